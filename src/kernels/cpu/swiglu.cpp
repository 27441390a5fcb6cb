// SwiGLU fast path: rows in parallel, elementwise inner loops; the per-token dp reduction stays inside its
// row.
#include "kernels/cpu/swiglu.h"

#include <cmath>

#include "core/error.h"
#include "kernels/cpu/simd_exp.h"

namespace dsv3 {
namespace {

constexpr int64_t kParallelMin = 1 << 14;

// 1/(1+e^{-a}) saturates cleanly: e^{-a} = inf gives 0, never NaN.
inline float sigmoid(float a) {
  return 1.f / (1.f + std::exp(-a));
}

// 8 lanes of sigmoid through simd::exp8 (clamped, so it saturates to 0 or 1 like the scalar form).
inline simd::v8 sigmoid8(simd::v8 a) {
  return 1.f / (1.f + simd::exp8(-a));
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
    const float pi = p ? p[i] : 1.f;
    const int64_t f8 = f / 8 * 8;
    for (int64_t j = 0; j < f8; j += 8) {
      const simd::v8 av = simd::ld(ar + j);
      simd::st(hr + j, (av * sigmoid8(av) * simd::ld(br + j)) * pi);
    }
    for (int64_t j = f8; j < f; ++j) hr[j] = (ar[j] * sigmoid(ar[j]) * br[j]) * pi;
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
    const int64_t f8 = f / 8 * 8;
    simd::v8 dpv = simd::v8{};
    for (int64_t j = 0; j < f8; j += 8) {
      const simd::v8 av = simd::ld(ar + j), bv = simd::ld(br + j), g = simd::ld(dhr + j);
      const simd::v8 s = sigmoid8(av), silu = av * s;
      dpv += g * silu * bv;
      const simd::v8 gp = g * pi;
      simd::st(dar + j, gp * bv * s * (1.f + av * (1.f - s)));
      simd::st(dbr + j, gp * silu);
    }
    float dpi = simd::hsum(dpv);
    for (int64_t j = f8; j < f; ++j) {
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
