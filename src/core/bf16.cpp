// Bulk bf16 conversions (the compiler vectorises these loops).
#include "core/bf16.h"

namespace dsv3 {

void to_bf16(const float* src, bf16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_bf16(src[i]);
}

void to_float(const bf16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

}  // namespace dsv3
