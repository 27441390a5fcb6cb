// Megatron .bin/.idx writer and mmap reader; the byte layout is in indexed_dataset.h.
#include "data/indexed_dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>

#include "core/error.h"

namespace dsv3 {
namespace {

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', 0, 0};
constexpr uint64_t kVersion = 1;
constexpr size_t kHeaderSize = 34;

// Writes `n` bytes or throws; short writes (full disk) must not pass silently.
void write_all(std::FILE* f, const void* data, size_t n, const std::string& path) {
  if (n && std::fwrite(data, 1, n, f) != n) fail("cannot write ", path, ": ", std::strerror(errno));
}

void flush_and_sync(std::FILE* f, const std::string& path) {
  if (std::fflush(f) != 0 || ::fsync(fileno(f)) != 0) fail("cannot flush ", path, ": ", std::strerror(errno));
}

std::string temp_name(const std::string& path) {
  return path + ".tmp." + std::to_string(::getpid());
}

// Maps a whole file read-only; an empty file maps to nullptr with size 0.
const uint8_t* map_file(const std::string& path, size_t& size) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("cannot open ", path, ": ", std::strerror(errno));
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    fail("cannot stat ", path, ": ", std::strerror(errno));
  }
  size = static_cast<size_t>(st.st_size);
  void* p = nullptr;
  if (size > 0) {
    p = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
      ::close(fd);
      fail("cannot mmap ", path, ": ", std::strerror(errno));
    }
  }
  ::close(fd);
  return static_cast<const uint8_t*>(p);
}

template <typename T>
T read_le(const uint8_t* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

}  // namespace

size_t dtype_size(DType d) {
  switch (d) {
    case DType::kUInt8:
    case DType::kInt8:
      return 1;
    case DType::kInt16:
    case DType::kUInt16:
      return 2;
    case DType::kInt32:
    case DType::kFloat32:
      return 4;
    case DType::kInt64:
    case DType::kFloat64:
      return 8;
  }
  fail("unknown dtype code ", static_cast<int>(d));
}

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kUInt8:
      return "uint8";
    case DType::kInt8:
      return "int8";
    case DType::kInt16:
      return "int16";
    case DType::kInt32:
      return "int32";
    case DType::kInt64:
      return "int64";
    case DType::kFloat64:
      return "float64";
    case DType::kFloat32:
      return "float32";
    case DType::kUInt16:
      return "uint16";
  }
  return "unknown";
}

DType optimal_dtype(int64_t vocab_size) {
  return vocab_size < 65500 ? DType::kUInt16 : DType::kInt32;
}

std::string idx_path(const std::string& prefix) {
  return prefix + ".idx";
}
std::string bin_path(const std::string& prefix) {
  return prefix + ".bin";
}

// ---------------------------------------------------------------------------------------------- builder

IndexedDatasetBuilder::IndexedDatasetBuilder(std::string prefix, DType dtype)
    : prefix_(std::move(prefix)), dtype_(dtype), bin_tmp_(temp_name(bin_path(prefix_))) {
  DSV3_CHECK(dtype == DType::kUInt16 || dtype == DType::kInt32 || dtype == DType::kInt64,
             "token files must be uint16, int32 or int64, not ", dtype_name(dtype));
  bin_ = std::fopen(bin_tmp_.c_str(), "wb");
  if (!bin_) fail("cannot create ", bin_tmp_, ": ", std::strerror(errno));
}

IndexedDatasetBuilder::~IndexedDatasetBuilder() {
  if (bin_) std::fclose(bin_);
  if (!finalized_) std::remove(bin_tmp_.c_str());
}

void IndexedDatasetBuilder::write_bin(const void* data, size_t n) {
  write_all(bin_, data, n, bin_tmp_);
}

void IndexedDatasetBuilder::add_document(std::span<const int32_t> ids, std::span<const int32_t> lengths) {
  DSV3_CHECK(!finalized_, "add_document after finalize on ", prefix_);
  int64_t total = 0;
  for (int32_t len : lengths) {
    DSV3_CHECK(len >= 0, "negative sequence length ", len);
    total += len;
  }
  DSV3_CHECK(total == static_cast<int64_t>(ids.size()), "sequence lengths sum to ", total,
             " but the document has ", ids.size(), " tokens");
  switch (dtype_) {
    case DType::kUInt16: {
      std::vector<uint16_t> buf(ids.size());
      for (size_t i = 0; i < ids.size(); ++i) {
        DSV3_CHECK(ids[i] >= 0 && ids[i] <= 0xFFFF, "token id ", ids[i], " does not fit uint16");
        buf[i] = static_cast<uint16_t>(ids[i]);
      }
      write_bin(buf.data(), buf.size() * 2);
      break;
    }
    case DType::kInt32:
      write_bin(ids.data(), ids.size() * 4);
      break;
    default: {
      std::vector<int64_t> buf(ids.begin(), ids.end());
      write_bin(buf.data(), buf.size() * 8);
    }
  }
  lengths_.insert(lengths_.end(), lengths.begin(), lengths.end());
  doc_idx_.push_back(static_cast<int64_t>(lengths_.size()));
  tokens_ += total;
}

