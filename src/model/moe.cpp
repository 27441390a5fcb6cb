// DeepSeek-V3 MoE layer forward/backward (see moe.h). Experts run in parallel over the threads, each GEMM on
// one thread (oneDNN runs single-threaded inside a parallel region): per-expert GEMMs are small, and one
// fork/join per expert loop instead of one per GEMM keeps the threads busy (and a descheduled thread on a
// shared machine stalls the others once per loop, not once per GEMM). Element-wise kernels (swiglu.h,
// moe_permute.h) parallelise themselves.
//
// Backend seam (kernels/backend.h): the GEMMs (routed experts, shared expert, dense FFN) and the SwiGLUs run
// on the Backend passed in; the router (kernels/cpu/router.h), the token permutation (ep_dispatch /
// ep_combine and their gradients), the routed experts' bf16 weight conversion and the host loop marked below
// still call the CPU code directly on host memory, so MoE layers need a host-memory backend (the CPU's) for
// now.
#include "model/moe.h"

#include <optional>

#include "core/error.h"
#include "core/profile.h"
#include "kernels/cpu/gemm.h"
#include "model/config.h"

namespace dsv3 {
namespace {

// f(e, o, n) for each local expert e that has rows (its rows are [o, o + n)), experts spread over the
// threads, each GEMM on one thread (see the top of this file). varying_rows: the bf16 GEMMs' runtime
// dimensions (below).
template <typename F>
void for_each_expert(const DispatchState& s, bool varying_rows, F&& f) {
  const int64_t e_n = static_cast<int64_t>(s.offsets_L1.size()) - 1;
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t o = s.offsets_L1[e], n = s.offsets_L1[e + 1] - o;
    if (n == 0) continue;
    std::optional<GemmVaryingRows> rows;  // n changes every step
    if (varying_rows) rows.emplace();
    f(e, o, n);
  }
}

// bf16 experts: the weights (gate and up stacked per expert, so one GEMM gives both) and the activations are
// converted to bf16 once per layer and step, and reused by the backward; results equal the per-GEMM
// conversions. Their GEMMs run with oneDNN runtime dimensions (GemmVaryingRows): an expert's row count
// changes every step and an exact-shape primitive would be re-created each time (in real training 1.27x
// slower steps on proxy-cpu). The fp32 path, dsv3's verification mode, keeps exact-shape primitives: their
// rows do not depend on the row count of the GEMM, so parallel layouts reproduce the serial run to ~1e-7
// (runtime-dimension GEMMs reach 1e-6).
void experts_forward_bf16(Backend& be, const MoeConfig& c, const MoeParams& p, MoeActs& a) {
  const int64_t d = c.hidden, f = c.ffn, e_n = c.local_experts(), r_n = a.dispatch.offsets_L1.back();
  const Precision bf = Precision::kBF16;
  a.w_gu_bf.resize(e_n * 2 * f * d);
  a.w_down_bf.resize(e_n * d * f);
#pragma omp parallel for schedule(static)
  for (int64_t e = 0; e < e_n; ++e) {
    to_bf16(p.gate_proj_EFD + e * f * d, &a.w_gu_bf[e * 2 * f * d], f * d);
    to_bf16(p.up_proj_EFD + e * f * d, &a.w_gu_bf[e * 2 * f * d + f * d], f * d);
    to_bf16(p.down_proj_EDF + e * d * f, &a.w_down_bf[e * d * f], d * f);
  }
  a.a_RF.resize(r_n * 2 * f);
  const bf16* x = static_cast<const bf16*>(linear_operand(be, a.x_RD.data(), r_n * d, bf, a.x_bf));
  for_each_expert(a.dispatch, true, [&](int64_t e, int64_t o, int64_t n) {
    linear_forward_op(be, x + o * d, &a.w_gu_bf[e * 2 * f * d], &a.a_RF[o * 2 * f], n, d, 2 * f, bf);
  });
  be.swiglu_forward(a.a_RF.data(), a.a_RF.data() + f, 2 * f, a.prob_R.data(), a.z_RF.data(), r_n, f);
  const bf16* z = static_cast<const bf16*>(linear_operand(be, a.z_RF.data(), r_n * f, bf, a.z_bf));
  for_each_expert(a.dispatch, true, [&](int64_t e, int64_t o, int64_t n) {
    linear_forward_op(be, z + o * f, &a.w_down_bf[e * d * f], &a.y_RD[o * d], n, f, d, bf);
  });
}

void experts_backward_bf16(Backend& be, const MoeConfig& c, MoeGrads& g, MoeActs& a) {
  const int64_t d = c.hidden, f = c.ffn, r_n = a.dispatch.offsets_L1.back();
  const Precision bf = Precision::kBF16;
  const bf16* dy = static_cast<const bf16*>(linear_operand(be, a.dy_RD.data(), r_n * d, bf, a.dy_bf));
  const bf16* z = a.z_bf.data();
  const bf16* x = a.x_bf.data();
  for_each_expert(a.dispatch, true, [&](int64_t e, int64_t o, int64_t n) {
    linear_backward_weight_op(be, dy + o * d, z + o * f, g.down_proj_EDF + e * d * f, n, f, d, bf);
    linear_backward_input_op(be, dy + o * d, &a.w_down_bf[e * d * f], &a.dz_RF[o * f], n, f, d, bf);
  });
  a.da_RF.resize(r_n * 2 * f);
  be.swiglu_backward(a.dz_RF.data(), a.a_RF.data(), a.a_RF.data() + f, 2 * f, a.prob_R.data(), a.da_RF.data(),
                     a.da_RF.data() + f, 2 * f, a.dprob_R.data(), r_n, f);
  const bf16* dab = static_cast<const bf16*>(linear_operand(be, a.da_RF.data(), r_n * 2 * f, bf, a.dab_bf));
  for_each_expert(a.dispatch, true, [&](int64_t e, int64_t o, int64_t n) {
    linear_backward_weight_op(be, dab + o * 2 * f, x + o * d, g.gate_proj_EFD + e * f * d, n, d, f, bf,
                              2 * f);
    linear_backward_weight_op(be, dab + o * 2 * f + f, x + o * d, g.up_proj_EFD + e * f * d, n, d, f, bf,
                              2 * f);
    linear_backward_input_op(be, dab + o * 2 * f, &a.w_gu_bf[e * 2 * f * d], &a.dx_RD[o * d], n, d, 2 * f,
                             bf);
  });
}

}  // namespace

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

