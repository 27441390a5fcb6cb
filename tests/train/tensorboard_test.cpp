// TensorBoard event files: CRC32C test vectors, TFRecord framing and both CRCs parsed here independently of
// the library's reader, byte-identity with torch.utils.tensorboard.SummaryWriter's records (committed fixture
// from tests/reference/tensorboard_golden.py), TensorBoard's own loader on our file (when the `tensorboard`
// Python package is importable), and clear errors on corrupt files.
#include "train/tensorboard.h"

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "core/error.h"
#include "python_peer.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}
void write_bytes(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
}
uint64_t le(const std::string& s, size_t off, int n) {
  uint64_t v = 0;
  for (int i = 0; i < n; ++i) v |= uint64_t{static_cast<unsigned char>(s[off + i])} << (8 * i);
  return v;
}
double hexf(const json& j) {
  return std::strtod(j.get<std::string>().c_str(), nullptr);
}

// TFRecord framing, parsed here: each record's length, its masked CRC and the data's masked CRC.
std::vector<std::string> split_records(const std::string& file) {
  std::vector<std::string> recs;
  size_t off = 0;
  while (off < file.size()) {
    EXPECT_GE(file.size() - off, 16u) << "trailing bytes at " << off;
    if (file.size() - off < 16) break;
    const uint64_t len = le(file, off, 8);
    EXPECT_EQ(le(file, off + 8, 4), masked_crc32c(file.data() + off, 8)) << "length CRC at " << off;
    EXPECT_LE(off + 16 + len, file.size());
    if (off + 16 + len > file.size()) break;
    EXPECT_EQ(le(file, off + 12 + len, 4), masked_crc32c(file.data() + off + 12, len))
        << "data CRC at " << off;
    recs.push_back(file.substr(off + 12, len));
    off += 16 + len;
  }
  return recs;
}

