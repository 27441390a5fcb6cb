// safetensors reader (mmap, validated header) and writer (sorted, packed, atomic); the layout is in
// safetensors.h.
#include "model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "core/atomic_file.h"
#include "core/bf16.h"
#include "core/error.h"

namespace dsv3 {
namespace {

using json = nlohmann::json;

// The Python library refuses headers above 100 MB; so do we, before allocating anything.
constexpr uint64_t kMaxHeader = 100'000'000;

struct DtypeName {
  StDtype dtype;
  const char* name;
  size_t size;
};
constexpr DtypeName kDtypes[] = {
    {StDtype::kF32, "F32", 4},   {StDtype::kBF16, "BF16", 2},      {StDtype::kF16, "F16", 2},
    {StDtype::kF64, "F64", 8},   {StDtype::kI64, "I64", 8},        {StDtype::kI32, "I32", 4},
    {StDtype::kI16, "I16", 2},   {StDtype::kI8, "I8", 1},          {StDtype::kU64, "U64", 8},
    {StDtype::kU32, "U32", 4},   {StDtype::kU16, "U16", 2},        {StDtype::kU8, "U8", 1},
    {StDtype::kBool, "BOOL", 1}, {StDtype::kF8E4M3, "F8_E4M3", 1}, {StDtype::kF8E5M2, "F8_E5M2", 1},
};

// IEEE binary16 → binary32, exact (subnormals, inf and NaN included).
float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      int e = -1;
      do {
        ++e;
        mant <<= 1;
      } while ((mant & 0x400u) == 0);
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((mant & 0x3ffu) << 13);
    }
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename T>
T load(const std::byte* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

const char* st_dtype_name(StDtype d) {
  for (const auto& e : kDtypes)
    if (e.dtype == d) return e.name;
  return "?";
}

size_t st_dtype_size(StDtype d) {
  for (const auto& e : kDtypes)
    if (e.dtype == d) return e.size;
  return 0;
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DSV3_CHECK(fd >= 0, "cannot open safetensors file ", path, ": ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("cannot stat ", path, ": ", std::strerror(errno));
  }
  size_ = static_cast<size_t>(st.st_size);
  if (size_ < 8) {
    ::close(fd);
    fail(path, ": not a safetensors file (", size_, " bytes, shorter than the 8-byte header size)");
  }
  void* p = ::mmap(nullptr, size_, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  DSV3_CHECK(p != MAP_FAILED, "cannot mmap ", path, ": ", std::strerror(errno));
  map_ = static_cast<const std::byte*>(p);

  try {
    const uint64_t n = load<uint64_t>(map_);
    DSV3_CHECK(n <= kMaxHeader, path, ": header size ", n,
               " is implausible (corrupt file or not safetensors)");
    DSV3_CHECK(n <= size_ - 8, path, ": truncated: header of ", n, " bytes but the file has only ", size_ - 8,
               " bytes after the size field");
    data_start_ = 8 + n;
    const uint64_t data_size = size_ - data_start_;
    json h;
    try {
      h = json::parse(reinterpret_cast<const char*>(map_ + 8), reinterpret_cast<const char*>(map_ + 8 + n));
    } catch (const json::exception& e) {
      fail(path, ": header is not valid JSON: ", e.what());
    }
    DSV3_CHECK(h.is_object(), path, ": header must be a JSON object");
    for (auto it = h.begin(); it != h.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        DSV3_CHECK(v.is_object(), path, ": __metadata__ must be an object of strings");
        for (auto m = v.begin(); m != v.end(); ++m) {
          DSV3_CHECK(m.value().is_string(), path, ": __metadata__ value of '", m.key(), "' is not a string");
          metadata_[m.key()] = m.value().get<std::string>();
        }
        continue;
      }
      DSV3_CHECK(v.is_object() && v.contains("dtype") && v.contains("shape") && v.contains("data_offsets"),
                 path, ": tensor '", name, "' must have dtype, shape and data_offsets");
      StTensorInfo t;
      t.name = name;
      DSV3_CHECK(v["dtype"].is_string(), path, ": tensor '", name, "' has a non-string dtype");
      const std::string dt = v["dtype"].get<std::string>();
      bool found = false;
      for (const auto& e : kDtypes)
        if (dt == e.name) t.dtype = e.dtype, found = true;
      DSV3_CHECK(found, path, ": tensor '", name, "' has unknown dtype '", dt, "'");
      DSV3_CHECK(v["shape"].is_array(), path, ": tensor '", name, "' has a non-array shape");
      for (const auto& d : v["shape"]) {
        DSV3_CHECK(d.is_number_unsigned(), path, ": tensor '", name, "' has a bad dimension ", d.dump());
        const uint64_t dim = d.get<uint64_t>();
        DSV3_CHECK(dim < (uint64_t(1) << 48) && (dim == 0 || uint64_t(t.numel) <= (uint64_t(1) << 60) / dim),
                   path, ": tensor '", name, "' is implausibly large");
        t.shape.push_back(static_cast<int64_t>(dim));
        t.numel *= static_cast<int64_t>(dim);
      }
      const json& off = v["data_offsets"];
      DSV3_CHECK(
          off.is_array() && off.size() == 2 && off[0].is_number_unsigned() && off[1].is_number_unsigned(),
          path, ": tensor '", name, "' data_offsets must be two non-negative integers");
      t.begin = off[0].get<uint64_t>();
      t.end = off[1].get<uint64_t>();
      DSV3_CHECK(t.begin <= t.end, path, ": tensor '", name, "' has data_offsets [", t.begin, ", ", t.end,
                 "] with begin > end");
      const uint64_t want = static_cast<uint64_t>(t.numel) * st_dtype_size(t.dtype);
      DSV3_CHECK(t.end - t.begin == want, path, ": tensor '", name, "' (", dt, " shape ", v["shape"].dump(),
                 ") needs ", want, " bytes but data_offsets give ", t.end - t.begin);
      DSV3_CHECK(t.end <= data_size, path, ": truncated: tensor '", name, "' ends at data byte ", t.end,
                 " but the file holds only ", data_size, " data bytes");
      tensors_.emplace(name, std::move(t));
    }
    // Data order, and no two tensors may share bytes.
    std::vector<const StTensorInfo*> order;
    for (const auto& [n2, t] : tensors_) order.push_back(&t);
    std::sort(order.begin(), order.end(),
              [](auto* a, auto* b) { return a->begin != b->begin ? a->begin < b->begin : a->end < b->end; });
    for (size_t i = 0; i < order.size(); ++i) {
      if (i > 0 && order[i - 1]->end > order[i]->begin)
        fail(path, ": tensors '", order[i - 1]->name, "' and '", order[i]->name, "' overlap");
      names_.push_back(order[i]->name);
    }
  } catch (...) {
    ::munmap(const_cast<std::byte*>(map_), size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsReader::~SafetensorsReader() {
  if (map_) ::munmap(const_cast<std::byte*>(map_), size_);
}

const StTensorInfo& SafetensorsReader::info(const std::string& name) const {
  auto it = tensors_.find(name);
  DSV3_CHECK(it != tensors_.end(), path_, ": no tensor named '", name, "'");
  return it->second;
}

const std::byte* SafetensorsReader::raw(const std::string& name) const {
  return map_ + data_start_ + info(name).begin;
}

std::vector<float> SafetensorsReader::read_f32(const std::string& name) const {
  std::vector<float> out(static_cast<size_t>(info(name).numel));
  read_f32(name, out.data(), static_cast<int64_t>(out.size()));
  return out;
}

void SafetensorsReader::read_f32(const std::string& name, float* out, int64_t numel) const {
  const StTensorInfo& t = info(name);
  DSV3_CHECK(numel == t.numel, path_, ": tensor '", name, "' has ", t.numel, " elements, the caller expects ",
             numel);
  const std::byte* p = raw(name);
  switch (t.dtype) {
    case StDtype::kF32:
      // An empty tensor may come with out == nullptr (an empty vector's data()); memcpy requires non-null.
      if (numel > 0) std::memcpy(out, p, static_cast<size_t>(numel) * 4);
      return;
    case StDtype::kBF16:
      for (int64_t i = 0; i < numel; ++i) out[i] = to_float(bf16{load<uint16_t>(p + 2 * i)});
      return;
    case StDtype::kF16:
      for (int64_t i = 0; i < numel; ++i) out[i] = half_to_float(load<uint16_t>(p + 2 * i));
      return;
    case StDtype::kF64:
      for (int64_t i = 0; i < numel; ++i) out[i] = static_cast<float>(load<double>(p + 8 * i));
      return;
    case StDtype::kF8E4M3:
    case StDtype::kF8E5M2:
      fail(path_, ": tensor '", name, "' is ", st_dtype_name(t.dtype),
           ": FP8 weights need their '*_scale_inv' block scales; dequantize the checkpoint to BF16 first");
    default:
      fail(path_, ": tensor '", name, "' has dtype ", st_dtype_name(t.dtype), ", not a floating type");
  }
}

std::vector<int64_t> SafetensorsReader::read_i64(const std::string& name) const {
  const StTensorInfo& t = info(name);
  std::vector<int64_t> out(static_cast<size_t>(t.numel));
  const std::byte* p = raw(name);
  for (int64_t i = 0; i < t.numel; ++i) {
    switch (t.dtype) {
      case StDtype::kI64:
        out[i] = load<int64_t>(p + 8 * i);
        break;
      case StDtype::kI32:
        out[i] = load<int32_t>(p + 4 * i);
        break;
      case StDtype::kI16:
        out[i] = load<int16_t>(p + 2 * i);
        break;
      case StDtype::kI8:
        out[i] = load<int8_t>(p + i);
        break;
      case StDtype::kU32:
        out[i] = load<uint32_t>(p + 4 * i);
        break;
      case StDtype::kU16:
        out[i] = load<uint16_t>(p + 2 * i);
        break;
      case StDtype::kU8:
      case StDtype::kBool:
        out[i] = load<uint8_t>(p + i);
        break;
      default:
        fail(path_, ": tensor '", name, "' has dtype ", st_dtype_name(t.dtype), ", not an integer type");
    }
  }
  return out;
}

void SafetensorsWriter::add(const std::string& name, std::vector<int64_t> shape, const float* data,
                            StDtype stored) {
  DSV3_CHECK(stored == StDtype::kF32 || stored == StDtype::kBF16, "safetensors writer: tensor '", name,
             "' can be stored as F32 or BF16, not ", st_dtype_name(stored));
  DSV3_CHECK(name != "__metadata__" && !name.empty(), "safetensors writer: bad tensor name '", name, "'");
  Entry e;
  for (int64_t d : shape) {
    DSV3_CHECK(d >= 0, "safetensors writer: tensor '", name, "' has a negative dimension");
    e.numel *= d;
  }
  e.shape = std::move(shape);
  e.f32 = data;
  e.stored = stored;
  DSV3_CHECK(entries_.emplace(name, std::move(e)).second, "safetensors writer: tensor '", name,
             "' added twice");
}

void SafetensorsWriter::add(const std::string& name, std::vector<int64_t> shape, const int64_t* data) {
  DSV3_CHECK(name != "__metadata__" && !name.empty(), "safetensors writer: bad tensor name '", name, "'");
  Entry e;
  for (int64_t d : shape) {
    DSV3_CHECK(d >= 0, "safetensors writer: tensor '", name, "' has a negative dimension");
    e.numel *= d;
  }
  e.shape = std::move(shape);
  e.i64 = data;
  e.stored = StDtype::kI64;
  DSV3_CHECK(entries_.emplace(name, std::move(e)).second, "safetensors writer: tensor '", name,
             "' added twice");
}

void SafetensorsWriter::write(const std::string& path) const {
  nlohmann::ordered_json h = nlohmann::ordered_json::object();
  if (!metadata_.empty()) h["__metadata__"] = metadata_;
  uint64_t off = 0;
  for (const auto& [name, e] : entries_) {
    const uint64_t bytes = static_cast<uint64_t>(e.numel) * st_dtype_size(e.stored);
    h[name] = {{"dtype", st_dtype_name(e.stored)}, {"shape", e.shape}, {"data_offsets", {off, off + bytes}}};
    off += bytes;
  }
  std::string header = h.dump();
  header.resize((header.size() + 7) / 8 * 8, ' ');

  AtomicFile f(path);
  auto write_all = [&](const void* p, size_t n) { f.write(p, n); };
  const uint64_t n = header.size();
  write_all(&n, 8);
  write_all(header.data(), header.size());
  std::vector<uint16_t> buf;
  for (const auto& [name, e] : entries_) {
    if (e.stored == StDtype::kF32) {
      write_all(e.f32, static_cast<size_t>(e.numel) * 4);
    } else if (e.stored == StDtype::kI64) {
      write_all(e.i64, static_cast<size_t>(e.numel) * 8);
    } else {  // BF16, converted in chunks so a large tensor needs no full-size copy
      constexpr int64_t kChunk = 1 << 20;
      for (int64_t i = 0; i < e.numel; i += kChunk) {
        const int64_t m = std::min(kChunk, e.numel - i);
        buf.resize(static_cast<size_t>(m));
        to_bf16(e.f32 + i, reinterpret_cast<bf16*>(buf.data()), m);
        write_all(buf.data(), static_cast<size_t>(m) * 2);
      }
    }
  }
  f.commit();
}

}  // namespace dsv3
