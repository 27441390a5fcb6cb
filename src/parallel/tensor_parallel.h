// Tensor parallelism's paired operations (Megatron-Core's tensor_parallel mappings), which the layers call at the
// edges of their TP regions instead of calling MPI (DESIGN principle 3). A TP region starts with copy-to-TP
// (forward: the identity, every TP rank already holds the whole input; backward: the input gradient, a partial
// sum over this rank's heads or FFN columns, all-reduced) and ends with reduce-from-TP (forward: the partial
// outputs of a row-parallel linear all-reduced; backward: the identity). Host memory: TP runs on the CPU
// backend. With size 1 every operation is a no-op.
#pragma once
#include <cstdint>

namespace dsv3 {

class Comm;

struct TensorParallel {
  int size = 1, rank = 0;
  Comm* comm = nullptr;  // the TP group (needed when size > 1)
  bool on() const { return size > 1; }

  // reduce-from-TP, forward: x[0..n) ← Σ over the TP ranks.
  void reduce_from_forward(float* x, int64_t n) const;
  // copy-to-TP, backward: dx[0..n) ← Σ over the TP ranks.
  void copy_to_backward(float* dx, int64_t n) const;
  // The vocab-parallel cross-entropy's reductions over the vocabulary shards.
  void max(float* x, int64_t n) const;
  void sum(float* x, int64_t n) const;
};

}  // namespace dsv3
