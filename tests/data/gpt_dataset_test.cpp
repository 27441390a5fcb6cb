// GPT/blended dataset sample order against Megatron-Core's own indices, cache files and samples
// (tests/golden/megatron_dataset, written by tests/reference/megatron_dataset_golden.py).
#include "data/gpt_dataset.h"

#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "data/blended_dataset.h"
#include "data/indexed_dataset.h"
#include "data/megatron_random.h"
#include "data/npy.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
const fs::path kGolden = testing::source_dir() / "tests/golden/megatron_dataset";

std::string slurp(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  EXPECT_TRUE(f.good()) << p;
  return {std::istreambuf_iterator<char>(f), {}};
}

std::vector<std::vector<int64_t>> read_samples(const fs::path& p) {
  std::vector<std::vector<int64_t>> out;
  std::ifstream f(p);
  std::string line;
  while (std::getline(f, line)) {
    std::istringstream is(line);
    std::vector<int64_t> v;
    int64_t x;
    while (is >> x) v.push_back(x);
    out.push_back(v);
  }
  return out;
}

nlohmann::json manifest() {
  std::ifstream f(kGolden / "cases.json");
  return nlohmann::json::parse(f);
}

// The golden prefixes are relative ("corpus_a"), as they entered Megatron's descriptions: run inside kGolden.
class GptDatasetGolden : public ::testing::Test {
 protected:
  void SetUp() override {
    old_ = fs::current_path();
    fs::current_path(kGolden);
    m_ = manifest();
  }
  void TearDown() override { fs::current_path(old_); }

  GptDatasetConfig config(const nlohmann::json& c, std::optional<std::string> cache, CacheHash h) const {
    GptDatasetConfig cfg;
    cfg.random_seed = c["seed"].get<int64_t>();
    cfg.sequence_length = m_["seq_length"].get<int64_t>();
    cfg.split = c["split"].get<std::string>();
    cfg.tokenizer_path = m_["tokenizer_path"].get<std::string>();
    cfg.path_to_cache = std::move(cache);
    cfg.cache_hash = h;
    return cfg;
  }
  std::unique_ptr<SampleDataset> build(const nlohmann::json& c, const std::string& split,
                                       std::optional<std::string> cache,
                                       CacheHash h = CacheHash::kMd5) const {
    int s = static_cast<int>(parse_split_name(split));
    return build_split_dataset(parse_data_path(c["data_path"].get<std::vector<std::string>>()),
                               parse_split_name(split), c["sizes"][s].get<int64_t>(), config(c, cache, h));
  }
  static std::vector<const GptDataset*> gpts(const SampleDataset& ds) {
    if (auto* b = dynamic_cast<const BlendedDataset*>(&ds)) {
      std::vector<const GptDataset*> v;
      for (size_t i = 0; i < b->num_datasets(); ++i) v.push_back(&b->dataset(i));
      return v;
    }
    return {dynamic_cast<const GptDataset*>(&ds)};
  }

  fs::path old_;
  nlohmann::json m_;
};

