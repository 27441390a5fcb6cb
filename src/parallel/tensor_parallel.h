// Tensor parallelism's paired operations (Megatron-Core's tensor_parallel mappings), which the layers call at the
// edges of their TP regions instead of calling MPI (DESIGN principle 3). A TP region starts with copy-to-TP
// (forward: the identity, every TP rank already holds the whole input; backward: the input gradient, a partial
// sum over this rank's heads or FFN columns, all-reduced) and ends with reduce-from-TP (forward: the partial
// outputs of a row-parallel linear all-reduced; backward: the identity). Host memory: TP runs on the CPU
// backend. With size 1 every operation is a no-op.
//
// Sequence parallelism (--sequence-parallel, sp()): outside the TP regions each TP rank holds only its shard of
// the sequence, positions [r·S/TP, (r+1)·S/TP) of every one of the B sequences, packed [B, S/TP, w] (Megatron
// splits dim 0 of its [S, B, h] tensors the same way). A region then starts with gather-from-SP (forward:
// all-gather to [B, S, w]; backward: reduce-scatter of the partial input gradient) and ends with
// reduce-scatter-to-SP (forward: the partial outputs summed and scattered; backward: all-gather of the shard
// gradients). scatter-to-SP keeps this rank's shard of a whole tensor (backward: all-gather).
#pragma once
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace dsv3 {

class Comm;

struct TensorParallel {
  int size = 1, rank = 0;
  Comm* comm = nullptr;  // the TP group (needed when size > 1)
  bool sequence_parallel =
      false;  // --sequence-parallel; only acts with size > 1 (Megatron ignores it at TP 1)
  bool on() const { return size > 1; }
  bool sp() const { return sequence_parallel && size > 1; }
  // Tokens this rank holds outside the TP regions, of t = B·S.
  int64_t local_tokens(int64_t t) const { return sp() ? t / size : t; }

  // reduce-from-TP, forward: x[0..n) ← Σ over the TP ranks.
  void reduce_from_forward(float* x, int64_t n) const;
  // copy-to-TP, backward: dx[0..n) ← Σ over the TP ranks.
  void copy_to_backward(float* dx, int64_t n) const;
  // The vocab-parallel cross-entropy's reductions over the vocabulary shards.
  void max(float* x, int64_t n) const;
  void sum(float* x, int64_t n) const;

  // Sequence parallelism. b sequences, s_local = S/TP positions of each on this rank, w floats per token.
  // all-gather: full [b, S, w] ← every rank's local [b, s_local, w] (gather-from-SP forward,
  // reduce-scatter-to-SP backward).
  void sp_all_gather(const float* local, float* full, int64_t b, int64_t s_local, int64_t w) const;
  // reduce-scatter: local [b, s_local, w] ← this rank's positions of Σ over the TP ranks of full [b, S, w]
  // (reduce-scatter-to-SP forward, gather-from-SP backward).
  void sp_reduce_scatter(const float* full, float* local, int64_t b, int64_t s_local, int64_t w) const;
  // scatter-to-SP forward: local ← this rank's positions of full (no communication; any element type).
  template <typename T>
  void sp_slice(const T* full, T* local, int64_t b, int64_t s_local, int64_t w) const {
    const int64_t s = s_local * size, n = s_local * w;
    for (int64_t i = 0; i < b; ++i)
      std::memcpy(local + i * n, full + (i * s + rank * s_local) * w, n * sizeof(T));
  }

  // Scratch of the SP collectives, [TP, b, s_local, w]: their rank-major order. Shared by the copies of one
  // TensorParallel (every layer of a model holds a copy of the model's), so a model keeps one, not one per layer;
  // public so that the struct stays an aggregate.
  std::shared_ptr<std::vector<float>> pack_ = std::make_shared<std::vector<float>>();
};

}  // namespace dsv3
