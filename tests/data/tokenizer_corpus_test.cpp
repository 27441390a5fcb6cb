// Whole-corpus checks: every document of sotu/foldoc against the HF reference stats (DeepSeek-V3), GPT-2
// decode(encode(x)) == x, and two threads sharing one Tokenizer.
#include <gtest/gtest.h>

#include <bit>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/sha256.h"
#include "data/tokenizer/tokenizer.h"
#include "test_util.h"

namespace dsv3 {
namespace {

std::vector<std::string> read_docs(const std::string& name) {
  std::ifstream in(testing::shared_data_dir() / "corpus" / name);
  std::vector<std::string> docs;
  std::string line;
  while (std::getline(in, line)) docs.push_back(nlohmann::json::parse(line).at("text").get<std::string>());
  return docs;
}

const Tokenizer& deepseek() {
  static const Tokenizer t = Tokenizer::from_directory(testing::shared_data_dir() / "deepseek-v3-tokenizer");
  return t;
}

static_assert(std::endian::native == std::endian::little, "ids are hashed as uint32 little-endian");

void check_corpus(const std::string& corpus) {
  const auto docs = read_docs(corpus + ".jsonl");
  std::ifstream stats(testing::shared_data_dir() / "corpus" / (corpus + ".deepseek-v3.stats.jsonl"));
  ASSERT_TRUE(stats);
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(stats, line);) lines.push_back(nlohmann::json::parse(line));
  ASSERT_EQ(lines.size(), docs.size() + 1);

  Sha256 all;
  int64_t n_tokens = 0, utf8_bytes = 0;
  int mismatches = 0;
  std::vector<int32_t> ids;
  for (size_t i = 0; i < docs.size(); ++i) {
    ids.clear();
    deepseek().encode_append(docs[i], ids);  // the stats have no BOS
    const std::string digest = sha256_hex({reinterpret_cast<const char*>(ids.data()), ids.size() * 4});
    all.update(ids.data(), ids.size() * 4);
    n_tokens += static_cast<int64_t>(ids.size());
    utf8_bytes += static_cast<int64_t>(docs[i].size());
    const auto& want = lines[i];
    ASSERT_EQ(want.at("doc").get<size_t>(), i);
    if (want.at("n_tokens").get<size_t>() != ids.size() || want.at("sha256_u32le") != digest) {
      if (++mismatches <= 5) {
        ADD_FAILURE() << corpus << " doc " << i << ": " << ids.size() << " tokens, want "
                      << want.at("n_tokens");
      }
    }
  }
  EXPECT_EQ(mismatches, 0);
  const auto& total = lines.back().at("total");
  EXPECT_EQ(total.at("docs").get<size_t>(), docs.size());
  EXPECT_EQ(total.at("n_tokens").get<int64_t>(), n_tokens);
  EXPECT_EQ(total.at("utf8_bytes").get<int64_t>(), utf8_bytes);
  EXPECT_EQ(total.at("sha256_u32le_concat").get<std::string>(), all.hex_digest());
}

TEST(TokenizerCorpus, SotuMatchesReferenceStats) {
  DSV3_REQUIRE_SHARED("corpus/sotu.deepseek-v3.stats.jsonl");
  DSV3_REQUIRE_SHARED("deepseek-v3-tokenizer/tokenizer.json");
  check_corpus("sotu");
}

TEST(TokenizerCorpus, FoldocMatchesReferenceStats) {
  DSV3_REQUIRE_SHARED("corpus/foldoc.deepseek-v3.stats.jsonl");
  DSV3_REQUIRE_SHARED("deepseek-v3-tokenizer/tokenizer.json");
  check_corpus("foldoc");
}

TEST(TokenizerCorpus, Gpt2RoundTrip) {
  DSV3_REQUIRE_SHARED("gpt2-tokenizer/tokenizer.json");
  DSV3_REQUIRE_SHARED("corpus/sotu.jsonl");
  const Tokenizer gpt2 = Tokenizer::from_directory(testing::shared_data_dir() / "gpt2-tokenizer");
  EXPECT_EQ(gpt2.size(), 50257);
  EXPECT_EQ(gpt2.bos_id(), 50256);
  EXPECT_EQ(gpt2.eos_id(), 50256);
  EXPECT_FALSE(gpt2.add_bos());
  EXPECT_EQ(gpt2.encode_for_model("<|endoftext|>"), (std::vector<int32_t>{50256}));
  for (const char* corpus : {"sotu.jsonl", "foldoc.jsonl"}) {
    int failures = 0;
    for (const auto& doc : read_docs(corpus)) {
      if (gpt2.decode(gpt2.encode(doc)) != doc && ++failures <= 3)
        ADD_FAILURE() << corpus << ": " << doc.substr(0, 80);
    }
    EXPECT_EQ(failures, 0) << corpus;
  }
}

TEST(TokenizerCorpus, TwoThreadsAgree) {
  DSV3_REQUIRE_SHARED("corpus/foldoc.jsonl");
  DSV3_REQUIRE_SHARED("deepseek-v3-tokenizer/tokenizer.json");
  auto docs = read_docs("foldoc.jsonl");
  docs.resize(3000);
  // A fresh tokenizer so both threads start with an empty word cache and race on filling it.
  const Tokenizer tok = Tokenizer::from_directory(testing::shared_data_dir() / "deepseek-v3-tokenizer");
  std::vector<std::vector<int32_t>> out[2];
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (const auto& d : docs) out[t].push_back(tok.encode(d));
    });
  }
  for (auto& th : threads) th.join();
  EXPECT_EQ(out[0], out[1]);
  for (size_t i = 0; i < docs.size(); i += 97)
    EXPECT_EQ(out[0][i], deepseek().encode(docs[i])) << "doc " << i;
}

}  // namespace
}  // namespace dsv3