// Every case and split: the same description text, hash, file names, .npy bytes and index arrays.
TEST_F(GptDatasetGolden, IndicesAndCacheFilesMatchMegatron) {
  int checked = 0;
  for (const auto& c : m_["cases"]) {
    const std::string name = c["name"];
    const fs::path golden_cache = kGolden / name / "cache";
    for (const auto& [split, info] : c["splits"].items()) {
      SCOPED_TRACE(name + "/" + split);
      const fs::path ours = testing::scratch_dir() / (name + "_" + split);
      auto ds = build(c, split, ours.string());
      ASSERT_EQ(ds->size(), info["num_samples"].get<int64_t>());
      auto parts = gpts(*ds);
      ASSERT_EQ(parts.size(), info["gpt"].size());
      for (size_t i = 0; i < parts.size(); ++i) {
        const GptDataset& g = *parts[i];
        const auto& gi = info["gpt"][i];
        EXPECT_FALSE(g.loaded_from_cache());
        EXPECT_EQ(g.description_hash(), gi["md5"].get<std::string>());
        EXPECT_EQ(g.size(), gi["length"].get<int64_t>());
        const std::string base = g.description_hash() + "-GPTDataset-" + split + "-";
        EXPECT_EQ(fs::path(g.cache_path("description.txt")), ours / (base + "description.txt"));
        EXPECT_EQ(g.description(), slurp(golden_cache / (base + "description.txt")));
        EXPECT_EQ(slurp(ours / (base + "description.txt")), slurp(golden_cache / (base + "description.txt")));
        for (const char* f : {"document_index.npy", "shuffle_index.npy"})
          EXPECT_TRUE(slurp(ours / (base + f)) == slurp(golden_cache / (base + f))) << f;
        auto di = read_npy((golden_cache / (base + "document_index.npy")).string());
        auto si = read_npy((golden_cache / (base + "sample_index.npy")).string());
        auto sh = read_npy((golden_cache / (base + "shuffle_index.npy")).string());
        EXPECT_EQ(g.document_index(), di.as<int32_t>());
        EXPECT_EQ(g.sample_index(), si.as_int64());
        EXPECT_EQ(g.shuffle_index(), sh.as_int64());
        EXPECT_EQ(di.descr, "<i4");
        EXPECT_EQ(sh.descr, "<u4");
        // The seed system's helpers.cpp stores sample_index as int32 when it fits (spec §4.4); Megatron-Core
        // 0.8.0, which made these files, always used int64. Same values; the bytes must match in either
        // dtype.
        EXPECT_EQ(read_npy(g.cache_path("sample_index.npy")).descr, "<i4");
        const auto rewritten = (ours / "sample_index_as_golden_dtype.npy").string();
        if (si.descr == "<i8")
          write_npy(rewritten, g.sample_index(), si.shape);
        else
          write_npy(rewritten, std::vector<int32_t>(g.sample_index().begin(), g.sample_index().end()),
                    si.shape);
        EXPECT_TRUE(slurp(rewritten) == slurp(golden_cache / (base + "sample_index.npy")));
        ++checked;
      }
      if (auto* b = dynamic_cast<const BlendedDataset*>(ds.get())) {
        const auto& bi = info["blend"];
        EXPECT_EQ(b->description_hash(), bi["md5"].get<std::string>());
        EXPECT_EQ(b->size(), bi["size"].get<int64_t>());
        EXPECT_EQ(b->weights(), bi["weights"].get<std::vector<double>>());
        const std::string base = b->description_hash() + "-BlendedDataset-" + split + "-";
        EXPECT_EQ(b->description(), slurp(golden_cache / (base + "description.txt")));
        for (const char* f : {"description.txt", "dataset_index.npy", "dataset_sample_index.npy"})
          EXPECT_TRUE(slurp(ours / (base + f)) == slurp(golden_cache / (base + f))) << f;
        EXPECT_EQ(b->dataset_index(),
                  read_npy((golden_cache / (base + "dataset_index.npy")).string()).as<int16_t>());
        EXPECT_EQ(b->dataset_sample_index(),
                  read_npy((golden_cache / (base + "dataset_sample_index.npy")).string()).as<int64_t>());
      }
    }
  }
  EXPECT_GE(checked, 12);
}

TEST_F(GptDatasetGolden, SamplesMatchMegatron) {
  for (const auto& c : m_["cases"]) {
    for (const auto& [split, info] : c["splits"].items()) {
      SCOPED_TRACE(c["name"].get<std::string>() + "/" + split);
      auto ds = build(c, split, (testing::scratch_dir() / "cache").string());
      auto want = read_samples(kGolden / c["name"].get<std::string>() / (split + "_samples.txt"));
      ASSERT_EQ(static_cast<int64_t>(want.size()), info["samples_written"].get<int64_t>());
      for (size_t i = 0; i < want.size(); ++i) {
        auto got = ds->sample(static_cast<int64_t>(i));
        ASSERT_EQ(got.size(), static_cast<size_t>(m_["seq_length"].get<int64_t>() + 1));
        ASSERT_EQ(got, want[i]) << "sample " << i;
      }
    }
  }
}

