// TensorBoard event writer/reader (format in tensorboard.h).
//
// Protobuf is hand-encoded: the writer needs five message types and four wire types (varint, fixed64,
// fixed32, length-delimited), about sixty lines, whereas libprotobuf would add a build-time protoc step, a
// runtime library and an ABI to keep in step, for no gain. Byte-identity with SummaryWriter's records is
// tested (tests/train/tensorboard_test.cpp), and TensorBoard's own loader reads the files there too.
#include "train/tensorboard.h"

#include <fcntl.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>

#include "core/error.h"

namespace dsv3 {

// ---------------------------------------------------------------------------------------------- CRC32C
namespace {

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> t{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    t[i] = c;
  }
  return t;
}
constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  const auto* p = static_cast<const unsigned char*>(data);
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = kCrc32cTable[(crc ^ p[i]) & 0xFF] ^ (crc >> 8);
  return ~crc;
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

// ------------------------------------------------------------------------------------ protobuf encoding
namespace {

enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7F) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_key(std::string& out, uint32_t field, WireType wt) {
  put_varint(out, (uint64_t{field} << 3) | wt);
}
void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}
void put_double(std::string& out, uint32_t field, double v) {
  uint64_t bits;
  std::memcpy(&bits, &v, 8);
  put_key(out, field, kFixed64);
  put_le(out, bits, 8);
}
void put_float(std::string& out, uint32_t field, float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  put_key(out, field, kFixed32);
  put_le(out, bits, 4);
}
void put_int64(std::string& out, uint32_t field, int64_t v) {
  put_key(out, field, kVarint);
  put_varint(out, static_cast<uint64_t>(v));  // negative int64: 10-byte two's complement, as protobuf
}
void put_bytes(std::string& out, uint32_t field, const std::string& bytes) {
  put_key(out, field, kLengthDelimited);
  put_varint(out, bytes.size());
  out += bytes;
}

// Event header shared by every record: wall_time, then step unless 0 (proto3 omits defaults).
std::string event_prefix(double wall_time, int64_t step) {
  std::string ev;
  if (wall_time != 0.0) put_double(ev, 1, wall_time);
  if (step != 0) put_int64(ev, 2, step);
  return ev;
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

std::string hostname() {
  char buf[256] = {};
  if (gethostname(buf, sizeof(buf) - 1) != 0 || buf[0] == '\0') return "localhost";
  return buf;
}

std::atomic<int> g_writer_counter{0};

}  // namespace

// ------------------------------------------------------------------------------------------ EventWriter
EventWriter::EventWriter(const std::string& logdir) {
  std::error_code ec;
  std::filesystem::create_directories(logdir, ec);
  DSV3_CHECK(!ec, "TensorBoard: cannot create directory ", logdir, ": ", ec.message());
  const auto seconds = static_cast<long long>(now_seconds());
  const std::string stem = "events.out.tfevents." + std::to_string(seconds) + "." + hostname() + "." +
                           std::to_string(static_cast<long long>(getpid())) + ".";
  // O_EXCL: never append to another writer's file; on a name clash take the next counter.
  for (int tries = 0; tries < 1000 && fd_ < 0; ++tries) {
    path_ = (std::filesystem::path(logdir) / (stem + std::to_string(g_writer_counter.fetch_add(1)))).string();
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0644);
    if (fd_ < 0 && errno != EEXIST) break;
  }
  DSV3_CHECK(fd_ >= 0, "TensorBoard: cannot create event file ", path_, ": ", std::strerror(errno));
  std::string ev = event_prefix(now_seconds(), 0);
  put_bytes(ev, 3, "brain.Event:2");
  std::string source;
  put_bytes(source, 1, "dsv3");
  put_bytes(ev, 10, source);
  write_record(ev);
}

EventWriter::~EventWriter() {
  if (fd_ >= 0) {
    ::fdatasync(fd_);
    ::close(fd_);
  }
}

void EventWriter::add_scalar(const std::string& tag, double value, int64_t step) {
  add_scalar(tag, value, step, now_seconds());
}

void EventWriter::add_scalar(const std::string& tag, double value, int64_t step, double wall_time) {
  std::string val;
  put_bytes(val, 1, tag);
  put_float(val, 2, static_cast<float>(value));
  std::string summary;
  put_bytes(summary, 1, val);
  std::string ev = event_prefix(wall_time, step);
  put_bytes(ev, 5, summary);
  write_record(ev);
}

void EventWriter::add_text(const std::string& tag, const std::string& text, int64_t step) {
  add_text(tag, text, step, now_seconds());
}