void moe_forward(Backend& be, const MoeConfig& c, const MoeParams& p, const float* x, int64_t t,
                 int64_t batch, bool training, MoeActs& a, float* out) {
  c.validate();
  DSV3_CHECK(p.gate_proj_EFD && p.up_proj_EFD && p.down_proj_EDF, "moe_forward: expert weights are null");
  DSV3_CHECK(c.n_shared == 0 || (p.shared_gate_SD && p.shared_up_SD && p.shared_down_DS),
             "moe_forward: shared expert weights are null");
  const int64_t d = c.hidden, f = c.ffn, k_n = c.router.topk;
  a.x_TD = x;
  a.t = t;
  {
    DSV3_PROFILE("fwd.moe.router");
    router_forward(c.router, {p.gate_w_ED, p.expert_bias_E}, x, t, d, batch, training, a.router);
  }
  // With pad-to-capacity the router's counts are the padded ones; the dispatcher decides what padding it
  // needs.
  const Routing routing{a.router.idx_TK.data(),
                        a.router.kept_TK.data(),
                        a.router.weight_TK.data(),
                        c.router.pad_to_capacity ? a.router.tokens_per_expert_E.data() : nullptr,
                        t,
                        k_n,
                        c.router.num_experts};
  ep_dispatch(c.ep, routing, x, d, a.dispatch, a.x_RD, a.prob_R);
  const int64_t r_n = a.dispatch.offsets_L1.back();
  a.a_RF.resize(r_n * f);
  a.b_RF.resize(r_n * f);
  a.z_RF.resize(r_n * f);
  a.y_RD.resize(r_n * d);

  DSV3_PROFILE_BEGIN(fwd_experts, "fwd.moe.experts");
  if (c.precision == Precision::kBF16) {
    experts_forward_bf16(be, c, p, a);
  } else {
    for_each_expert(a.dispatch, false, [&](int64_t e, int64_t o, int64_t n) {
      linear_forward(be, &a.x_RD[o * d], p.gate_proj_EFD + e * f * d, &a.a_RF[o * f], n, d, f, c.precision,
                     a.lin);
      linear_forward(be, &a.x_RD[o * d], p.up_proj_EFD + e * f * d, &a.b_RF[o * f], n, d, f, c.precision,
                     a.lin);
    });
    be.swiglu_forward(a.a_RF.data(), a.b_RF.data(), f, a.prob_R.data(), a.z_RF.data(), r_n, f);
    for_each_expert(a.dispatch, false, [&](int64_t e, int64_t o, int64_t n) {
      linear_forward(be, &a.z_RF[o * f], p.down_proj_EDF + e * d * f, &a.y_RD[o * d], n, f, d, c.precision,
                     a.lin);
    });
  }
  DSV3_PROFILE_END(fwd_experts);
  // Routed sum first, then the shared expert added on top (HF's order).
  ep_combine(c.ep, a.dispatch, a.y_RD.data(), out);
  if (c.n_shared > 0 && t > 0) {
    DSV3_PROFILE("fwd.moe.shared");
    const MlpParams mp{p.shared_gate_SD, p.shared_up_SD, p.shared_down_DS, p.bf16_weights};
    mlp_forward(be, mp, x, t, d, c.shared_ffn(), out, 1.f, a.shared, a.shared_scratch, c.precision);
  }
}