TEST(TensorBoard, Crc32cKnownVectors) {
  EXPECT_EQ(crc32c("123456789", 9), 0xE3069283u);
  EXPECT_EQ(crc32c("", 0), 0u);
  // RFC 3720 (iSCSI) B.4 vectors.
  std::string zeros(32, '\0'), ones(32, '\xff'), inc(32, '\0');
  for (int i = 0; i < 32; ++i) inc[i] = static_cast<char>(i);
  EXPECT_EQ(crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(crc32c(inc.data(), 32), 0x46DD794Eu);
  // Extending equals one pass.
  EXPECT_EQ(crc32c("6789", 4, crc32c("12345", 5)), 0xE3069283u);
  // Masking: rotate right by 15, add 0xa282ead8.
  const uint32_t c = 0xE3069283u;
  EXPECT_EQ(masked_crc32c("123456789", 9), ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST(TensorBoard, WritesScalarsAndTextReadBack) {
  const auto dir = testing::scratch_dir() / "tb";
  std::string path;
  {
    EventWriter w(dir.string());
    path = w.path();
    w.add_scalar("lm loss", 11.5, 1);
    w.add_scalar("lm loss vs samples", 0.1, 8);
    w.add_scalar("grad-norm", 3.25, 1234567890123LL);
    w.add_text("seq_length", "4096", 0);
    w.add_text("tokenizer_model", "/data/déjà", 10);
    w.flush();
  }
  const std::string name = fs::path(path).filename().string();
  EXPECT_TRUE(std::regex_match(name, std::regex(R"(events\.out\.tfevents\.\d{10}\.[^.].*\.\d+\.\d+)")))
      << name;
  EXPECT_EQ(fs::path(path).parent_path(), dir);

  const auto recs = split_records(read_bytes(path));
  ASSERT_EQ(recs.size(), 6u);
  EXPECT_EQ(read_tfrecords(path), recs);

  const TbEvent head = decode_event(recs[0]);
  EXPECT_EQ(head.file_version, "brain.Event:2");
  EXPECT_TRUE(head.values.empty());
  const double now = static_cast<double>(std::time(nullptr));
  EXPECT_NEAR(head.wall_time, now, 60.0);

  struct Want {
    int64_t step;
    std::string tag;
    float value;
  };
  const Want scalars[] = {
      {1, "lm loss", 11.5f}, {8, "lm loss vs samples", 0.1f}, {1234567890123LL, "grad-norm", 3.25f}};
  for (int i = 0; i < 3; ++i) {
    const TbEvent e = decode_event(recs[1 + i]);
    EXPECT_EQ(e.step, scalars[i].step);
    EXPECT_NEAR(e.wall_time, now, 60.0);
    EXPECT_GE(e.wall_time, head.wall_time);
    ASSERT_EQ(e.values.size(), 1u);
    EXPECT_EQ(e.values[0].tag, scalars[i].tag);
    ASSERT_TRUE(e.values[0].simple_value.has_value());
    EXPECT_EQ(*e.values[0].simple_value, scalars[i].value);  // float32, as SummaryWriter
    EXPECT_EQ(e.values[0].plugin_name, "");
  }
  const TbEvent t0 = decode_event(recs[4]);
  EXPECT_EQ(t0.step, 0);
  ASSERT_EQ(t0.values.size(), 1u);
  EXPECT_EQ(t0.values[0].tag, "seq_length/text_summary");
  EXPECT_EQ(t0.values[0].plugin_name, "text");
  EXPECT_EQ(t0.values[0].tensor_dtype, 7);  // DT_STRING
  EXPECT_EQ(t0.values[0].tensor_shape, std::vector<int64_t>{1});
  EXPECT_EQ(t0.values[0].string_vals, std::vector<std::string>{"4096"});
  EXPECT_FALSE(t0.values[0].simple_value.has_value());
  const TbEvent t1 = decode_event(recs[5]);
  EXPECT_EQ(t1.step, 10);
  EXPECT_EQ(t1.values[0].string_vals, std::vector<std::string>{"/data/déjà"});
}

// Every add is on disk before it returns (no user-space buffer), so a crash loses at most a torn last record.
TEST(TensorBoard, EachAddReachesTheFileImmediately) {
  const auto dir = testing::scratch_dir();
  EventWriter w(dir.string());
  EXPECT_EQ(read_tfrecords(w.path()).size(), 1u);
  w.add_scalar("a", 1.0, 1);
  EXPECT_EQ(read_tfrecords(w.path()).size(), 2u);
  w.add_text("b", "x", 1);
  EXPECT_EQ(read_tfrecords(w.path()).size(), 3u);
}

TEST(TensorBoard, TwoWritersNeverShareAFile) {
  const auto dir = testing::scratch_dir();
  EventWriter a(dir.string()), b(dir.string());
  EXPECT_NE(a.path(), b.path());
  a.add_scalar("x", 1.0, 1);
  b.add_scalar("x", 2.0, 1);
  EXPECT_EQ(read_tfrecords(a.path()).size(), 2u);
  EXPECT_EQ(read_tfrecords(b.path()).size(), 2u);
}

// Replays the calls of tests/golden/tensorboard/calls.json; every record after the file_version record must
// be byte-identical to what torch's SummaryWriter wrote for them.
TEST(TensorBoard, RecordsMatchTorchSummaryWriterBytes) {
  const auto golden = testing::source_dir() / "tests" / "golden" / "tensorboard";
  const json calls = json::parse(read_bytes(golden / "calls.json"));
  const auto dir = testing::scratch_dir();
  std::string path;
  {
    EventWriter w(dir.string());
    path = w.path();
    for (const auto& c : calls) {
      if (c["kind"] == "scalar")
        w.add_scalar(c["tag"], hexf(c["value"]), c["step"].get<int64_t>(), hexf(c["wall_time"]));
      else
        w.add_text(c["tag"], c["value"].get<std::string>(), c["step"].get<int64_t>(), hexf(c["wall_time"]));
    }
  }
  const auto ours = split_records(read_bytes(path));
  const auto theirs = split_records(read_bytes(golden / "summarywriter.tfevents"));
  ASSERT_EQ(ours.size(), calls.size() + 1);
  ASSERT_EQ(theirs.size(), ours.size());
  EXPECT_EQ(decode_event(ours[0]).file_version, decode_event(theirs[0]).file_version);
  for (size_t i = 1; i < ours.size(); ++i)
    EXPECT_EQ(ours[i], theirs[i]) << "record " << i << ": " << calls[i - 1];
  // And the library reader decodes SummaryWriter's file as it decodes ours.
  const auto a = read_event_file(path), b = read_event_file((golden / "summarywriter.tfevents").string());
  for (size_t i = 1; i < a.size(); ++i) {
    EXPECT_EQ(a[i].step, b[i].step);
    EXPECT_EQ(a[i].wall_time, b[i].wall_time);
    ASSERT_EQ(a[i].values.size(), 1u);
    EXPECT_EQ(a[i].values[0].tag, b[i].values[0].tag);
    EXPECT_EQ(a[i].values[0].simple_value, b[i].values[0].simple_value);
    EXPECT_EQ(a[i].values[0].string_vals, b[i].values[0].string_vals);
  }
}

std::string run_capture(const std::string& cmd, int* status) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) {
    *status = -1;
    return out;
  }
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  *status = ::pclose(p);
  return out;
}

// TensorBoard's own EventFileLoader (and its masked CRC) reads our file: tags, steps, values, texts.
TEST(TensorBoard, TensorBoardPackageReadsOurFile) {
  const auto dir = testing::scratch_dir();
  std::string path;
  {
    EventWriter w(dir.string());
    path = w.path();
    w.add_scalar("lm loss", 10.25, 1);
    w.add_scalar("learning-rate vs samples", 1.1e-6, 80);
    w.add_scalar("grad-norm", -0.0, 0);
    w.add_text("lr", "0.00022", 3);
  }
  int status = 0;
  const std::string script = (testing::source_dir() / "tests" / "reference" / "tensorboard_read.py").string();
  const auto err = dir / "python_stderr.txt";
  const std::string out = run_capture(
      testing::python_interpreter() + " '" + script + "' '" + path + "' 2>'" + err.string() + "'", &status);
  const std::string err_text = read_bytes(err);
  if (WIFEXITED(status) && testing::python_peer_unavailable(WEXITSTATUS(status)) &&
      !testing::python_peers_required())
    GTEST_SKIP() << "the Python `tensorboard` package is not importable by " << testing::python_interpreter()
                 << " (pip install tensorboard); the C++ framing/CRC/field checks of the other TensorBoard "
                    "tests still ran. "
                 << err_text;
  ASSERT_EQ(status, 0) << out << err_text;
  const json j = json::parse(out);
  EXPECT_EQ(j["records"], 5);
  const auto& ev = j["events"];
  ASSERT_EQ(ev.size(), 5u);
  EXPECT_EQ(ev[0]["file_version"], "brain.Event:2");
  struct Want {
    int64_t step;
    std::string tag;
    double value;
  };
  const Want want[] = {{1, "lm loss", 10.25},
                       {80, "learning-rate vs samples", static_cast<float>(1.1e-6)},
                       {0, "grad-norm", -0.0}};
  for (int i = 0; i < 3; ++i) {
    const auto& e = ev[1 + i];
    EXPECT_EQ(e["step"], want[i].step);
    ASSERT_EQ(e["values"].size(), 1u);
    EXPECT_EQ(e["values"][0]["tag"], want[i].tag);
    EXPECT_EQ(e["values"][0]["plugin"], "scalars");
    EXPECT_EQ(hexf(e["values"][0]["scalar"]), want[i].value);
    EXPECT_EQ(std::signbit(hexf(e["values"][0]["scalar"])), std::signbit(want[i].value));
  }
  EXPECT_EQ(ev[4]["step"], 3);
  EXPECT_EQ(ev[4]["values"][0]["tag"], "lr/text_summary");
  EXPECT_EQ(ev[4]["values"][0]["plugin"], "text");
  EXPECT_EQ(ev[4]["values"][0]["text"], json::array({"0.00022"}));
}

std::string read_error(const fs::path& p) {
  try {
    read_tfrecords(p.string());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(TensorBoard, ReaderNamesCorruptionAndTruncation) {
  const auto dir = testing::scratch_dir();
  std::string path;
  {
    EventWriter w((dir / "tb").string());
    path = w.path();
    w.add_scalar("a", 1.0, 1);
  }
  const std::string good = read_bytes(path);
  const size_t first_len = 16 + le(good, 0, 8);

  std::string bad = good;
  bad[first_len + 12 + 2] ^= 0x01;  // a data byte of record 1
  write_bytes(dir / "data_crc", bad);
  const std::string e1 = read_error(dir / "data_crc");
  EXPECT_NE(e1.find("bad data CRC"), std::string::npos) << e1;
  EXPECT_NE(e1.find("data_crc"), std::string::npos) << e1;
  EXPECT_NE(e1.find("byte " + std::to_string(first_len)), std::string::npos) << e1;

  bad = good;
  bad[first_len] ^= 0x01;  // the length of record 1
  write_bytes(dir / "len_crc", bad);
  EXPECT_NE(read_error(dir / "len_crc").find("bad length CRC"), std::string::npos);

  write_bytes(dir / "torn", good.substr(0, good.size() - 3));  // a torn last write
  EXPECT_NE(read_error(dir / "torn").find("truncated record"), std::string::npos);
  write_bytes(dir / "torn_header", good.substr(0, first_len + 5));
  EXPECT_NE(read_error(dir / "torn_header").find("truncated record header"), std::string::npos);
  // The complete records before a torn one are intact (framing is self-delimiting).
  EXPECT_EQ(split_records(good.substr(0, first_len)).size(), 1u);

  EXPECT_NE(read_error(dir / "missing").find("cannot open"), std::string::npos);
}

TEST(TensorBoard, UnwritableLogdirIsAClearError) {
  const auto dir = testing::scratch_dir();
  write_bytes(dir / "file", "x");
  try {
    EventWriter w((dir / "file" / "sub").string());
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("TensorBoard"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("file/sub"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv3
