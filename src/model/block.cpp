// Decoder layer: RMSNorm → MLA → residual, RMSNorm → dense SwiGLU or MoE → residual.
#include "model/block.h"

#include "core/error.h"
#include "core/profile.h"

namespace dsv3 {
void block_forward(Backend& be, const BlockDims& d, const BlockParams& p, const float* x, int64_t B,
                   int64_t S, bool training, float* out, BlockActs& a, BlockScratch& s, Precision prec) {
  const int64_t T = B * S, D = d.D;
  a.x_TD = x;
  a.B = B, a.S = S;
  grow(be, a.xn1_TD, T * D), grow(be, a.rstd1_T, T), grow(be, a.h_mid_TD, T * D), grow(be, a.xn2_TD, T * D),
      grow(be, a.rstd2_T, T);
  grow(be, a.tmp_TD, T * D);
  {
    DSV3_PROFILE("fwd.norm");
    be.rmsnorm_forward(x, D, p.input_norm_w, a.xn1_TD.data(), D, a.rstd1_T.data(), T, D, d.norm_eps);
  }
  mla_forward(be, d.mla, p.mla, a.xn1_TD.data(), B, S, a.tmp_TD.data(), a.mla, prec, s.mla);
  {
    DSV3_PROFILE("fwd.norm");
    be.add(a.h_mid_TD.data(), x, a.tmp_TD.data(), T * D);
    be.rmsnorm_forward(a.h_mid_TD.data(), D, p.post_norm_w, a.xn2_TD.data(), D, a.rstd2_T.data(), T, D,
                       d.norm_eps);
  }
  if (d.is_moe) {
    moe_forward(be, d.moe, p.moe, a.xn2_TD.data(), T, B, training, a.moe, a.tmp_TD.data());
  } else {
    DSV3_PROFILE("fwd.dense_ffn");
    const MlpParams mp{p.gate_FD, p.up_FD, p.down_DF, p.bf16_weights};
    mlp_forward(be, mp, a.xn2_TD.data(), T, D, d.F, a.tmp_TD.data(), 0.f, a.mlp, s.mlp, prec);
    d.tp.reduce_from_forward(a.tmp_TD.data(), T * D);
  }
  be.add(out, a.h_mid_TD.data(), a.tmp_TD.data(), T * D);
}

void block_backward(Backend& be, const BlockDims& d, const BlockParams& p, BlockActs& a, const float* dout,
                    float aux_grad, float* dx, BlockGrads& g, BlockScratch& s, Precision prec) {
  DSV3_CHECK(dx != dout, "block_backward: dx may not alias dout");
  const int64_t T = a.B * a.S, D = d.D;
  grow(be, s.dxn_TD, T * D), grow(be, s.dh_mid_TD, T * D);
  float* dxn = s.dxn_TD.data();
  float* dh_mid = s.dh_mid_TD.data();
  if (d.is_moe) {
    moe_backward(be, d.moe, p.moe, a.moe, dout, aux_grad, g.moe, dxn, 0.f);
  } else {
    DSV3_PROFILE("bwd.dense_ffn");
    const MlpParams mp{p.gate_FD, p.up_FD, p.down_DF, p.bf16_weights};
    MlpGrads mg{g.gate_FD, g.up_FD, g.down_DF};
    mlp_backward(be, mp, a.mlp, dout, D, d.F, dxn, 0.f, mg, s.mlp, prec);
    d.tp.copy_to_backward(dxn, T * D);
  }
  // The residual carries dout straight to h_mid; the post-attention norm adds its input gradient on top.
  {
    DSV3_PROFILE("bwd.norm");
    be.copy(dh_mid, dout, T * D * sizeof(float));
    be.rmsnorm_backward(dxn, D, a.h_mid_TD.data(), D, p.post_norm_w, a.rstd2_T.data(), dh_mid, D,
                        g.post_norm_w, T, D, 1.f);
  }
  mla_backward(be, d.mla, p.mla, a.mla, dh_mid, dxn, g.mla, prec, s.mla);
  DSV3_PROFILE("bwd.norm");
  be.copy(dx, dh_mid, T * D * sizeof(float));
  be.rmsnorm_backward(dxn, D, a.x_TD, D, p.input_norm_w, a.rstd1_T.data(), dx, D, g.input_norm_w, T, D, 1.f);
}

}  // namespace dsv3
