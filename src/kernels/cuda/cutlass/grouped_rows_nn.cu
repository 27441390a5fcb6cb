// The grouped expert GEMM for the input gradient: dx = dy · W  (grouped_kernel.cuh).
#include "kernels/cuda/cutlass/grouped_kernel.cuh"

namespace dsv3::cuda::grouped {

using K_rows_nn = Kernel<cutlass::layout::RowMajor, cutlass::layout::RowMajor, void>;

size_t scratch_rows_nn(int groups, int sm_count) {
  return scratch<K_rows_nn>(groups, sm_count);
}
void launch_rows_nn(const GroupedGemmArgs& g, void* scratch, size_t bytes, int sm_count, int device,
                    cudaStream_t st) {
  launch<K_rows_nn>(g, scratch, bytes, sm_count, device, st);
}

}  // namespace dsv3::cuda::grouped
