// A bias-free linear layer y[T,out] = x[T,in] · W[out,in]^T (HF nn.Linear layout), forward and backward, in
// fp32 or bf16 (operands rounded to bf16, fp32 accumulation and fp32 outputs). Every projection in the model
// goes through these calls so that precision and the GEMM backend are decided in one place: each runs its
// GEMM (and its bf16 operand conversions) on the Backend it is given (kernels/backend.h).
#pragma once
#include <cstdint>
#include <vector>

#include "core/bf16.h"
#include "kernels/device_array.h"
#include "kernels/precision.h"

namespace dsv3 {

// Scratch for the bf16 operand copies; grows on first use and is reused after (no allocation in steady state).
struct LinearScratch {
  DeviceArray<bf16> a, b;
};

// y = x W^T (beta = 0) or y += x W^T (beta = 1).
void linear_forward(Backend& be, const float* x_TI, const float* w_OI, float* y_TO, int64_t t, int64_t in,
                    int64_t out, Precision p, LinearScratch& s, float beta = 0.f);
// dx = dy W (beta = 0: assign; 1: accumulate).
void linear_backward_input(Backend& be, const float* dy_TO, const float* w_OI, float* dx_TI, int64_t t,
                           int64_t in, int64_t out, Precision p, LinearScratch& s, float beta = 0.f);
// dW += dy^T x (parameter gradients always accumulate).
void linear_backward_weight(Backend& be, const float* dy_TO, const float* x_TI, float* dw_OI, int64_t t,
                            int64_t in, int64_t out, Precision p, LinearScratch& s);

// Operand-level forms for callers that reuse a converted operand across several GEMMs (MoE experts): x, w and
// dy are GEMM operands in the precision's type (const float* for kF32, const bf16* for kBF16), with row strides
// ld_* in elements (0: dense). linear_operand makes one; linear_operand_at offsets into one.
const void* linear_operand(Backend& be, const float* x, int64_t n, Precision p, DeviceArray<bf16>& buf);
inline const void* linear_operand_at(const void* base, int64_t offset, Precision p) {
  return p == Precision::kF32 ? static_cast<const void*>(static_cast<const float*>(base) + offset)
                              : static_cast<const void*>(static_cast<const bf16*>(base) + offset);
}
void linear_forward_op(Backend& be, const void* x, const void* w, float* y, int64_t t, int64_t in,
                       int64_t out, Precision p, float beta = 0.f, int64_t ld_x = 0, int64_t ld_y = 0);
void linear_backward_input_op(Backend& be, const void* dy, const void* w, float* dx, int64_t t, int64_t in,
                              int64_t out, Precision p, float beta = 0.f, int64_t ld_dy = 0);
// dw += dy^T x; dy rows of stride ld_dy.
void linear_backward_weight_op(Backend& be, const void* dy, const void* x, float* dw, int64_t t, int64_t in,
                               int64_t out, Precision p, int64_t ld_dy = 0);

// bf16 copies of a set of fp32 weight tensors, refreshed by their owner whenever the weights may have changed
// (Model: at the start of every forward, so an optimizer step or a checkpoint load can never leave a stale
// copy), and read by every linear in that forward and its backward instead of converting each weight per
// GEMM.
class Bf16Weights {
 public:
  void clear();
  // Registers w[0, n) (memory of be, which holds the copies too); registration order is irrelevant. Register
  // every tensor before the first refresh().
  void add(Backend& be, const float* w, int64_t n);
  void refresh();  // converts every registered tensor
  // The copy of w[0, n) when registered tensors without gaps cover it (w may point inside one), else nullptr.
  const bf16* find(const float* w, int64_t n) const;

 private:
  struct Range {
    const float* w;
    int64_t n, off;
  };
  std::vector<Range> ranges_;  // sorted by w; off: position in data_ (also increasing)
  DeviceArray<bf16> data_;
  Backend* be_ = nullptr;
};

// GEMM operand for the weight w[0, n): fp32 → w itself; bf16 → its copy in `cache` when registered there,
// else converted into buf.
const void* weight_operand(Backend& be, const float* w, int64_t n, Precision p, const Bf16Weights* cache,
                           DeviceArray<bf16>& buf);
// The operand a forward saved: fp32 → the activation itself; bf16 → its bf16 copy.
inline const void* saved_operand(const float* x, const DeviceArray<bf16>& x_bf, Precision p) {
  return p == Precision::kF32 ? static_cast<const void*>(x) : static_cast<const void*>(x_bf.data());
}

}  // namespace dsv3
