// CUDA and cuBLASLt status checks that raise dsv3::Error with the call named.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include "core/error.h"

namespace dsv3::cuda {

inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess)
    fail("CUDA error in ", what, ": ", cudaGetErrorName(e), " (", cudaGetErrorString(e), ")");
}
inline void check_lt(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) fail("cuBLASLt error in ", what, ": status ", static_cast<int>(s));
}
// After a kernel launch: configuration errors surface here, execution errors at the next synchronisation.
inline void check_launch(const char* what) {
  check(cudaGetLastError(), what);
}

}  // namespace dsv3::cuda
