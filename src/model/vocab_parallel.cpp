// Vocab-parallel embedding and cross-entropy (see vocab_parallel.h): the GEMMs on the backend, the per-token
// reductions as plain loops over this rank's logit columns.
#include "model/vocab_parallel.h"

#include <cmath>
#include <limits>

#include "core/error.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"

namespace dsv3 {
namespace {

void check_labels(const int32_t* labels, int64_t t, int64_t vocab) {
  for (int64_t i = 0; i < t; ++i)
    DSV3_CHECK(labels[i] == kIgnoreLabel || (labels[i] >= 0 && labels[i] < vocab), "cross-entropy: label ",
               labels[i], " at token ", i, " is outside the vocabulary [0, ", vocab, ")");
}

float* logits(Backend& be, const VocabShard& v, const float* h, const float* w, int64_t t, int64_t d,
              Precision p, VocabParallelScratch& s) {
  s.logits_TVr.resize(static_cast<size_t>(t * v.rows));
  linear_forward(be, h, w, s.logits_TVr.data(), t, d, v.rows, p, s.lin);
  return s.logits_TVr.data();
}

}  // namespace

void vocab_parallel_embedding_forward(const TensorParallel& tp, const VocabShard& v, const int32_t* ids,
                                      const float* table, float* out, int64_t t, int64_t d) {
  embedding_forward_shard(ids, table, out, t, v.vocab, v.v0, v.rows, d);
  tp.reduce_from_forward(out, t * d);  // one rank holds each row: the sum is exact
}

void vocab_parallel_embedding_backward(const VocabShard& v, const float* dout, const int32_t* ids,
                                       float* dtable, int64_t t, int64_t d) {
  embedding_backward_shard(dout, ids, dtable, t, v.vocab, v.v0, v.rows, d);
}

void vocab_parallel_embedding_forward_sp(const TensorParallel& tp, const VocabShard& v, const int32_t* ids,
                                         const float* table, float* full, float* out, int64_t b, int64_t s,
                                         int64_t d) {
  embedding_forward_shard(ids, table, full, b * s, v.vocab, v.v0, v.rows, d);
  tp.sp_reduce_scatter(full, out, b, s / tp.size, d);
}

void vocab_parallel_embedding_backward_sp(const TensorParallel& tp, const VocabShard& v, const float* dout,
                                          const int32_t* ids, float* full, float* dtable, int64_t b,
                                          int64_t s, int64_t d) {
  tp.sp_all_gather(dout, full, b, s / tp.size, d);
  embedding_backward_shard(full, ids, dtable, b * s, v.vocab, v.v0, v.rows, d);
}

void vocab_parallel_head_ce_forward(Backend& be, const TensorParallel& tp, const VocabShard& v,
                                    const float* h, const float* w, const int32_t* labels, float* loss,
                                    float* lse, int64_t t, int64_t d, Precision p, VocabParallelScratch& s) {
  check_labels(labels, t, v.vocab);
  const float* l = logits(be, v, h, w, t, d, p, s);
  const int64_t n = v.rows;
  s.max_T.assign(t, -std::numeric_limits<float>::infinity());
  s.sum_T.assign(t, 0.f), s.target_T.assign(t, 0.f);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < n; ++j) s.max_T[i] = std::max(s.max_T[i], l[i * n + j]);
  tp.max(s.max_T.data(), t);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < t; ++i) {
    double acc = 0;
    for (int64_t j = 0; j < n; ++j) acc += std::exp(static_cast<double>(l[i * n + j] - s.max_T[i]));
    s.sum_T[i] = static_cast<float>(acc);
    const int64_t y = labels[i] - v.v0;
    if (labels[i] != kIgnoreLabel && y >= 0 && y < n) s.target_T[i] = l[i * n + y];
  }
  tp.sum(s.sum_T.data(), t), tp.sum(s.target_T.data(), t);  // the target: one rank's logit, the others 0
  for (int64_t i = 0; i < t; ++i) {
    lse[i] = s.max_T[i] + std::log(s.sum_T[i]);
    loss[i] = labels[i] == kIgnoreLabel ? 0.f : lse[i] - s.target_T[i];
  }
}

void vocab_parallel_head_ce_backward(Backend& be, const TensorParallel& tp, const VocabShard& v,
                                     const float* h, const float* w, const int32_t* labels, const float* lse,
                                     float dloss, float* dh, float* dw, int64_t t, int64_t d, Precision p,
                                     VocabParallelScratch& s) {
  float* l = logits(be, v, h, w, t, d, p, s);
  const int64_t n = v.rows;
  // In place: dlogits = dloss · (softmax − onehot(label)) over this rank's columns.
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < t; ++i) {
    float* r = l + i * n;
    if (labels[i] == kIgnoreLabel) {
      std::fill(r, r + n, 0.f);
      continue;
    }
    for (int64_t j = 0; j < n; ++j) r[j] = dloss * std::exp(r[j] - lse[i]);
    const int64_t y = labels[i] - v.v0;
    if (y >= 0 && y < n) r[y] -= dloss;
  }
  linear_backward_weight(be, l, h, dw, t, d, n, p, s.lin);
  linear_backward_input(be, l, w, dh, t, d, n, p, s.lin);
  // The head's input is copied to every TP rank (or gathered): its gradient is the sum over them.
  if (!tp.sp()) tp.copy_to_backward(dh, t * d);
}

}  // namespace dsv3
