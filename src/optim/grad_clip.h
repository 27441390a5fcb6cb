// Global gradient norm and Megatron's clip (megatron/core/optimizer/clip_grads.py, spec §8: global L2 norm to
// --clip-grad). Norms accumulate squares in double in fixed 16Ki-element blocks reduced in order, so the result is
// the same for every thread count. NaN/Inf in the gradients propagate to the norm (the trainer checks it).
#pragma once
#include <cstdint>

namespace dsv3 {

// Σ g_i² in double (deterministic). Sum these over ranges/ranks, then sqrt, for a norm over several buffers.
double sum_of_squares(const float* g, int64_t n);
// sqrt(sum_of_squares(g, n)).
double l2_norm(const float* g, int64_t n);
// g *= s (fp32 multiply, as Megatron's multi_tensor_scale).
void scale_inplace(float* g, int64_t n, float s);
// Megatron: clip_coeff = max_norm / (total_norm + 1e-6); grads are scaled by it only when clip_coeff < 1.
// Returns clip_coeff in that case, else 1 (also for a NaN norm). Call only when clipping is on (max_norm > 0).
double clip_coefficient(double total_norm, double max_norm);

}  // namespace dsv3
