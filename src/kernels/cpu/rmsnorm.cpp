// RMSNorm fast path: rows in parallel for the forward and dx; dw in parallel over column blocks, each block
// summing all tokens in order (deterministic for any thread count, no scratch).
#include "kernels/cpu/rmsnorm.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3 {
namespace {

// Below this many elements the OpenMP fork costs more than the loop.
constexpr int64_t kParallelMin = 1 << 15;
constexpr int64_t kColBlock = 64;

void check_args(int64_t t, int64_t d, const char* what) {
  DSV3_CHECK(t >= 0 && d > 0, what, ": bad shape t=", t, " d=", d);
}

}  // namespace

void rmsnorm_forward_strided(const float* x, int64_t ld_x, const float* w, float* y, int64_t ld_y,
                             float* rstd, int64_t t, int64_t d, float eps) {
  check_args(t, d, "rmsnorm_forward");
  DSV3_CHECK(ld_x >= d && ld_y >= d, "rmsnorm_forward: row stride smaller than d=", d);
  const float inv_d = 1.f / static_cast<float>(d);
#pragma omp parallel for schedule(static) if (t * d >= kParallelMin)
  for (int64_t i = 0; i < t; ++i) {
    const float* xr = x + i * ld_x;
    float* yr = y + i * ld_y;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < d; ++j) ss += xr[j] * xr[j];
    // Same operation order as HF: x * rsqrt(mean + eps), then weight * that.
    const float r = 1.f / std::sqrt(ss * inv_d + eps);
    rstd[i] = r;
#pragma omp simd
    for (int64_t j = 0; j < d; ++j) yr[j] = w[j] * (xr[j] * r);
  }
}

void rmsnorm_backward_strided(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, const float* w,
                              const float* rstd, float* dx, int64_t ld_dx, float* dw, int64_t t, int64_t d,
                              float beta) {
  check_args(t, d, "rmsnorm_backward");
  DSV3_CHECK(ld_dy >= d && ld_x >= d && ld_dx >= d, "rmsnorm_backward: row stride smaller than d=", d);
  DSV3_CHECK(beta == 0.f || beta == 1.f, "rmsnorm_backward: beta must be 0 or 1, got ", beta);
  const bool par = t * d >= kParallelMin;
  // dw first: dx may alias dy.
  if (dw) {
    const int64_t nblk = (d + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (par)
    for (int64_t b = 0; b < nblk; ++b) {
      const int64_t j0 = b * kColBlock, n = std::min(kColBlock, d - j0);
      float acc[kColBlock] = {};
      for (int64_t i = 0; i < t; ++i) {
        const float* dyr = dy + i * ld_dy + j0;
        const float* xr = x + i * ld_x + j0;
        const float r = rstd[i];
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) acc[j] += dyr[j] * (xr[j] * r);
      }
      for (int64_t j = 0; j < n; ++j) dw[j0 + j] += acc[j];
    }
  }
  const float inv_d = 1.f / static_cast<float>(d);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t i = 0; i < t; ++i) {
    const float* dyr = dy + i * ld_dy;
    const float* xr = x + i * ld_x;
    float* dxr = dx + i * ld_dx;
    const float r = rstd[i];
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < d; ++j) s += w[j] * dyr[j] * xr[j];
    const float c = r * r * r * s * inv_d;
    if (beta == 0.f) {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) dxr[j] = r * (w[j] * dyr[j]) - xr[j] * c;
    } else {
#pragma omp simd
      for (int64_t j = 0; j < d; ++j) dxr[j] += r * (w[j] * dyr[j]) - xr[j] * c;
    }
  }
}

void rmsnorm_forward(const float* x, const float* w, float* y, float* rstd, int64_t t, int64_t d, float eps) {
  rmsnorm_forward_strided(x, d, w, y, d, rstd, t, d, eps);
}

void rmsnorm_backward(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                      float* dw, int64_t t, int64_t d, float beta) {
  rmsnorm_backward_strided(dy, d, x, d, w, rstd, dx, d, dw, t, d, beta);
}

void rmsnorm_forward_reference(const float* x, const float* w, float* y, float* rstd, int64_t t, int64_t d,
                               float eps) {
  for (int64_t i = 0; i < t; ++i) {
    double ss = 0;
    for (int64_t j = 0; j < d; ++j) ss += static_cast<double>(x[i * d + j]) * x[i * d + j];
    const double r = 1.0 / std::sqrt(ss / d + eps);
    rstd[i] = static_cast<float>(r);
    for (int64_t j = 0; j < d; ++j) y[i * d + j] = static_cast<float>(w[j] * (x[i * d + j] * r));
  }
}

void rmsnorm_backward_reference(const float* dy, const float* x, const float* w, const float* rstd, float* dx,
                                float* dw, int64_t t, int64_t d, float beta) {
  for (int64_t j = 0; j < d; ++j) {
    double acc = 0;
    for (int64_t i = 0; i < t; ++i) acc += static_cast<double>(dy[i * d + j]) * x[i * d + j] * rstd[i];
    dw[j] += static_cast<float>(acc);
  }
  for (int64_t i = 0; i < t; ++i) {
    const double r = rstd[i];
    double s = 0;
    for (int64_t j = 0; j < d; ++j) s += static_cast<double>(w[j]) * dy[i * d + j] * x[i * d + j];
    for (int64_t j = 0; j < d; ++j) {
      const double v = r * w[j] * dy[i * d + j] - x[i * d + j] * r * r * r * s / d;
      dx[i * d + j] = static_cast<float>(beta == 0.f ? v : dx[i * d + j] + v);
    }
  }
}

}  // namespace dsv3
