// MLA forward/backward on the backend's ops (linear_* GEMMs, RMSNorm, RoPE and the tiled causal attention).
// Norms, RoPE and the softmax are fp32 in both precisions; Precision::kBF16 only rounds the GEMM (and
// attention matmul) operands.
#include "model/mla.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/profile.h"
#include "kernels/cpu/rope.h"

namespace dsv3 {
namespace {

// The cos/sin table covers positions [0, S); rebuilt (on the host, then copied to the backend) only when S
// outgrows it or the frequencies change, so steady state neither allocates nor recomputes trig.
RopeTableView rope_table(Backend& be, const MlaDims& d, int64_t S, MlaScratch& sc) {
  const bool same = sc.rope_table_freqs.inv_freq == d.rope.inv_freq &&
                    sc.rope_table_freqs.attention_factor == d.rope.attention_factor;
  RopeTable& t = sc.rope_table;
  if (!same || t.max_pos < S || sc.rope_cos_PH.backend() != &be) {
    if (!same || t.max_pos < S) rope_build_table(d.rope, S, t);
    sc.rope_table_freqs = d.rope;
    const int64_t n = static_cast<int64_t>(t.cos_PH.size());
    sc.rope_cos_PH = {}, sc.rope_sin_PH = {};
    grow(be, sc.rope_cos_PH, n), grow(be, sc.rope_sin_PH, n);
    sc.rope_cos_PH.copy_from_host(t.cos_PH.data(), n), sc.rope_sin_PH.copy_from_host(t.sin_PH.data(), n);
  }
  return {sc.rope_cos_PH.data(), sc.rope_sin_PH.data(), t.max_pos, t.half};
}

}  // namespace

void MlaDims::validate() const {
  DSV3_CHECK(D > 0 && H > 0, "MLA: hidden size and heads must be positive (D=", D, " H=", H, ")");
  DSV3_CHECK(q_lora >= 0 && kv_lora > 0, "MLA: q_lora_rank must be >= 0 and kv_lora_rank > 0 (got ", q_lora,
             ", ", kv_lora, ")");
  DSV3_CHECK(dn >= 0 && dv > 0 && dr > 0 && dr % 2 == 0,
             "MLA: need qk_nope >= 0, v > 0 and an even positive qk_rope_head_dim (got dn=", dn, " dr=", dr,
             " dv=", dv, ")");
  DSV3_CHECK(static_cast<int64_t>(rope.inv_freq.size()) == dr / 2, "MLA: rope.inv_freq has ",
             rope.inv_freq.size(), " entries, qk_rope_head_dim/2 = ", dr / 2);
  DSV3_CHECK(softmax_scale > 0.f, "MLA: softmax_scale must be positive (got ", softmax_scale, ")");
}

void mla_forward(Backend& be, const MlaDims& d, const MlaParams& p, const float* x, int64_t B, int64_t S,
                 float* y, MlaActs& a, MlaScratch& sc, Precision prec) {
  d.validate();
  DSV3_CHECK(B > 0 && S > 0, "MLA: batch and sequence length must be positive (B=", B, " S=", S, ")");
  const bool qlora = d.q_lora > 0;
  DSV3_CHECK(
      qlora ? (p.q_a_proj_w && p.q_a_norm_w && p.q_b_proj_w) : p.q_proj_w != nullptr,
      qlora ? "MLA: q_a_proj / q_a_layernorm / q_b_proj weights missing" : "MLA: q_proj weight missing");
  DSV3_CHECK(p.kv_a_proj_w && p.kv_a_norm_w && p.kv_b_proj_w && p.o_proj_w, "MLA: kv/o weights missing");
  const int64_t T = B * S, H = d.H, Q = d.qk_dim(), U = d.kv_b_dim(), A = d.kv_a_dim(), Lkv = d.kv_lora;
  const bool sp = d.tp.sp();
  const int64_t Tl = d.tp.local_tokens(T), Sl = S / d.tp.size;  // x's rows (this rank's positions with SP)
  a.B = B, a.S = S, a.x_TD = x;

  // Queries: [T, H·Q], per head [nope | rope]. Each projection input becomes a GEMM operand once (kept for
  // the weight gradients); weights come from the step's bf16 copies when the caller has them.
  auto W = [&](const float* w, int64_t n) {
    return weight_operand(be, w, n, prec, p.bf16_weights, sc.lin.b);
  };
  const void* xo = linear_operand(be, x, Tl * d.D, prec, a.x_bf);
  float* q = grow(be, a.q_THQ, T * H * Q);
  DSV3_PROFILE_BEGIN(qkv, "fwd.attn.qkv_proj");
  if (qlora) {
    float* cq = grow(be, a.cq_TLq, Tl * d.q_lora);
    float* cqn = grow(be, a.cqn_TLq, T * d.q_lora);
    float* cqn_mine = sp ? grow(be, sc.cqn_local_TLq, Tl * d.q_lora) : cqn;
    linear_forward_op(be, xo, W(p.q_a_proj_w, d.q_lora * d.D), cq, Tl, d.D, d.q_lora, prec);
    be.rmsnorm_forward(cq, d.q_lora, p.q_a_norm_w, cqn_mine, d.q_lora, grow(be, a.rstd_q_T, Tl), Tl, d.q_lora,
                       d.norm_eps);
    if (sp) d.tp.sp_all_gather(cqn_mine, cqn, B, Sl, d.q_lora);
    const void* cqno = linear_operand(be, cqn, T * d.q_lora, prec, a.cqn_bf);
    linear_forward_op(be, cqno, W(p.q_b_proj_w, H * Q * d.q_lora), q, T, d.q_lora, H * Q, prec);
  } else {
    const void* xqo = xo;
    if (sp) {
      d.tp.sp_all_gather(x, grow(be, a.x_full_TD, T * d.D), B, Sl, d.D);
      xqo = linear_operand(be, a.x_full_TD.data(), T * d.D, prec, a.x_full_bf);
    }
    linear_forward_op(be, xqo, W(p.q_proj_w, H * Q * d.D), q, T, d.D, H * Q, prec);
  }

  // Latent kv: [T, A] = [ckv | k_pe]; only ckv is normed.
  float* ckv = grow(be, a.ckv_TA, T * A);
  float* ckvn = grow(be, a.ckvn_TLkv, T * Lkv);
  float* kv = grow(be, a.kv_THU, T * H * U);
  float* ckv_mine = sp ? grow(be, sc.ckv_local_TA, Tl * A) : ckv;
  linear_forward_op(be, xo, W(p.kv_a_proj_w, A * d.D), ckv_mine, Tl, d.D, A, prec);
  if (sp) d.tp.sp_all_gather(ckv_mine, ckv, B, Sl, A);
  be.rmsnorm_forward(ckv, A, p.kv_a_norm_w, ckvn, Lkv, grow(be, a.rstd_kv_T, T), T, Lkv, d.norm_eps);
  const void* ckvno = linear_operand(be, ckvn, T * Lkv, prec, a.ckvn_bf);
  linear_forward_op(be, ckvno, W(p.kv_b_proj_w, H * U * Lkv), kv, T, Lkv, H * U, prec);
  DSV3_PROFILE_END(qkv);

  // RoPE on q_pe (every head, in place) and k_pe (once, into head 0's key, then broadcast to the other heads).
  DSV3_PROFILE("fwd.attn.rope");
  const RopeTableView tab = rope_table(be, d, S, sc);
  float* k = grow(be, a.k_THQ, T * H * Q);
  be.copy_rows(k, Q, kv, U, T * H, d.dn);  // k_nope of every head: kv [T,H,U] cols [0, dn) → k [T,H,Q]
  be.rope_forward(q + d.dn, H * Q, Q, q + d.dn, H * Q, Q, T, H, S, tab, true);
  // The one k_pe rotated into every head's key (input head stride 0): the broadcast costs no extra pass.
  be.rope_forward(ckv + Lkv, A, 0, k + d.dn, H * Q, Q, T, H, S, tab, true);

  AttentionShape as{B, S, H, Q, d.dv, d.softmax_scale};
  float* o = grow(be, a.o_THV, T * H * d.dv);
  {
    DSV3_PROFILE("fwd.attn.kernel");
    be.attention_forward(as, {q, H * Q, Q}, {k, H * Q, Q}, {kv + d.dn, H * U, U}, {o, H * d.dv, d.dv},
                         grow(be, a.lse_BHS, B * H * S), prec);
  }
  DSV3_PROFILE("fwd.attn.o_proj");
  const void* oo = linear_operand(be, o, T * H * d.dv, prec, a.o_bf);
  linear_forward_op(be, oo, W(p.o_proj_w, d.D * H * d.dv), y, T, H * d.dv, d.D, prec);
}

void mla_backward(Backend& be, const MlaDims& d, const MlaParams& p, const MlaActs& a, const float* dy,
                  float* dx, MlaGrads& g, MlaScratch& sc, Precision prec) {
  d.validate();
  DSV3_CHECK(a.x_TD != nullptr && a.B > 0 && a.S > 0, "MLA backward: no saved forward activations");
  const bool qlora = d.q_lora > 0;
  DSV3_CHECK(g.kv_a_proj_w && g.kv_a_norm_w && g.kv_b_proj_w && g.o_proj_w &&
                 (qlora ? (g.q_a_proj_w && g.q_a_norm_w && g.q_b_proj_w) : g.q_proj_w != nullptr),
             "MLA backward: a gradient buffer is missing");
  const int64_t B = a.B, S = a.S, T = B * S, H = d.H, Q = d.qk_dim(), U = d.kv_b_dim(), A = d.kv_a_dim(),
                Lkv = d.kv_lora;
  const bool sp = d.tp.sp();
  const int64_t Tl = d.tp.local_tokens(T), Sl = S / d.tp.size;
  // Each output gradient becomes a GEMM operand once (sc.lin.a) and feeds both the weight and input
  // gradients.
  auto W = [&](const float* w, int64_t n) {
    return weight_operand(be, w, n, prec, p.bf16_weights, sc.lin.b);
  };
  auto G = [&](const float* dy_, int64_t n) { return linear_operand(be, dy_, n, prec, sc.lin.a); };
  const void* xo = saved_operand(a.x_TD, a.x_bf, prec);

  // o_proj.
  float* dout = grow(be, sc.do_THV, T * H * d.dv);
  {
    DSV3_PROFILE("bwd.attn.o_proj");
    const void* dyo = G(dy, T * d.D);
    linear_backward_weight_op(be, dyo, saved_operand(a.o_THV.data(), a.o_bf, prec), g.o_proj_w, T, H * d.dv,
                              d.D, prec);
    linear_backward_input_op(be, dyo, W(p.o_proj_w, d.D * H * d.dv), dout, T, H * d.dv, d.D, prec);
  }

  // Attention: dv lands directly in the v columns of dkv; dk is split below.
  float* dq = grow(be, sc.dq_THQ, T * H * Q);
  float* dk = grow(be, sc.dk_THQ, T * H * Q);
  float* dkv = grow(be, sc.dkv_THU, T * H * U);
  AttentionShape as{B, S, H, Q, d.dv, d.softmax_scale};
  {
    DSV3_PROFILE("bwd.attn.kernel");
    be.attention_backward(as, {a.q_THQ.data(), H * Q, Q}, {a.k_THQ.data(), H * Q, Q},
                          {a.kv_THU.data() + d.dn, H * U, U}, {a.o_THV.data(), H * d.dv, d.dv},
                          a.lse_BHS.data(), {dout, H * d.dv, d.dv}, {dq, H * Q, Q}, {dk, H * Q, Q},
                          {dkv + d.dn, H * U, U}, prec);
  }

  // Undo RoPE; k_pe was shared by all heads, so its gradient is the sum over heads (into dckv's k_pe columns).
  float* dckv = grow(be, sc.dckv_TA, T * A);
  {
    DSV3_PROFILE("bwd.attn.rope");
    const RopeTableView tab = rope_table(be, d, S, sc);
    be.copy_rows(dkv, U, dk, Q, T * H, d.dn);  // dk_nope of every head → dkv cols [0, dn)
    be.sum_heads(dk + d.dn, H * Q, Q, dckv + Lkv, A, T, H, d.dr);  // dk_pe summed over the heads, in order
    be.rope_backward(dq + d.dn, H * Q, Q, dq + d.dn, H * Q, Q, T, H, S, tab, true);
    be.rope_backward(dckv + Lkv, A, 0, dckv + Lkv, A, 0, T, 1, S, tab, true);
  }
  DSV3_PROFILE("bwd.attn.qkv_proj");

  // kv_b_proj, kv_a_layernorm (its gradient goes into the ckv columns of dckv), kv_a_proj_with_mqa.
  float* dckvn = grow(be, sc.dckvn_TLkv, T * Lkv);
  const void* dkvo = G(dkv, T * H * U);
  linear_backward_weight_op(be, dkvo, saved_operand(a.ckvn_TLkv.data(), a.ckvn_bf, prec), g.kv_b_proj_w, T,
                            Lkv, H * U, prec);
  linear_backward_input_op(be, dkvo, W(p.kv_b_proj_w, H * U * Lkv), dckvn, T, Lkv, H * U, prec);
  be.rmsnorm_backward(dckvn, Lkv, a.ckv_TA.data(), A, p.kv_a_norm_w, a.rstd_kv_T.data(), dckv, A,
                      g.kv_a_norm_w, T, Lkv, 0.f);
  // SP: the latent's gradient, partial over the heads for all positions, summed and kept for this rank's.
  float* dckv_mine = sp ? grow(be, sc.dckv_local_TA, Tl * A) : dckv;
  if (sp) d.tp.sp_reduce_scatter(dckv, dckv_mine, B, Sl, A);
  const void* dckvo = G(dckv_mine, Tl * A);
  linear_backward_weight_op(be, dckvo, xo, g.kv_a_proj_w, Tl, d.D, A, prec);
  linear_backward_input_op(be, dckvo, W(p.kv_a_proj_w, A * d.D), dx, Tl, d.D, A, prec);

  // Query path, accumulating into dx.
  const void* dqo = G(dq, T * H * Q);
  if (qlora) {
    float* dcqn = grow(be, sc.dcqn_TLq, T * d.q_lora);
    float* dcq = grow(be, sc.dcq_TLq, Tl * d.q_lora);
    linear_backward_weight_op(be, dqo, saved_operand(a.cqn_TLq.data(), a.cqn_bf, prec), g.q_b_proj_w, T,
                              d.q_lora, H * Q, prec);
    linear_backward_input_op(be, dqo, W(p.q_b_proj_w, H * Q * d.q_lora), dcqn, T, d.q_lora, H * Q, prec);
    float* dcqn_mine = sp ? grow(be, sc.dcqn_local_TLq, Tl * d.q_lora) : dcqn;
    if (sp) d.tp.sp_reduce_scatter(dcqn, dcqn_mine, B, Sl, d.q_lora);
    be.rmsnorm_backward(dcqn_mine, d.q_lora, a.cq_TLq.data(), d.q_lora, p.q_a_norm_w, a.rstd_q_T.data(), dcq,
                        d.q_lora, g.q_a_norm_w, Tl, d.q_lora, 0.f);
    const void* dcqo = G(dcq, Tl * d.q_lora);
    linear_backward_weight_op(be, dcqo, xo, g.q_a_proj_w, Tl, d.D, d.q_lora, prec);
    linear_backward_input_op(be, dcqo, W(p.q_a_proj_w, d.q_lora * d.D), dx, Tl, d.D, d.q_lora, prec, 1.f);
  } else if (sp) {  // q_proj read x gathered: its input gradient is reduce-scattered, then added
    float* dx_full = grow(be, sc.dx_full_TD, T * d.D);
    float* dx_mine = grow(be, sc.dx_local_TD, Tl * d.D);
    linear_backward_weight_op(be, dqo, saved_operand(a.x_full_TD.data(), a.x_full_bf, prec), g.q_proj_w, T,
                              d.D, H * Q, prec);
    linear_backward_input_op(be, dqo, W(p.q_proj_w, H * Q * d.D), dx_full, T, d.D, H * Q, prec);
    d.tp.sp_reduce_scatter(dx_full, dx_mine, B, Sl, d.D);
    be.add(dx, dx, dx_mine, Tl * d.D);
  } else {
    linear_backward_weight_op(be, dqo, xo, g.q_proj_w, T, d.D, H * Q, prec);
    linear_backward_input_op(be, dqo, W(p.q_proj_w, H * Q * d.D), dx, T, d.D, H * Q, prec, 1.f);
  }
}

}  // namespace dsv3
