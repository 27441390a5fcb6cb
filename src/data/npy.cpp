// numpy .npy reader/writer (see npy.h for the layout).
#include "data/npy.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>

#include "core/atomic_file.h"

namespace dsv3 {
namespace {

constexpr size_t kArrayAlign = 64;
constexpr size_t kGrowthAxisMaxDigits = 21;
const char kMagic[] = "\x93NUMPY";

size_t descr_itemsize(const std::string& descr, const std::string& path) {
  DSV3_CHECK(
      descr.size() >= 3 && (descr[0] == '<' || descr[0] == '|') && (descr[1] == 'i' || descr[1] == 'u'), path,
      ": unsupported dtype '", descr, "' (expected a little-endian integer dtype)");
  int n = std::atoi(descr.c_str() + 2);
  DSV3_CHECK(n == 1 || n == 2 || n == 4 || n == 8, path, ": unsupported dtype '", descr, "'");
  return static_cast<size_t>(n);
}

std::string shape_repr(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape[i]);
  }
  if (shape.size() == 1) s += ",";
  return s + ")";
}

// Value text following `'key': ` in a header dict.
std::string header_value(const std::string& header, const std::string& key, const std::string& path) {
  auto k = header.find("'" + key + "'");
  DSV3_CHECK(k != std::string::npos, path, ": .npy header has no '", key, "': ", header);
  auto colon = header.find(':', k);
  DSV3_CHECK(colon != std::string::npos, path, ": malformed .npy header: ", header);
  size_t b = header.find_first_not_of(' ', colon + 1);
  DSV3_CHECK(b != std::string::npos, path, ": malformed .npy header: ", header);
  size_t e;
  if (header[b] == '(') {
    e = header.find(')', b);
    DSV3_CHECK(e != std::string::npos, path, ": malformed .npy shape: ", header);
    return header.substr(b, e - b + 1);
  }
  if (header[b] == '\'' || header[b] == '"') {
    e = header.find(header[b], b + 1);
    DSV3_CHECK(e != std::string::npos, path, ": malformed .npy header: ", header);
    return header.substr(b + 1, e - b - 1);
  }
  e = header.find_first_of(",}", b);
  return header.substr(b, e - b);
}

}  // namespace

std::string npy_header(const std::string& descr, const std::vector<int64_t>& shape) {
  std::string dict =
      "{'descr': '" + descr + "', 'fortran_order': False, 'shape': " + shape_repr(shape) + ", }";
  if (!shape.empty()) dict.append(kGrowthAxisMaxDigits - std::to_string(shape[0]).size(), ' ');
  size_t hlen = dict.size() + 1;
  size_t padlen = kArrayAlign - ((8 + 2 + hlen) % kArrayAlign);
  size_t total = hlen + padlen;
  DSV3_CHECK(total <= 0xFFFF, "npy header too long for format 1.0 (", total, " bytes)");
  std::string out(kMagic, 6);
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(total & 0xFF);
  out += static_cast<char>((total >> 8) & 0xFF);
  out += dict;
  out.append(padlen, ' ');
  out += '\n';
  return out;
}

void write_npy(const std::string& path, const std::string& descr, const std::vector<int64_t>& shape,
               const void* data, size_t nbytes) {
  int64_t numel = 1;
  for (int64_t d : shape) numel *= d;
  DSV3_CHECK(static_cast<size_t>(numel) * descr_itemsize(descr, path) == nbytes, path,
             ": data size does not match shape ", shape_repr(shape));
  std::string header = npy_header(descr, shape);
  AtomicFile f(path);
  f.write(header);
  f.write(data, nbytes);
  f.commit();
}

int64_t NpyArray::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::vector<int64_t> NpyArray::as_int64() const {
  size_t item = descr_itemsize(descr, path);
  bool is_signed = descr[1] == 'i';
  std::vector<int64_t> out(data.size() / item);
  for (size_t i = 0; i < out.size(); ++i) {
    const uint8_t* p = data.data() + i * item;
    switch (item) {
      case 1:
        out[i] = is_signed ? static_cast<int8_t>(p[0]) : p[0];
        break;
      case 2: {
        uint16_t v;
        std::memcpy(&v, p, 2);
        out[i] = is_signed ? static_cast<int16_t>(v) : v;
        break;
      }
      case 4: {
        uint32_t v;
        std::memcpy(&v, p, 4);
        out[i] = is_signed ? static_cast<int32_t>(v) : static_cast<int64_t>(v);
        break;
      }
      default: {
        uint64_t v;
        std::memcpy(&v, p, 8);
        DSV3_CHECK(is_signed || v <= static_cast<uint64_t>(INT64_MAX), path, ": value ", v,
                   " does not fit int64");
        out[i] = static_cast<int64_t>(v);
      }
    }
  }
  return out;
}

NpyArray read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DSV3_CHECK(in.good(), "cannot open ", path);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  DSV3_CHECK(bytes.size() >= 10 && bytes.compare(0, 6, std::string(kMagic, 6)) == 0, path,
             ": not a .npy file (bad magic)");
  uint8_t major = static_cast<uint8_t>(bytes[6]);
  size_t hlen, start;
  if (major == 1) {
    hlen = static_cast<uint8_t>(bytes[8]) | (static_cast<size_t>(static_cast<uint8_t>(bytes[9])) << 8);
    start = 10;
  } else {
    DSV3_CHECK(major == 2 || major == 3, path, ": unsupported .npy version ", int(major));
    DSV3_CHECK(bytes.size() >= 12, path, ": truncated .npy header");
    hlen = 0;
    for (int i = 0; i < 4; ++i) hlen |= static_cast<size_t>(static_cast<uint8_t>(bytes[8 + i])) << (8 * i);
    start = 12;
  }
  DSV3_CHECK(bytes.size() >= start + hlen, path, ": truncated .npy header");
  std::string header = bytes.substr(start, hlen);
  NpyArray a;
  a.path = path;
  a.descr = header_value(header, "descr", path);
  a.fortran_order = header_value(header, "fortran_order", path) == "True";
  std::string shape = header_value(header, "shape", path);
  for (size_t i = 1; i < shape.size();) {
    size_t j = shape.find_first_of(",)", i);
    std::string tok = shape.substr(i, j - i);
    auto b = tok.find_first_not_of(' ');
    if (b != std::string::npos) {
      try {
        a.shape.push_back(std::stoll(tok.substr(b)));
      } catch (const std::exception&) {
        fail(path, ": malformed .npy shape ", shape);
      }
    }
    if (j == std::string::npos || shape[j] == ')') break;
    i = j + 1;
  }
  size_t item = descr_itemsize(a.descr, path);
  size_t want = static_cast<size_t>(a.numel()) * item;
  DSV3_CHECK(bytes.size() - start - hlen == want, path, ": data is ", bytes.size() - start - hlen,
             " bytes, shape ", shape, " of ", a.descr, " needs ", want);
  a.data.assign(bytes.begin() + static_cast<std::ptrdiff_t>(start + hlen), bytes.end());
  return a;
}

}  // namespace dsv3
