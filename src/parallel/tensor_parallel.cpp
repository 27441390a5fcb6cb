// The TP mappings over the TP group's Comm (see tensor_parallel.h).
#include "parallel/tensor_parallel.h"

#include "core/error.h"
#include "parallel/comm.h"

namespace dsv3 {
namespace {
void check_group(const TensorParallel& tp) {
  DSV3_CHECK(tp.comm && tp.comm->size() == tp.size, "tensor parallelism: no TP group of size ", tp.size);
}
void reduce(const TensorParallel& tp, float* x, int64_t n, ReduceOp op) {
  if (!tp.on() || n == 0) return;
  check_group(tp);
  tp.comm->allreduce(x, n, op);
}
}  // namespace

void TensorParallel::reduce_from_forward(float* x, int64_t n) const {
  reduce(*this, x, n, ReduceOp::kSum);
}
void TensorParallel::copy_to_backward(float* dx, int64_t n) const {
  reduce(*this, dx, n, ReduceOp::kSum);
}
void TensorParallel::max(float* x, int64_t n) const {
  reduce(*this, x, n, ReduceOp::kMax);
}
void TensorParallel::sum(float* x, int64_t n) const {
  reduce(*this, x, n, ReduceOp::kSum);
}

// The collectives concatenate blocks rank by rank; a sequence's positions are rank-major only within it, so the
// blocks are unpacked (gather) or packed (reduce-scatter) per sequence. One sequence needs no copy.
namespace {
// dst[j][i] = src[i][j]: blocks of blk floats, src [outer][inner] (rank-major [TP][b] <-> sequence-major [b][TP]).
void transpose_blocks(const float* src, float* dst, int64_t outer, int64_t inner, int64_t blk) {
  for (int64_t i = 0; i < outer; ++i)
    for (int64_t j = 0; j < inner; ++j)
      std::memcpy(dst + (j * outer + i) * blk, src + (i * inner + j) * blk, blk * sizeof(float));
}
}  // namespace

void TensorParallel::sp_all_gather(const float* local, float* full, int64_t b, int64_t s_local,
                                   int64_t w) const {
  const int64_t n = b * s_local * w;
  if (!sp()) {
    std::memcpy(full, local, n * sizeof(float));
    return;
  }
  check_group(*this);
  if (b == 1) return comm->allgather(local, n, full);
  pack_->resize(static_cast<size_t>(n * size));
  comm->allgather(local, n, pack_->data());
  transpose_blocks(pack_->data(), full, size, b, s_local * w);
}

void TensorParallel::sp_reduce_scatter(const float* full, float* local, int64_t b, int64_t s_local,
                                       int64_t w) const {
  const int64_t n = b * s_local * w;
  if (!sp()) {
    std::memcpy(local, full, n * sizeof(float));
    return;
  }
  check_group(*this);
  if (b == 1) return comm->reduce_scatter(full, local, n);
  pack_->resize(static_cast<size_t>(n * size));
  transpose_blocks(full, pack_->data(), b, size, s_local * w);
  comm->reduce_scatter(pack_->data(), local, n);
}

}  // namespace dsv3
