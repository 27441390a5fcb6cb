// Id-for-id agreement with HF's Rust tokenizers on the reference vectors, plus the DeepSeek-V3 model-input
// conventions (BOS, sizes, special ids).
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/tokenizer/tokenizer.h"
#include "test_util.h"

namespace dsv3 {
namespace {

const Tokenizer& deepseek() {
  static const Tokenizer t = Tokenizer::from_directory(testing::shared_data_dir() / "deepseek-v3-tokenizer");
  return t;
}

// tiny-4k has no tokenizer_config.json of its own; it shares the full tokenizer's special tokens.
const Tokenizer& tiny() {
  static const Tokenizer t =
      Tokenizer::from_directory(testing::shared_data_dir() / "deepseek-v3-tokenizer/tiny-4k");
  return t;
}

void check_vectors(const Tokenizer& tok, const std::filesystem::path& file) {
  std::ifstream in(file);
  ASSERT_TRUE(in) << file;
  std::string line;
  int cases = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    const std::string name = j.at("name"), text = j.at("text");
    const auto want = j.at("ids").get<std::vector<int32_t>>();
    const auto got = tok.encode(text);
    EXPECT_EQ(got, want) << "case " << name;
    if (j.value("decode_roundtrip", false)) {
      EXPECT_EQ(tok.decode(got), text) << "case " << name;
    }
    ++cases;
  }
  EXPECT_EQ(cases, 49);
}

TEST(TokenizerVectors, DeepSeekV3) {
  DSV3_REQUIRE_SHARED("deepseek-v3-tokenizer/test_vectors.jsonl");
  check_vectors(deepseek(), testing::shared_data_dir() / "deepseek-v3-tokenizer/test_vectors.jsonl");
}

TEST(TokenizerVectors, Tiny4k) {
  DSV3_REQUIRE_SHARED("deepseek-v3-tokenizer/tiny-4k/test_vectors.jsonl");
  check_vectors(tiny(), testing::shared_data_dir() / "deepseek-v3-tokenizer/tiny-4k/test_vectors.jsonl");
}

// Examples documented in deepseek-v3-tokenizer/README.md (reproduced there with HF's Rust tokenizers).
TEST(TokenizerVectors, DeepSeekReadmeExamples) {
  DSV3_REQUIRE_SHARED("deepseek-v3-tokenizer/tokenizer.json");
  EXPECT_EQ(deepseek().encode("Hello, world!"), (std::vector<int32_t>{19923, 14, 2058, 3}));
  EXPECT_EQ(
      deepseek().encode("Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"),
      (std::vector<int32_t>{19923, 3,   223,   5464, 5008, 1175,  19,   940,   223, 19,  438,   223, 20,
                            6113,  257, 76589, 131,  100,  76032, 1628, 76589, 131, 108, 76589, 131, 98}));
}

TEST(TokenizerVectors, DeepSeekModelConventions) {
  DSV3_REQUIRE_SHARED("deepseek-v3-tokenizer/tokenizer.json");
  const Tokenizer& t = deepseek();
  EXPECT_EQ(t.size(), 128815);
  EXPECT_EQ(t.bos_id(), 0);
  EXPECT_EQ(t.eos_id(), 1);
  EXPECT_TRUE(t.add_bos());
  EXPECT_FALSE(t.add_eos());
  EXPECT_EQ(t.encode_for_model("Hello, world!"), (std::vector<int32_t>{0, 19923, 14, 2058, 3}));
  EXPECT_EQ(t.encode_for_model(""), (std::vector<int32_t>{0}));
  EXPECT_EQ(t.token_to_id("<｜begin▁of▁sentence｜>"), 0);
  EXPECT_EQ(t.token_to_id("<|EOT|>"), 128805);
  EXPECT_EQ(t.token_to_id("<｜place▁holder▁no▁799｜>"), 128799);
  EXPECT_EQ(t.id_to_token(128803), "<｜User｜>");
  EXPECT_EQ(t.id_to_token(3), "!");
  EXPECT_EQ(t.token_to_id("no such token"), std::nullopt);
  EXPECT_EQ(t.id_to_token(999999), "");
  // Special tokens are matched in raw text even without add_special_tokens, and skipped on request in decode.
  const auto ids = t.encode("<｜begin▁of▁sentence｜>Hi<｜User｜>");
  ASSERT_GE(ids.size(), 3u);
  EXPECT_EQ(ids.front(), 0);
  EXPECT_EQ(ids.back(), 128803);
  EXPECT_EQ(t.decode(ids), "<｜begin▁of▁sentence｜>Hi<｜User｜>");
  EXPECT_EQ(t.decode(ids, /*skip_special_tokens=*/true), "Hi<｜User｜>");
}

TEST(TokenizerVectors, Tiny4kSize) {
  DSV3_REQUIRE_SHARED("deepseek-v3-tokenizer/tiny-4k/tokenizer.json");
  EXPECT_EQ(tiny().size(), 4274);
  EXPECT_EQ(tiny().token_to_id("<｜User｜>"), 4262);
}

TEST(TokenizerVectors, RejectsInvalidUtf8) {
  DSV3_REQUIRE_SHARED("deepseek-v3-tokenizer/tiny-4k/tokenizer.json");
  EXPECT_THROW(tiny().encode(std::string("ab\xff")), Error);
}

}  // namespace
}  // namespace dsv3