// The cases exercise what their names say.
TEST_F(GptDatasetGolden, EpochCasesCoverBothFinalEpochModes) {
  std::map<std::string, std::pair<int64_t, bool>> seen;
  for (const auto& c : m_["cases"]) {
    auto ds = build(c, "train", (testing::scratch_dir() / "cache").string());
    auto g = gpts(*ds)[0];
    seen[c["name"]] = {g->num_epochs(), g->separate_final_epoch()};
  }
  EXPECT_EQ(seen["one_epoch"], (std::pair<int64_t, bool>{1, false}));
  EXPECT_EQ(seen["epochs_separate"], (std::pair<int64_t, bool>{3, true}));
  EXPECT_EQ(seen["epochs_joint"], (std::pair<int64_t, bool>{3, false}));
}

// Megatron's own cache directory is a hit for us (all files present) and gives the same samples; our cache
// written on a miss is a hit on the next build.
TEST_F(GptDatasetGolden, CacheHitsOnMegatronFilesAndOnOurOwn) {
  for (const auto& c : m_["cases"]) {
    const std::string name = c["name"];
    SCOPED_TRACE(name);
    auto want = read_samples(kGolden / name / "train_samples.txt");
    // Megatron's directory: read-only use.
    auto theirs = build(c, "train", (kGolden / name / "cache").string());
    for (auto* g : gpts(*theirs)) EXPECT_TRUE(g->loaded_from_cache());
    if (auto* b = dynamic_cast<const BlendedDataset*>(theirs.get())) {
      EXPECT_TRUE(b->loaded_from_cache());
    }
    for (size_t i = 0; i < want.size(); ++i) ASSERT_EQ(theirs->sample(static_cast<int64_t>(i)), want[i]);
    // Ours: miss, then hit, equal arrays.
    const auto dir = (testing::scratch_dir() / name).string();
    auto first = build(c, "train", dir, CacheHash::kSha256);
    auto second = build(c, "train", dir, CacheHash::kSha256);
    auto a = gpts(*first), b = gpts(*second);
    for (size_t i = 0; i < a.size(); ++i) {
      EXPECT_FALSE(a[i]->loaded_from_cache());
      EXPECT_TRUE(b[i]->loaded_from_cache());
      EXPECT_EQ(a[i]->document_index(), b[i]->document_index());
      EXPECT_EQ(a[i]->sample_index(), b[i]->sample_index());
      EXPECT_EQ(a[i]->shuffle_index(), b[i]->shuffle_index());
    }
    if (auto* bb = dynamic_cast<const BlendedDataset*>(second.get())) {
      EXPECT_TRUE(bb->loaded_from_cache());
    }
    for (int64_t i = 0; i < second->size(); ++i) ASSERT_EQ(second->sample(i), first->sample(i));
  }
}

// The seed system (Intel Gaudi Megatron-LM) names cache files by sha256 of the same description.
TEST_F(GptDatasetGolden, DefaultHashIsSha256OfMegatronDescription) {
  const auto& c = m_["cases"][0];
  auto ds = build(c, "train", (testing::scratch_dir() / "c").string(), CacheHash::kSha256);
  auto g = gpts(*ds)[0];
  EXPECT_EQ(g->description_hash(), c["splits"]["train"]["gpt"][0]["sha256"].get<std::string>());
  EXPECT_TRUE(fs::exists(g->cache_path("shuffle_index.npy")));
  EXPECT_EQ(GptDatasetConfig{}.cache_hash, CacheHash::kSha256);
}

