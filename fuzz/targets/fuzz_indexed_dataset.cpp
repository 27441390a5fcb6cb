// Megatron .idx + .bin -> IndexedDataset (the validating mmap reader), then every sequence read back whole
// and in part. Input: the .idx bytes, the part separator, the .bin bytes.
#include "core/error.h"
#include "data/indexed_dataset.h"
#include "fuzz_common.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = dsv3_fuzz::split_parts(data, size, 2);
  const std::string prefix = (dsv3_fuzz::scratch_dir() / "ds").string();
  dsv3_fuzz::write_file(dsv3::idx_path(prefix), parts[0]);
  dsv3_fuzz::write_file(dsv3::bin_path(prefix), parts[1]);
  try {
    dsv3::IndexedDataset ds(prefix);
    std::vector<int64_t> out;
    const int64_t n = std::min<int64_t>(ds.sequence_count(), 4096);
    for (int64_t i = 0; i < n; ++i) {
      out.clear();
      ds.get(i, 0, -1, out);
      const int64_t len = ds.sequence_lengths()[i];
      if (len > 1) ds.get(i, 1, len / 2, out);
    }
    int64_t docs = 0;
    for (int64_t d : ds.document_indices()) docs += d;  // touch every document index
    (void)docs;
    (void)ds.token_count();
  } catch (const dsv3::Error&) {
  }
  return 0;
}
