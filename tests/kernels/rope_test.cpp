// RoPE/YaRN: inv_freq, attention factor, cos/sin, forward and backward against HF transformers' DeepSeek-V3
// code (fixture from tests/reference/ops_rope_golden.py), fast path vs the double reference, and the backward
// as the exact transpose of the forward.
#include "kernels/cpu/rope.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "test_util.h"

namespace dsv3 {
namespace {

std::vector<float> randn(int64_t n, uint64_t stream) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = philox_normal(3, stream, i);
  return v;
}

struct Golden {
  nlohmann::json manifest;
  std::vector<float> data;
};

const Golden& golden() {
  static const Golden g = [] {
    Golden g;
    const auto dir = testing::source_dir() / "tests" / "golden" / "ops";
    std::ifstream js(dir / "rope.json");
    g.manifest = nlohmann::json::parse(js);
    std::ifstream bin(dir / "rope.bin", std::ios::binary | std::ios::ate);
    const auto bytes = static_cast<size_t>(bin.tellg());
    g.data.resize(bytes / 4);
    bin.seekg(0);
    bin.read(reinterpret_cast<char*>(g.data.data()), bytes);
    return g;
  }();
  return g;
}

std::vector<float> tensor(const nlohmann::json& c, const std::string& name) {
  const auto& t = c["tensors"][name];
  int64_t n = 1;
  for (int64_t s : t["shape"]) n *= s;
  const int64_t off = t["offset"];
  const auto& d = golden().data;
  return std::vector<float>(d.begin() + off, d.begin() + off + n);
}

TEST(RopeGolden, MatchesHuggingFace) {
  const auto& cases = golden().manifest["cases"];
  ASSERT_EQ(cases.size(), 4u);
  for (const auto& c : cases) {
    SCOPED_TRACE(c["name"].get<std::string>());
    const int64_t dim = c["dim"], heads = c["heads"], s = c["seq_len"], t = c["batch"].get<int64_t>() * s;
    const int64_t half = dim / 2;
    YarnParams y;
    const bool yarn = !c["rope_scaling"].is_null();
    if (yarn) {
      const auto& r = c["rope_scaling"];
      y.factor = r["factor"];
      y.original_max_position_embeddings = r.value("original_max_position_embeddings", 0);
      y.beta_fast = r.value("beta_fast", 0.0);
      y.beta_slow = r.value("beta_slow", 0.0);
      y.mscale = r.value("mscale", 0.0);
      y.mscale_all_dim = r.value("mscale_all_dim", 0.0);
      y.truncate = r.value("truncate", true);
    }
    const RopeFreqs f = rope_inv_freq(dim, c["theta"], yarn ? &y : nullptr, c["max_position_embeddings"]);
    const auto inv = tensor(c, "inv_freq");
    ASSERT_EQ(f.inv_freq.size(), inv.size());
    for (int64_t i = 0; i < half; ++i) EXPECT_FLOAT_EQ(f.inv_freq[i], inv[i]) << "inv_freq " << i;
    EXPECT_NEAR(f.attention_factor, c["attention_scaling"].get<double>(), 1e-6);

    RopeTable tab;
    rope_build_table(f, s, tab);
    const auto cos = tensor(c, "cos"), sin = tensor(c, "sin");  // [S, dr] = cat(freqs, freqs)
    for (int64_t p = 0; p < s; ++p)
      for (int64_t k = 0; k < dim; ++k) {
        EXPECT_NEAR(tab.cos_PH[p * half + k % half], cos[p * dim + k], 1e-6) << p << "," << k;
        EXPECT_NEAR(tab.sin_PH[p * half + k % half], sin[p * dim + k], 1e-6) << p << "," << k;
      }

    auto check = [&](const std::vector<float>& got, const std::vector<float>& want, const char* what) {
      double err = 0, mag = 0;
      for (size_t i = 0; i < want.size(); ++i) {
        err = std::max(err, std::fabs((double)got[i] - want[i]));
        mag = std::max(mag, std::fabs((double)want[i]));
      }
      EXPECT_LT(err, 1e-6 * mag) << what;
    };
    // q_pe as it sits in the q buffer: the last dr of each head's (8 + dr) values, rotated in place.
    const int64_t hs = 8 + dim, ld = heads * hs;
    auto place = [&](const std::vector<float>& src, int64_t nh, int64_t ldb, int64_t hsb, int64_t off) {
      std::vector<float> buf(t * ldb, 99.f);
      for (int64_t i = 0; i < t; ++i)
        for (int64_t h = 0; h < nh; ++h)
          for (int64_t k = 0; k < dim; ++k) buf[i * ldb + h * hsb + off + k] = src[(i * nh + h) * dim + k];
      return buf;
    };
    auto take = [&](const std::vector<float>& buf, int64_t nh, int64_t ldb, int64_t hsb, int64_t off) {
      std::vector<float> out(t * nh * dim);
      for (int64_t i = 0; i < t; ++i)
        for (int64_t h = 0; h < nh; ++h)
          for (int64_t k = 0; k < dim; ++k) out[(i * nh + h) * dim + k] = buf[i * ldb + h * hsb + off + k];
      return out;
    };
    auto qb = place(tensor(c, "q"), heads, ld, hs, 8);
    rope_forward(qb.data() + 8, ld, hs, qb.data() + 8, ld, hs, t, heads, s, tab);
    check(take(qb, heads, ld, hs, 8), tensor(c, "q_out"), "q_out");
    auto dqb = place(tensor(c, "dq_out"), heads, ld, hs, 8);
    rope_backward(dqb.data() + 8, ld, hs, dqb.data() + 8, ld, hs, t, heads, s, tab);
    check(take(dqb, heads, ld, hs, 8), tensor(c, "dq"), "dq");
    // k_pe: one head at columns [40, 40 + dr) of a wider row, out of place into a contiguous buffer.
    const int64_t ldk = 40 + dim;
    auto kb = place(tensor(c, "k"), 1, ldk, 0, 40);
    std::vector<float> ko(t * dim), dk(t * dim);
    rope_forward(kb.data() + 40, ldk, 0, ko.data(), dim, 0, t, 1, s, tab);
    check(ko, tensor(c, "k_out"), "k_out");
    const auto dko = tensor(c, "dk_out");
    rope_backward(dko.data(), dim, 0, dk.data(), dim, 0, t, 1, s, tab);
    check(dk, tensor(c, "dk"), "dk");
  }
}

TEST(Rope, FastMatchesReference) {
  YarnParams y;
  y.factor = 40, y.original_max_position_embeddings = 64, y.mscale = 1, y.mscale_all_dim = 0.707;
  for (bool interleave : {true, false}) {
    for (auto [dim, heads] : {std::pair<int64_t, int64_t>{64, 3}, {8, 1}, {2, 2}}) {
      const int64_t s = 50, t = 2 * s;
      const RopeFreqs f = rope_inv_freq(dim, 10000.0, &y);
      RopeTable tab;
      rope_build_table(f, 300, tab);
      auto x = randn(t * heads * dim, dim + heads);
      std::vector<float> yf(x.size()), yr(x.size()), bf(x.size()), br(x.size());
      rope_forward(x.data(), heads * dim, dim, yf.data(), heads * dim, dim, t, heads, s, tab, interleave);
      rope_reference(x.data(), yr.data(), t, heads, s, f, interleave, false);
      rope_backward(x.data(), heads * dim, dim, bf.data(), heads * dim, dim, t, heads, s, tab, interleave);
      rope_reference(x.data(), br.data(), t, heads, s, f, interleave, true);
      for (size_t i = 0; i < x.size(); ++i) {
        ASSERT_NEAR(yf[i], yr[i], 2e-6) << dim << " " << i;
        ASSERT_NEAR(bf[i], br[i], 2e-6) << dim << " " << i;
      }
    }
  }
}

TEST(Rope, BackwardIsTransposeOfForward) {
  // The forward is linear in x, so finite differences of <y, g> reproduce it exactly; the real content is
  // that the backward equals the transpose: <F x, g> = <x, B g> for all x, g.
  const int64_t dim = 16, heads = 2, s = 9, t = 18;
  const RopeFreqs f = rope_inv_freq(dim, 10000.0);
  RopeTable tab;
  rope_build_table(f, s, tab);
  auto x = randn(t * heads * dim, 41), g = randn(t * heads * dim, 42);
  std::vector<float> yv(x.size()), dx(x.size());
  rope_forward(x.data(), heads * dim, dim, yv.data(), heads * dim, dim, t, heads, s, tab);
  rope_backward(g.data(), heads * dim, dim, dx.data(), heads * dim, dim, t, heads, s, tab);
  double lhs = 0, rhs = 0;
  for (size_t i = 0; i < x.size(); ++i) lhs += (double)yv[i] * g[i], rhs += (double)x[i] * dx[i];
  EXPECT_NEAR(lhs, rhs, 1e-5 * std::fabs(lhs) + 1e-5);
  // Plain RoPE at position 0 is the de-interleave permutation alone.
  for (int64_t k = 0; k < dim / 2; ++k) {
    EXPECT_EQ(yv[k], x[2 * k]);
    EXPECT_EQ(yv[dim / 2 + k], x[2 * k + 1]);
  }
}

TEST(Rope, YarnNumbersFromTheSpec) {
  // spec §2.4/§2.5: V3's YaRN (factor 40, L0 4096, β 32/1) and its softmax mscale.
  YarnParams y;
  y.factor = 40, y.original_max_position_embeddings = 4096, y.beta_fast = 32, y.beta_slow = 1, y.mscale = 1,
  y.mscale_all_dim = 1;
  const RopeFreqs f = rope_inv_freq(64, 10000.0, &y);
  EXPECT_FLOAT_EQ(f.inv_freq[0], 1.f);
  // The spec quotes 8 significant digits.
  EXPECT_NEAR(f.inv_freq[10], 5.6234133e-2, 1e-7 * 5.6234133e-2);
  EXPECT_NEAR(f.inv_freq[11], 3.9006927e-2, 1e-7 * 3.9006927e-2);
  EXPECT_NEAR(f.inv_freq[23], 3.3338036e-5, 1e-7 * 3.3338036e-5);
  EXPECT_NEAR(f.inv_freq[31], 3.3338036e-6, 1e-7 * 3.3338036e-6);
  EXPECT_EQ(f.attention_factor, 1.f);
  EXPECT_NEAR(yarn_mscale(40, 1.0), 1.3688879454, 1e-9);
  EXPECT_NEAR(yarn_mscale(40, 0.707), 1.2608037774, 1e-9);
  EXPECT_EQ(yarn_mscale(1.0, 1.0), 1.0);
}

TEST(Rope, RejectsBadArguments) {
  EXPECT_THROW(rope_inv_freq(7, 10000.0), Error);
  YarnParams y;
  y.factor = 4;
  EXPECT_THROW(rope_inv_freq(8, 10000.0, &y), Error);  // no original/max position embeddings
  RopeTable tab;
  rope_build_table(rope_inv_freq(8, 10000.0), 4, tab);
  std::vector<float> x(8 * 8);
  EXPECT_THROW(rope_forward(x.data(), 8, 8, x.data(), 8, 8, 8, 1, 8, tab),
               Error);  // seq_len beyond the table
  EXPECT_THROW(rope_forward(x.data(), 8, 8, x.data(), 8, 8, 6, 1, 4, tab),
               Error);  // t not a multiple of seq_len
}

}  // namespace
}  // namespace dsv3
