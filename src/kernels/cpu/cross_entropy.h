// Output head fused with next-token cross-entropy: logits = h W^T (W [V, D] as HF's lm_head), loss_t =
// logsumexp(logits_t) − logits_t[label_t], computed in vocab chunks so the full [T, V] fp32 logits never
// exist (129280 × 8192 tokens would be 4 GiB). The forward keeps an online (max, sum-exp) per token across
// chunks and stores lse_T for the backward; the backward recomputes each chunk's logits, turns them in place
// into
//   dlogits = dloss_t · (softmax − onehot(label))
// and feeds two GEMMs: dh (+)= dlogits · W_chunk (assigned on the first chunk) and dW_chunk += dlogits^T · h.
// Labels follow HF: -100 is ignored (loss 0, no gradient); any other id outside [0, V) is an error naming it.
// Precision::kBF16 rounds the GEMM operands (h, W and dlogits) to bf16 with fp32 accumulation; logits,
// softmax and losses stay fp32. Legend: T tokens, D hidden, V vocab, C vocab chunk.
#pragma once
#include <cstdint>
#include <vector>

#include "core/bf16.h"
#include "kernels/precision.h"

namespace dsv3 {

constexpr int32_t kIgnoreLabel = -100;

// Grows on first use; reused across steps without allocation.
struct HeadLossScratch {
  std::vector<float> logits_TC;
  std::vector<float> max_T, sum_T, label_logit_T;
  std::vector<bf16> h_bf, w_bf, d_bf;
};

struct HeadLossResult {
  double loss_sum = 0;  // Σ loss_t over non-ignored tokens
  int64_t n_valid = 0;  // number of non-ignored tokens (HF's mean divides by this)
};

// w_bf_VD (nullable, bf16 mode): a bf16 copy of w_VD the caller already holds; used instead of converting W.
// chunk_v = 0 picks a chunk so that the [T, C] buffer stays ~32 MiB. logits_TV (nullable) receives the full
// logits (tests and HF golden comparisons). loss_T gets 0 for ignored tokens; lse_T is needed by the
// backward.
HeadLossResult head_cross_entropy_forward(const float* h_TD, const float* w_VD, const int32_t* labels_T,
                                          float* loss_T, float* lse_T, int64_t t, int64_t d, int64_t v,
                                          Precision p, HeadLossScratch& s, int64_t chunk_v = 0,
                                          float* logits_TV = nullptr, const bf16* w_bf_VD = nullptr);

// dloss: gradient of the objective w.r.t. each token's loss (1/n_valid for a mean, 1 for a sum), times
// dloss_T[t] when dloss_T is non-null (per-token weights such as a loss mask). dh_TD is assigned, dw_VD
// accumulated.
void head_cross_entropy_backward(const float* h_TD, const float* w_VD, const int32_t* labels_T,
                                 const float* lse_T, float dloss, const float* dloss_T, float* dh_TD,
                                 float* dw_VD, int64_t t, int64_t d, int64_t v, Precision p,
                                 HeadLossScratch& s, int64_t chunk_v = 0, const bf16* w_bf_VD = nullptr);

// Test oracle: full logits in double, same outputs (logits_TV nullable); dh assigned, dw accumulated.
HeadLossResult head_cross_entropy_reference(const float* h_TD, const float* w_VD, const int32_t* labels_T,
                                            float* loss_T, float* logits_TV, float dloss,
                                            const float* dloss_T, float* dh_TD, float* dw_VD, int64_t t,
                                            int64_t d, int64_t v);

}  // namespace dsv3
