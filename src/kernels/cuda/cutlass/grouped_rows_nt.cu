// The grouped expert GEMM for the forward: y = x · W^T  (grouped_kernel.cuh).
#include "kernels/cuda/cutlass/grouped_kernel.cuh"

namespace dsv3::cuda::grouped {

using K_rows_nt = Kernel<cutlass::layout::RowMajor, cutlass::layout::ColumnMajor, void>;

size_t scratch_rows_nt(int groups, int sm_count) {
  return scratch<K_rows_nt>(groups, sm_count);
}
void launch_rows_nt(const GroupedGemmArgs& g, void* scratch, size_t bytes, int sm_count, int device,
                    cudaStream_t st) {
  launch<K_rows_nt>(g, scratch, bytes, sm_count, device, st);
}

}  // namespace dsv3::cuda::grouped
