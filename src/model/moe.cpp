// DeepSeek-V3 MoE layer forward/backward (see moe.h). Experts run one after another over their contiguous
// rows; the parallelism is inside each GEMM (oneDNN) and in the element-wise kernels (swiglu.h,
// moe_permute.h).
#include "model/moe.h"

#include "core/error.h"
#include "kernels/cpu/swiglu.h"
#include "model/config.h"

namespace dsv3 {

void MoeConfig::validate() const {
  DSV3_CHECK(hidden > 0 && ffn > 0, "moe: hidden and ffn must be > 0, got ", hidden, ", ", ffn);
  DSV3_CHECK(n_shared >= 0, "moe: n_shared must be >= 0, got ", n_shared);
  router.validate();
}

MoeConfig moe_config_from_model(const ModelConfig& m, Precision p) {
  MoeConfig c;
  c.hidden = m.hidden_size;
  c.ffn = m.moe_intermediate_size;
  c.n_shared = m.n_shared_experts;
  c.precision = p;
  RouterConfig& r = c.router;
  r.num_experts = m.n_routed_experts;
  r.topk = m.num_experts_per_tok;
  r.n_group = m.n_group;
  r.topk_group = m.topk_group;
  r.group_score_topk = m.group_score_topk;
  r.normalise = m.always_renormalise;
  r.scaling_factor = static_cast<float>(m.routed_scaling_factor);
  r.group_mask = m.source == ConfigSource::kHuggingFace ? GroupMaskValue::kZero : GroupMaskValue::kNegInf;
  return c;
}

void moe_forward(const MoeConfig& c, const MoeParams& p, const float* x, int64_t t, int64_t batch,
                 bool training, MoeActs& a, float* out) {
  c.validate();
  DSV3_CHECK(p.gate_proj_EFD && p.up_proj_EFD && p.down_proj_EDF, "moe_forward: expert weights are null");
  DSV3_CHECK(c.n_shared == 0 || (p.shared_gate_SD && p.shared_up_SD && p.shared_down_DS),
             "moe_forward: shared expert weights are null");
  const int64_t d = c.hidden, f = c.ffn, e_n = c.router.num_experts, k_n = c.router.topk;
  a.x_TD = x;
  a.t = t;
  router_forward(c.router, {p.gate_w_ED, p.expert_bias_E}, x, t, d, batch, training, a.router);
  build_permutation(a.router.idx_TK.data(), a.router.kept_TK.data(), t, k_n, e_n, a.perm);
  const int64_t r_n = a.perm.rows();
  a.x_RD.resize(r_n * d);
  a.a_RF.resize(r_n * f);
  a.b_RF.resize(r_n * f);
  a.z_RF.resize(r_n * f);
  a.prob_R.resize(r_n);
  a.y_RD.resize(r_n * d);
  permute_rows(x, a.perm, d, a.x_RD.data());
  permute_pairs(a.router.weight_TK.data(), a.perm, a.prob_R.data());

  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t n = a.perm.count(e), o = a.perm.offsets_E1[e];
    if (n == 0) continue;
    linear_forward(&a.x_RD[o * d], p.gate_proj_EFD + e * f * d, &a.a_RF[o * f], n, d, f, c.precision, a.lin);
    linear_forward(&a.x_RD[o * d], p.up_proj_EFD + e * f * d, &a.b_RF[o * f], n, d, f, c.precision, a.lin);
  }
  swiglu_scaled_forward(a.a_RF.data(), a.b_RF.data(), a.prob_R.data(), a.z_RF.data(), r_n, f);
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t n = a.perm.count(e), o = a.perm.offsets_E1[e];
    if (n == 0) continue;
    linear_forward(&a.z_RF[o * f], p.down_proj_EDF + e * d * f, &a.y_RD[o * d], n, f, d, c.precision, a.lin);
  }
  // Routed sum first, then the shared expert added on top (HF's order).
  unpermute_sum(a.y_RD.data(), a.perm, d, out, 0.f);
  if (c.n_shared > 0 && t > 0) {
    const int64_t s = c.shared_ffn();
    a.sa_TS.resize(t * s);
    a.sb_TS.resize(t * s);
    a.sh_TS.resize(t * s);
    linear_forward(x, p.shared_gate_SD, a.sa_TS.data(), t, d, s, c.precision, a.lin);
    linear_forward(x, p.shared_up_SD, a.sb_TS.data(), t, d, s, c.precision, a.lin);
    swiglu_forward(a.sa_TS.data(), a.sb_TS.data(), a.sh_TS.data(), t, s);
    linear_forward(a.sh_TS.data(), p.shared_down_DS, out, t, s, d, c.precision, a.lin, 1.f);
  }
}

