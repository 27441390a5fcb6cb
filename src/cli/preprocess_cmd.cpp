// `dsv3 preprocess`: the flags of Megatron's tools/preprocess_data.py, mapped onto dsv3::preprocess.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <iostream>

#include "cli/commands.h"
#include "core/error.h"
#include "data/preprocess.h"

namespace dsv3::cli {

int preprocess_main(int argc, char** argv) {
  CLI::App app{"Tokenize JSONL into Megatron .bin/.idx (flags of Megatron's tools/preprocess_data.py)",
               "dsv3 preprocess"};
  PreprocessOptions o;
  std::string tokenizer_type;
  int64_t seq_length = 0;
  bool read_only_input_path = false;
  app.add_option("--input", o.input, "Input JSONL file, .gz file or glob pattern")->required();
  app.add_option("--output-prefix", o.output_prefix, "Output prefix; writes {prefix}_{key}_document.bin/.idx")
      ->required();
  app.add_option("--tokenizer-type", tokenizer_type, "Only HuggingFaceTokenizer")->required();
  app.add_option("--tokenizer-model", o.tokenizer_model, "HuggingFace tokenizer directory")->required();
  app.add_option("--workers", o.workers, "Tokenizer threads")->required();
  app.add_option("--partitions", o.partitions, "Megatron partitions: line n goes to partition n % P");
  app.add_flag("--append-eod", o.append_eod, "Append the EOS token to each non-empty document");
  app.add_option("--json-keys", o.json_keys, "Keys to tokenize (one output pair per key)")->expected(1, -1);
  app.add_option("--log-interval", o.log_interval, "Print progress every N documents");
  app.add_flag("--keep-sequential-samples", o.keep_sequential_samples,
               "Contiguous instead of round-robin partitions");
  app.add_flag("--skip-bad-lines", o.skip_bad_lines,
               "Skip malformed lines (counted and reported) instead of stopping");
  app.add_option("--seq-length", seq_length,
                 "Accepted for compatibility: a warning threshold only, no truncation");
  app.add_flag("--read-only-input-path", read_only_input_path,
               "Accepted for compatibility: dsv3 writes no files next to the input anyway");
  // Megatron options dsv3 does not implement: present so that using them is an error naming them.
  const char* unsupported[][2] = {{"--split-sentences", "NLTK sentence splitting"},
                                  {"--keep-newlines", "NLTK sentence splitting"},
                                  {"--lang", "NLTK sentence splitting"},
                                  {"--binarize-only", "pre-tokenized input"},
                                  {"--vocab-file", "non-HuggingFace tokenizers"},
                                  {"--merge-file", "non-HuggingFace tokenizers"},
                                  {"--vocab-size", "non-HuggingFace tokenizers"},
                                  {"--vocab-extra-ids", "non-HuggingFace tokenizers"},
                                  {"--tiktoken-pattern", "TikTokenizer"},
                                  {"--tiktoken-num-special-tokens", "TikTokenizer"},
                                  {"--tiktoken-special-tokens", "TikTokenizer"}};
  std::vector<std::pair<CLI::Option*, std::string>> rejected;
  for (auto& u : unsupported) {
    auto* opt = app.add_option(u[0])->expected(0, -1)->group("");
    rejected.emplace_back(opt, std::string(u[0]) + " is not supported by dsv3 preprocess (" + u[1] + ")");
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  for (auto& [opt, msg] : rejected) DSV3_CHECK(opt->count() == 0, msg);
  DSV3_CHECK(tokenizer_type == "HuggingFaceTokenizer", "--tokenizer-type ", tokenizer_type,
             " is not supported; dsv3 preprocess implements HuggingFaceTokenizer");

  auto log = [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); };
  PreprocessStats st = preprocess(o, log);
  std::printf("Done: %lld documents, %lld tokens, %.2f MB in %.2f s (%.2f MB/s, %.0f tokens/s)\n",
              static_cast<long long>(st.documents), static_cast<long long>(st.tokens), st.bytes / 1048576.0,
              st.seconds, st.bytes / 1048576.0 / st.seconds, st.tokens / st.seconds);
  if (st.bad_lines) {
    std::printf("Skipped %lld bad lines; first:\n", static_cast<long long>(st.bad_lines));
    for (const auto& b : st.first_bad) std::printf("  %s\n", b.c_str());
  }
  for (const auto& p : st.outputs) std::printf("Wrote %s.bin and %s.idx\n", p.c_str(), p.c_str());
  return 0;
}

}  // namespace dsv3::cli