void IndexedDatasetBuilder::add_index(const std::string& other_prefix) {
  IndexedDataset other(other_prefix);
  DSV3_CHECK(other.dtype() == dtype_, "cannot merge ", other_prefix, " (", dtype_name(other.dtype()),
             ") into ", prefix_, " (", dtype_name(dtype_), ")");
  const int64_t offset = static_cast<int64_t>(lengths_.size());
  auto lens = other.sequence_lengths();
  lengths_.insert(lengths_.end(), lens.begin(), lens.end());
  auto docs = other.document_indices();
  for (size_t i = 1; i < docs.size(); ++i) doc_idx_.push_back(offset + docs[i]);
  tokens_ += other.token_count();
  // Copy the .bin bytes through a buffer rather than the mapping so the copy streams.
  std::FILE* in = std::fopen(bin_path(other_prefix).c_str(), "rb");
  if (!in) fail("cannot open ", bin_path(other_prefix), ": ", std::strerror(errno));
  std::vector<char> buf(1 << 20);
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), in)) > 0) write_bin(buf.data(), n);
  std::fclose(in);
}

void IndexedDatasetBuilder::finalize() {
  DSV3_CHECK(!finalized_, "finalize called twice on ", prefix_);
  flush_and_sync(bin_, bin_tmp_);
  std::fclose(bin_);
  bin_ = nullptr;

  const std::string idx_final = idx_path(prefix_);
  const std::string idx_tmp = temp_name(idx_final);
  std::FILE* f = std::fopen(idx_tmp.c_str(), "wb");
  if (!f) fail("cannot create ", idx_tmp, ": ", std::strerror(errno));
  try {
    const uint64_t s = lengths_.size(), d = doc_idx_.size();
    const uint8_t code = static_cast<uint8_t>(dtype_);
    write_all(f, kMagic, sizeof kMagic, idx_tmp);
    write_all(f, &kVersion, 8, idx_tmp);
    write_all(f, &code, 1, idx_tmp);
    write_all(f, &s, 8, idx_tmp);
    write_all(f, &d, 8, idx_tmp);
    write_all(f, lengths_.data(), s * 4, idx_tmp);
    std::vector<int64_t> pointers(s);
    int64_t at = 0;
    for (size_t i = 0; i < s; ++i) {
      pointers[i] = at;
      at += static_cast<int64_t>(lengths_[i]) * static_cast<int64_t>(dtype_size(dtype_));
    }
    write_all(f, pointers.data(), s * 8, idx_tmp);
    write_all(f, doc_idx_.data(), d * 8, idx_tmp);
    flush_and_sync(f, idx_tmp);
  } catch (...) {
    std::fclose(f);
    std::remove(idx_tmp.c_str());
    throw;
  }
  std::fclose(f);
  // .bin first, then .idx: a reader opens the pair through the .idx, which appears last.
  if (std::rename(bin_tmp_.c_str(), bin_path(prefix_).c_str()) != 0 ||
      std::rename(idx_tmp.c_str(), idx_final.c_str()) != 0) {
    std::remove(idx_tmp.c_str());
    fail("cannot rename outputs into place for ", prefix_, ": ", std::strerror(errno));
  }
  finalized_ = true;
}

// ---------------------------------------------------------------------------------------------- reader

