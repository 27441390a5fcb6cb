// SwiGLU fast path: rows in parallel, elementwise inner loops; the per-token dp reduction stays inside its
// row.
#include "kernels/cpu/swiglu.h"

#include <cmath>

#include "core/error.h"

namespace dsv3 {
namespace {

constexpr int64_t kParallelMin = 1 << 14;

// 1/(1+e^{-a}) saturates cleanly: e^{-a} = inf gives 0, never NaN.
inline float sigmoid(float a) {
  return 1.f / (1.f + std::exp(-a));
}

void check(int64_t t, int64_t f, int64_t ld_ab, const char* what) {
  DSV3_CHECK(t >= 0 && f >= 0, what, ": bad shape t=", t, " f=", f);
  DSV3_CHECK(ld_ab >= f, what, ": row stride ", ld_ab, " smaller than f=", f);
}

}  // namespace

void swiglu_forward_general(const float* a, const float* b, int64_t ld_ab, const float* p, float* h,
                            int64_t t, int64_t f) {
  check(t, f, ld_ab, "swiglu_forward");
#pragma omp parallel for schedule(static) if (t * f >= kParallelMin)
  for (int64_t i = 0; i < t; ++i) {
    const float* ar = a + i * ld_ab;
    const float* br = b + i * ld_ab;
    float* hr = h + i * f;
    if (p) {
      const float pi = p[i];
      for (int64_t j = 0; j < f; ++j) hr[j] = (ar[j] * sigmoid(ar[j]) * br[j]) * pi;
    } else {
      for (int64_t j = 0; j < f; ++j) hr[j] = ar[j] * sigmoid(ar[j]) * br[j];
    }
  }
}

void swiglu_backward_general(const float* dh, const float* a, const float* b, int64_t ld_ab, const float* p,
                             float* da, float* db, int64_t ld_dab, float* dp, int64_t t, int64_t f) {
  check(t, f, ld_ab, "swiglu_backward");
  DSV3_CHECK(ld_dab >= f, "swiglu_backward: gradient row stride ", ld_dab, " smaller than f=", f);
  DSV3_CHECK(!p || dp, "swiglu_backward: a scaled SwiGLU needs dp_T");
#pragma omp parallel for schedule(static) if (t * f >= kParallelMin)
  for (int64_t i = 0; i < t; ++i) {
    const float* ar = a + i * ld_ab;
    const float* br = b + i * ld_ab;
    const float* dhr = dh + i * f;
    float* dar = da + i * ld_dab;
    float* dbr = db + i * ld_dab;
    const float pi = p ? p[i] : 1.f;
    float dpi = 0.f;
    for (int64_t j = 0; j < f; ++j) {
      const float av = ar[j], bv = br[j], g = dhr[j];
      const float s = sigmoid(av), silu = av * s;
      dpi += g * silu * bv;
      const float gp = g * pi;
      dar[j] = gp * bv * s * (1.f + av * (1.f - s));
      dbr[j] = gp * silu;
    }
    if (p) dp[i] = dpi;
  }
}

void swiglu_forward_reference(const float* a, const float* b, const float* p, float* h, int64_t t,
                              int64_t f) {
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < f; ++j) {
      const double av = a[i * f + j], s = 1.0 / (1.0 + std::exp(-av));
      h[i * f + j] = static_cast<float>(av * s * b[i * f + j] * (p ? p[i] : 1.0));
    }
}

void swiglu_backward_reference(const float* dh, const float* a, const float* b, const float* p, float* da,
                               float* db, float* dp, int64_t t, int64_t f) {
  for (int64_t i = 0; i < t; ++i) {
    const double pi = p ? p[i] : 1.0;
    double dpi = 0;
    for (int64_t j = 0; j < f; ++j) {
      const double av = a[i * f + j], bv = b[i * f + j], g = dh[i * f + j];
      const double s = 1.0 / (1.0 + std::exp(-av));
      dpi += g * av * s * bv;
      da[i * f + j] = static_cast<float>(g * pi * bv * (s + av * s * (1.0 - s)));
      db[i * f + j] = static_cast<float>(g * pi * av * s);
    }
    if (p) dp[i] = static_cast<float>(dpi);
  }
}

}  // namespace dsv3
