// Whole-corpus checks against HF `tokenizers` reference statistics (per-document token counts and id hashes):
// the bundled slices (data/*-slice, stats by tests/reference/corpus_stats.py in tests/golden/corpus) always,
// the full corpora too where ../shared/data has them. GPT-2 decode(encode(x)) == x, and two threads sharing
// one Tokenizer.
#include <gtest/gtest.h>

#include <bit>
#include <fstream>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/sha256.h"
#include "data/line_reader.h"
#include "data/tokenizer/tokenizer.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

const fs::path kGolden = testing::source_dir() / "tests/golden/corpus";
const fs::path kSotuSlice = testing::data_dir() / "sotu-slice/sotu-slice.jsonl";
const fs::path kFoldocSlice = testing::data_dir() / "foldoc-slice/foldoc-slice.jsonl.gz";

// The "text" of every line of a JSONL file, plain or gzip (read as preprocess reads its input).
std::vector<std::string> read_docs(const fs::path& file) {
  LineReader reader({file.string()});
  std::vector<std::string> docs;
  for (std::string line; reader.next(line);)
    docs.push_back(nlohmann::json::parse(line).at("text").get<std::string>());
  return docs;
}

// The bundled copies (tokenizer.json.gz): byte-identical, once decompressed, to ../shared/data's.
const Tokenizer& deepseek() {
  static const Tokenizer t = Tokenizer::from_directory(testing::data_dir() / "deepseek-v3-tokenizer");
  return t;
}
const Tokenizer& gpt2() {
  static const Tokenizer t = Tokenizer::from_directory(testing::data_dir() / "gpt2-tokenizer");
  return t;
}

static_assert(std::endian::native == std::endian::little, "ids are hashed as uint32 little-endian");

void check_corpus(const Tokenizer& tok, const fs::path& corpus, const fs::path& stats_file) {
  SCOPED_TRACE(corpus.string());
  const auto docs = read_docs(corpus);
  std::ifstream stats(stats_file);
  ASSERT_TRUE(stats) << stats_file;
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(stats, line);) lines.push_back(nlohmann::json::parse(line));
  ASSERT_GT(docs.size(), 0u);
  ASSERT_EQ(lines.size(), docs.size() + 1);

  Sha256 all;
  int64_t n_tokens = 0, utf8_bytes = 0;
  int mismatches = 0;
  std::vector<int32_t> ids;
  for (size_t i = 0; i < docs.size(); ++i) {
    ids.clear();
    tok.encode_append(docs[i], ids);  // the stats have no BOS
    const std::string digest = sha256_hex({reinterpret_cast<const char*>(ids.data()), ids.size() * 4});
    all.update(ids.data(), ids.size() * 4);
    n_tokens += static_cast<int64_t>(ids.size());
    utf8_bytes += static_cast<int64_t>(docs[i].size());
    const auto& want = lines[i];
    ASSERT_EQ(want.at("doc").get<size_t>(), i);
    if (want.at("n_tokens").get<size_t>() != ids.size() || want.at("sha256_u32le") != digest) {
      if (++mismatches <= 5)
        ADD_FAILURE() << "doc " << i << ": " << ids.size() << " tokens, want " << want.at("n_tokens");
    }
  }
  EXPECT_EQ(mismatches, 0);
  const auto& total = lines.back().at("total");
  EXPECT_EQ(total.at("docs").get<size_t>(), docs.size());
  EXPECT_EQ(total.at("n_tokens").get<int64_t>(), n_tokens);
  EXPECT_EQ(total.at("utf8_bytes").get<int64_t>(), utf8_bytes);
  EXPECT_EQ(total.at("sha256_u32le_concat").get<std::string>(), all.hex_digest());
}

// The full corpus and its stats from ../shared/data, where both are present.
void check_full_corpus_if_shared(const std::string& corpus) {
  const auto docs = testing::shared_data_file("corpus/" + corpus + ".jsonl");
  const auto stats = testing::shared_data_file("corpus/" + corpus + ".deepseek-v3.stats.jsonl");
  if (!docs || !stats) return;
  ::testing::Test::RecordProperty("full_corpus", docs->string());
  check_corpus(deepseek(), *docs, *stats);
}

TEST(TokenizerCorpus, SotuMatchesReferenceStats) {
  check_corpus(deepseek(), kSotuSlice, kGolden / "sotu-slice.deepseek-v3.stats.jsonl");
  check_full_corpus_if_shared("sotu");
}

TEST(TokenizerCorpus, FoldocMatchesReferenceStats) {
  check_corpus(deepseek(), kFoldocSlice, kGolden / "foldoc-slice.deepseek-v3.stats.jsonl");
  check_full_corpus_if_shared("foldoc");
}

TEST(TokenizerCorpus, Gpt2MatchesReferenceStats) {
  check_corpus(gpt2(), kSotuSlice, kGolden / "sotu-slice.gpt2.stats.jsonl");
}

TEST(TokenizerCorpus, Gpt2RoundTrip) {
  EXPECT_EQ(gpt2().size(), 50257);
  EXPECT_EQ(gpt2().bos_id(), 50256);
  EXPECT_EQ(gpt2().eos_id(), 50256);
  EXPECT_FALSE(gpt2().add_bos());
  EXPECT_EQ(gpt2().encode_for_model("<|endoftext|>"), (std::vector<int32_t>{50256}));
  std::vector<fs::path> corpora = {kSotuSlice, kFoldocSlice};
  for (const char* full : {"corpus/sotu.jsonl", "corpus/foldoc.jsonl"})
    if (auto p = testing::shared_data_file(full)) corpora.push_back(*p);
  for (const auto& corpus : corpora) {
    int failures = 0;
    for (const auto& doc : read_docs(corpus)) {
      if (gpt2().decode(gpt2().encode(doc)) != doc && ++failures <= 3)
        ADD_FAILURE() << corpus << ": " << doc.substr(0, 80);
    }
    EXPECT_EQ(failures, 0) << corpus;
  }
}

TEST(TokenizerCorpus, TwoThreadsAgree) {
  const auto docs = read_docs(kFoldocSlice);
  ASSERT_GT(docs.size(), 2000u);
  // A fresh tokenizer so both threads start with an empty word cache and race on filling it.
  const Tokenizer tok = Tokenizer::from_directory(testing::data_dir() / "deepseek-v3-tokenizer");
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
