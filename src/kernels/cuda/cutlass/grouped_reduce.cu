// The grouped expert GEMM for the weight gradient: dW += dy^T · x  (grouped_kernel.cuh).
#include "kernels/cuda/cutlass/grouped_kernel.cuh"

namespace dsv3::cuda::grouped {

using K_reduce = Kernel<cutlass::layout::ColumnMajor, cutlass::layout::RowMajor, float>;

size_t scratch_reduce(int groups, int sm_count) {
  return scratch<K_reduce>(groups, sm_count);
}
void launch_reduce(const GroupedGemmArgs& g, void* scratch, size_t bytes, int sm_count, int device,
                   cudaStream_t st) {
  launch<K_reduce>(g, scratch, bytes, sm_count, device, st);
}

}  // namespace dsv3::cuda::grouped
