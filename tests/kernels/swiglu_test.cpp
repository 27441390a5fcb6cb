// SwiGLU: fast path vs the double reference (separate, fused [T,2F], scaled), backward (incl. dp) vs central
// finite differences of a double forward, in-place fused backward, and saturation at large |a|.
#include "kernels/cpu/swiglu.h"

#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "kernels/kernel_test_util.h"
#include "test_util.h"

namespace dsv3 {
namespace {

std::vector<float> randn(int64_t n, uint64_t stream, float scale = 1.f) {
  return testing::philox_normals(9, n, stream, scale);
}

using testing::max_rel;

TEST(SwiGlu, FastMatchesReference) {
  const int64_t t = 45, f = 77;
  auto a = randn(t * f, 1, 3.f), b = randn(t * f, 2), dh = randn(t * f, 3), p = randn(t, 4);
  for (bool scaled : {false, true}) {
    const float* pp = scaled ? p.data() : nullptr;
    std::vector<float> h(t * f), hr(t * f);
    if (scaled)
      swiglu_scaled_forward(a.data(), b.data(), pp, h.data(), t, f);
    else
      swiglu_forward(a.data(), b.data(), h.data(), t, f);
    swiglu_forward_reference(a.data(), b.data(), pp, hr.data(), t, f);
    EXPECT_LT(max_rel(h, hr), 1e-6);
    std::vector<float> da(t * f), db(t * f), dp(t), dar(t * f), dbr(t * f), dpr(t);
    if (scaled)
      swiglu_scaled_backward(dh.data(), a.data(), b.data(), pp, da.data(), db.data(), dp.data(), t, f);
    else
      swiglu_backward(dh.data(), a.data(), b.data(), da.data(), db.data(), t, f);
    swiglu_backward_reference(dh.data(), a.data(), b.data(), pp, dar.data(), dbr.data(), dpr.data(), t, f);
    EXPECT_LT(max_rel(da, dar), 1e-6);
    EXPECT_LT(max_rel(db, dbr), 1e-6);
    if (scaled) {
      EXPECT_LT(max_rel(dp, dpr), 1e-5);
    }
  }
}

TEST(SwiGlu, FusedLayoutAndInPlace) {
  const int64_t t = 13, f = 19;
  auto a = randn(t * f, 5, 2.f), b = randn(t * f, 6), dh = randn(t * f, 7);
  std::vector<float> ab(t * 2 * f);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < f; ++j) ab[i * 2 * f + j] = a[i * f + j], ab[i * 2 * f + f + j] = b[i * f + j];
  std::vector<float> h(t * f), hf(t * f), da(t * f), db(t * f);
  swiglu_forward(a.data(), b.data(), h.data(), t, f);
  swiglu_forward_fused(ab.data(), hf.data(), t, f);
  EXPECT_EQ(h, hf);
  swiglu_backward(dh.data(), a.data(), b.data(), da.data(), db.data(), t, f);
  swiglu_backward_fused(dh.data(), ab.data(), ab.data(), t, f);  // in place
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < f; ++j) {
      EXPECT_EQ(ab[i * 2 * f + j], da[i * f + j]);
      EXPECT_EQ(ab[i * 2 * f + f + j], db[i * f + j]);
    }
}

TEST(SwiGlu, BackwardMatchesFiniteDifferences) {
  const int64_t t = 3, f = 5;
  auto a = randn(t * f, 11, 2.f), b = randn(t * f, 12), g = randn(t * f, 13), p = randn(t, 14);
  std::vector<float> da(t * f), db(t * f), dp(t);
  swiglu_scaled_backward(g.data(), a.data(), b.data(), p.data(), da.data(), db.data(), dp.data(), t, f);
  std::vector<double> ad(a.begin(), a.end()), bd(b.begin(), b.end()), pd(p.begin(), p.end());
  auto loss = [&] {
    double l = 0;
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < f; ++j) {
        const double av = ad[i * f + j];
        l += g[i * f + j] * av / (1 + std::exp(-av)) * bd[i * f + j] * pd[i];
      }
    return l;
  };
  const double h = 1e-6;
  auto fd = [&](double& v) {
    const double v0 = v;
    v = v0 + h;
    const double lp = loss();
    v = v0 - h;
    const double lm = loss();
    v = v0;
    return (lp - lm) / (2 * h);
  };
  for (int64_t k = 0; k < t * f; ++k) {
    const double fa = fd(ad[k]), fb = fd(bd[k]);
    EXPECT_NEAR(da[k], fa, 1e-5 * (1 + std::fabs(fa))) << k;
    EXPECT_NEAR(db[k], fb, 1e-5 * (1 + std::fabs(fb))) << k;
  }
  for (int64_t i = 0; i < t; ++i) {
    const double fp = fd(pd[i]);
    EXPECT_NEAR(dp[i], fp, 1e-5 * (1 + std::fabs(fp))) << i;
  }
}

TEST(SwiGlu, SaturatesWithoutNaN) {
  std::vector<float> a = {-200.f, -90.f, 0.f, 90.f, 200.f}, b(5, 2.f), dh(5, 1.f), h(5), da(5), db(5);
  swiglu_forward(a.data(), b.data(), h.data(), 1, 5);
  swiglu_backward(dh.data(), a.data(), b.data(), da.data(), db.data(), 1, 5);
  const float eh[] = {0.f, 0.f, 0.f, 180.f, 400.f}, eda[] = {0.f, 0.f, 1.f, 2.f, 2.f};
  for (int j = 0; j < 5; ++j) {
    EXPECT_NEAR(h[j], eh[j], 1e-30f) << j;
    EXPECT_NEAR(da[j], eda[j], 1e-30f) << j;
  }
}

TEST(SwiGlu, ScaledBackwardNeedsDp) {
  std::vector<float> v(4);
  EXPECT_THROW(swiglu_backward_general(v.data(), v.data(), v.data(), 2, v.data(), v.data(), v.data(), 2,
                                       nullptr, 2, 2),
               Error);
}

}  // namespace
}  // namespace dsv3
