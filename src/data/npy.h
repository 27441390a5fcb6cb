// numpy .npy files (format v1.0 written, v1/v2/v3 read), byte-identical to numpy.save for the plain
// little-endian integer arrays Megatron caches its dataset indices in.
//
// Layout: "\x93NUMPY" + u8 major + u8 minor + u16 (v1) / u32 (v2+) header length + header + raw C-order data.
// The header is Python's repr of {'descr': '<i4', 'fortran_order': False, 'shape': (n, 2), } padded with
// spaces (numpy leaves room for the first axis to grow to 21 digits) and a final '\n' so that the data starts
// at a multiple of 64 bytes.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"

namespace dsv3 {

// numpy dtype string of T ('<i4', '<u4', '<i8', '<i2', ...).
template <typename T>
const char* npy_descr();
template <>
inline const char* npy_descr<int16_t>() {
  return "<i2";
}
template <>
inline const char* npy_descr<int32_t>() {
  return "<i4";
}
template <>
inline const char* npy_descr<uint32_t>() {
  return "<u4";
}
template <>
inline const char* npy_descr<int64_t>() {
  return "<i8";
}
template <>
inline const char* npy_descr<uint64_t>() {
  return "<u8";
}

// The complete header (magic .. '\n') numpy.save writes for this dtype and shape.
std::string npy_header(const std::string& descr, const std::vector<int64_t>& shape);

// Writes `path` via a temporary name in the same directory, fsync and rename.
void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
               const void* data, size_t nbytes);

template <typename T>
void write_npy(const std::string& path, const std::vector<T>& v, const std::vector<int64_t>& shape) {
  write_npy(path, npy_descr<T>(), shape, v.data(), v.size() * sizeof(T));
}

struct NpyArray {
  std::string path;
  std::string descr;
  bool fortran_order = false;
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;

  int64_t numel() const;
  // The data as T; the dtype must be exactly T's.
  template <typename T>
  std::vector<T> as() const {
    DSV3_CHECK(descr == npy_descr<T>(), path, ": dtype is ", descr, ", expected ", npy_descr<T>());
    std::vector<T> out(data.size() / sizeof(T));
    if (!out.empty()) std::memcpy(out.data(), data.data(), out.size() * sizeof(T));
    return out;
  }
  // Integer data of any supported integer dtype, widened to int64.
  std::vector<int64_t> as_int64() const;
};

// Reads a whole .npy file; throws dsv3::Error naming the file on anything malformed.
NpyArray read_npy(const std::string& path);

}  // namespace dsv3
