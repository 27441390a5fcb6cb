#include "optim/adamw.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3 {

AdamW::AdamW(int64_t numel, AdamWConfig cfg) : numel_(numel), cfg_(cfg) {
  DSV3_CHECK(numel >= 0, "AdamW: negative parameter count ", numel);
  DSV3_CHECK(cfg.beta1 >= 0.0 && cfg.beta1 < 1.0, "AdamW: beta1 must be in [0, 1), got ", cfg.beta1);
  DSV3_CHECK(cfg.beta2 >= 0.0 && cfg.beta2 < 1.0, "AdamW: beta2 must be in [0, 1), got ", cfg.beta2);
  DSV3_CHECK(cfg.eps >= 0.0, "AdamW: eps must be >= 0, got ", cfg.eps);
  m_.assign(static_cast<size_t>(numel), 0.f);
  v_.assign(static_cast<size_t>(numel), 0.f);
}

void AdamW::begin_step() { ++step_; }

void AdamW::set_step(int64_t s) {
  DSV3_CHECK(s >= 0, "AdamW: negative step ", s);
  step_ = s;
}

namespace {

struct StepConsts {
  float decay, w1, b2, w2, step_size, bc2_sqrt, eps;
};

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
    std::copy_n(p + i, r, tp), std::copy_n(g + i, r, tg), std::copy_n(m + i, r, tm), std::copy_n(v + i, r, tv);
    adamw8(tp, tg, tm, tv, k);
    std::copy_n(tp, r, p + i), std::copy_n(tm, r, m + i), std::copy_n(tv, r, v + i);
  }
}

constexpr int64_t kChunk = 1 << 14;

}  // namespace

void AdamW::update(float* params, const float* grads, int64_t begin, int64_t n, double lr, double wd) {
  update_range(params + begin, grads + begin, begin, n, lr, wd);
}

void AdamW::update_range(float* p, const float* g, int64_t begin, int64_t n, double lr, double wd) {
  DSV3_CHECK(step_ > 0, "AdamW::update called before begin_step()");
  DSV3_CHECK(begin >= 0 && n >= 0 && begin + n <= numel_, "AdamW::update: range [", begin, ", ", begin + n,
             ") outside the ", numel_, " optimizer elements");
  if (n == 0) return;
  // Scalars as torch.optim.AdamW (_single_tensor_adam) forms them: Python doubles, used by fp32 kernels.
  const double t = static_cast<double>(step_);
  const double bc1 = 1.0 - std::pow(cfg_.beta1, t);
  const double bc2 = 1.0 - std::pow(cfg_.beta2, t);
  StepConsts k;
  k.decay = static_cast<float>(1.0 - lr * wd);         // param.mul_(1 - lr*wd)
  k.w1 = static_cast<float>(1.0 - cfg_.beta1);         // exp_avg.lerp_(grad, 1 - beta1)
  k.b2 = static_cast<float>(cfg_.beta2);               // exp_avg_sq.mul_(beta2)
  k.w2 = static_cast<float>(1.0 - cfg_.beta2);         //   .addcmul_(grad, grad, value=1 - beta2)
  k.step_size = static_cast<float>(lr / bc1);          // param.addcdiv_(exp_avg, denom, value=-lr/bc1)
  k.bc2_sqrt = static_cast<float>(std::sqrt(bc2));     // denom = exp_avg_sq.sqrt() / bc2**0.5 + eps
  k.eps = static_cast<float>(cfg_.eps);
  float* m = m_.data() + begin;
  float* v = v_.data() + begin;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (chunks > 4)
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t lo = c * kChunk;
    adamw_chunk(p + lo, g + lo, m + lo, v + lo, std::min(kChunk, n - lo), k);
  }
}

}  // namespace dsv3
