// Linear layers on top of gemm(): bf16 mode converts both operands into scratch, then runs a bf16 GEMM with
// fp32 accumulation and fp32 output (what torch.autocast does for matmuls on CPU).
#include "kernels/cpu/linear.h"

#include "kernels/cpu/gemm.h"

namespace dsv3 {

const void* linear_operand(const float* x, int64_t n, Precision p, std::vector<bf16>& buf) {
  if (p == Precision::kF32) return x;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  to_bf16(x, buf.data(), n);
  return buf.data();
}

namespace {

const void* as_operand(const float* x, int64_t n, Precision p, std::vector<bf16>& buf) {
  return linear_operand(x, n, p, buf);
}

GemmType ab_type(Precision p) { return p == Precision::kF32 ? GemmType::kF32 : GemmType::kBF16; }

}  // namespace

void linear_forward(const float* x, const float* w, float* y, int64_t t, int64_t in, int64_t out, Precision p,
                    LinearScratch& s, float beta) {
  GemmArgs g;
  g.m = t, g.n = out, g.k = in;
  g.a = as_operand(x, t * in, p, s.a), g.lda = in;
  g.b = as_operand(w, out * in, p, s.b), g.ldb = in, g.trans_b = true;
  g.c = y, g.ldc = out, g.ab_type = ab_type(p), g.beta = beta;
  gemm(g);
}

void linear_backward_input(const float* dy, const float* w, float* dx, int64_t t, int64_t in, int64_t out,
                           Precision p, LinearScratch& s, float beta) {
  GemmArgs g;
  g.m = t, g.n = in, g.k = out;
  g.a = as_operand(dy, t * out, p, s.a), g.lda = out;
  g.b = as_operand(w, out * in, p, s.b), g.ldb = in;
  g.c = dx, g.ldc = in, g.ab_type = ab_type(p), g.beta = beta;
  gemm(g);
}

void linear_backward_weight(const float* dy, const float* x, float* dw, int64_t t, int64_t in, int64_t out,
                            Precision p, LinearScratch& s) {
  GemmArgs g;
  g.m = out, g.n = in, g.k = t;
  g.a = as_operand(dy, t * out, p, s.a), g.lda = out, g.trans_a = true;
  g.b = as_operand(x, t * in, p, s.b), g.ldb = in;
  g.c = dw, g.ldc = in, g.ab_type = ab_type(p), g.beta = 1.f;
  gemm(g);
}

void linear_forward_op(const void* x, const void* w, float* y, int64_t t, int64_t in, int64_t out, Precision p,
                       float beta, int64_t ld_x, int64_t ld_y) {
  GemmArgs g;
  g.m = t, g.n = out, g.k = in;
  g.a = x, g.lda = ld_x ? ld_x : in;
  g.b = w, g.ldb = in, g.trans_b = true;
  g.c = y, g.ldc = ld_y ? ld_y : out, g.ab_type = ab_type(p), g.beta = beta;
  gemm(g);
}

void linear_backward_input_op(const void* dy, const void* w, float* dx, int64_t t, int64_t in, int64_t out,
                              Precision p, float beta, int64_t ld_dy) {
  GemmArgs g;
  g.m = t, g.n = in, g.k = out;
  g.a = dy, g.lda = ld_dy ? ld_dy : out;
  g.b = w, g.ldb = in;
  g.c = dx, g.ldc = in, g.ab_type = ab_type(p), g.beta = beta;
  gemm(g);
}

void linear_backward_weight_op(const void* dy, const void* x, float* dw, int64_t t, int64_t in, int64_t out,
                               Precision p, int64_t ld_dy) {
  GemmArgs g;
  g.m = out, g.n = in, g.k = t;
  g.a = dy, g.lda = ld_dy ? ld_dy : out, g.trans_a = true;
  g.b = x, g.ldb = in;
  g.c = dw, g.ldc = in, g.ab_type = ab_type(p), g.beta = 1.f;
  gemm(g);
}

}  // namespace dsv3
