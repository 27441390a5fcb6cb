// RMSNorm fast path: rows in parallel; the backward reads dy and x once, dw summed from fixed row-block
// partials in block order (deterministic for any thread count).
#include "kernels/cpu/rmsnorm.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace dsv3 {
namespace {

// Below this many elements the OpenMP fork costs more than the loop.
constexpr int64_t kParallelMin = 1 << 15;
constexpr int64_t kRowBlock = 32;  // rows per partial dw in the backward

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
  // One pass over dy and x: blocks of kRowBlock rows, each writing its rows' dx and its own partial dw; the
  // partials are then summed in block order. The block boundaries do not depend on the thread count, so
  // neither does the result.
  const int64_t nblk = (t + kRowBlock - 1) / kRowBlock;
  thread_local std::vector<float> partial;
  if (dw && static_cast<int64_t>(partial.size()) < nblk * d) partial.resize(nblk * d);
  float* part = dw ? partial.data() : nullptr;
  const float inv_d = 1.f / static_cast<float>(d);
#pragma omp parallel for schedule(static) if (par)
  for (int64_t blk = 0; blk < nblk; ++blk) {
    float* pw = part ? part + blk * d : nullptr;
    if (pw) std::fill(pw, pw + d, 0.f);
    for (int64_t i = blk * kRowBlock; i < std::min(t, (blk + 1) * kRowBlock); ++i) {
      const float* dyr = dy + i * ld_dy;
      const float* xr = x + i * ld_x;
      float* dxr = dx + i * ld_dx;
      const float r = rstd[i];
      float s = 0.f;
      if (pw) {  // dw before dx: dx may alias dy
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < d; ++j) {
          pw[j] += dyr[j] * (xr[j] * r);
          s += w[j] * dyr[j] * xr[j];
        }
      } else {
#pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < d; ++j) s += w[j] * dyr[j] * xr[j];
      }
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
  if (dw) {
#pragma omp parallel for schedule(static) if (par)
    for (int64_t j = 0; j < d; ++j) {
      float acc = 0.f;
      for (int64_t blk = 0; blk < nblk; ++blk) acc += part[blk * d + j];
      dw[j] += acc;
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
