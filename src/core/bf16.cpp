// Bulk bf16 conversions. to_bf16 is on every bf16 GEMM operand, so it is vectorised explicitly (AVX-512 when the
// CPU has it, else AVX2 through GCC vector extensions) with the scalar rounding bit for bit (round to nearest
// even on the integer bits, NaN quieted; no flush of denormals, unlike vcvtneps2bf16), and split over OpenMP
// threads for large arrays.
#include "core/bf16.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>

namespace dsv3 {
namespace {

constexpr int64_t kParallelMin = 1 << 18;

__attribute__((target("avx512f,avx512bw"))) void to_bf16_avx512(const float* src, bf16* dst, int64_t n) {
  const __m512i round = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1),
                abs = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000),
                qnan = _mm512_set1_epi32(0x40);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_loadu_si512(src + i);
    const __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(round, _mm512_and_si512(_mm512_srli_epi32(u, 16), one))), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs), inf);
    const __m512i q = _mm512_or_si512(_mm512_srli_epi32(u, 16), qnan);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                        _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, q)));
  }
  for (; i < n; ++i) dst[i] = to_bf16(src[i]);
}

void to_bf16_generic(const float* src, bf16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}

void to_bf16_serial(const float* src, bf16* dst, int64_t n) {
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
  if (avx512)
    to_bf16_avx512(src, dst, n);
  else
    to_bf16_generic(src, dst, n);
}

}  // namespace

void to_bf16(const float* src, bf16* dst, int64_t n) {
  if (n < kParallelMin || omp_in_parallel()) {
    to_bf16_serial(src, dst, n);
    return;
  }
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t chunk = (n / nt + 15) / 16 * 16, b = std::min(n, t * chunk), e = std::min(n, b + chunk);
    to_bf16_serial(src + b, dst + b, e - b);
  }
}

void to_float(const bf16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

}  // namespace dsv3