void moe_backward(const MoeConfig& c, const MoeParams& p, MoeActs& a, const float* dout, float aux_grad,
                  MoeGrads& g, float* dx, float beta) {
  DSV3_CHECK(g.gate_w_ED && g.gate_proj_EFD && g.up_proj_EFD && g.down_proj_EDF,
             "moe_backward: null gradients");
  DSV3_CHECK(c.n_shared == 0 || (g.shared_gate_SD && g.shared_up_SD && g.shared_down_DS),
             "moe_backward: null shared expert gradients");
  const int64_t d = c.hidden, f = c.ffn, e_n = c.router.num_experts, k_n = c.router.topk, t = a.t;
  const float* x = a.x_TD;
  float dx_beta = beta;
  if (c.n_shared > 0 && t > 0) {
    const int64_t s = c.shared_ffn();
    a.dsh_TS.resize(t * s);
    a.dsa_TS.resize(t * s);
    a.dsb_TS.resize(t * s);
    linear_backward_weight(dout, a.sh_TS.data(), g.shared_down_DS, t, s, d, c.precision, a.lin);
    linear_backward_input(dout, p.shared_down_DS, a.dsh_TS.data(), t, s, d, c.precision, a.lin);
    swiglu_backward(a.dsh_TS.data(), a.sa_TS.data(), a.sb_TS.data(), a.dsa_TS.data(), a.dsb_TS.data(), t, s);
    linear_backward_weight(a.dsa_TS.data(), x, g.shared_gate_SD, t, d, s, c.precision, a.lin);
    linear_backward_weight(a.dsb_TS.data(), x, g.shared_up_SD, t, d, s, c.precision, a.lin);
    linear_backward_input(a.dsa_TS.data(), p.shared_gate_SD, dx, t, d, s, c.precision, a.lin, beta);
    linear_backward_input(a.dsb_TS.data(), p.shared_up_SD, dx, t, d, s, c.precision, a.lin, 1.f);
    dx_beta = 1.f;
  }

  const int64_t r_n = a.perm.rows();
  a.dy_RD.resize(r_n * d);
  a.dz_RF.resize(r_n * f);
  a.da_RF.resize(r_n * f);
  a.db_RF.resize(r_n * f);
  a.dx_RD.resize(r_n * d);
  a.dprob_R.resize(r_n);
  a.dweight_TK.resize(t * k_n);
  permute_rows(dout, a.perm, d, a.dy_RD.data());
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t n = a.perm.count(e), o = a.perm.offsets_E1[e];
    if (n == 0) continue;
    linear_backward_weight(&a.dy_RD[o * d], &a.z_RF[o * f], g.down_proj_EDF + e * d * f, n, f, d, c.precision,
                           a.lin);
    linear_backward_input(&a.dy_RD[o * d], p.down_proj_EDF + e * d * f, &a.dz_RF[o * f], n, f, d, c.precision,
                          a.lin);
  }
  // z = silu(a)⊙b·w: the gate weight w of each row gets dw = Σ_f dz·silu(a)·b here.
  swiglu_scaled_backward(a.dz_RF.data(), a.a_RF.data(), a.b_RF.data(), a.prob_R.data(), a.da_RF.data(),
                         a.db_RF.data(), a.dprob_R.data(), r_n, f);
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t n = a.perm.count(e), o = a.perm.offsets_E1[e];
    if (n == 0) continue;
    const float* xe = &a.x_RD[o * d];
    linear_backward_weight(&a.da_RF[o * f], xe, g.gate_proj_EFD + e * f * d, n, d, f, c.precision, a.lin);
    linear_backward_weight(&a.db_RF[o * f], xe, g.up_proj_EFD + e * f * d, n, d, f, c.precision, a.lin);
    linear_backward_input(&a.da_RF[o * f], p.gate_proj_EFD + e * f * d, &a.dx_RD[o * d], n, d, f, c.precision,
                          a.lin);
    linear_backward_input(&a.db_RF[o * f], p.up_proj_EFD + e * f * d, &a.dx_RD[o * d], n, d, f, c.precision,
                          a.lin, 1.f);
  }
  unpermute_sum(a.dx_RD.data(), a.perm, d, dx, dx_beta);
  unpermute_pairs(a.dprob_R.data(), a.perm, a.dweight_TK.data());
  RouterGrads rg{g.gate_w_ED};
  router_backward(c.router, {p.gate_w_ED, p.expert_bias_E}, x, d, a.router, a.dweight_TK.data(), aux_grad, rg,
                  dx, 1.f);
}

}  // namespace dsv3
