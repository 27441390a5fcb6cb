// Chunked head + cross-entropy: fast path (chunk sizes that do and do not divide V, ignored labels) vs the
// full-logits double reference, gradients vs central finite differences of a double loss, bf16 GEMM mode vs
// the reference on bf16-rounded operands, accumulation semantics and label validation.
#include "kernels/cpu/cross_entropy.h"

#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "kernels/kernel_test_util.h"
#include "test_util.h"

namespace dsv3 {
namespace {

constexpr int64_t kT = 37, kD = 24, kV = 1000;

std::vector<float> randn(int64_t n, uint64_t stream, float scale = 1.f) {
  return testing::philox_normals(17, n, stream, scale);
}

std::vector<int32_t> make_labels(int64_t t, int64_t v) {
  std::vector<int32_t> y(t);
  for (int64_t i = 0; i < t; ++i) y[i] = static_cast<int32_t>((i * 389 + 11) % v);
  y[3] = y[17] = y[t - 1] = kIgnoreLabel;
  y[5] = 0, y[6] = static_cast<int32_t>(v - 1);  // the first and last vocab rows
  return y;
}

using testing::max_rel;

struct Case {
  std::vector<float> h = randn(kT * kD, 1, 1.f), w = randn(kV * kD, 2, 0.5f), wt = randn(kT, 3);
  std::vector<int32_t> y = make_labels(kT, kV);
};

TEST(HeadCrossEntropy, FastMatchesReference) {
  Case c;
  const float dloss = 1.f / 34;  // a mean over the 34 valid tokens
  std::vector<float> loss_r(kT), logits_r(kT * kV), dh_r(kT * kD), dw0 = randn(kV * kD, 4), dw_r = dw0;
  const auto ref =
      head_cross_entropy_reference(c.h.data(), c.w.data(), c.y.data(), loss_r.data(), logits_r.data(), dloss,
                                   c.wt.data(), dh_r.data(), dw_r.data(), kT, kD, kV);
  EXPECT_EQ(ref.n_valid, kT - 3);
  HeadLossScratch s;
  for (int64_t chunk : {128, 1000, 333, 0}) {
    SCOPED_TRACE(chunk);
    std::vector<float> loss(kT), lse(kT), dh(kT * kD, 7.f), dw = dw0;
    const auto res = head_cross_entropy_forward(c.h.data(), c.w.data(), c.y.data(), loss.data(), lse.data(),
                                                kT, kD, kV, Precision::kF32, s, chunk);
    EXPECT_EQ(res.n_valid, ref.n_valid);
    EXPECT_NEAR(res.loss_sum, ref.loss_sum, 1e-5 * ref.loss_sum);
    EXPECT_LT(max_rel(loss, loss_r), 1e-5);
    for (int64_t i : {3, 17, 36}) EXPECT_EQ(loss[i], 0.f);
    head_cross_entropy_backward(c.h.data(), c.w.data(), c.y.data(), lse.data(), dloss, c.wt.data(), dh.data(),
                                dw.data(), kT, kD, kV, Precision::kF32, s, chunk);
    EXPECT_LT(max_rel(dh, dh_r), 1e-5);
    EXPECT_LT(max_rel(dw, dw_r), 1e-5);  // accumulated onto dw0 like the reference
    for (int64_t i : {3, 17, 36})
      for (int64_t k = 0; k < kD; ++k) EXPECT_EQ(dh[i * kD + k], 0.f);  // ignored tokens: no gradient
  }
  std::vector<float> loss(kT), lse(kT), logits(kT * kV);
  head_cross_entropy_forward(c.h.data(), c.w.data(), c.y.data(), loss.data(), lse.data(), kT, kD, kV,
                             Precision::kF32, s, 300, logits.data());
  EXPECT_LT(max_rel(logits, logits_r), 1e-6);
  EXPECT_LT(max_rel(loss, loss_r), 1e-5);
}

TEST(HeadCrossEntropy, GradientsMatchFiniteDifferences) {
  // Small sizes so the double loss can be re-evaluated per perturbed entry.
  const int64_t t = 5, d = 6, v = 11;
  auto h = randn(t * d, 21), w = randn(v * d, 22), wt = randn(t, 23);
  std::vector<int32_t> y = {3, kIgnoreLabel, 0, 10, 7};
  const float dloss = 0.7f;
  HeadLossScratch s;
  std::vector<float> loss(t), lse(t), dh(t * d), dw(v * d, 0.f), dh1(t * d), dw1(v * d, 0.f);
  head_cross_entropy_forward(h.data(), w.data(), y.data(), loss.data(), lse.data(), t, d, v, Precision::kF32,
                             s, 4);
  head_cross_entropy_backward(h.data(), w.data(), y.data(), lse.data(), dloss, wt.data(), dh.data(),
                              dw.data(), t, d, v, Precision::kF32, s, 4);
  // One vocab row per chunk gives the same gradients.
  head_cross_entropy_backward(h.data(), w.data(), y.data(), lse.data(), dloss, wt.data(), dh1.data(),
                              dw1.data(), t, d, v, Precision::kF32, s, 1);
  for (int64_t k = 0; k < t * d; ++k) EXPECT_NEAR(dh1[k], dh[k], 1e-6 * (1 + std::fabs(dh[k])));
  for (int64_t k = 0; k < v * d; ++k) EXPECT_NEAR(dw1[k], dw[k], 1e-6 * (1 + std::fabs(dw[k])));
  std::vector<double> hd(h.begin(), h.end()), wd(w.begin(), w.end());
  auto objective = [&] {
    double total = 0;
    for (int64_t i = 0; i < t; ++i) {
      if (y[i] == kIgnoreLabel) continue;
      std::vector<double> lg(v);
      double m = -1e300, se = 0;
      for (int64_t j = 0; j < v; ++j) {
        for (int64_t k = 0; k < d; ++k) lg[j] += hd[i * d + k] * wd[j * d + k];
        m = std::max(m, lg[j]);
      }
      for (int64_t j = 0; j < v; ++j) se += std::exp(lg[j] - m);
      total += double(dloss) * wt[i] * (m + std::log(se) - lg[y[i]]);
    }
    return total;
  };
  const double eps = 1e-6;
  auto fd = [&](double& x) {
    const double x0 = x;
    x = x0 + eps;
    const double lp = objective();
    x = x0 - eps;
    const double lm = objective();
    x = x0;
    return (lp - lm) / (2 * eps);
  };
  for (int64_t k = 0; k < t * d; ++k) {
    const double g = fd(hd[k]);
    EXPECT_NEAR(dh[k], g, 1e-5 * (1 + std::fabs(g))) << "dh " << k;
  }
  for (int64_t k = 0; k < v * d; ++k) {
    const double g = fd(wd[k]);
    EXPECT_NEAR(dw[k], g, 1e-5 * (1 + std::fabs(g))) << "dw " << k;
  }
}

TEST(HeadCrossEntropy, Bf16GemmsMatchReferenceOnRoundedOperands) {
  Case c;
  auto hr = c.h, wr = c.w;
  for (auto& x : hr) x = round_bf16(x);
  for (auto& x : wr) x = round_bf16(x);
  std::vector<float> loss_r(kT), dh_r(kT * kD), dw_r(kV * kD, 0.f);
  head_cross_entropy_reference(hr.data(), wr.data(), c.y.data(), loss_r.data(), nullptr, 1.f, nullptr,
                               dh_r.data(), dw_r.data(), kT, kD, kV);
  HeadLossScratch s;
  std::vector<float> loss(kT), lse(kT), dh(kT * kD), dw(kV * kD, 0.f);
  head_cross_entropy_forward(c.h.data(), c.w.data(), c.y.data(), loss.data(), lse.data(), kT, kD, kV,
                             Precision::kBF16, s, 128);
  // Logits see only the operand rounding (fp32 accumulation): tight.
  EXPECT_LT(max_rel(loss, loss_r), 1e-5);
  head_cross_entropy_backward(c.h.data(), c.w.data(), c.y.data(), lse.data(), 1.f, nullptr, dh.data(),
                              dw.data(), kT, kD, kV, Precision::kBF16, s, 128);
  // The backward also rounds dlogits to bf16 (2^-9 relative per element).
  EXPECT_LT(max_rel(dh, dh_r), 1e-2);
  EXPECT_LT(max_rel(dw, dw_r), 1e-2);
}

TEST(HeadCrossEntropy, AllIgnoredAndEmpty) {
  const int64_t t = 3, d = 4, v = 5;
  auto h = randn(t * d, 31), w = randn(v * d, 32);
  std::vector<int32_t> y(t, kIgnoreLabel);
  HeadLossScratch s;
  std::vector<float> loss(t, 1.f), lse(t), dh(t * d, 1.f), dw(v * d, 2.f);
  const auto res = head_cross_entropy_forward(h.data(), w.data(), y.data(), loss.data(), lse.data(), t, d, v,
                                              Precision::kF32, s);
  EXPECT_EQ(res.n_valid, 0);
  EXPECT_EQ(res.loss_sum, 0.0);
  head_cross_entropy_backward(h.data(), w.data(), y.data(), lse.data(), 1.f, nullptr, dh.data(), dw.data(), t,
                              d, v, Precision::kF32, s);
  for (float x : dh) EXPECT_EQ(x, 0.f);
  for (float x : dw) EXPECT_EQ(x, 2.f);
  const auto empty = head_cross_entropy_forward(h.data(), w.data(), y.data(), loss.data(), lse.data(), 0, d,
                                                v, Precision::kF32, s);
  EXPECT_EQ(empty.n_valid, 0);
}

TEST(HeadCrossEntropy, RejectsBadLabels) {
  const int64_t t = 2, d = 2, v = 3;
  std::vector<float> h(t * d), w(v * d), loss(t), lse(t);
  HeadLossScratch s;
  for (int32_t bad : {3, -1, -99}) {
    std::vector<int32_t> y = {0, bad};
    try {
      head_cross_entropy_forward(h.data(), w.data(), y.data(), loss.data(), lse.data(), t, d, v,
                                 Precision::kF32, s);
      FAIL() << "accepted label " << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("label " + std::to_string(bad) + " at token 1"), std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace dsv3
