// Launchers of the CUDA backend's own kernels (cuda_backend.cu owns the stream, the scratch and cuBLASLt; the
// files here hold the kernels). Every launcher enqueues on `st` and returns without synchronising. Semantics are
// the CPU kernels' named beside each (kernels/backend.h); shapes were checked by the caller.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/backend.h"

namespace dsv3::cuda {

// Errors found inside kernels (an embedding id out of range, a bad label) are recorded in a device word and
// reported at the next synchronisation point, so no op needs a host round trip to validate its input.
struct DeviceErrors {
  int* word = nullptr;  // [4]: code, index, value, unused (first error wins)
};
enum ErrorCode : int { kNoError = 0, kBadEmbeddingId = 1, kBadLabel = 2, kBadRouterLogit = 3 };

void launch_to_bf16(const float* x, bf16* y, int64_t n, cudaStream_t st);
void launch_scale(float* x, int64_t n, float s, cudaStream_t st);
// Attention heads between dsv3's strided fp32 views [T, H, D] and packed bf16 [T, H, D] (cuDNN's operands).
void launch_heads_to_bf16(const float* x, int64_t ld_token, int64_t ld_head, int64_t t, int64_t heads,
                          int64_t d, bf16* y, cudaStream_t st);
void launch_heads_from_bf16(const bf16* y, int64_t t, int64_t heads, int64_t d, float* x, int64_t ld_token,
                            int64_t ld_head, cudaStream_t st);
void launch_add(float* y, const float* a, const float* b, int64_t n, cudaStream_t st);
void launch_permute_rows(const float* x, const int32_t* token_R, int64_t r, int64_t d, float* y,
                         cudaStream_t st);
void launch_unpermute_sum(const float* y, const int32_t* row_TK, int64_t t, int64_t k, int64_t d, float* out,
                          float beta, cudaStream_t st);
void launch_gather_or_zero(const float* v, const int32_t* index, int64_t n, float* out, cudaStream_t st);
// The router from its logits (route.cu: kernels/route.h's bodies, one thread per token, expert or sequence). A
// non-finite logit is reported (kBadRouterLogit: token, expert).
size_t route_forward_scratch_bytes(const RouteForwardArgs& a);
void launch_route_forward(const RouteForwardArgs& a, void* scratch, DeviceErrors err, cudaStream_t st);
void launch_route_backward(const RouteBackwardArgs& a, cudaStream_t st);
void launch_sum_heads(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t t,
                      int64_t heads, int64_t n, cudaStream_t st);
// Σ x² per 16Ki block in the CPU's accumulation order (cpu/reduce.cpp) into partial_B; then the blocks summed
// in order into *out (device double), added to it when accumulate.
int64_t sum_of_squares_blocks(int64_t n);
void launch_sum_of_squares(const float* x, int64_t n, double* partial_B, cudaStream_t st);
void launch_sum_partials(const double* partial_B, int64_t blocks, double* out, bool accumulate,
                         cudaStream_t st);
void launch_sum(const float* x, int64_t n, double* out, bool accumulate, cudaStream_t st);

void launch_rmsnorm_forward(const float* x, int64_t ld_x, const float* w, float* y, int64_t ld_y, float* rstd,
                            int64_t t, int64_t d, float eps, cudaStream_t st);
// dw partials [ceil(t/32), d] go to scratch (rmsnorm_dw_scratch_floats), then are added to dw in row-block order.
int64_t rmsnorm_dw_scratch_floats(int64_t t, int64_t d);
void launch_rmsnorm_backward(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, const float* w,
                             const float* rstd, float* dx, int64_t ld_dx, float* dw, int64_t t, int64_t d,
                             float beta, float* scratch, cudaStream_t st);

void launch_swiglu_forward(const float* a, const float* b, int64_t ld_ab, const float* p, float* h, int64_t t,
                           int64_t f, cudaStream_t st);
void launch_swiglu_backward(const float* dh, const float* a, const float* b, int64_t ld_ab, const float* p,
                            float* da, float* db, int64_t ld_dab, float* dp, int64_t t, int64_t f,
                            cudaStream_t st);

void launch_embedding_forward(const int32_t* ids, const float* table, float* out, int64_t t, int64_t vocab,
                              int64_t d, DeviceErrors err, cudaStream_t st);
// Deterministic: tokens sorted by id (stable), each row of dtable summed in token order. Scratch from
// embedding_backward_scratch_bytes.
size_t embedding_backward_scratch_bytes(int64_t t);
void launch_embedding_backward(const float* dout, const int32_t* ids, float* dtable, int64_t t, int64_t vocab,
                               int64_t d, void* scratch, size_t scratch_bytes, DeviceErrors err,
                               cudaStream_t st);

void launch_rope(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y, int64_t t,
                 int64_t heads, int64_t seq_len, const RopeTableView& table, bool interleave, bool forward,
                 cudaStream_t st);

// Cross-entropy pieces around the head GEMMs (cross_entropy.cu drives the chunks).
void launch_ce_chunk_stats(const float* logits_TC, int64_t t, int64_t c, int64_t chunk_begin,
                           const int32_t* labels, float* max_T, float* sum_T, float* label_logit_T,
                           bool first, cudaStream_t st);
void launch_ce_finish(const float* max_T, const float* sum_T, const float* label_logit_T,
                      const int32_t* labels, int64_t t, int64_t v, float* loss_T, float* lse_T,
                      DeviceErrors err, cudaStream_t st);
// logits_TC becomes dlogits in place: dloss·(dloss_T[t])·(softmax − onehot); rows with ignored labels become 0.
// With bf, also written rounded into dlogits_bf.
void launch_ce_chunk_grad(float* logits_TC, int64_t t, int64_t c, int64_t chunk_begin, const int32_t* labels,
                          const float* lse_T, float dloss, const float* dloss_T, bf16* dlogits_bf,
                          cudaStream_t st);

void launch_adamw(float* params, const float* grads, float* m, float* v, const AdamWSegment* segments_dev,
                  int64_t num_segments, int64_t max_segment_n, cudaStream_t st);

// Flash-style causal attention (attention.cu). bf16 rounds the matmul operands as the CPU kernel does; softmax
// statistics in fp32. The backward needs scratch for D_i = rowsum(dO ⊙ O): attention_backward_scratch_floats.
// Returns false (launching nothing) for a shape it cannot run (head sizes above its limit).
bool attention_supported(const AttentionShape& s);
void launch_attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsViewMut o,
                              float* lse_BHS, bool bf16_operands, cudaStream_t st);
int64_t attention_backward_scratch_floats(const AttentionShape& s);
void launch_attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                               const float* lse_BHS, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk,
                               HeadsViewMut dv, bool bf16_operands, float* scratch, cudaStream_t st);

// The same attention on tensor cores (attention_tc.cu), bf16 operands only: the CPU's bf16 rounding contract,
// WMMA bf16 products with fp32 accumulation, fp32 softmax; deterministic. attention_tc_supported: head sizes
// multiples of 16 up to 256 whose tiles fit the device's shared memory (MLA's 192/128 does); other shapes use
// the kernels above. The backward uses the same scratch as launch_attention_backward.
// DSV3_ATTENTION (read once per process): tensor-cores (default), cuda-cores, or cudnn (bf16 attention through
// cuDNN's fused attention, cudnn_attention.h; fp32 stays on the CUDA-core kernel).
bool attention_tc_enabled();
bool attention_cudnn_requested();
bool attention_tc_supported(const AttentionShape& s);
void launch_attention_tc_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v,
                                 HeadsViewMut o, float* lse_BHS, cudaStream_t st);
void launch_attention_tc_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                                  const float* lse_BHS, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk,
                                  HeadsViewMut dv, float* scratch, cudaStream_t st);

}  // namespace dsv3::cuda
