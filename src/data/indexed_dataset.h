// Megatron-LM's indexed dataset (.bin/.idx) — byte-identical writer and a validating mmap reader.
//
// .bin: little-endian concatenation of every sequence's token ids in dtype D; no header, no padding.
// .idx (little-endian, no padding):
//   0   9 bytes   magic "MMIDIDX\0\0"
//   9   uint64    version = 1
//   17  uint8     dtype code (1 u8, 2 i8, 3 i16, 4 i32, 5 i64, 6 f64, 7 f32, 8 u16)
//   18  uint64    sequence_count S
//   26  uint64    document_count D (= documents + 1)
//   34  int32[S]  sequence lengths (tokens)
//       int64[S]  sequence pointers (byte offset in .bin; cumulative len*itemsize from 0)
//       int64[D]  document indices: 0, then the sequence count at the end of each document
// Megatron writes the .bin while adding documents and the .idx at finalize; so do we, but both under
// temporary names that finalize() renames into place, so a failed run never leaves a complete-looking pair.
#pragma once
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <span>
#include <string>
#include <vector>

#include "core/unaligned_view.h"

namespace dsv3 {

enum class DType : uint8_t {
  kUInt8 = 1,
  kInt8 = 2,
  kInt16 = 3,
  kInt32 = 4,
  kInt64 = 5,
  kFloat64 = 6,
  kFloat32 = 7,
  kUInt16 = 8
};

size_t dtype_size(DType d);
const char* dtype_name(DType d);
// Megatron's DType.optimal_dtype: uint16 when the tokenizer's vocab size is below 65500, else int32.
DType optimal_dtype(int64_t vocab_size);

std::string idx_path(const std::string& prefix);  // prefix + ".idx"
std::string bin_path(const std::string& prefix);  // prefix + ".bin"

class IndexedDatasetBuilder {
 public:
  // Opens `{prefix}.bin` for writing under a temporary name.
  IndexedDatasetBuilder(std::string prefix, DType dtype);
  ~IndexedDatasetBuilder();  // removes the temporaries unless finalize() succeeded
  IndexedDatasetBuilder(const IndexedDatasetBuilder&) = delete;
  IndexedDatasetBuilder& operator=(const IndexedDatasetBuilder&) = delete;

  // One document made of sequences; `lengths` splits `ids` (Megatron's add_document). Empty `lengths` or an
  // all-empty document still closes a document (Megatron's zero-sequence document quirk).
  void add_document(std::span<const int32_t> ids, std::span<const int32_t> lengths);
  // Appends another finished dataset (Megatron's add_index): its .bin bytes and its index arrays.
  void add_index(const std::string& other_prefix);
  // Writes the .idx, fsyncs both files and renames them to their final names.
  void finalize();

  int64_t sequence_count() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t token_count() const { return tokens_; }

 private:
  void write_bin(const void* data, size_t n);
  std::string prefix_;
  DType dtype_;
  std::FILE* bin_ = nullptr;
  std::string bin_tmp_;
  std::vector<int32_t> lengths_;
  std::vector<int64_t> doc_idx_{0};
  int64_t tokens_ = 0;
  bool finalized_ = false;
};

// Read-only view of a .bin/.idx pair, both memory-mapped; the constructor validates header and sizes.
class IndexedDataset {
 public:
  explicit IndexedDataset(std::string prefix);
  ~IndexedDataset();
  IndexedDataset(const IndexedDataset&) = delete;
  IndexedDataset& operator=(const IndexedDataset&) = delete;

  const std::string& prefix() const { return prefix_; }
  DType dtype() const { return dtype_; }
  int64_t sequence_count() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t document_count() const { return static_cast<int64_t>(doc_idx_.size()) - 1; }
  int64_t token_count() const { return tokens_; }
  // Views of the mapped index: its arrays sit at unaligned offsets (core/unaligned_view.h).
  UnalignedView<int32_t> sequence_lengths() const { return lengths_; }
  UnalignedView<int64_t> sequence_pointers() const { return pointers_; }
  UnalignedView<int64_t> document_indices() const { return doc_idx_; }

  // Megatron's get(idx, offset, length): `length` tokens of sequence idx from `offset` (-1 = to the end),
  // appended to `out` as int64.
  void get(int64_t idx, int64_t offset, int64_t length, std::vector<int64_t>& out) const;
  std::vector<int64_t> get(int64_t idx, int64_t offset = 0, int64_t length = -1) const;

 private:
  void unmap();
  std::string prefix_;
  DType dtype_{};
  const uint8_t* idx_map_ = nullptr;
  size_t idx_size_ = 0;
  const uint8_t* bin_map_ = nullptr;
  size_t bin_size_ = 0;
  UnalignedView<int32_t> lengths_;
  UnalignedView<int64_t> pointers_;
  UnalignedView<int64_t> doc_idx_;
  int64_t tokens_ = 0;
};

}  // namespace dsv3
