// cuDNN's fused attention (the graph API's SDPA, through the header-only cudnn-frontend) for MLA's causal
// attention in bf16: dsv3's attention op with DSV3_ATTENTION=cudnn (kernels/cuda/cuda_backend.cu). cuDNN runs
// d_qk = 192 with d_v = 128 forward and backward on Hopper. Its tensors here are bf16, packed [B, S, H, D] (the
// backend converts dsv3's strided fp32 heads on the way in and out); lse is fp32 [B, H, S], natural log, as the
// CPU op's. The backward asks for cuDNN's deterministic algorithm. libcudnn.so.9 is opened at run time
// (cudnn-frontend's dynamic loading): nothing of cuDNN is needed to load the CUDA backend.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <memory>
#include <string>

#include "kernels/cpu/attention.h"

namespace dsv3::cuda {

class CudnnAttention {
 public:
  // Opens cuDNN and makes a handle; nullptr with *why_not set where this build or machine has no cuDNN.
  static std::unique_ptr<CudnnAttention> open(std::string* why_not);
  ~CudnnAttention();
  CudnnAttention(const CudnnAttention&) = delete;
  CudnnAttention& operator=(const CudnnAttention&) = delete;

  // Whether cuDNN runs the shape forward and backward (the first call per shape builds and caches both plans;
  // a refusal is cached too, its reason in *why_not). The backend runs its own kernels where this is false.
  bool supports(const AttentionShape& s, std::string* why_not = nullptr);
  // Workspace bytes for a supported shape.
  size_t forward_workspace(const AttentionShape& s);
  size_t backward_workspace(const AttentionShape& s);
  void forward(const AttentionShape& s, const void* q, const void* k, const void* v, void* o, float* lse_BHS,
               void* workspace, cudaStream_t st);
  void backward(const AttentionShape& s, const void* q, const void* k, const void* v, const void* o,
                const void* d_o, const float* lse_BHS, void* dq, void* dk, void* dv, void* workspace,
                cudaStream_t st);

 private:
  struct Impl;
  explicit CudnnAttention(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3::cuda
