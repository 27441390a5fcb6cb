// SwiGLU MLP forward/backward on the backend's GEMMs and SwiGLU kernel (see mlp.h).
#include "model/mlp.h"

namespace dsv3 {

void mlp_forward(Backend& be, int64_t d, int64_t f, const MlpParams& p, const float* x, int64_t t, float* y,
                 float beta, MlpActs& a, MlpScratch& s, Precision prec) {
  a.x_TD = x, a.t = t;
  grow(be, a.ab_T2F, t * 2 * f), grow(be, a.h_TF, t * f);
  auto W = [&](const float* w, int64_t n) { return weight_operand(be, w, n, prec, p.bf16_weights, s.lin.b); };
  const void* xo = linear_operand(be, x, t * d, prec, a.x_bf);
  float* ab = a.ab_T2F.data();
  if (p.up_FD == p.gate_FD + f * d) {
    linear_forward_op(be, xo, W(p.gate_FD, 2 * f * d), ab, t, d, 2 * f, prec);
  } else {
    linear_forward_op(be, xo, W(p.gate_FD, f * d), ab, t, d, f, prec, 0.f, 0, 2 * f);
    linear_forward_op(be, xo, W(p.up_FD, f * d), ab + f, t, d, f, prec, 0.f, 0, 2 * f);
  }
  be.swiglu_forward(ab, ab + f, 2 * f, nullptr, a.h_TF.data(), t, f);
  const void* ho = linear_operand(be, a.h_TF.data(), t * f, prec, a.h_bf);
  linear_forward_op(be, ho, W(p.down_DF, d * f), y, t, f, d, prec, beta);
}

void mlp_backward(Backend& be, int64_t d, int64_t f, const MlpParams& p, const MlpActs& a, const float* dy,
                  float* dx, float beta, MlpGrads& g, MlpScratch& s, Precision prec) {
  const int64_t t = a.t;
  grow(be, s.dh_TF, t * f), grow(be, s.dab_T2F, t * 2 * f);
  auto W = [&](const float* w, int64_t n) { return weight_operand(be, w, n, prec, p.bf16_weights, s.lin.b); };
  const void* dyo = linear_operand(be, dy, t * d, prec, s.lin.a);
  linear_backward_weight_op(be, dyo, saved_operand(a.h_TF.data(), a.h_bf, prec), g.down_DF, t, f, d, prec);
  linear_backward_input_op(be, dyo, W(p.down_DF, d * f), s.dh_TF.data(), t, f, d, prec);
  const float* ab = a.ab_T2F.data();
  float* dab = s.dab_T2F.data();
  be.swiglu_backward(s.dh_TF.data(), ab, ab + f, 2 * f, nullptr, dab, dab + f, 2 * f, nullptr, t, f);
  const void* dabo = linear_operand(be, dab, t * 2 * f, prec, s.lin.a);
  const void* dbo = linear_operand_at(dabo, f, prec);
  const void* xo = saved_operand(a.x_TD, a.x_bf, prec);
  if (p.up_FD == p.gate_FD + f * d) {
    linear_backward_input_op(be, dabo, W(p.gate_FD, 2 * f * d), dx, t, d, 2 * f, prec, beta);
  } else {
    linear_backward_input_op(be, dabo, W(p.gate_FD, f * d), dx, t, d, f, prec, beta, 2 * f);
    linear_backward_input_op(be, dbo, W(p.up_FD, f * d), dx, t, d, f, prec, 1.f, 2 * f);
  }
  if (g.up_FD == g.gate_FD + f * d) {
    linear_backward_weight_op(be, dabo, xo, g.gate_FD, t, d, 2 * f, prec);
  } else {
    linear_backward_weight_op(be, dabo, xo, g.gate_FD, t, d, f, prec, 2 * f);
    linear_backward_weight_op(be, dbo, xo, g.up_FD, t, d, f, prec, 2 * f);
  }
}

}  // namespace dsv3