// Without --data-cache-path the cache goes to <prefix>/cache/GPTDataset_indices, as in Megatron.
TEST(GptDataset, DefaultCacheDirectoryIsUnderThePrefix) {
  const auto dir = testing::scratch_dir();
  fs::copy(kGolden / "corpus_a.bin", dir / "corpus_a.bin");
  fs::copy(kGolden / "corpus_a.idx", dir / "corpus_a.idx");
  GptDatasetConfig cfg;
  cfg.sequence_length = 16;
  cfg.split = "1";
  cfg.tokenizer_path = "tok";
  const std::string prefix = (dir / "corpus_a").string();
  auto ds = build_split_dataset(parse_data_path({prefix}), Split::kTrain, 10, cfg);
  auto* g = dynamic_cast<const GptDataset*>(ds.get());
  ASSERT_NE(g, nullptr);
  EXPECT_EQ(fs::path(g->cache_dir()), dir / "corpus_a" / "cache" / "GPTDataset_indices");
  EXPECT_TRUE(fs::is_regular_file(g->cache_path("description.txt")));
}

// Runs `dsv3 data samples ARGS` in `cwd`; stdout+stderr go to `log`.
int run_cli(const std::string& args, const fs::path& cwd, const fs::path& log, std::string* output) {
  std::string cmd = "cd '" + cwd.string() + "' && '" + testing::dsv3_binary().string() + "' data samples " +
                    args + " > '" + log.string() + "' 2>&1";
  int rc = std::system(cmd.c_str());
  if (output) *output = slurp(log);
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

TEST(GptDatasetCli, SamplesMatchMegatron) {
  const auto m = manifest();
  const auto dir = testing::scratch_dir();
  for (const auto& c : m["cases"]) {
    const std::string name = c["name"];
    if (name != "split_80_15_5" && name != "blend") continue;
    for (const auto& [split, info] : c["splits"].items()) {
      SCOPED_TRACE(name + "/" + split);
      const int s = static_cast<int>(parse_split_name(split));
      const auto out = dir / (name + split + ".txt");
      std::string data_path;
      for (const auto& t : c["data_path"]) data_path += " " + t.get<std::string>();
      std::ostringstream args;
      args << "--data-path" << data_path << " --split '" << c["split"].get<std::string>() << "' --seq-length "
           << m["seq_length"] << " --seed " << c["seed"] << " --num-samples " << c["sizes"][s]
           << " --index-split " << split << " --tokenizer-model " << m["tokenizer_path"].get<std::string>()
           << " --output '" << out.string() << "' --data-cache-path '" << (dir / "cache").string()
           << "' --cache-hash md5";
      std::string log;
      ASSERT_EQ(run_cli(args.str(), kGolden, dir / "cli.log", &log), 0) << log;
      auto got = read_samples(out);
      auto want = read_samples(kGolden / name / (split + "_samples.txt"));
      ASSERT_EQ(got.size(), c["sizes"][s].get<size_t>());
      for (size_t i = 0; i < std::min(want.size(), got.size()); ++i)
        ASSERT_EQ(got[i], want[i]) << "sample " << i;
    }
  }
}

TEST(GptDatasetCli, BadInputsGiveClearErrors) {
  const auto dir = testing::scratch_dir();
  const auto lg = dir / "cli.log";
  const std::string base = "--data-path corpus_a --split 1 --seed 1 --tokenizer-model t --output '" +
                           (dir / "o.txt").string() + "' --data-cache-path '" + (dir / "c").string() + "'";
  std::string log;
  EXPECT_EQ(run_cli(base + " --seq-length 8 --num-samples 4 --index-split bogus", kGolden, lg, &log), 1);
  EXPECT_NE(log.find("unknown index split 'bogus'"), std::string::npos) << log;
  EXPECT_EQ(run_cli(base + " --seq-length 0 --num-samples 4", kGolden, lg, &log), 1);
  EXPECT_NE(log.find("--seq-length must be at least 1"), std::string::npos) << log;
  EXPECT_EQ(run_cli(base + " --seq-length 8 --num-samples 4 --index-split valid", kGolden, lg, &log), 1);
  EXPECT_NE(log.find("the valid split is empty"), std::string::npos) << log;
  EXPECT_EQ(
      run_cli("--data-path no_such_prefix --seq-length 8 --num-samples 4 --tokenizer-model t --output x",
              kGolden, lg, &log),
      1);
  EXPECT_NE(log.find("no_such_prefix"), std::string::npos) << log;
  EXPECT_FALSE(fs::exists(dir / "o.txt"));
}

TEST(GptDataset, TooFewTokensAndBadConfigAreErrors) {
  const auto dir = testing::scratch_dir();
  const std::string prefix = (dir / "tiny").string();
  {
    IndexedDatasetBuilder b(prefix, DType::kInt32);
    for (int d = 0; d < 10; ++d) {
      std::vector<int32_t> ids = {d, d + 1, d + 2};
      std::vector<int32_t> lens = {3};
      b.add_document(ids, lens);
    }
    b.finalize();
  }
  GptDatasetConfig cfg;
  cfg.sequence_length = 4;
  cfg.split = "969, 30, 1";  // 10 sequences: the test split [10, 10) has no tokens
  cfg.tokenizer_path = "t";
  cfg.path_to_cache = (dir / "cache").string();
  try {
    build_split_dataset(parse_data_path({prefix}), Split::kTest, 5, cfg);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("has no tokens"), std::string::npos) << e.what();
  }
  cfg.sequence_length = 0;
  EXPECT_THROW(build_split_dataset(parse_data_path({prefix}), Split::kTrain, 5, cfg), Error);
  cfg.sequence_length = 4;
  cfg.random_seed = -1;
  EXPECT_THROW(build_split_dataset(parse_data_path({prefix}), Split::kTrain, 5, cfg), Error);
  cfg.random_seed = 1;
  cfg.split = "1,2,3,4";
  EXPECT_THROW(build_split_dataset(parse_data_path({prefix}), Split::kTrain, 5, cfg), Error);
  EXPECT_THROW(parse_split_name("training"), Error);
  EXPECT_THROW(parse_data_path({"0.5", "a", "b", "c"}), Error);  // mixed weights and prefixes
  EXPECT_THROW(parse_data_path({"-1", "a"}), Error);
}

