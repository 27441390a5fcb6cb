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

// The MoE's expert GEMMs of one kind in one call: group g (an expert) owns the rows [offsets_G1[g],
// offsets_G1[g+1]) of the row-stacked operands, and the row counts are read where the operands live (on a GPU
// they never come down to the host). bf16 operands, fp32 outputs, fp32 accumulation.
//   kRows:   C[rows, n]  = A[rows, k] · op(B_g)        rows of A and C stacked (a + o·lda, c + o·ldc); B_g =
//            b + g·b_stride is [n, k] (trans_b, a linear's weight) or [k, n]. C is assigned.
//   kReduce: C_g[m, n] += A[rows, m]^T · B[rows, n]    the rows are the reduction (a weight gradient); A and B
//            stacked, C_g = c + g·c_stride. A group without rows leaves C_g as it is.
struct GroupedGemmArgs {
  enum class Kind : uint8_t { kRows, kReduce };
  Kind kind = Kind::kRows;
  int64_t groups = 0;
  const int32_t* offsets_G1 = nullptr;  // groups + 1 ascending row offsets, offsets_G1[0] = 0
  int64_t m = 0, n = 0, k = 0;          // kRows: n, k; kReduce: m, n
  const bf16* a = nullptr;
  int64_t lda = 0;
  const bf16* b = nullptr;
  int64_t ldb = 0, b_stride = 0;
  bool trans_b = false;
  float* c = nullptr;
  int64_t ldc = 0, c_stride = 0;
};
// Group `group`'s GEMM, its rows [row0, row0 + rows), as gemm() runs it (what every backend's grouped GEMM
// equals up to summation order; offsets_G1 is not read).
GemmArgs grouped_gemm_group(const GroupedGemmArgs& g, int64_t group, int64_t row0, int64_t rows);
// The CPU's: the groups over the threads, each GEMM on one thread with oneDNN's runtime row dimension
// (GemmVaryingRows), as the MoE layer runs its experts on the CPU.
void grouped_gemm(const GroupedGemmArgs& g);

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
