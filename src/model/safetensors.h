// safetensors files (HuggingFace's checkpoint format): a validating mmap reader and an atomic writer.
//
// Layout (https://github.com/huggingface/safetensors, format version as of safetensors 0.4):
//   bytes [0, 8)        N, little-endian uint64: the size of the header
//   bytes [8, 8+N)      UTF-8 JSON object: { "__metadata__": {str: str} (optional),
//                                            NAME: {"dtype": "F32"|"BF16"|"F16"|"I64"|..., "shape": [d0,
//                                            ...],
//                                                   "data_offsets": [begin, end]}, ... }
//                       (the Python writer pads it with spaces to a multiple of 8)
//   bytes [8+N, EOF)    the data; offsets are relative to 8+N, tensors are row-major little-endian.
// The reader checks: header size within the file, valid JSON, known dtypes, end-begin == numel·itemsize,
// offsets inside the data and not overlapping. Every error names the file (and tensor).
// The writer emits tensors sorted by name, packed, header padded to 8 bytes, via temp name + fsync + rename.
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace dsv3 {

// Every dtype the format defines; read_f32 converts the float ones (FP8 is refused: it needs its
// *_scale_inv).
enum class StDtype {
  kF32,
  kBF16,
  kF16,
  kF64,
  kI64,
  kI32,
  kI16,
  kI8,
  kU64,
  kU32,
  kU16,
  kU8,
  kBool,
  kF8E4M3,
  kF8E5M2
};
const char* st_dtype_name(StDtype d);
size_t st_dtype_size(StDtype d);

struct StTensorInfo {
  std::string name;
  StDtype dtype = StDtype::kF32;
  std::vector<int64_t> shape;
  int64_t numel = 1;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the data section
};

class SafetensorsReader {
 public:
  explicit SafetensorsReader(const std::string& path);
  ~SafetensorsReader();
  SafetensorsReader(const SafetensorsReader&) = delete;
  SafetensorsReader& operator=(const SafetensorsReader&) = delete;

  const std::string& path() const { return path_; }
  // Names in data order (ascending offset).
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return tensors_.count(name) != 0; }
  const StTensorInfo& info(const std::string& name) const;  // throws naming the file and tensor
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Floating tensors (F32, BF16, F16, F64) converted to fp32.
  std::vector<float> read_f32(const std::string& name) const;
  void read_f32(const std::string& name, float* out, int64_t numel) const;
  // Integer tensors (I64, I32, I16, I8, U32, U16, U8, BOOL) widened to int64.
  std::vector<int64_t> read_i64(const std::string& name) const;
  // The raw little-endian bytes of a tensor (valid while the reader lives).
  const std::byte* raw(const std::string& name) const;

 private:
  std::string path_;
  const std::byte* map_ = nullptr;
  size_t size_ = 0;
  size_t data_start_ = 0;
  std::map<std::string, StTensorInfo> tensors_;
  std::vector<std::string> names_;
  std::map<std::string, std::string> metadata_;
};

// Collects tensors (non-owning: each pointer must stay valid until write()) and writes them in one file.
class SafetensorsWriter {
 public:
  // fp32 data stored as F32 or BF16 (round to nearest even).
  void add(const std::string& name, std::vector<int64_t> shape, const float* data,
           StDtype stored = StDtype::kF32);
  // int64 data stored as I64.
  void add(const std::string& name, std::vector<int64_t> shape, const int64_t* data);
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  // Writes `path` through a temporary name in the same directory, fsync and rename.
  void write(const std::string& path) const;

 private:
  struct Entry {
    std::vector<int64_t> shape;
    int64_t numel = 1;
    const float* f32 = nullptr;
    const int64_t* i64 = nullptr;
    StDtype stored = StDtype::kF32;
  };
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace dsv3
