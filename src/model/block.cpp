// Decoder layer: RMSNorm → MLA → residual, RMSNorm → dense SwiGLU or MoE → residual.
#include "model/block.h"

#include <algorithm>

#include "core/error.h"
#include "core/profile.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/swiglu.h"

namespace dsv3 {
namespace {

void grow(std::vector<float>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

void add_into(float* y, const float* a, const float* b, int64_t n) {
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

}  // namespace

void block_forward(const BlockDims& d, const BlockParams& p, const float* x, int64_t B, int64_t S, bool training,
                   float* out, BlockActs& a, BlockScratch& s, Precision prec) {
  const int64_t T = B * S, D = d.D;
  a.x_TD = x;
  a.B = B, a.S = S;
  grow(a.xn1_TD, T * D), grow(a.rstd1_T, T), grow(a.h_mid_TD, T * D), grow(a.xn2_TD, T * D), grow(a.rstd2_T, T);
  grow(a.tmp_TD, T * D);
  {
    DSV3_PROFILE("fwd.norm");
    rmsnorm_forward(x, p.input_norm_w, a.xn1_TD.data(), a.rstd1_T.data(), T, D, d.norm_eps);
  }
  mla_forward(d.mla, p.mla, a.xn1_TD.data(), B, S, a.tmp_TD.data(), a.mla, prec, s.mla);
  {
    DSV3_PROFILE("fwd.norm");
    add_into(a.h_mid_TD.data(), x, a.tmp_TD.data(), T * D);
    rmsnorm_forward(a.h_mid_TD.data(), p.post_norm_w, a.xn2_TD.data(), a.rstd2_T.data(), T, D, d.norm_eps);
  }
  if (d.is_moe) {
    moe_forward(d.moe, p.moe, a.xn2_TD.data(), T, B, training, a.moe, a.tmp_TD.data());
  } else {
    DSV3_PROFILE("fwd.dense_ffn");
    const int64_t F = d.F;
    grow(a.a_TF, T * F), grow(a.b_TF, T * F), grow(a.h_TF, T * F);
    linear_forward(a.xn2_TD.data(), p.gate_FD, a.a_TF.data(), T, D, F, prec, s.lin);
    linear_forward(a.xn2_TD.data(), p.up_FD, a.b_TF.data(), T, D, F, prec, s.lin);
    swiglu_forward(a.a_TF.data(), a.b_TF.data(), a.h_TF.data(), T, F);
    linear_forward(a.h_TF.data(), p.down_DF, a.tmp_TD.data(), T, F, D, prec, s.lin);
  }
  add_into(out, a.h_mid_TD.data(), a.tmp_TD.data(), T * D);
}

void block_backward(const BlockDims& d, const BlockParams& p, BlockActs& a, const float* dout, float aux_grad,
                    float* dx, BlockGrads& g, BlockScratch& s, Precision prec) {
  DSV3_CHECK(dx != dout, "block_backward: dx may not alias dout");
  const int64_t T = a.B * a.S, D = d.D;
  grow(s.dxn_TD, T * D), grow(s.dh_mid_TD, T * D);
  float* dxn = s.dxn_TD.data();
  float* dh_mid = s.dh_mid_TD.data();
  if (d.is_moe) {
    moe_backward(d.moe, p.moe, a.moe, dout, aux_grad, g.moe, dxn, 0.f);
  } else {
    DSV3_PROFILE("bwd.dense_ffn");
    const int64_t F = d.F;
    grow(s.dh_TF, T * F), grow(s.da_TF, T * F), grow(s.db_TF, T * F);
    linear_backward_input(dout, p.down_DF, s.dh_TF.data(), T, F, D, prec, s.lin);
    linear_backward_weight(dout, a.h_TF.data(), g.down_DF, T, F, D, prec, s.lin);
    swiglu_backward(s.dh_TF.data(), a.a_TF.data(), a.b_TF.data(), s.da_TF.data(), s.db_TF.data(), T, F);
    linear_backward_input(s.da_TF.data(), p.gate_FD, dxn, T, D, F, prec, s.lin);
    linear_backward_input(s.db_TF.data(), p.up_FD, dxn, T, D, F, prec, s.lin, 1.f);
    linear_backward_weight(s.da_TF.data(), a.xn2_TD.data(), g.gate_FD, T, D, F, prec, s.lin);
    linear_backward_weight(s.db_TF.data(), a.xn2_TD.data(), g.up_FD, T, D, F, prec, s.lin);
  }
  // The residual carries dout straight to h_mid; the post-attention norm adds its input gradient on top.
  {
    DSV3_PROFILE("bwd.norm");
    std::copy(dout, dout + T * D, dh_mid);
    rmsnorm_backward(dxn, a.h_mid_TD.data(), p.post_norm_w, a.rstd2_T.data(), dh_mid, g.post_norm_w, T, D, 1.f);
  }
  mla_backward(d.mla, p.mla, a.mla, dh_mid, dxn, g.mla, prec, s.mla);
  DSV3_PROFILE("bwd.norm");
  std::copy(dh_mid, dh_mid + T * D, dx);
  rmsnorm_backward(dxn, a.x_TD, p.input_norm_w, a.rstd1_T.data(), dx, g.input_norm_w, T, D, 1.f);
}

}  // namespace dsv3
