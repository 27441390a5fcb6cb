// Global gradient norm and Megatron's clip (megatron/core/optimizer/clip_grads.py, spec §8: global L2 norm to
// --clip-grad). Norms accumulate squares in double in fixed 16Ki-element blocks reduced in order, so the result is
// the same for every thread count. NaN/Inf in the gradients propagate to the norm (the trainer checks it).
#pragma once
#include <cstdint>

#include "kernels/cpu/reduce.h"  // sum_of_squares, l2_norm, scale_inplace

namespace dsv3 {

// Megatron: clip_coeff = max_norm / (total_norm + 1e-6); grads are scaled by it only when clip_coeff < 1.
// Returns clip_coeff in that case, else 1 (also for a NaN norm). Call only when clipping is on (max_norm > 0).
double clip_coefficient(double total_norm, double max_norm);

}  // namespace dsv3
