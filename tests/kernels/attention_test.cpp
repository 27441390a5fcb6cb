// Causal attention: tiled fast path vs the double full-matrix reference (forward and backward, strided views,
// Dqk != Dv, ragged last block, B > 1), finite differences of the reference, and the bf16 mode's error bound.
#include "kernels/cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/bf16.h"
#include "core/error.h"
#include "core/philox.h"
#include "test_util.h"

namespace dsv3 {
namespace {

// A [B,S,H,D] tensor embedded in a wider strided buffer (as MLA's q/k/v slices are), plus a contiguous double copy.
struct Strided {
  int64_t T, H, D, ld_token, ld_head;
  std::vector<float> buf;
  Strided(int64_t t, int64_t h, int64_t d, int64_t head_pad, int64_t token_pad)
      : T(t),
        H(h),
        D(d),
        ld_token(h * (d + head_pad) + token_pad),
        ld_head(d + head_pad),
        buf(t * ld_token, 7.f) {}
  float& at(int64_t t, int64_t h, int64_t d) { return buf[t * ld_token + h * ld_head + d]; }
  HeadsView view() const { return {buf.data(), ld_token, ld_head}; }
  HeadsViewMut mut() { return {buf.data(), ld_token, ld_head}; }
  void fill(uint64_t stream, float scale) {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) at(t, h, d) = scale * philox_normal(11, stream, (t * H + h) * D + d);
  }
  std::vector<double> dense(bool bf = false) {
    std::vector<double> out(T * H * D);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) out[(t * H + h) * D + d] = bf ? round_bf16(at(t, h, d)) : at(t, h, d);
    return out;
  }
};

// max |a - b| / max |b|
double rel_err(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / std::max(den, 1e-300);
}

struct Result {
  std::vector<double> o, lse, dq, dk, dv;
};

Result run_fast(const AttentionShape& s, Strided& q, Strided& k, Strided& v, Strided& dout, Precision p) {
  const int64_t T = s.batch * s.seq;
  Strided o(T, s.heads, s.d_v, 2, 1), dq(T, s.heads, s.d_qk, 1, 3), dk(T, s.heads, s.d_qk, 0, 2),
      dv(T, s.heads, s.d_v, 3, 0);
  std::vector<float> lse(s.batch * s.heads * s.seq);
  AttentionScratch scratch;
  attention_forward(s, q.view(), k.view(), v.view(), o.mut(), lse.data(), p, scratch);
  attention_backward(s, q.view(), k.view(), v.view(), o.view(), lse.data(), dout.view(), dq.mut(), dk.mut(),
                     dv.mut(), p, scratch);
  // Padding between heads/tokens must be untouched (7.f from construction).
  EXPECT_EQ(o.buf[s.d_v], 7.f);
  EXPECT_EQ(dv.buf[s.d_v], 7.f);
  return {o.dense(), std::vector<double>(lse.begin(), lse.end()), dq.dense(), dk.dense(), dv.dense()};
}

Result run_reference(const AttentionShape& s, Strided& q, Strided& k, Strided& v, Strided& dout, bool bf) {
  const auto qd = q.dense(bf), kd = k.dense(bf), vd = v.dense(bf), dod = dout.dense();
  Result r;
  const int64_t T = s.batch * s.seq;
  r.o.resize(T * s.heads * s.d_v);
  r.lse.resize(s.batch * s.heads * s.seq);
  r.dq.resize(qd.size()), r.dk.resize(kd.size()), r.dv.resize(vd.size());
  attention_forward_reference(s, qd.data(), kd.data(), vd.data(), r.o.data(), r.lse.data());
  attention_backward_reference(s, qd.data(), kd.data(), vd.data(), dod.data(), r.dq.data(), r.dk.data(),
                               r.dv.data());
  return r;
}

struct Case {
  int64_t B, S, H, Dqk, Dv;
};

TEST(Attention, FastMatchesReference) {
  // Ragged last blocks (S % 64 != 0), several key blocks, Dqk != Dv, Dqk not a multiple of 16, B > 1.
  const Case cases[] = {{2, 7, 2, 12, 6}, {1, 130, 3, 20, 16}, {2, 64, 1, 48, 32}, {2, 200, 2, 192, 128}};
  for (const auto& c : cases) {
    SCOPED_TRACE(::testing::Message()
                 << "B=" << c.B << " S=" << c.S << " H=" << c.H << " Dqk=" << c.Dqk << " Dv=" << c.Dv);
    const int64_t T = c.B * c.S;
    AttentionShape s{c.B, c.S, c.H, c.Dqk, c.Dv, 1.7f / std::sqrt(float(c.Dqk))};
    Strided q(T, c.H, c.Dqk, 3, 5), k(T, c.H, c.Dqk, 0, 0), v(T, c.H, c.Dv, 2, 1), dout(T, c.H, c.Dv, 0, 4);
    q.fill(1, 1.f), k.fill(2, 1.f), v.fill(3, 1.f), dout.fill(4, 1.f);
    const Result f = run_fast(s, q, k, v, dout, Precision::kF32);
    const Result r = run_reference(s, q, k, v, dout, false);
    EXPECT_LT(rel_err(f.o, r.o), 2e-6);
    EXPECT_LT(rel_err(f.lse, r.lse), 2e-6);
    EXPECT_LT(rel_err(f.dq, r.dq), 2e-5);
    EXPECT_LT(rel_err(f.dk, r.dk), 2e-5);
    EXPECT_LT(rel_err(f.dv, r.dv), 2e-5);
  }
}

