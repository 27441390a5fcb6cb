// safetensors reader/writer: round trips, a file written by the Python safetensors package, and clear errors
// on truncated or corrupt files.
#include "model/safetensors.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <limits>

#include "core/bf16.h"
#include "core/error.h"
#include "test_util.h"

namespace dsv3 {
namespace {

std::string read_bytes(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void write_bytes(const std::filesystem::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary);
  out.write(s.data(), static_cast<std::streamsize>(s.size()));
}

// A file with the given header JSON and `data_bytes` zero bytes of data.
std::string make_file(const std::string& header, size_t data_bytes) {
  std::string s(8, '\0');
  const uint64_t n = header.size();
  std::memcpy(s.data(), &n, 8);
  return s + header + std::string(data_bytes, '\0');
}

std::string open_error(const std::filesystem::path& p) {
  try {
    SafetensorsReader r(p.string());
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(Safetensors, RoundTripF32Bf16I64AndMetadata) {
  const auto dir = testing::scratch_dir();
  const auto path = (dir / "rt.safetensors").string();
  std::vector<float> a(6 * 5), b(7);
  for (size_t i = 0; i < a.size(); ++i) a[i] = std::sin(0.3f * static_cast<float>(i)) * 100.0f;
  for (size_t i = 0; i < b.size(); ++i) b[i] = 1.0f / (1.0f + static_cast<float>(i));
  const std::vector<int64_t> ids = {-1, 0, 1LL << 50, 42};
  const float scalar = -2.5f;
  SafetensorsWriter w;
  w.add("model.layers.0.weight", {6, 5}, a.data());
  w.add("bf", {7}, b.data(), StDtype::kBF16);
  w.add("ids", {2, 2}, ids.data());
  w.add("scalar", {}, &scalar);
  w.add("empty", {0, 4}, a.data());
  w.set_metadata("format", "pt");
  w.set_metadata("iteration", "17");
  EXPECT_THROW(w.add("bf", {1}, b.data()), Error);
  EXPECT_THROW(w.add("x", {1}, b.data(), StDtype::kF16), Error);
  w.write(path);
  // Nothing else left in the directory (the temporary name was renamed away).
  EXPECT_EQ(std::distance(std::filesystem::directory_iterator(dir), {}), 1);
  // Header padded to 8 bytes, data after it.
  const std::string bytes = read_bytes(path);
  uint64_t n;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ(n % 8, 0u);

  SafetensorsReader r(path);
  EXPECT_EQ(r.metadata().at("format"), "pt");
  EXPECT_EQ(r.metadata().at("iteration"), "17");
  EXPECT_EQ(r.names().size(), 5u);
  EXPECT_EQ(r.info("model.layers.0.weight").shape, (std::vector<int64_t>{6, 5}));
  EXPECT_EQ(r.info("model.layers.0.weight").dtype, StDtype::kF32);
  EXPECT_EQ(r.read_f32("model.layers.0.weight"), a);
  EXPECT_EQ(r.info("bf").dtype, StDtype::kBF16);
  const auto bb = r.read_f32("bf");
  for (size_t i = 0; i < b.size(); ++i) EXPECT_EQ(bb[i], round_bf16(b[i]));
  EXPECT_EQ(r.read_i64("ids"), ids);
  EXPECT_TRUE(r.info("scalar").shape.empty());
  EXPECT_EQ(r.read_f32("scalar"), std::vector<float>{scalar});
  EXPECT_EQ(r.info("empty").numel, 0);
  EXPECT_TRUE(r.read_f32("empty").empty());
  // Wrong-kind reads and unknown names are errors that name the file and tensor.
  try {
    r.read_i64("bf");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'bf'"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find(path), std::string::npos);
  }
  EXPECT_THROW(r.read_f32("ids"), Error);
  EXPECT_THROW(r.info("nope"), Error);
  std::vector<float> small(3);
  EXPECT_THROW(r.read_f32("model.layers.0.weight", small.data(), 3), Error);

  // Overwriting an existing file is atomic too.
  SafetensorsWriter w2;
  w2.add("only", {1}, &scalar);
  w2.write(path);
  EXPECT_EQ(SafetensorsReader(path).names(), std::vector<std::string>{"only"});
}

// tests/golden/hf_tiny/dtypes.safetensors was written by Python `safetensors.torch.save_file`
// (tests/reference/hf_model_golden.py, write_dtype_fixture); the values below are the same formulas.
TEST(Safetensors, ReadsFileWrittenByPythonSafetensors) {
  SafetensorsReader r((testing::source_dir() / "tests/golden/hf_tiny/dtypes.safetensors").string());
  EXPECT_EQ(r.metadata().at("purpose"), "dtype fixture");
  std::vector<float> x(12);
  for (int i = 0; i < 12; ++i) x[i] = static_cast<float>(i - 6) * 0.37f;
  EXPECT_EQ(r.info("f32").shape, (std::vector<int64_t>{3, 4}));
  EXPECT_EQ(r.read_f32("f32"), x);
  EXPECT_EQ(r.info("bf16").dtype, StDtype::kBF16);
  EXPECT_EQ(r.info("bf16").shape, (std::vector<int64_t>{2, 6}));
  const auto bf = r.read_f32("bf16");
  for (int i = 0; i < 12; ++i) EXPECT_EQ(bf[i], round_bf16(x[i])) << i;
  EXPECT_EQ(r.info("f16").dtype, StDtype::kF16);
  const auto h = r.read_f32("f16");
  ASSERT_EQ(h.size(), 14u);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(h[i], 0.25f * static_cast<float>(i - 6));
  EXPECT_EQ(h[8], 65504.0f);
  EXPECT_EQ(h[9], std::ldexp(1.0f, -14));
  EXPECT_EQ(h[10], std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_EQ(h[11], 3.0f * std::ldexp(1.0f, -20));
  EXPECT_EQ(h[12], 0.0f);
  EXPECT_TRUE(std::signbit(h[12]));
  EXPECT_EQ(h[13], std::numeric_limits<float>::infinity());
  EXPECT_EQ(r.read_i64("i64"), (std::vector<int64_t>{-3, 1LL << 40, 7}));
  EXPECT_EQ(r.read_i64("i32"), (std::vector<int64_t>{-2147483648LL, 0, 5, 2147483647}));
  EXPECT_EQ(r.read_i64("bool"), (std::vector<int64_t>{1, 0, 1}));
  EXPECT_EQ(r.read_f32("scalar"), std::vector<float>{1.5f});
  EXPECT_EQ(r.info("empty").shape, (std::vector<int64_t>{0, 3}));
}

TEST(Safetensors, TruncatedAndCorruptFilesGiveClearErrors) {
  const auto dir = testing::scratch_dir();
  std::vector<float> a(64, 1.0f);
  SafetensorsWriter w;
  w.add("a", {8, 8}, a.data());
  w.add("b", {8, 8}, a.data());
  const auto good = dir / "good.safetensors";
  w.write(good.string());
  const std::string bytes = read_bytes(good);

  struct Case {
    std::string name, contents, expect;
  };
  const std::vector<Case> cases = {
      {"empty", "", "shorter than the 8-byte header size"},
      {"short", "abc", "shorter than the 8-byte header size"},
      {"cut_data", bytes.substr(0, bytes.size() - 10), "truncated: tensor 'b'"},
      {"cut_header", bytes.substr(0, 40), "truncated: header"},
      {"huge_header", std::string("\xff\xff\xff\xff\xff\xff\xff\x7f", 8) + "{}", "implausible"},
      {"not_json", make_file("{\"a\": [1, 2", 0), "not valid JSON"},
      {"not_object", make_file("[1, 2]", 0), "JSON object"},
      {"bad_dtype", make_file(R"({"t":{"dtype":"Q7","shape":[1],"data_offsets":[0,1]}})", 1),
       "unknown dtype 'Q7'"},
      {"wrong_size", make_file(R"({"t":{"dtype":"F32","shape":[2,2],"data_offsets":[0,12]}})", 12),
       "needs 16 bytes"},
      {"out_of_bounds", make_file(R"({"t":{"dtype":"F32","shape":[4],"data_offsets":[8,24]}})", 16),
       "truncated: tensor 't'"},
      {"reversed", make_file(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", 16), "begin > end"},
      {"overlap",
       make_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"u":{"dtype":"F32","shape":[2],)"
                 R"("data_offsets":[4,12]}})",
                 12),
       "overlap"},
      {"missing_field", make_file(R"({"t":{"dtype":"F32","shape":[2]}})", 8), "data_offsets"},
      {"negative_dim", make_file(R"({"t":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8),
       "bad dimension"},
      {"bad_metadata", make_file(R"({"__metadata__":{"k":3}})", 0), "__metadata__"},
  };
  for (const auto& c : cases) {
    const auto p = dir / (c.name + ".safetensors");
    write_bytes(p, c.contents);
    const std::string err = open_error(p);
    EXPECT_NE(err.find(c.expect), std::string::npos) << c.name << ": '" << err << "'";
    EXPECT_NE(err.find(p.string()), std::string::npos) << c.name << ": '" << err << "'";
  }
  EXPECT_NE(open_error(dir / "missing.safetensors").find("cannot open"), std::string::npos);
  // FP8 is recognised but refused with a reason.
  const auto fp8 = dir / "fp8.safetensors";
  write_bytes(fp8, make_file(R"({"w":{"dtype":"F8_E4M3","shape":[4],"data_offsets":[0,4]}})", 4));
  SafetensorsReader r(fp8.string());
  try {
    r.read_f32("w");
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("scale_inv"), std::string::npos) << e.what();
  }
  // Writing into a missing directory fails cleanly.
  EXPECT_THROW(w.write((dir / "no/such/dir/x.safetensors").string()), Error);
}

}  // namespace
}  // namespace dsv3
