// RMSNorm over the last dim, y = w ⊙ x · rstd with rstd = 1/sqrt(mean(x²) + eps), forward and backward in
// fp32. Forward stores rstd per row so backward need not recompute the reduction. Rows may be strided (ld_*),
// which lets the MLA latent norm run in place on the first 512 columns of the [T, 576] kv_a output.
//
// Backward (spec §3.1), with g = w ⊙ dy:  dx = rstd·g − x·rstd³·(Σ_j g_j x_j)/d ;  dw += Σ_t dy ⊙ x·rstd.
// dx is assigned (beta = 0) or accumulated (beta = 1: the residual stream adds the norm's input gradient into
// the gradient already flowing through the skip connection). dw always accumulates and is reduced over tokens
// in a fixed order, so the result does not depend on the thread count (dw_D may be null to skip it).
//
// Legend: T tokens, D normalised features.
#pragma once
#include <cstdint>

namespace dsv3 {

void rmsnorm_forward(const float* x_TD, const float* w_D, float* y_TD, float* rstd_T, int64_t t, int64_t d,
                     float eps);
void rmsnorm_backward(const float* dy_TD, const float* x_TD, const float* w_D, const float* rstd_T,
                      float* dx_TD, float* dw_D, int64_t t, int64_t d, float beta = 0.f);

// Strided rows: row i of x starts at x + i*ld_x (ld_* >= d). y may alias x (same pointer and stride); dx may
// alias dy.
void rmsnorm_forward_strided(const float* x, int64_t ld_x, const float* w_D, float* y, int64_t ld_y,
                             float* rstd_T, int64_t t, int64_t d, float eps);
void rmsnorm_backward_strided(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, const float* w_D,
                              const float* rstd_T, float* dx, int64_t ld_dx, float* dw_D, int64_t t,
                              int64_t d, float beta = 0.f);

// Test oracles: plain loops with double accumulation, contiguous rows.
void rmsnorm_forward_reference(const float* x_TD, const float* w_D, float* y_TD, float* rstd_T, int64_t t,
                               int64_t d, float eps);
void rmsnorm_backward_reference(const float* dy_TD, const float* x_TD, const float* w_D, const float* rstd_T,
                                float* dx_TD, float* dw_D, int64_t t, int64_t d, float beta = 0.f);

}  // namespace dsv3
