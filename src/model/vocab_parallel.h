// The vocabulary-parallel ends of the model under tensor parallelism (Megatron-Core's VocabParallelEmbedding,
// ColumnParallelLinear output layer and vocab_parallel_cross_entropy): each TP rank holds the rows
// [v0, v0 + rows) of the embedding and of lm_head. The embedding looks up the ids it holds (zeros elsewhere) and
// the outputs are reduced over TP; the head computes only its logit columns, and the cross-entropy reduces per
// token the max, the sum of exp and the target logit over TP, so the [T, V] logits are never gathered:
//   loss_t = log Σ_j exp(l_tj − m_t) + m_t − l_t,label      (−100: ignored, loss 0, no gradient)
// Host memory (TP runs on the CPU backend). Legend: T tokens, D hidden, Vr = rows (this rank's vocabulary).
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/linear.h"
#include "parallel/tensor_parallel.h"

namespace dsv3 {

struct VocabShard {
  int64_t vocab = 0, v0 = 0, rows = 0;  // global vocabulary; this rank's first row and row count
};

struct VocabParallelScratch {
  std::vector<float> logits_TVr, max_T, sum_T, target_T;
  LinearScratch lin;
};

// out_TD (assigned) = embedding rows of ids_T, reduced over TP.
void vocab_parallel_embedding_forward(const TensorParallel& tp, const VocabShard& v, const int32_t* ids_T,
                                      const float* table_VrD, float* out_TD, int64_t t, int64_t d);
// dtable_VrD += the rows of dout_TD (whole on every TP rank) for the ids this rank holds.
void vocab_parallel_embedding_backward(const VocabShard& v, const float* dout_TD, const int32_t* ids_T,
                                       float* dtable_VrD, int64_t t, int64_t d);

// Sequence parallelism (tensor_parallel.h): the lookup of all B·S ids into full_TD (scratch), reduce-scattered
// into out_TlD, this rank's positions (Megatron's embedding with reduce_scatter_embeddings); the backward
// all-gathers dout_TlD into full_TD and accumulates every token's row this rank holds.
void vocab_parallel_embedding_forward_sp(const TensorParallel& tp, const VocabShard& v, const int32_t* ids_T,
                                         const float* table_VrD, float* full_TD, float* out_TlD, int64_t b,
                                         int64_t s, int64_t d);
void vocab_parallel_embedding_backward_sp(const TensorParallel& tp, const VocabShard& v,
                                          const float* dout_TlD, const int32_t* ids_T, float* full_TD,
                                          float* dtable_VrD, int64_t b, int64_t s, int64_t d);

// loss_T and lse_T (for the backward) assigned; both the same on every TP rank.
void vocab_parallel_head_ce_forward(Backend& be, const TensorParallel& tp, const VocabShard& v,
                                    const float* h_TD, const float* w_VrD, const int32_t* labels_T,
                                    float* loss_T, float* lse_T, int64_t t, int64_t d, Precision p,
                                    VocabParallelScratch& s);
// dh_TD assigned (the whole gradient: the partial sums over the vocabulary shards are reduced over TP; with
// sequence parallelism left partial, for the caller to reduce-scatter to its sequence shard), dw_VrD
// accumulated; dloss scales every non-ignored token's loss.
void vocab_parallel_head_ce_backward(Backend& be, const TensorParallel& tp, const VocabShard& v,
                                     const float* h_TD, const float* w_VrD, const int32_t* labels_T,
                                     const float* lse_T, float dloss, float* dh_TD, float* dw_VrD, int64_t t,
                                     int64_t d, Precision p, VocabParallelScratch& s);

}  // namespace dsv3
