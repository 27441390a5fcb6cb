// Token embedding lookup out[t] = E[ids[t]] and its backward, a scatter-add into dE. Ids are validated
// (0 <= id < vocab) before any work, with an error naming the offending id and its token index.
// The backward is deterministic: threads own disjoint column blocks of dE and each sums its tokens in token
// order, so the result is bit-identical for any thread count. dE accumulates (+=), as parameter gradients do.
// The _shard forms serve a vocab-parallel table (Megatron VocabParallelEmbedding): the table holds global
// rows [row_begin, row_begin + rows); ids outside that range give zero output rows and no gradient (the TP
// all-reduce of the outputs then fills them in). HF's padding_idx (a row that never receives gradient) is
// padding_idx >= 0.
//
// Legend: T tokens, V vocab rows (of this shard), D hidden.
#pragma once
#include <cstdint>

namespace dsv3 {

void embedding_forward(const int32_t* ids_T, const float* table_VD, float* out_TD, int64_t t, int64_t vocab,
                       int64_t d);
void embedding_backward(const float* dout_TD, const int32_t* ids_T, float* dtable_VD, int64_t t,
                        int64_t vocab, int64_t d, int64_t padding_idx = -1);

void embedding_forward_shard(const int32_t* ids_T, const float* table_VD, float* out_TD, int64_t t,
                             int64_t vocab, int64_t row_begin, int64_t rows, int64_t d);
void embedding_backward_shard(const float* dout_TD, const int32_t* ids_T, float* dtable_VD, int64_t t,
                              int64_t vocab, int64_t row_begin, int64_t rows, int64_t d,
                              int64_t padding_idx = -1);

// Test oracles (full table, plain loops).
void embedding_forward_reference(const int32_t* ids_T, const float* table_VD, float* out_TD, int64_t t,
                                 int64_t d);
void embedding_backward_reference(const float* dout_TD, const int32_t* ids_T, float* dtable_VD, int64_t t,
                                  int64_t d, int64_t padding_idx = -1);

}  // namespace dsv3
