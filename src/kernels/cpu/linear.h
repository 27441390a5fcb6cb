// A bias-free linear layer y[T,out] = x[T,in] · W[out,in]^T (HF nn.Linear layout), forward and backward, in
// fp32 or bf16 (operands rounded to bf16, fp32 accumulation and fp32 outputs). Every projection in the model
// goes through these three calls so that precision and the GEMM backend are decided in one place.
#pragma once
#include <cstdint>
#include <vector>

#include "core/bf16.h"

namespace dsv3 {

enum class Precision : uint8_t { kF32, kBF16 };

// Scratch for the bf16 operand copies; grows on first use and is reused after (no allocation in steady state).
struct LinearScratch {
  std::vector<bf16> a, b;
};

// y = x W^T (beta = 0) or y += x W^T (beta = 1).
void linear_forward(const float* x_TI, const float* w_OI, float* y_TO, int64_t t, int64_t in, int64_t out,
                    Precision p, LinearScratch& s, float beta = 0.f);
// dx = dy W (beta = 0: assign; 1: accumulate).
void linear_backward_input(const float* dy_TO, const float* w_OI, float* dx_TI, int64_t t, int64_t in, int64_t out,
                           Precision p, LinearScratch& s, float beta = 0.f);
// dW += dy^T x (parameter gradients always accumulate).
void linear_backward_weight(const float* dy_TO, const float* x_TI, float* dw_OI, int64_t t, int64_t in, int64_t out,
                            Precision p, LinearScratch& s);

}  // namespace dsv3
