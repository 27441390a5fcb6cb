// exp on 8 fp32 lanes (GCC vector extensions, so -march decides the instructions): Cephes expf polynomial,
// ~1 ulp for x in [-87, 88]; inputs below -87 give ~1e-38 rather than 0 (harmless for softmax weights), -inf
// gives that too, so callers mask it when an exact 0 matters.
#pragma once
#include <cstdint>
#include <cstring>

namespace dsv3::simd {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 ld(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline void st(float* p, v8 v) {
  std::memcpy(p, &v, sizeof v);
}
inline float hsum(v8 v) {
  float s = 0.f;
  for (int c = 0; c < 8; ++c) s += v[c];
  return s;
}
inline float hmax(v8 v) {
  float m = v[0];
  for (int c = 1; c < 8; ++c) m = v[c] > m ? v[c] : m;
  return m;
}

inline v8 exp8(v8 x) {
  const v8 hi = v8{} + 88.0f, lo = v8{} - 87.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const v8 magic = v8{} + 12582912.0f;  // 1.5·2^23: adding and subtracting rounds to the nearest integer
  const v8 n = (x * 1.44269504088896341f + magic) - magic;
  const v8 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  v8 p = v8{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const v8 y = p * r * r + r + 1.0f;
  const v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
  v8 scale;
  std::memcpy(&scale, &e, sizeof scale);
  return y * scale;
}

}  // namespace dsv3::simd