TEST(GptDataset, DataPathFormsFollowMegatron) {
  auto one = parse_data_path({" corpus "});
  EXPECT_EQ(one.prefixes, std::vector<std::string>{"corpus"});
  EXPECT_FALSE(one.weights);
  auto pairs = parse_data_path({"0.3", "a", "7", "b"});
  EXPECT_EQ(pairs.prefixes, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(*pairs.weights, (std::vector<double>{0.3, 7.0}));
  auto odd = parse_data_path({"a", "b", "c"});
  EXPECT_EQ(odd.prefixes.size(), 3u);
  EXPECT_FALSE(odd.weights);
  auto names = parse_data_path({"a", "b"});  // even count, but no weights
  EXPECT_EQ(names.prefixes, (std::vector<std::string>{"a", "b"}));
  EXPECT_FALSE(names.weights);
}

TEST(GptDataset, PythonFloatReprAndJson) {
  EXPECT_EQ(python_float_repr(0.969), "0.969");
  EXPECT_EQ(python_float_repr(1.0), "1.0");
  EXPECT_EQ(python_float_repr(0.1 + 0.2), "0.30000000000000004");
  EXPECT_EQ(python_float_repr(1e-05), "1e-05");
  EXPECT_EQ(python_float_repr(0.0001), "0.0001");
  EXPECT_EQ(python_float_repr(1e16), "1e+16");
  EXPECT_EQ(python_float_repr(1e15), "1000000000000000.0");
  EXPECT_EQ(python_float_repr(-2.5e-7), "-2.5e-07");
  EXPECT_EQ(python_float_repr(123456789012345680.0), "1.2345678901234568e+17");
  EXPECT_EQ(python_float_repr(0.0), "0.0");
  nlohmann::ordered_json j;
  j["a"] = nlohmann::ordered_json::array();
  j["b"] = {1, nullptr};
  j["c"] = "é\"\n";
  EXPECT_EQ(python_json_dumps(j),
            "{\n    \"a\": [],\n    \"b\": [\n        1,\n        null\n    ],\n"
            "    \"c\": \"\\u00e9\\\"\\n\"\n}");
  auto m = split_matrix_from_vector(parse_and_normalize_split("969, 30, 1"));
  EXPECT_EQ(python_float_repr(m[1]->second), "0.999");
  EXPECT_FALSE(split_matrix_from_vector(parse_and_normalize_split("90,10,0"))[2].has_value());
}

// numpy.random.RandomState(seed).shuffle, produced by tests/reference/megatron_dataset_golden.py
// (shuffle_vectors(), written to mt19937_shuffle.json).
TEST(MegatronRandom, ShuffleMatchesNumpy) {
  std::ifstream f(kGolden / "mt19937_shuffle.json");
  auto cases = nlohmann::json::parse(f);
  ASSERT_GE(cases.size(), 4u);
  for (const auto& c : cases) {
    NumpyRandomState raw(c["seed"].get<int64_t>());
    for (auto v : c["first_uint32"]) EXPECT_EQ(raw.next_uint32(), v.get<uint64_t>());
    NumpyRandomState rs(c["seed"].get<int64_t>());
    const auto n = c["n"].get<size_t>();
    std::vector<uint32_t> a(n);
    for (size_t i = 0; i < n; ++i) a[i] = static_cast<uint32_t>(i);
    rs.shuffle(std::span(a));
    std::vector<int64_t> b(n + 5);
    for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<int64_t>(i);
    rs.shuffle(std::span(b));
    EXPECT_EQ(a, c["first"].get<std::vector<uint32_t>>()) << c["seed"];
    EXPECT_EQ(b, c["second"].get<std::vector<int64_t>>()) << c["seed"];
  }
}

TEST(MegatronRandom, RandomIntervalStaysInRangeAndUses64BitDraws) {
  NumpyRandomState rs(7);
  for (uint64_t max : {1ULL, 2ULL, 5ULL, 1000ULL, 0xFFFFFFFFULL, 0x1FFFFFFFFULL})
    for (int i = 0; i < 100; ++i) EXPECT_LE(rs.random_interval(max), max);
  NumpyRandomState a(3), b(3);
  uint64_t v = a.random_interval(0x100000000ULL);  // > 32 bits: one 64-bit draw (two outputs, high first)
  uint64_t hi = b.next_uint32(), lo = b.next_uint32();
  uint64_t masked = ((hi << 32) | lo) & 0x1FFFFFFFFULL;
  if (masked <= 0x100000000ULL) {
    EXPECT_EQ(v, masked);
  }
}

TEST(Npy, HeaderMatchesNumpyAndRoundTrips) {
  // numpy.save(arange(3, dtype=int32)) header, 128 bytes with padding to 64.
  auto h = npy_header("<i4", {3});
  EXPECT_EQ(h.size() % 64, 0u);
  EXPECT_EQ(h.substr(10, 57), "{'descr': '<i4', 'fortran_order': False, 'shape': (3,), }");
  const auto p = (testing::scratch_dir() / "x.npy").string();
  std::vector<int64_t> v = {1, -2, 3, 4, 5, 6};
  write_npy(p, v, {3, 2});
  auto a = read_npy(p);
  EXPECT_EQ(a.shape, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(a.as<int64_t>(), v);
  EXPECT_THROW(a.as<int32_t>(), Error);
  std::ofstream(p, std::ios::binary) << "junk";
  EXPECT_THROW(read_npy(p), Error);
}

}  // namespace
}  // namespace dsv3