void moe_backward(Backend& be, const MoeConfig& c, const MoeParams& p, MoeActs& a, const float* dout,
                  float aux_grad, MoeGrads& g, float* dx, float beta) {
  DSV3_CHECK(g.gate_w_ED && g.gate_proj_EFD && g.up_proj_EFD && g.down_proj_EDF,
             "moe_backward: null gradients");
  DSV3_CHECK(c.n_shared == 0 || (g.shared_gate_SD && g.shared_up_SD && g.shared_down_DS),
             "moe_backward: null shared expert gradients");
  const int64_t d = c.hidden, f = c.ffn, k_n = c.router.topk, t = a.t;
  const float* x = a.x_TD;
  float dx_beta = beta;
  if (c.n_shared > 0 && t > 0) {
    DSV3_PROFILE("bwd.moe.shared");
    const MlpParams mp{p.shared_gate_SD, p.shared_up_SD, p.shared_down_DS, p.bf16_weights};
    MlpGrads mg{g.shared_gate_SD, g.shared_up_SD, g.shared_down_DS};
    mlp_backward(be, mp, a.shared, dout, d, c.shared_ffn(), dx, beta, mg, a.shared_scratch, c.precision);
    dx_beta = 1.f;
  }

  ep_dispatch_grad(c.ep, a.dispatch, dout, a.dy_RD);
  const int64_t r_n = a.dispatch.offsets_L1.back();
  a.dz_RF.resize(r_n * f);
  a.da_RF.resize(r_n * f);
  a.db_RF.resize(r_n * f);
  a.dx_RD.resize(r_n * d);
  a.dprob_R.resize(r_n);
  a.dweight_TK.resize(t * k_n);
  DSV3_PROFILE_BEGIN(bwd_experts, "bwd.moe.experts");
  if (c.precision == Precision::kBF16) {
    experts_backward_bf16(be, c, g, a);
  } else {
    for_each_expert(a.dispatch, false, [&](int64_t e, int64_t o, int64_t n) {
      linear_backward_weight(be, &a.dy_RD[o * d], &a.z_RF[o * f], g.down_proj_EDF + e * d * f, n, f, d,
                             c.precision, a.lin);
      linear_backward_input(be, &a.dy_RD[o * d], p.down_proj_EDF + e * d * f, &a.dz_RF[o * f], n, f, d,
                            c.precision, a.lin);
    });
    // z = silu(a)⊙b·w: the gate weight w of each row gets dw = Σ_f dz·silu(a)·b here.
    be.swiglu_backward(a.dz_RF.data(), a.a_RF.data(), a.b_RF.data(), f, a.prob_R.data(), a.da_RF.data(),
                       a.db_RF.data(), f, a.dprob_R.data(), r_n, f);
    for_each_expert(a.dispatch, false, [&](int64_t e, int64_t o, int64_t n) {
      const float* xe = &a.x_RD[o * d];
      linear_backward_weight(be, &a.da_RF[o * f], xe, g.gate_proj_EFD + e * f * d, n, d, f, c.precision,
                             a.lin);
      linear_backward_weight(be, &a.db_RF[o * f], xe, g.up_proj_EFD + e * f * d, n, d, f, c.precision, a.lin);
      linear_backward_input(be, &a.da_RF[o * f], p.gate_proj_EFD + e * f * d, &a.dx_RD[o * d], n, d, f,
                            c.precision, a.lin);
      linear_backward_input(be, &a.db_RF[o * f], p.up_proj_EFD + e * f * d, &a.dx_RD[o * d], n, d, f,
                            c.precision, a.lin, 1.f);
    });
  }
  DSV3_PROFILE_END(bwd_experts);
  if (dx_beta == 0.f) {
    ep_combine_grad(c.ep, a.dispatch, a.dx_RD.data(), a.dprob_R.data(), dx, 0.f, a.dweight_TK.data());
  } else {
    // The routed rows are summed per token first, then added to what is already in dx (the shared expert's
    // part): the order the allgather dispatcher's reduce-scatter imposes, so every dispatcher and layout adds
    // the same terms in the same order (exactly, for top-2 routing).
    a.dx_routed_TD.resize(t * d);
    ep_combine_grad(c.ep, a.dispatch, a.dx_RD.data(), a.dprob_R.data(), a.dx_routed_TD.data(), 0.f,
                    a.dweight_TK.data());
    const float* r = a.dx_routed_TD.data();
    // host loop: needs a backend op before CUDA (dx += the routed part).
#pragma omp parallel for simd schedule(static) if (t * d > 65536)
    for (int64_t i = 0; i < t * d; ++i) dx[i] += r[i];
  }
  DSV3_PROFILE("bwd.moe.router");
  RouterGrads rg{g.gate_w_ED};
  router_backward(c.router, {p.gate_w_ED, p.expert_bias_E}, x, d, a.router, a.dweight_TK.data(), aux_grad, rg,
                  dx, 1.f);
}

}  // namespace dsv3
