// Deterministic fp32 buffer reductions (the gradient norm's sum of squares) and scaling.
#pragma once
#include <cstdint>

namespace dsv3 {

// Σ g_i² in double (deterministic). Sum these over ranges/ranks, then sqrt, for a norm over several buffers.
double sum_of_squares(const float* g, int64_t n);
// sqrt(sum_of_squares(g, n)).
double l2_norm(const float* g, int64_t n);
// g *= s (fp32 multiply, as Megatron's multi_tensor_scale).
void scale_inplace(float* g, int64_t n, float s);

}  // namespace dsv3
