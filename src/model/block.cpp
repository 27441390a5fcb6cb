// Decoder layer: RMSNorm → MLA → residual, RMSNorm → dense SwiGLU or MoE → residual.
#include "model/block.h"

#include "core/error.h"
#include "core/profile.h"

namespace dsv3 {
namespace {

// The edges of a TP region (tensor_parallel.h). Entering: the input the region reads, this rank's xn itself or,
// with SP, all of it gathered into `full`. Leaving: the region's partial output y (T rows) summed over TP into
// out (Tl rows): all-reduced in place without SP (y is out), reduce-scattered with it.
const float* enter(const BlockDims& d, const float* xn, DeviceArray<float>& full, Backend& be, int64_t B,
                   int64_t S) {
  if (!d.tp.sp()) return xn;
  d.tp.sp_all_gather(xn, grow(be, full, B * S * d.D), B, S / d.tp.size, d.D);
  return full.data();
}
void leave(const BlockDims& d, float* y, float* out, int64_t B, int64_t S) {
  if (d.tp.sp()) return d.tp.sp_reduce_scatter(y, out, B, S / d.tp.size, d.D);
  d.tp.reduce_from_forward(y, B * S * d.D);
}
// Backward of leave: the output gradient the region reads (dout itself, or all of it gathered with SP).
const float* leave_backward(const BlockDims& d, const float* dout, DeviceArray<float>& full, Backend& be,
                            int64_t B, int64_t S) {
  return enter(d, dout, full, be, B, S);
}
// Backward of enter: the region's partial input gradient dy (T rows) summed over TP into dxn (Tl rows).
void enter_backward(const BlockDims& d, float* dy, float* dxn, int64_t B, int64_t S) {
  if (d.tp.sp()) return d.tp.sp_reduce_scatter(dy, dxn, B, S / d.tp.size, d.D);
  d.tp.copy_to_backward(dy, B * S * d.D);
}

}  // namespace

void block_forward(Backend& be, const BlockDims& d, const BlockParams& p, const float* x, int64_t B,
                   int64_t S, bool training, float* out, BlockActs& a, BlockScratch& s, Precision prec) {
  const int64_t T = B * S, Tl = d.tp.local_tokens(T), D = d.D;
  a.x_TD = x;
  a.B = B, a.S = S;
  grow(be, a.xn1_TD, Tl * D), grow(be, a.rstd1_T, Tl), grow(be, a.h_mid_TD, Tl * D),
      grow(be, a.xn2_TD, Tl * D), grow(be, a.rstd2_T, Tl);
  grow(be, a.tmp_TD, Tl * D);
  // The regions' partial outputs: in place in tmp without SP, whole-sequence scratch with it.
  float* y = d.tp.sp() ? grow(be, s.full_TD, T * D) : a.tmp_TD.data();
  {
    DSV3_PROFILE("fwd.norm");
    be.rmsnorm_forward(x, D, p.input_norm_w, a.xn1_TD.data(), D, a.rstd1_T.data(), Tl, D, d.norm_eps);
  }
  // MLA takes this rank's positions and gathers its latents itself (mla.h), so its region is entered there.
  mla_forward(be, d.mla, p.mla, a.xn1_TD.data(), B, S, y, a.mla, s.mla, prec);
  leave(d, y, a.tmp_TD.data(), B, S);
  {
    DSV3_PROFILE("fwd.norm");
    be.add(a.h_mid_TD.data(), x, a.tmp_TD.data(), Tl * D);
    be.rmsnorm_forward(a.h_mid_TD.data(), D, p.post_norm_w, a.xn2_TD.data(), D, a.rstd2_T.data(), Tl, D,
                       d.norm_eps);
  }
  if (d.is_moe) {  // the MoE layer takes this rank's tokens and keeps its own TP edges (moe.h)
    moe_forward(be, d.moe, p.moe, a.xn2_TD.data(), Tl, B, training, a.tmp_TD.data(), a.moe, s.moe);
  } else {
    DSV3_PROFILE("fwd.dense_ffn");
    const MlpParams mp{p.gate_FD, p.up_FD, p.down_DF, p.bf16_weights};
    const float* ffn_in = enter(d, a.xn2_TD.data(), a.xn2_full_TD, be, B, S);
    mlp_forward(be, D, d.F, mp, ffn_in, T, y, 0.f, a.mlp, s.mlp, prec);
    leave(d, y, a.tmp_TD.data(), B, S);
  }
  be.add(out, a.h_mid_TD.data(), a.tmp_TD.data(), Tl * D);
}

void block_backward(Backend& be, const BlockDims& d, const BlockParams& p, BlockActs& a, const float* dout,
                    float aux_grad, float* dx, BlockGrads& g, BlockScratch& s, Precision prec) {
  DSV3_CHECK(dx != dout, "block_backward: dx may not alias dout");
  const int64_t B = a.B, S = a.S, T = B * S, Tl = d.tp.local_tokens(T), D = d.D;
  grow(be, s.dxn_TD, Tl * D), grow(be, s.dh_mid_TD, Tl * D);
  float* dxn = s.dxn_TD.data();
  float* dh_mid = s.dh_mid_TD.data();
  // The regions' partial input gradients: in place in dxn without SP, whole-sequence scratch with it.
  float* dy = d.tp.sp() ? grow(be, s.full_TD, T * D) : dxn;
  if (d.is_moe) {
    moe_backward(be, d.moe, p.moe, a.moe, dout, aux_grad, dxn, g.moe, 0.f, s.moe);
  } else {
    DSV3_PROFILE("bwd.dense_ffn");
    const MlpParams mp{p.gate_FD, p.up_FD, p.down_DF, p.bf16_weights};
    MlpGrads mg{g.gate_FD, g.up_FD, g.down_DF};
    const float* dffn = leave_backward(d, dout, s.dfull_TD, be, B, S);
    mlp_backward(be, D, d.F, mp, a.mlp, dffn, dy, 0.f, mg, s.mlp, prec);
    enter_backward(d, dy, dxn, B, S);
  }
  // The residual carries dout straight to h_mid; the post-attention norm adds its input gradient on top.
  {
    DSV3_PROFILE("bwd.norm");
    be.copy(dh_mid, dout, Tl * D * sizeof(float));
    be.rmsnorm_backward(dxn, D, a.h_mid_TD.data(), D, p.post_norm_w, a.rstd2_T.data(), dh_mid, D,
                        g.post_norm_w, Tl, D, 1.f);
  }
  const float* dattn = leave_backward(d, dh_mid, s.dfull_TD, be, B, S);
  if (d.tp.sp()) {  // MLA's input gradient comes back whole for this rank's positions
    mla_backward(be, d.mla, p.mla, a.mla, dattn, dxn, g.mla, s.mla, prec);
  } else {
    mla_backward(be, d.mla, p.mla, a.mla, dattn, dy, g.mla, s.mla, prec);
    enter_backward(d, dy, dxn, B, S);
  }
  DSV3_PROFILE("bwd.norm");
  be.copy(dx, dh_mid, Tl * D * sizeof(float));
  be.rmsnorm_backward(dxn, D, a.x_TD, D, p.input_norm_w, a.rstd1_T.data(), dx, D, g.input_norm_w, Tl, D, 1.f);
}

}  // namespace dsv3
