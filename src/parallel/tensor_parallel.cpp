// The TP mappings over the TP group's Comm (see tensor_parallel.h).
#include "parallel/tensor_parallel.h"

#include "core/error.h"
#include "parallel/comm.h"

namespace dsv3 {
namespace {
void reduce(const TensorParallel& tp, float* x, int64_t n, ReduceOp op) {
  if (!tp.on() || n == 0) return;
  DSV3_CHECK(tp.comm && tp.comm->size() == tp.size, "tensor parallelism: no TP group of size ", tp.size);
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

}  // namespace dsv3
