// RMSNorm: fast path vs the double reference loop, backward vs central finite differences of a double
// forward, strided/in-place rows, dx accumulation and thread-count independence of dw.
#include "kernels/cpu/rmsnorm.h"

#include <omp.h>

#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "kernels/kernel_test_util.h"
#include "test_util.h"

namespace dsv3 {
namespace {

std::vector<float> randn(int64_t n, uint64_t stream, float scale = 1.f, float shift = 0.f) {
  return testing::philox_normals(7, n, stream, scale, shift);
}

using testing::max_rel;

// Double-precision loss L = Σ y ⊙ g, for finite differences.
double loss_double(const std::vector<double>& x, const std::vector<double>& w, const std::vector<float>& g,
                   int64_t t, int64_t d, double eps) {
  double loss = 0;
  for (int64_t i = 0; i < t; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += x[i * d + j] * x[i * d + j];
    const double r = 1.0 / std::sqrt(ss / d + eps);
    for (int64_t j = 0; j < d; ++j) loss += g[i * d + j] * w[j] * x[i * d + j] * r;
  }
  return loss;
}

TEST(RmsNorm, FastMatchesReference) {
  for (auto [t, d] : {std::pair<int64_t, int64_t>{1, 3}, {5, 7}, {37, 96}, {300, 513}}) {
    auto x = randn(t * d, 1, 2.f, 0.3f), w = randn(d, 2, 0.5f, 1.f), dy = randn(t * d, 3);
    std::vector<float> y(t * d), yr(t * d), r(t), rr(t);
    rmsnorm_forward(x.data(), w.data(), y.data(), r.data(), t, d, 1e-6f);
    rmsnorm_forward_reference(x.data(), w.data(), yr.data(), rr.data(), t, d, 1e-6f);
    EXPECT_LT(max_rel(y, yr), 2e-6) << t << "x" << d;
    EXPECT_LT(max_rel(r, rr), 2e-6) << t << "x" << d;
    auto dw0 = randn(d, 4);
    std::vector<float> dx(t * d), dxr(t * d), dw = dw0, dwr = dw0;
    rmsnorm_backward(dy.data(), x.data(), w.data(), r.data(), dx.data(), dw.data(), t, d);
    rmsnorm_backward_reference(dy.data(), x.data(), w.data(), rr.data(), dxr.data(), dwr.data(), t, d);
    EXPECT_LT(max_rel(dx, dxr), 1e-5) << t << "x" << d;
    EXPECT_LT(max_rel(dw, dwr), 1e-5) << t << "x" << d;
  }
}

TEST(RmsNorm, BackwardMatchesFiniteDifferences) {
  const int64_t t = 4, d = 9;
  const float eps = 1e-2f;  // a visible eps so its place in the formula is checked too
  auto x = randn(t * d, 11), w = randn(d, 12, 0.5f, 1.f), g = randn(t * d, 13);
  std::vector<float> y(t * d), r(t), dx(t * d), dw(d, 0.f);
  rmsnorm_forward(x.data(), w.data(), y.data(), r.data(), t, d, eps);
  rmsnorm_backward(g.data(), x.data(), w.data(), r.data(), dx.data(), dw.data(), t, d);
  std::vector<double> xd(x.begin(), x.end()), wd(w.begin(), w.end());
  const double h = 1e-6;
  for (int64_t k = 0; k < t * d; ++k) {
    auto xp = xd, xm = xd;
    xp[k] += h, xm[k] -= h;
    const double fd = (loss_double(xp, wd, g, t, d, eps) - loss_double(xm, wd, g, t, d, eps)) / (2 * h);
    EXPECT_NEAR(dx[k], fd, 1e-4 * (1 + std::fabs(fd))) << "dx " << k;
  }
  for (int64_t k = 0; k < d; ++k) {
    auto wp = wd, wm = wd;
    wp[k] += h, wm[k] -= h;
    const double fd = (loss_double(xd, wp, g, t, d, eps) - loss_double(xd, wm, g, t, d, eps)) / (2 * h);
    EXPECT_NEAR(dw[k], fd, 1e-4 * (1 + std::fabs(fd))) << "dw " << k;
  }
}

TEST(RmsNorm, StridedInPlaceAndAccumulate) {
  // The MLA latent-norm case: normalise columns [0, 20) of [T, 24] rows in place; the last 4 stay untouched.
  const int64_t t = 6, d = 20, ld = 24;
  auto buf = randn(t * ld, 21), w = randn(d, 22, 0.3f, 1.f), dy = randn(t * d, 23);
  std::vector<float> xc(t * d), yc(t * d), rc(t), r(t);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < d; ++j) xc[i * d + j] = buf[i * ld + j];
  rmsnorm_forward(xc.data(), w.data(), yc.data(), rc.data(), t, d, 1e-6f);
  auto orig = buf;
  rmsnorm_forward_strided(buf.data(), ld, w.data(), buf.data(), ld, r.data(), t, d, 1e-6f);
  for (int64_t i = 0; i < t; ++i) {
    for (int64_t j = 0; j < d; ++j) EXPECT_EQ(buf[i * ld + j], yc[i * d + j]);
    for (int64_t j = d; j < ld; ++j) EXPECT_EQ(buf[i * ld + j], orig[i * ld + j]);
  }
  // beta = 1 adds onto an existing gradient; dx may alias dy.
  std::vector<float> dx0 = randn(t * d, 24), dx = dx0, dxa(t * d), dw(d, 0.f), dw2(d, 0.f);
  rmsnorm_backward(dy.data(), xc.data(), w.data(), rc.data(), dx.data(), dw.data(), t, d, 1.f);
  rmsnorm_backward(dy.data(), xc.data(), w.data(), rc.data(), dxa.data(), dw2.data(), t, d);
  for (int64_t k = 0; k < t * d; ++k) EXPECT_FLOAT_EQ(dx[k], dx0[k] + dxa[k]);
  auto alias = dy;
  std::vector<float> dw3(d, 0.f);
  rmsnorm_backward(alias.data(), xc.data(), w.data(), rc.data(), alias.data(), dw3.data(), t, d);
  EXPECT_EQ(alias, dxa);
  EXPECT_EQ(dw3, dw2);
}

TEST(RmsNorm, DeterministicAcrossThreadCounts) {
  const int64_t t = 257, d = 300;
  auto x = randn(t * d, 31), w = randn(d, 32), dy = randn(t * d, 33);
  std::vector<float> y(t * d), r(t);
  rmsnorm_forward(x.data(), w.data(), y.data(), r.data(), t, d, 1e-6f);
  const int saved = omp_get_max_threads();
  std::vector<std::vector<float>> dws;
  for (int nt : {1, 2, 3}) {
    omp_set_num_threads(nt);
    std::vector<float> dx(t * d), dw(d, 0.f);
    rmsnorm_backward(dy.data(), x.data(), w.data(), r.data(), dx.data(), dw.data(), t, d);
    dws.push_back(dw);
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(dws[0], dws[1]);
  EXPECT_EQ(dws[0], dws[2]);
}

TEST(RmsNorm, RejectsBadShapes) {
  std::vector<float> v(4);
  EXPECT_THROW(rmsnorm_forward(v.data(), v.data(), v.data(), v.data(), 1, 0, 1e-6f), Error);
  EXPECT_THROW(rmsnorm_forward_strided(v.data(), 1, v.data(), v.data(), 2, v.data(), 1, 2, 1e-6f), Error);
}

}  // namespace
}  // namespace dsv3
