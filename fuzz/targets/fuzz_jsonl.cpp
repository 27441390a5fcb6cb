// A JSONL input file -> LineReader -> encode_jsonl_line, exactly as `dsv3 preprocess` reads and encodes each
// line, with the bundled tiny-4k tokenizer. Inputs starting with the gzip magic are read as a .gz file (the
// reader decompresses those). Inputs of odd size are read with --json-keys text title (two keys).
#include "core/error.h"
#include "data/line_reader.h"
#include "data/preprocess.h"
#include "data/tokenizer/tokenizer.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const dsv3::Tokenizer tok = dsv3::Tokenizer::from_directory(DSV3_SOURCE_DIR "/data/tiny-4k");
  const bool gz = size >= 2 && data[0] == 0x1f && data[1] == 0x8b;
  const auto path = dsv3_fuzz::scratch_dir() / (gz ? "input.jsonl.gz" : "input.jsonl");
  dsv3_fuzz::write_file(path, {reinterpret_cast<const char*>(data), size});
  dsv3::PreprocessOptions opt;
  opt.append_eod = true;
  if (size % 2 == 1) opt.json_keys = {"text", "title"};
  try {
    dsv3::LineReader reader({path.string()});
    std::string line;
    while (reader.next(line)) (void)dsv3::encode_jsonl_line(line, opt, tok, tok.eos_id());
  } catch (const dsv3::Error&) {
  }
  return 0;
}
