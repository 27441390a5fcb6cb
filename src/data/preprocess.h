// `dsv3 preprocess`: JSONL -> Megatron .bin/.idx, with the semantics of Megatron's tools/preprocess_data.py.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

struct PreprocessOptions {
  std::string input;  // path or glob; .gz files are decompressed
  std::string output_prefix;
  std::string tokenizer_model;  // HF tokenizer directory
  std::vector<std::string> json_keys{"text"};
  int workers = 1;
  int partitions = 1;
  bool append_eod = false;
  bool keep_sequential_samples = false;
  bool skip_bad_lines = false;
  int64_t log_interval = 1000;
};

struct PreprocessStats {
  int64_t documents = 0;               // lines turned into documents
  int64_t bad_lines = 0;               // skipped with skip_bad_lines
  std::vector<std::string> first_bad;  // "file:line: reason" of the first few
  int64_t bytes = 0;                   // input bytes read (lines with their newline)
  int64_t tokens = 0;                  // over all keys
  double seconds = 0;
  std::vector<std::string> outputs;  // final prefixes written, one per key
};

class Tokenizer;

// One JSONL line as the workers encode it: every key's sentences' ids, key after key.
struct EncodedLine {
  std::vector<int32_t> ids;           // all keys' ids, key after key
  std::vector<int32_t> lengths;       // sequence lengths, key after key
  std::vector<uint32_t> key_seq_end;  // per key: end index into lengths
  std::string error;                  // non-empty: the line is bad (the job stops or skips it)
};

// Encodes one line exactly as preprocess() does for each input line (the JSON parse, the key lookups and
// the tokenizer), with opt.json_keys and opt.append_eod (eod is the tokenizer's EOS, required then). A
// bad line is reported in .error, never thrown; the tokenizer may still throw dsv3::Error (invalid UTF-8).
// preprocess() itself reuses one parser per worker; this entry point (for the fuzz target and tests) makes
// its own.
EncodedLine encode_jsonl_line(std::string_view line, const PreprocessOptions& opt, const Tokenizer& tok,
                              std::optional<int32_t> eod);

// Runs the whole job. Progress goes to `log` (stderr in the CLI). Throws dsv3::Error on bad input, leaving
// nothing under the final output names.
PreprocessStats preprocess(const PreprocessOptions& opt, const std::function<void(const std::string&)>& log);

// The output prefix Megatron derives for one key: {prefix}_{key}_document.
std::string output_prefix_for_key(const std::string& prefix, const std::string& key);

}  // namespace dsv3
