// make_cuda_backend for a build without the CUDA backend (no nvcc, or -DDSV3_CUDA=OFF): it says so.
#ifndef DSV3_HAVE_CUDA
#include "kernels/backend.h"

namespace dsv3 {

std::unique_ptr<Backend> make_cuda_backend(int, std::string* why_not) {
  if (why_not)
    *why_not =
        "this build of dsv3 has no CUDA backend (nvcc was not found at build time, or -DDSV3_CUDA=OFF)";
  return nullptr;
}

}  // namespace dsv3
#endif
