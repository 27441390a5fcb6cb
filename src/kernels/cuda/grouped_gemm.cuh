// The MoE's grouped expert GEMMs on Hopper (Backend::grouped_gemm, cpu/gemm.h GroupedGemmArgs): CUTLASS's
// pointer-array grouped kernel (TMA + wgmma, warp-specialized cooperative, persistent), one launch per kind
// of expert GEMM, the per-expert row counts read by the GPU from the offsets in device memory (a setup kernel
// turns them into the groups' shapes and pointers). Deterministic: no split-K, each output tile is made by one
// CTA in a fixed order. Built where CMake finds CUTLASS's headers (DSV3_HAVE_CUTLASS); elsewhere, on other
// GPUs, and for shapes its alignment rules refuse, grouped_gemm_supported says no and the caller issues the
// experts' GEMMs one by one.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/cpu/gemm.h"

namespace dsv3::cuda {

// Whether this build, a GPU of compute capability `cc` (major·10 + minor) and g's shapes, strides and pointers
// can run grouped_gemm_launch.
bool grouped_gemm_supported(const GroupedGemmArgs& g, int cc);
// Device scratch the launch needs (the groups' shapes, pointers and strides, CUTLASS's workspace).
size_t grouped_gemm_scratch_bytes(const GroupedGemmArgs& g, int sm_count);
// Enqueues the setup kernel and the grouped GEMM on st. Errors (a CUTLASS status other than success) throw.
void grouped_gemm_launch(const GroupedGemmArgs& g, void* scratch, size_t scratch_bytes, int sm_count,
                         int device, cudaStream_t st);

// The three kernels (cutlass/*.cu): kRows with a [n, k] weight (forward), with a [k, n] one (input gradient),
// and kReduce (weight gradient, accumulating).
namespace grouped {
size_t scratch_rows_nt(int groups, int sm_count);
size_t scratch_rows_nn(int groups, int sm_count);
size_t scratch_reduce(int groups, int sm_count);
void launch_rows_nt(const GroupedGemmArgs& g, void* scratch, size_t bytes, int sm_count, int device,
                    cudaStream_t st);
void launch_rows_nn(const GroupedGemmArgs& g, void* scratch, size_t bytes, int sm_count, int device,
                    cudaStream_t st);
void launch_reduce(const GroupedGemmArgs& g, void* scratch, size_t bytes, int sm_count, int device,
                   cudaStream_t st);
}  // namespace grouped

}  // namespace dsv3::cuda