void EventWriter::add_text(const std::string& tag, const std::string& text, int64_t step, double wall_time) {
  std::string dim;
  put_int64(dim, 1, 1);
  std::string shape;
  put_bytes(shape, 2, dim);
  std::string tensor;
  put_int64(tensor, 1, 7);  // DT_STRING
  put_bytes(tensor, 2, shape);
  put_bytes(tensor, 8, text);
  std::string plugin;
  put_bytes(plugin, 1, "text");
  std::string metadata;
  put_bytes(metadata, 1, plugin);
  std::string val;
  put_bytes(val, 1, tag + "/text_summary");
  put_bytes(val, 8, tensor);
  put_bytes(val, 9, metadata);
  std::string summary;
  put_bytes(summary, 1, val);
  std::string ev = event_prefix(wall_time, step);
  put_bytes(ev, 5, summary);
  write_record(ev);
}

void EventWriter::flush() {
  DSV3_CHECK(::fdatasync(fd_) == 0, "TensorBoard: cannot sync ", path_, ": ", std::strerror(errno));
}

void EventWriter::write_record(const std::string& data) {
  std::string rec;
  rec.reserve(data.size() + 16);
  put_le(rec, data.size(), 8);
  put_le(rec, masked_crc32c(rec.data(), 8), 4);
  rec += data;
  put_le(rec, masked_crc32c(data.data(), data.size()), 4);
  // One write(2) per record; loop only for the (regular-file-unusual) short write.
  size_t done = 0;
  while (done < rec.size()) {
    const ssize_t n = ::write(fd_, rec.data() + done, rec.size() - done);
    if (n < 0 && errno == EINTR) continue;
    DSV3_CHECK(n > 0, "TensorBoard: cannot write ", path_, ": ", std::strerror(errno));
    done += static_cast<size_t>(n);
  }
}

// ------------------------------------------------------------------------------------------------ reader
namespace {

uint64_t get_le(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t{p[i]} << (8 * i);
  return v;
}

// A cursor over one protobuf message; every read is bounds-checked.
struct PbReader {
  const unsigned char* p;
  const unsigned char* end;
  bool done() const { return p >= end; }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
      DSV3_CHECK(p < end, "protobuf: truncated varint");
      const unsigned char b = *p++;
      v |= uint64_t{b & 0x7Fu} << shift;
      if (!(b & 0x80)) return v;
    }
    fail("protobuf: varint longer than 10 bytes");
  }
  uint64_t fixed(int bytes) {
    DSV3_CHECK(end - p >= bytes, "protobuf: truncated fixed", bytes * 8);
    const uint64_t v = get_le(p, bytes);
    p += bytes;
    return v;
  }
  std::string bytes() {
    const uint64_t n = varint();
    DSV3_CHECK(n <= static_cast<uint64_t>(end - p), "protobuf: length ", n, " beyond the message");
    std::string s(reinterpret_cast<const char*>(p), n);
    p += n;
    return s;
  }
  void skip(uint32_t wt) {
    switch (wt) {
      case kVarint:
        varint();
        break;
      case kFixed64:
        fixed(8);
        break;
      case kLengthDelimited:
        bytes();
        break;
      case kFixed32:
        fixed(4);
        break;
      default:
        fail("protobuf: unsupported wire type ", wt);
    }
  }
};

// The reader points into `s`, so `s` must outlive it (a temporary is refused at compile time).
PbReader reader_of(const std::string& s) {
  const auto* b = reinterpret_cast<const unsigned char*>(s.data());
  return PbReader{b, b + s.size()};
}
PbReader reader_of(std::string&&) = delete;

std::string plugin_name_of(const std::string& metadata) {
  std::string name;
  for (PbReader r = reader_of(metadata); !r.done();) {
    const uint64_t key = r.varint();
    if (key == ((1u << 3) | kLengthDelimited)) {
      const std::string pd_msg = r.bytes();
      for (PbReader pd = reader_of(pd_msg); !pd.done();) {
        const uint64_t k2 = pd.varint();
        if (k2 == ((1u << 3) | kLengthDelimited))
          name = pd.bytes();
        else
          pd.skip(k2 & 7);
      }
    } else {
      r.skip(key & 7);
    }
  }
  return name;
}

