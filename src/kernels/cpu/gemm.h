// Matrix multiply for every linear layer: C[M,N] = alpha * op(A)[M,K] * op(B)[K,N] + beta * C, row-major with
// leading dimensions. op(X) is X or X^T. A and B share a dtype (fp32, or bf16 with fp32 accumulation); C is
// fp32 or bf16. The fast path is oneDNN's matmul (primitives cached by shape); gemm_reference is the test
// oracle.
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

// While an instance is alive on a thread, that thread's gemm() calls use one oneDNN primitive per shape class
// with M and K left to run time (oneDNN's runtime dimensions) instead of one primitive per exact shape. For
// the MoE experts, whose row counts (M of the forward GEMMs, K of the weight-gradient GEMMs) change every
// step: creating a primitive costs about as much as running it (~0.5 ms for a 512×512×512 bf16 GEMM here),
// and a step would pay that for every expert GEMM. Measured: the runtime-dimension primitive runs as fast as
// the exact-shape one there.
class GemmVaryingRows {
 public:
  GemmVaryingRows();
  ~GemmVaryingRows();
  GemmVaryingRows(const GemmVaryingRows&) = delete;
  GemmVaryingRows& operator=(const GemmVaryingRows&) = delete;

 private:
  bool was_;
};
void gemm_reference(const GemmArgs& g);

// bf16 operands widened to fp32 (exact) and multiplied by the fp32 path: the same maths as a bf16 GEMM with
// fp32 accumulation. gemm() takes it where oneDNN has no bf16 matmul for this CPU (AVX2-only machines), or
// everywhere when DSV3_GEMM_BF16_VIA_F32=1.
void gemm_bf16_via_f32(const GemmArgs& g);
// Whether bf16 GEMMs run natively here (else through gemm_bf16_via_f32 and its per-thread fp32 copies).
bool gemm_bf16_native();
// The most fp32-path GEMM kernels one thread keeps (oneDNN primitives, each ~20 KB of JIT code and state): the
// fp32 MoE experts make one per row count they meet, so a long fp32 MoE run holds up to this many.
constexpr int64_t kGemmMaxKernels = 2048;

// Common shapes: y[M,N] (+)= x[M,K] * w[N,K]^T (a linear layer with weight [out,in]) in fp32.
void linear_f32(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k, float beta = 0.f);

}  // namespace dsv3
