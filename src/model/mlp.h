// The SwiGLU MLP: DeepSeek-V3's dense FFN layers and the MoE layer's shared expert.
#pragma once
#include <cstdint>

#include "kernels/backend.h"
#include "kernels/cpu/linear.h"

namespace dsv3 {

// y (+)= down(silu(gate·x) ⊙ up·x). Legend: T tokens, D hidden, F width. gate and up run as one [2F, D] GEMM
// when their weights are adjacent in memory (the parameter store lays them out so), likewise their gradients;
// otherwise as two GEMMs over the same [T, 2F] buffer.
struct MlpParams {
  const float* gate_FD = nullptr;
  const float* up_FD = nullptr;
  const float* down_DF = nullptr;
  const Bf16Weights* bf16_weights = nullptr;  // nullable
};
struct MlpGrads {
  float* gate_FD = nullptr;
  float* up_FD = nullptr;
  float* down_DF = nullptr;
};
struct MlpActs {
  const float* x_TD = nullptr;  // not owned; kept alive by the caller until backward
  int64_t t = 0;
  DeviceArray<float> ab_T2F;     // per row [gate pre-activation (F) | up (F)]
  DeviceArray<float> h_TF;       // down_proj input
  DeviceArray<bf16> x_bf, h_bf;  // bf16 mode: the GEMM operands, reused by the weight gradients
};
struct MlpScratch {
  DeviceArray<float> dh_TF, dab_T2F;
  LinearScratch lin;  // a: output-gradient operands, b: weights without a bf16 copy
};
void mlp_forward(Backend& be, int64_t d, int64_t f, const MlpParams& p, const float* x_TD, int64_t t,
                 float* y_TD, float beta, MlpActs& a, MlpScratch& s, Precision prec);
// dx (beta 0: assign, 1: accumulate); parameter gradients accumulate.
void mlp_backward(Backend& be, int64_t d, int64_t f, const MlpParams& p, const MlpActs& a, const float* dy_TD,
                  float* dx_TD, float beta, MlpGrads& g, MlpScratch& s, Precision prec);

}  // namespace dsv3
