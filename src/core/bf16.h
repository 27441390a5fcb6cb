// bfloat16 storage type: round-to-nearest-even conversion from fp32 (as PyTorch and oneDNN do), exact widening.
#pragma once
#include <cstdint>
#include <cstring>

namespace dsv3 {

struct bf16 {
  uint16_t bits;
};

inline float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline bf16 to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{static_cast<uint16_t>(u >> 16)};
}

// Rounds fp32 through bf16 and back (what a bf16 cast does to a value).
inline float round_bf16(float f) {
  return to_float(to_bf16(f));
}

void to_bf16(const float* src, bf16* dst, int64_t n);
void to_float(const bf16* src, float* dst, int64_t n);

}  // namespace dsv3
