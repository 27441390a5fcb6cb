// Deterministic reductions over fp32 buffers: Σ x² in double in fixed 16Ki-element blocks (four AVX2 double
// accumulators per block, a fixed combination order, blocks added in order), so the result does not depend on the
// thread count. The CUDA backend reproduces this exact order (cuda/reduce.cu).
#include "kernels/cpu/reduce.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"

namespace dsv3 {

namespace {
constexpr int64_t kBlock = 1 << 14;

// Σ x² of one block in double: four AVX2 accumulators of four lanes each (x² of a float is exact in double), then
// a fixed reduction order. Deterministic for a given block; blocks are the unit of parallelism.
double block_sum(const float* g, int64_t n) {
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(g + i), x1 = _mm256_loadu_ps(g + i + 8);
    const __m256d d0 = _mm256_cvtps_pd(_mm256_castps256_ps128(x0));
    const __m256d d1 = _mm256_cvtps_pd(_mm256_extractf128_ps(x0, 1));
    const __m256d d2 = _mm256_cvtps_pd(_mm256_castps256_ps128(x1));
    const __m256d d3 = _mm256_cvtps_pd(_mm256_extractf128_ps(x1, 1));
    a0 = _mm256_fmadd_pd(d0, d0, a0);
    a1 = _mm256_fmadd_pd(d1, d1, a1);
    a2 = _mm256_fmadd_pd(d2, d2, a2);
    a3 = _mm256_fmadd_pd(d3, d3, a3);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, _mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(a2, a3)));
  double acc = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  for (; i < n; ++i) {
    const double x = g[i];
    acc += x * x;
  }
  return acc;
}
}  // namespace

double sum_of_squares(const float* g, int64_t n) {
  DSV3_CHECK(n >= 0, "sum_of_squares: negative length ", n);
  if (n <= kBlock) return block_sum(g, n);
  const int64_t nb = (n + kBlock - 1) / kBlock;
  std::vector<double> part(static_cast<size_t>(nb));
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kBlock;
    part[b] = block_sum(g + lo, std::min(kBlock, n - lo));
  }
  double total = 0.0;
  for (double x : part) total += x;
  return total;
}

double l2_norm(const float* g, int64_t n) {
  return std::sqrt(sum_of_squares(g, n));
}

void scale_inplace(float* g, int64_t n, float s) {
#pragma omp parallel for simd schedule(static) if (n > (1 << 16))
  for (int64_t i = 0; i < n; ++i) g[i] = g[i] * s;
}

}  // namespace dsv3