TEST(Attention, LargeScoresStayFinite) {
  // Scores of magnitude ~100 exercise the online-softmax rescaling and the exp clamp.
  AttentionShape s{1, 150, 2, 16, 16, 1.f};
  const int64_t T = 150;
  Strided q(T, 2, 16, 0, 0), k(T, 2, 16, 0, 0), v(T, 2, 16, 0, 0), dout(T, 2, 16, 0, 0);
  q.fill(1, 3.f), k.fill(2, 3.f), v.fill(3, 1.f), dout.fill(4, 1.f);
  const Result f = run_fast(s, q, k, v, dout, Precision::kF32);
  const Result r = run_reference(s, q, k, v, dout, false);
  EXPECT_LT(rel_err(f.o, r.o), 2e-5);
  EXPECT_LT(rel_err(f.dq, r.dq), 1e-4);
  EXPECT_LT(rel_err(f.dk, r.dk), 1e-4);
  EXPECT_LT(rel_err(f.dv, r.dv), 2e-5);
}

TEST(Attention, ReferenceBackwardMatchesFiniteDifferences) {
  // L = Σ o ⊙ w in double; central differences against the reference backward.
  const AttentionShape s{2, 5, 2, 4, 3, 0.6f};
  const int64_t T = 10, nq = T * 2 * 4, nv = T * 2 * 3;
  std::vector<double> q(nq), k(nq), v(nv), w(nv);
  for (int64_t i = 0; i < nq; ++i) q[i] = philox_normal(5, 1, i), k[i] = philox_normal(5, 2, i);
  for (int64_t i = 0; i < nv; ++i) v[i] = philox_normal(5, 3, i), w[i] = philox_normal(5, 4, i);
  auto loss = [&] {
    std::vector<double> o(nv), lse(2 * 2 * 5);
    attention_forward_reference(s, q.data(), k.data(), v.data(), o.data(), lse.data());
    double l = 0;
    for (int64_t i = 0; i < nv; ++i) l += o[i] * w[i];
    return l;
  };
  std::vector<double> dq(nq), dk(nq), dv(nv);
  attention_backward_reference(s, q.data(), k.data(), v.data(), w.data(), dq.data(), dk.data(), dv.data());
  const double h = 1e-6;
  auto check = [&](std::vector<double>& x, const std::vector<double>& g, const char* name) {
    for (size_t i = 0; i < x.size(); ++i) {
      const double x0 = x[i];
      x[i] = x0 + h;
      const double lp = loss();
      x[i] = x0 - h;
      const double lm = loss();
      x[i] = x0;
      EXPECT_NEAR((lp - lm) / (2 * h), g[i], 1e-7) << name << "[" << i << "]";
    }
  };
  check(q, dq, "q");
  check(k, dk, "k");
  check(v, dv, "v");
}

TEST(Attention, Bf16WithinBound) {
  // bf16 mode rounds q, k, v, dO and the probabilities to bf16; against a double reference on the rounded inputs,
  // the remaining error is the rounding of P (and dS), a relative 2^-9 per element.
  const AttentionShape s{2, 100, 2, 24, 16, 0.2f};
  const int64_t T = 200;
  Strided q(T, 2, 24, 0, 0), k(T, 2, 24, 0, 0), v(T, 2, 16, 0, 0), dout(T, 2, 16, 0, 0);
  q.fill(1, 1.f), k.fill(2, 1.f), v.fill(3, 1.f), dout.fill(4, 1.f);
  const Result f = run_fast(s, q, k, v, dout, Precision::kBF16);
  const Result r = run_reference(s, q, k, v, dout, true);
  EXPECT_LT(rel_err(f.o, r.o), 8e-3);
  EXPECT_LT(rel_err(f.lse, r.lse), 1e-5);
  EXPECT_LT(rel_err(f.dq, r.dq), 1.5e-2);
  EXPECT_LT(rel_err(f.dk, r.dk), 1.5e-2);
  EXPECT_LT(rel_err(f.dv, r.dv), 8e-3);
}

TEST(Attention, RejectsBadShapes) {
  AttentionScratch scratch;
  std::vector<float> buf(64), lse(8);
  AttentionShape s{1, 4, 2, 4, 4, 1.f};
  HeadsView in{buf.data(), 8, 4};
  HeadsViewMut out{buf.data(), 8, 4};
  EXPECT_NO_THROW(attention_forward(s, in, in, in, out, lse.data(), Precision::kF32, scratch));
  HeadsView narrow{buf.data(), 6, 4};  // two heads of 4 do not fit in 6 floats per token
  EXPECT_THROW(attention_forward(s, narrow, in, in, out, lse.data(), Precision::kF32, scratch), Error);
  s.seq = 0;
  EXPECT_THROW(attention_forward(s, in, in, in, out, lse.data(), Precision::kF32, scratch), Error);
}

}  // namespace
}  // namespace dsv3
