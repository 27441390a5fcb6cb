// .bin/.idx: our writer reproduces Megatron-Core's bytes; the reader rejects damaged pairs with clear errors.
#include "data/indexed_dataset.h"

#include <fstream>
#include <iterator>

#include "core/error.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using testing::slurp;

const fs::path kGolden = testing::source_dir() / "tests/golden/preprocess";

// Megatron wrote these files (tests/reference/preprocess_golden.py); rebuilding them document by document
// from what our reader returns must give the same bytes.
TEST(IndexedDataset, RewriteReproducesMegatronBytes) {
  for (const char* name : {"tiny_p1_eod_text_document", "full_p1_two_keys_text_document"}) {
    IndexedDataset in((kGolden / name).string());
    const auto out = (testing::scratch_dir() / name).string();
    IndexedDatasetBuilder b(out, in.dtype());
    auto docs = in.document_indices();
    for (size_t d = 0; d + 1 < docs.size(); ++d) {
      std::vector<int64_t> ids64;
      std::vector<int32_t> lens;
      for (int64_t s = docs[d]; s < docs[d + 1]; ++s) {
        in.get(s, 0, -1, ids64);
        lens.push_back(in.sequence_lengths()[s]);
      }
      std::vector<int32_t> ids(ids64.begin(), ids64.end());
      b.add_document(ids, lens);
    }
    b.finalize();
    EXPECT_EQ(slurp(out + ".idx"), slurp(kGolden / (std::string(name) + ".idx"))) << name;
    EXPECT_EQ(slurp(out + ".bin"), slurp(kGolden / (std::string(name) + ".bin"))) << name;
  }
}

TEST(IndexedDataset, ReaderCountsAndSlices) {
  IndexedDataset ds((kGolden / "tiny_p1_eod_text_document").string());
  EXPECT_EQ(ds.dtype(), DType::kUInt16);
  EXPECT_EQ(ds.document_count(), 39);  // the 39 lines of input.jsonl
  int64_t sum = 0;
  for (auto l : ds.sequence_lengths()) sum += l;
  EXPECT_EQ(ds.token_count(), sum);
  EXPECT_EQ(static_cast<int64_t>(std::filesystem::file_size(kGolden / "tiny_p1_eod_text_document.bin")),
            sum * 2);
  auto all = ds.get(0);
  auto part = ds.get(0, 3, 4);
  ASSERT_EQ(part.size(), 4u);
  EXPECT_TRUE(std::equal(part.begin(), part.end(), all.begin() + 3));
  EXPECT_EQ(all.front(), 0);  // BOS, prepended by AutoTokenizer
  EXPECT_THROW(ds.get(0, 0, all.size() + 1), Error);
  EXPECT_THROW(ds.get(ds.sequence_count()), Error);
}

TEST(IndexedDataset, MergeMatchesMegatronAddIndex) {
  // Splitting a dataset in two and merging with add_index must give back the original bytes.
  const std::string name = "tiny_p1_eod_text_document";
  IndexedDataset in((kGolden / name).string());
  const auto dir = testing::scratch_dir();
  auto docs = in.document_indices();
  const size_t half = (docs.size() - 1) / 2;
  for (int part = 0; part < 2; ++part) {
    IndexedDatasetBuilder b((dir / ("part" + std::to_string(part))).string(), in.dtype());
    for (size_t d = part ? half : 0; d < (part ? docs.size() - 1 : half); ++d) {
      std::vector<int64_t> ids64;
      std::vector<int32_t> lens;
      for (int64_t s = docs[d]; s < docs[d + 1]; ++s) {
        in.get(s, 0, -1, ids64);
        lens.push_back(in.sequence_lengths()[s]);
      }
      std::vector<int32_t> ids(ids64.begin(), ids64.end());
      b.add_document(ids, lens);
    }
    b.finalize();
  }
  IndexedDatasetBuilder m((dir / "merged").string(), in.dtype());
  m.add_index((dir / "part0").string());
  m.add_index((dir / "part1").string());
  m.finalize();
  EXPECT_EQ(slurp(dir / "merged.idx"), slurp(kGolden / (name + ".idx")));
  EXPECT_EQ(slurp(dir / "merged.bin"), slurp(kGolden / (name + ".bin")));
}

void expect_error_containing(const std::string& prefix, const std::string& needle) {
  try {
    IndexedDataset ds(prefix);
    ADD_FAILURE() << "no error for " << prefix;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(IndexedDataset, DamagedPairsAreClearErrors) {
  const auto dir = testing::scratch_dir();
  const std::string name = "tiny_p1_eod_text_document";
  auto copy = [&](const std::string& to, size_t idx_cut, size_t bin_cut, bool bad_magic = false) {
    std::string idx = slurp(kGolden / (name + ".idx")), bin = slurp(kGolden / (name + ".bin"));
    if (idx_cut) idx.resize(idx.size() - idx_cut);
    if (bin_cut) bin.resize(bin.size() - bin_cut);
    if (bad_magic) idx[0] = 'X';
    std::ofstream(dir / (to + ".idx"), std::ios::binary) << idx;
    std::ofstream(dir / (to + ".bin"), std::ios::binary) << bin;
    return (dir / to).string();
  };
  expect_error_containing(copy("short_bin", 0, 2), "truncated or mismatched");
  expect_error_containing(copy("short_idx", 8, 0), "truncated");
  expect_error_containing(copy("magic", 0, 0, true), "bad magic");
  expect_error_containing((dir / "absent").string(), "cannot open");
  std::ofstream(dir / "tiny.idx") << "MMIDIDX";
  expect_error_containing((dir / "tiny").string(), "truncated header");
}

TEST(IndexedDataset, UnfinishedBuilderLeavesNothing) {
  const auto dir = testing::scratch_dir();
  {
    IndexedDatasetBuilder b((dir / "x").string(), DType::kInt32);
    std::vector<int32_t> ids{1, 2, 3}, lens{3};
    b.add_document(ids, lens);
  }  // destroyed without finalize, as when an error unwinds
  EXPECT_TRUE(fs::is_empty(dir));
}

TEST(IndexedDataset, OptimalDtypeFollowsMegatron) {
  EXPECT_EQ(optimal_dtype(4274), DType::kUInt16);
  EXPECT_EQ(optimal_dtype(65499), DType::kUInt16);
  EXPECT_EQ(optimal_dtype(65500), DType::kInt32);
  EXPECT_EQ(optimal_dtype(128815), DType::kInt32);
}

}  // namespace
}  // namespace dsv3
