// AdamW's elementwise update over fp32 buffers (the arithmetic of optim/adamw.h, which owns the moments and the
// step count). Kept here, below the backends, so the CPU backend and the optimizer run one code.
#include "kernels/cpu/adamw.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

namespace dsv3 {
namespace {

using StepConsts = AdamWStepConsts;

// Eight elements in AVX2 (the project's x86-64-v3 baseline), written out because GCC will not vectorise a loop
// containing sqrt without -fno-math-errno. The operations and roundings are torch 2.x's vectorised CPU kernels'
// (found by matching the fixture bit for bit):
//   p·decay (mul_);  fma(w1, g - m, m) (lerp_);  fma(w2·g, g, v·b2) (mul_ + addcmul_);
//   sqrt(v)/bc2_sqrt + eps;  p - (step_size·m)/denom (addcdiv_).
// fp-contract=off: GCC would otherwise fuse p·decay - update into one FMA (torch rounds p·decay first).
__attribute__((optimize("fp-contract=off"))) inline void adamw8(float* p, const float* g, float* m, float* v,
                                                                const StepConsts& k) {
  const __m256 gi = _mm256_loadu_ps(g);
  const __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p), _mm256_set1_ps(k.decay));
  const __m256 m0 = _mm256_loadu_ps(m);
  const __m256 mi = _mm256_fmadd_ps(_mm256_set1_ps(k.w1), _mm256_sub_ps(gi, m0), m0);
  const __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(k.w2), gi), gi,
                                    _mm256_mul_ps(_mm256_loadu_ps(v), _mm256_set1_ps(k.b2)));
  const __m256 denom =
      _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), _mm256_set1_ps(k.bc2_sqrt)), _mm256_set1_ps(k.eps));
  const __m256 upd = _mm256_div_ps(_mm256_mul_ps(_mm256_set1_ps(k.step_size), mi), denom);
  _mm256_storeu_ps(m, mi);
  _mm256_storeu_ps(v, vi);
  _mm256_storeu_ps(p, _mm256_sub_ps(pi, upd));
}

// One contiguous chunk; a ragged tail goes through the same eight-wide code via a padded copy, so every element
// gets identical arithmetic wherever it falls.
__attribute__((optimize("fp-contract=off"))) void adamw_chunk(float* p, const float* g, float* m, float* v,
                                                              int64_t n, const StepConsts& k) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) adamw8(p + i, g + i, m + i, v + i, k);
  if (i < n) {
    alignas(32) float tp[8] = {}, tg[8] = {}, tm[8] = {}, tv[8] = {};
    const int64_t r = n - i;
    std::copy_n(p + i, r, tp), std::copy_n(g + i, r, tg), std::copy_n(m + i, r, tm),
        std::copy_n(v + i, r, tv);
    adamw8(tp, tg, tm, tv, k);
    std::copy_n(tp, r, p + i), std::copy_n(tm, r, m + i), std::copy_n(tv, r, v + i);
  }
}

constexpr int64_t kChunk = 1 << 14;

}  // namespace

AdamWStepConsts adamw_step_consts(double beta1, double beta2, double eps, int64_t step, double lr,
                                  double wd) {
  // Scalars as torch.optim.AdamW (_single_tensor_adam) forms them: Python doubles, used by fp32 kernels.
  const double t = static_cast<double>(step);
  const double bc1 = 1.0 - std::pow(beta1, t);
  const double bc2 = 1.0 - std::pow(beta2, t);
  AdamWStepConsts k;
  k.decay = static_cast<float>(1.0 - lr * wd);      // param.mul_(1 - lr*wd)
  k.w1 = static_cast<float>(1.0 - beta1);           // exp_avg.lerp_(grad, 1 - beta1)
  k.b2 = static_cast<float>(beta2);                 // exp_avg_sq.mul_(beta2)
  k.w2 = static_cast<float>(1.0 - beta2);           //   .addcmul_(grad, grad, value=1 - beta2)
  k.step_size = static_cast<float>(lr / bc1);       // param.addcdiv_(exp_avg, denom, value=-lr/bc1)
  k.bc2_sqrt = static_cast<float>(std::sqrt(bc2));  // denom = exp_avg_sq.sqrt() / bc2**0.5 + eps
  k.eps = static_cast<float>(eps);
  return k;
}

void adamw_segments_cpu(float* params, const float* grads, float* m, float* v,
                        const std::vector<AdamWSegment>& segments) {
  for (const AdamWSegment& s : segments) {
    const int64_t chunks = (s.n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 4)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t lo = s.begin + c * kChunk;
      adamw_chunk(params + lo, grads + lo, m + lo, v + lo, std::min(kChunk, s.begin + s.n - lo), s.k);
    }
  }
}

}  // namespace dsv3
