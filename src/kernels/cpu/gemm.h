// Matrix multiply for every linear layer: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, row-major with
// leading dimensions. op(X) is X or X^T. A and B share a dtype (fp32, or bf16 with fp32 accumulation); C is fp32
// or bf16. The fast path is oneDNN's matmul (primitives cached by shape); gemm_reference is the test oracle.
#pragma once
#include <cstdint>

#include "core/bf16.h"

namespace dsv3 {

enum class GemmType : uint8_t { kF32, kBF16 };

struct GemmArgs {
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0;
  bool trans_a = false;  // A stored [K,M] when true
  const void* b = nullptr;
  int64_t ldb = 0;
  bool trans_b = false;  // B stored [N,K] when true
  void* c = nullptr;
  int64_t ldc = 0;
  GemmType ab_type = GemmType::kF32;
  GemmType c_type = GemmType::kF32;
  float alpha = 1.f;
  float beta = 0.f;  // 0 or 1 (accumulate: parameter gradients use beta = 1)
};

void gemm(const GemmArgs& g);
void gemm_reference(const GemmArgs& g);

// Common shapes: y[M,N] (+)= x[M,K] * w[N,K]^T (a linear layer with weight [out,in]) in fp32.
void linear_f32(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k, float beta = 0.f);

}  // namespace dsv3