void decode_tensor(const std::string& bytes, TbValue& v) {
  for (PbReader r = reader_of(bytes); !r.done();) {
    const uint64_t key = r.varint();
    const uint64_t field = key >> 3;
    if (field == 1 && (key & 7) == kVarint) {
      v.tensor_dtype = static_cast<int64_t>(r.varint());
    } else if (field == 2 && (key & 7) == kLengthDelimited) {
      const std::string s_msg = r.bytes();
      for (PbReader s = reader_of(s_msg); !s.done();) {
        const uint64_t k2 = s.varint();
        if (k2 == ((2u << 3) | kLengthDelimited)) {
          const std::string d_msg = s.bytes();
          for (PbReader d = reader_of(d_msg); !d.done();) {
            const uint64_t k3 = d.varint();
            if (k3 == ((1u << 3) | kVarint))
              v.tensor_shape.push_back(static_cast<int64_t>(d.varint()));
            else
              d.skip(k3 & 7);
          }
        } else {
          s.skip(k2 & 7);
        }
      }
    } else if (field == 8 && (key & 7) == kLengthDelimited) {
      v.string_vals.push_back(r.bytes());
    } else {
      r.skip(key & 7);
    }
  }
}

TbValue decode_value(const std::string& bytes) {
  TbValue v;
  for (PbReader r = reader_of(bytes); !r.done();) {
    const uint64_t key = r.varint();
    const uint64_t field = key >> 3;
    const uint32_t wt = key & 7;
    if (field == 1 && wt == kLengthDelimited) {
      v.tag = r.bytes();
    } else if (field == 2 && wt == kFixed32) {
      const auto bits = static_cast<uint32_t>(r.fixed(4));
      float f;
      std::memcpy(&f, &bits, 4);
      v.simple_value = f;
    } else if (field == 8 && wt == kLengthDelimited) {
      decode_tensor(r.bytes(), v);
    } else if (field == 9 && wt == kLengthDelimited) {
      v.plugin_name = plugin_name_of(r.bytes());
    } else {
      r.skip(wt);
    }
  }
  return v;
}

}  // namespace

TbEvent decode_event(const std::string& bytes) {
  TbEvent ev;
  for (PbReader r = reader_of(bytes); !r.done();) {
    const uint64_t key = r.varint();
    const uint64_t field = key >> 3;
    const uint32_t wt = key & 7;
    if (field == 1 && wt == kFixed64) {
      const uint64_t bits = r.fixed(8);
      std::memcpy(&ev.wall_time, &bits, 8);
    } else if (field == 2 && wt == kVarint) {
      ev.step = static_cast<int64_t>(r.varint());
    } else if (field == 3 && wt == kLengthDelimited) {
      ev.file_version = r.bytes();
    } else if (field == 5 && wt == kLengthDelimited) {
      const std::string s_msg = r.bytes();
      for (PbReader s = reader_of(s_msg); !s.done();) {
        const uint64_t k2 = s.varint();
        if (k2 == ((1u << 3) | kLengthDelimited))
          ev.values.push_back(decode_value(s.bytes()));
        else
          s.skip(k2 & 7);
      }
    } else if (field == 10 && wt == kLengthDelimited) {
      const std::string s_msg = r.bytes();
      for (PbReader s = reader_of(s_msg); !s.done();) {
        const uint64_t k2 = s.varint();
        if (k2 == ((1u << 3) | kLengthDelimited))
          ev.source_writer = s.bytes();
        else
          s.skip(k2 & 7);
      }
    } else {
      r.skip(wt);
    }
  }
  return ev;
}

std::vector<std::string> read_tfrecords(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DSV3_CHECK(in, "TensorBoard: cannot open ", path);
  const std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const auto* b = reinterpret_cast<const unsigned char*>(data.data());
  std::vector<std::string> records;
  size_t off = 0;
  while (off < data.size()) {
    DSV3_CHECK(data.size() - off >= 12, path, ": truncated record header at byte ", off);
    const uint64_t len = get_le(b + off, 8);
    DSV3_CHECK(get_le(b + off + 8, 4) == masked_crc32c(b + off, 8), path, ": bad length CRC at byte ", off);
    DSV3_CHECK(len <= data.size() - off - 12 && data.size() - off - 12 - len >= 4, path,
               ": truncated record at byte ", off, " (length ", len, ")");
    DSV3_CHECK(get_le(b + off + 12 + len, 4) == masked_crc32c(b + off + 12, len), path,
               ": bad data CRC in the record at byte ", off);
    records.emplace_back(data.substr(off + 12, len));
    off += 12 + len + 4;
  }
  return records;
}

std::vector<TbEvent> read_event_file(const std::string& path) {
  std::vector<TbEvent> events;
  for (const auto& rec : read_tfrecords(path)) {
    try {
      events.push_back(decode_event(rec));
    } catch (const Error& e) {
      fail(path, ": record ", events.size(), ": ", e.what());
    }
  }
  return events;
}

}  // namespace dsv3
