// CudnnAttention in a build without cudnn-frontend's headers (CMake could not fetch them): open() says so and
// the backend runs dsv3's own attention kernels.
#include "core/error.h"
#include "kernels/cuda/cudnn_attention.h"

namespace dsv3::cuda {

struct CudnnAttention::Impl {};

std::unique_ptr<CudnnAttention> CudnnAttention::open(std::string* why_not) {
  *why_not = "this build has no cuDNN attention (cudnn-frontend's headers were not found at configure time)";
  return nullptr;
}
CudnnAttention::CudnnAttention(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudnnAttention::~CudnnAttention() = default;
bool CudnnAttention::supports(const AttentionShape&, std::string* why_not) {
  if (why_not) *why_not = "no cuDNN attention in this build";
  return false;
}
size_t CudnnAttention::forward_workspace(const AttentionShape&) {
  fail("no cuDNN attention in this build");
}
size_t CudnnAttention::backward_workspace(const AttentionShape&) {
  fail("no cuDNN attention in this build");
}
void CudnnAttention::forward(const AttentionShape&, const void*, const void*, const void*, void*, float*,
                             void*, cudaStream_t) {
  fail("no cuDNN attention in this build");
}
void CudnnAttention::backward(const AttentionShape&, const void*, const void*, const void*, const void*,
                              const void*, const float*, void*, void*, void*, void*, cudaStream_t) {
  fail("no cuDNN attention in this build");
}

}  // namespace dsv3::cuda