IndexedDataset::IndexedDataset(std::string prefix) : prefix_(std::move(prefix)) {
  const std::string ip = idx_path(prefix_), bp = bin_path(prefix_);
  idx_map_ = map_file(ip, idx_size_);
  try {
    DSV3_CHECK(idx_size_ >= kHeaderSize, ip, ": truncated header (", idx_size_, " bytes)");
    DSV3_CHECK(std::memcmp(idx_map_, kMagic, sizeof kMagic) == 0, ip,
               ": not a Megatron index file (bad magic)");
    const uint64_t version = read_le<uint64_t>(idx_map_ + 9);
    DSV3_CHECK(version == kVersion, ip, ": unsupported index version ", version, " (expected 1)");
    dtype_ = static_cast<DType>(idx_map_[17]);
    DSV3_CHECK(idx_map_[17] >= 1 && idx_map_[17] <= 8, ip, ": unknown dtype code ", int(idx_map_[17]));
    const uint64_t s = read_le<uint64_t>(idx_map_ + 18), d = read_le<uint64_t>(idx_map_ + 26);
    DSV3_CHECK(d >= 1, ip, ": document count is 0 (must be at least 1)");
    const unsigned __int128 need =
        kHeaderSize + static_cast<unsigned __int128>(s) * 12 + static_cast<unsigned __int128>(d) * 8;
    DSV3_CHECK(need <= idx_size_, ip, ": truncated (", idx_size_, " bytes, header promises ",
               static_cast<uint64_t>(need), " for ", s, " sequences and ", d - 1, " documents)");
    DSV3_CHECK(need == idx_size_ || need + s == idx_size_, ip, ": ", idx_size_ - static_cast<uint64_t>(need),
               " unexpected trailing bytes");
    // The arrays sit at unaligned offsets in general (34 + 4S): read in place, as Megatron's numpy views are,
    // through unaligned views.
    lengths_ = {idx_map_ + kHeaderSize, s};
    pointers_ = {idx_map_ + kHeaderSize + 4 * s, s};
    doc_idx_ = {idx_map_ + kHeaderSize + 12 * s, d};
    bin_map_ = map_file(bp, bin_size_);
    const size_t item = dtype_size(dtype_);
    for (uint64_t i = 0; i < s; ++i) {
      DSV3_CHECK(lengths_[i] >= 0, ip, ": negative length at sequence ", i);
      tokens_ += lengths_[i];
    }
    const uint64_t end = s ? static_cast<uint64_t>(pointers_[s - 1]) + uint64_t(lengths_[s - 1]) * item : 0;
    DSV3_CHECK(end == bin_size_, bp, " has ", bin_size_, " bytes but ", ip, " describes ", end,
               " (truncated or mismatched pair)");
    // Every sequence, not only the last, must lie inside the .bin: get() reads through these pointers
    // unchecked, so one corrupt entry in the middle would read outside the mapping.
    for (uint64_t i = 0; i < s; ++i) {
      const int64_t ptr = pointers_[i];
      DSV3_CHECK(ptr >= 0 && static_cast<unsigned __int128>(ptr) +
                                     static_cast<unsigned __int128>(lengths_[i]) * item <=
                                 bin_size_,
                 ip, ": sequence ", i, " (", lengths_[i], " tokens at byte ", ptr, ") lies outside ", bp,
                 " (", bin_size_, " bytes)");
    }
    DSV3_CHECK(doc_idx_[0] == 0, ip, ": document indices do not start at 0");
    for (uint64_t i = 1; i < d; ++i)
      DSV3_CHECK(doc_idx_[i] >= doc_idx_[i - 1] && uint64_t(doc_idx_[i]) <= s, ip,
                 ": document indices not monotonic within [0, ", s, "] at ", i);
  } catch (...) {
    unmap();
    throw;
  }
}

IndexedDataset::~IndexedDataset() {
  unmap();
}

void IndexedDataset::unmap() {
  if (idx_map_) ::munmap(const_cast<uint8_t*>(idx_map_), idx_size_);
  if (bin_map_) ::munmap(const_cast<uint8_t*>(bin_map_), bin_size_);
  idx_map_ = bin_map_ = nullptr;
}

void IndexedDataset::get(int64_t idx, int64_t offset, int64_t length, std::vector<int64_t>& out) const {
  DSV3_CHECK(idx >= 0 && idx < sequence_count(), prefix_, ": sequence ", idx, " out of range [0, ",
             sequence_count(), ")");
  const int64_t len = lengths_[idx];
  if (length < 0) length = len - offset;
  DSV3_CHECK(offset >= 0 && offset + length <= len, prefix_, ": tokens [", offset, ", ", offset + length,
             ") outside sequence ", idx, " of length ", len);
  const size_t item = dtype_size(dtype_);
  const uint8_t* p = bin_map_ + pointers_[idx] + offset * item;
  out.reserve(out.size() + length);
  for (int64_t i = 0; i < length; ++i, p += item) {
    switch (dtype_) {
      case DType::kUInt8:
        out.push_back(*p);
        break;
      case DType::kInt8:
        out.push_back(static_cast<int8_t>(*p));
        break;
      case DType::kInt16:
        out.push_back(read_le<int16_t>(p));
        break;
      case DType::kUInt16:
        out.push_back(read_le<uint16_t>(p));
        break;
      case DType::kInt32:
        out.push_back(read_le<int32_t>(p));
        break;
      case DType::kInt64:
        out.push_back(read_le<int64_t>(p));
        break;
      default:
        fail(prefix_, ": token dtype ", dtype_name(dtype_), " is not an integer type");
    }
  }
}

std::vector<int64_t> IndexedDataset::get(int64_t idx, int64_t offset, int64_t length) const {
  std::vector<int64_t> out;
  get(idx, offset, length, out);
  return out;
}

}  // namespace dsv3
