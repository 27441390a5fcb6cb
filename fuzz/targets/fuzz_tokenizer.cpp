// tokenizer.json (+ tokenizer_config.json) -> Tokenizer::from_json_strings, then encode/decode of a text.
// Input: tokenizer.json, then optionally (after the part separator) tokenizer_config.json and a text.
#include "core/error.h"
#include "data/tokenizer/tokenizer.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = dsv3_fuzz::split_parts(data, size, 3);
  try {
    const dsv3::Tokenizer tok = dsv3::Tokenizer::from_json_strings(parts[0], parts[1]);
    const std::string_view text =
        parts[2].empty() ? std::string_view("Hello world, 1234 <|x|>\n\tend") : parts[2];
    const std::vector<int32_t> ids = tok.encode_for_model(text);
    (void)tok.decode(ids, false);
    (void)tok.decode(ids, true);
    for (int32_t id : ids) (void)tok.id_to_token(id);
    (void)tok.size();
  } catch (const dsv3::Error&) {
  }
  return 0;
}
