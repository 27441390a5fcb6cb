// Which grouped kernel runs a GroupedGemmArgs, and whether one can (grouped_gemm.cuh).
#include <cstdint>

#include "core/error.h"
#include "kernels/cuda/grouped_gemm.cuh"

namespace dsv3::cuda {
namespace {

using Kind = GroupedGemmArgs::Kind;

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

}  // namespace

bool grouped_gemm_supported(const GroupedGemmArgs& g, int cc) {
#ifndef DSV3_HAVE_CUTLASS
  (void)g, (void)cc;
  return false;
#else
  // sm_90a code only: wgmma and the TMA descriptors it is built around do not carry over to other GPUs.
  if (cc != 90 || g.groups < 1 || g.groups > 65535 || !g.offsets_G1) return false;
  // TMA: 16-byte aligned bases and row strides; CUTLASS's operand alignment (8 bf16, 4 fp32) applies to each
  // operand's contiguous dimension, which here is never the varying one.
  if (!aligned16(g.a) || !aligned16(g.b) || !aligned16(g.c)) return false;
  if (g.lda % 8 || g.ldb % 8 || g.ldc % 4) return false;
  if (g.kind == Kind::kRows) return g.n % 8 == 0 && g.k % 8 == 0 && g.b_stride % 8 == 0 && g.n > 0 && g.k > 0;
  return g.m % 8 == 0 && g.n % 8 == 0 && g.c_stride % 4 == 0 && g.m > 0 && g.n > 0;
#endif
}

#ifdef DSV3_HAVE_CUTLASS
size_t grouped_gemm_scratch_bytes(const GroupedGemmArgs& g, int sm_count) {
  const int groups = static_cast<int>(g.groups);
  if (g.kind == Kind::kReduce) return grouped::scratch_reduce(groups, sm_count);
  return g.trans_b ? grouped::scratch_rows_nt(groups, sm_count) : grouped::scratch_rows_nn(groups, sm_count);
}

void grouped_gemm_launch(const GroupedGemmArgs& g, void* scratch, size_t bytes, int sm_count, int device,
                         cudaStream_t st) {
  if (g.kind == Kind::kReduce) return grouped::launch_reduce(g, scratch, bytes, sm_count, device, st);
  if (g.trans_b) return grouped::launch_rows_nt(g, scratch, bytes, sm_count, device, st);
  grouped::launch_rows_nn(g, scratch, bytes, sm_count, device, st);
}
#else
size_t grouped_gemm_scratch_bytes(const GroupedGemmArgs&, int) {
  return 0;
}
void grouped_gemm_launch(const GroupedGemmArgs&, void*, size_t, int, int, cudaStream_t) {
  fail("grouped GEMM: this build has no CUTLASS kernels");
}
#endif

}  // namespace dsv3::cuda
