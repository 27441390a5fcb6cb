// Id-for-id agreement with HF's Rust tokenizers on the reference vectors, plus the DeepSeek-V3 model-input
// conventions (BOS, sizes, special ids). Everything read here is bundled under data/.
#include <gtest/gtest.h>
#include <zlib.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/tokenizer/tokenizer.h"
#include "test_util.h"

namespace dsv3 {
namespace {

const Tokenizer& deepseek() {
  static const Tokenizer t = Tokenizer::from_directory(testing::data_dir() / "deepseek-v3-tokenizer");
  return t;
}

// tiny-4k's tokenizer_config.json is the full tokenizer's: the same special tokens.
const Tokenizer& tiny() {
  static const Tokenizer t = Tokenizer::from_directory(testing::data_dir() / "tiny-4k");
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
  check_vectors(deepseek(), testing::data_dir() / "deepseek-v3-tokenizer/test_vectors.jsonl");
}

TEST(TokenizerVectors, Tiny4k) {
  check_vectors(tiny(), testing::data_dir() / "tiny-4k/test_vectors.jsonl");
}

// Examples documented in data/deepseek-v3-tokenizer/README.md (reproduced there with HF's Rust tokenizers).
TEST(TokenizerVectors, DeepSeekReadmeExamples) {
  EXPECT_EQ(deepseek().encode("Hello, world!"), (std::vector<int32_t>{19923, 14, 2058, 3}));
  EXPECT_EQ(
      deepseek().encode("Hello! 毕老师！1 + 1 = 2 ĠÑĤÐ²ÑĬÑĢ"),
      (std::vector<int32_t>{19923, 3,   223,   5464, 5008, 1175,  19,   940,   223, 19,  438,   223, 20,
                            6113,  257, 76589, 131,  100,  76032, 1628, 76589, 131, 108, 76589, 131, 98}));
}

TEST(TokenizerVectors, DeepSeekModelConventions) {
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
  EXPECT_EQ(tiny().size(), 4274);
  EXPECT_EQ(tiny().token_to_id("<｜User｜>"), 4262);
}

TEST(TokenizerVectors, RejectsInvalidUtf8) {
  EXPECT_THROW(tiny().encode(std::string("ab\xff")), Error);
}

// A directory holding tokenizer.json.gz loads as the plain file does; a truncated one is refused by name.
TEST(TokenizerVectors, LoadsGzipTokenizerJson) {
  const auto dir = testing::scratch_dir();
  const std::string plain = testing::slurp(testing::data_dir() / "tiny-4k/tokenizer.json");
  ASSERT_FALSE(plain.empty());
  gzFile gz = gzopen((dir / "tokenizer.json.gz").c_str(), "wb");
  ASSERT_TRUE(gz);
  ASSERT_EQ(gzwrite(gz, plain.data(), plain.size()), static_cast<int>(plain.size()));
  ASSERT_EQ(gzclose(gz), Z_OK);
  std::filesystem::copy_file(testing::data_dir() / "tiny-4k/tokenizer_config.json",
                             dir / "tokenizer_config.json");
  const Tokenizer t = Tokenizer::from_directory(dir);
  EXPECT_EQ(t.size(), tiny().size());
  EXPECT_EQ(t.bos_id(), tiny().bos_id());
  check_vectors(t, testing::data_dir() / "tiny-4k/test_vectors.jsonl");

  const std::string packed = testing::slurp(dir / "tokenizer.json.gz");
  std::ofstream(dir / "tokenizer.json.gz", std::ios::binary | std::ios::trunc)
      << packed.substr(0, packed.size() / 2);
  try {
    Tokenizer::from_directory(dir);
    ADD_FAILURE() << "a truncated tokenizer.json.gz loaded";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tokenizer.json.gz is not a complete gzip file"), std::string::npos)
        << e.what();
  }
  std::filesystem::remove(dir / "tokenizer.json.gz");
  EXPECT_THROW(Tokenizer::from_directory(dir), Error);
}

}  // namespace
}  // namespace dsv3
