// DeepSeek-V3 router forward/backward (see router.h for the math and the HF/Megatron choices).
#include "moe/router.h"

#include <cmath>

#include "core/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/route.h"

namespace dsv3 {

RouterConfig RouterConfig::hf(int64_t e, int64_t k, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                              float scaling) {
  RouterConfig c;
  c.num_experts = e, c.topk = k, c.n_group = n_group, c.topk_group = topk_group;
  c.group_score_topk = 2;  // HF hard-codes .topk(2) for the group score
  c.group_mask = GroupMaskValue::kZero;
  c.normalise = norm_topk_prob;
  c.scaling_factor = scaling;
  return c;
}

RouterConfig RouterConfig::megatron(int64_t e, int64_t k, int64_t n_group, int64_t topk_group,
                                    float scaling) {
  RouterConfig c;
  c.num_experts = e, c.topk = k, c.n_group = n_group, c.topk_group = topk_group;
  c.group_score_topk = topk_group > 0 ? k / topk_group : 0;
  c.group_mask = GroupMaskValue::kNegInf;
  c.normalise = k > 1;
  c.scaling_factor = scaling;
  return c;
}

void RouterConfig::validate() const {
  DSV3_CHECK(num_experts > 0, "router: num_experts must be > 0, got ", num_experts);
  DSV3_CHECK(topk >= 1 && topk <= num_experts, "router: topk must be in [1, num_experts=", num_experts,
             "], got ", topk);
  DSV3_CHECK(n_group >= 1 && num_experts % n_group == 0, "router: n_group=", n_group,
             " must divide num_experts=", num_experts);
  if (n_group > 1) {
    const int64_t gs = num_experts / n_group;
    DSV3_CHECK(topk_group >= 1 && topk_group <= n_group,
               "router: topk_group must be in [1, n_group=", n_group, "], got ", topk_group);
    DSV3_CHECK(group_score_topk >= 1 && group_score_topk <= gs, "router: group_score_topk must be in [1, ",
               gs, " experts per group], got ", group_score_topk, " (Megatron uses topk/topk_group = ", topk,
               "/", topk_group, ")");
    DSV3_CHECK(group_mask == GroupMaskValue::kZero || topk <= topk_group * gs, "router: topk=", topk,
               " exceeds the ", topk_group * gs, " experts left in the kept groups");
  }
  DSV3_CHECK(std::isfinite(scaling_factor), "router: scaling_factor must be finite");
  DSV3_CHECK(dropless() || capacity_factor > 0,
             "router: capacity_factor must be > 0 (or negative for dropless), got ", capacity_factor);
  DSV3_CHECK(!pad_to_capacity || !dropless(), "router: pad_to_capacity needs a capacity_factor");
  DSV3_CHECK(seq_aux_coeff >= 0.f, "router: seq_aux_coeff must be >= 0, got ", seq_aux_coeff);
}

RouteSelect route_select(const RouterConfig& r) {
  RouteSelect s;
  s.e = static_cast<int32_t>(r.num_experts), s.k = static_cast<int32_t>(r.topk);
  s.n_group = static_cast<int32_t>(r.n_group), s.topk_group = static_cast<int32_t>(r.topk_group);
  s.group_score_topk = static_cast<int32_t>(r.group_score_topk);
  s.mask_neg_inf = r.group_mask == GroupMaskValue::kNegInf, s.normalise = r.normalise;
  s.scaling = r.scaling_factor;
  return s;
}

int64_t expert_capacity(int64_t tokens, int64_t topk, int64_t experts, double capacity_factor) {
  return static_cast<int64_t>(
      std::ceil((static_cast<double>(tokens * topk) / static_cast<double>(experts)) * capacity_factor));
}

int64_t tokens_per_expert(const RouterConfig& cfg, int64_t t, int64_t capacity, int64_t kept) {
  if (!cfg.pad_to_capacity) return kept;
  return capacity > t ? t : capacity;  // Megatron: a capacity above T pads every expert to T
}

void router_route(const RouterConfig& cfg, const float* bias_E, int64_t t, int64_t batch, bool training,
                  RouterActs& a) {
  cfg.validate();
  DSV3_CHECK(batch > 0 && t % batch == 0, "router: T=", t, " tokens is not a multiple of batch=", batch);
  const int64_t e_n = cfg.num_experts, k_n = cfg.topk;
  DSV3_CHECK(static_cast<int64_t>(a.logits_TE.size()) == t * e_n, "router_route: logits_TE holds ",
             a.logits_TE.size(), " values, expected T*E=", t * e_n);
  a.t = t;
  a.scores_TE.resize(t * e_n);
  a.idx_TK.resize(t * k_n);
  a.weight_TK.resize(t * k_n);
  a.denom_T.resize(t);
  a.kept_TK.assign(t * k_n, 1);
  a.capacity = cfg.dropless() ? -1 : expert_capacity(t, k_n, e_n, cfg.capacity_factor);
  a.has_aux_grad = training && cfg.seq_aux_coeff > 0.f;
  a.seq_aux_loss = 0.f;
  RouteForwardArgs f;
  f.cfg = route_select(cfg), f.t = t, f.batch = batch;
  f.logits_TE = a.logits_TE.data(), f.bias_E = bias_E;
  f.scores_TE = a.scores_TE.data(), f.weight_TK = a.weight_TK.data(), f.denom_T = a.denom_T.data();
  f.idx_TK = a.idx_TK.data();
  if (a.capacity >= 0) {  // the rule picks among each expert's candidates: it needs the permutation
    a.offsets_E1.resize(e_n + 1), a.routed_E1.resize(e_n + 1);
    a.token_R.resize(t * k_n), a.slot_R.resize(t * k_n), a.row_TK.resize(t * k_n);
    f.offsets_E1 = a.offsets_E1.data(), f.token_R = a.token_R.data(), f.slot_R = a.slot_R.data();
    f.row_TK = a.row_TK.data();
    f.capacity = a.capacity, f.drop_by_position = cfg.drop_policy == DropPolicy::kPosition;
    f.kept_TK = a.kept_TK.data(), f.routed_E1 = a.routed_E1.data();
  }
  if (a.has_aux_grad) {
    a.aux_dlogits_TE.resize(t * e_n);
    f.aux_coeff = cfg.seq_aux_coeff, f.aux_loss_1 = &a.seq_aux_loss,
    f.aux_dlogits_TE = a.aux_dlogits_TE.data();
  }
  route_forward_host(f);
  a.routed_per_expert_E.assign(e_n, 0);
  a.tokens_per_expert_E.assign(e_n, 0);
  a.kept_pairs = 0;
  for (int64_t i = 0; i < t * k_n; ++i) {
    ++a.routed_per_expert_E[a.idx_TK[i]];
    a.tokens_per_expert_E[a.idx_TK[i]] += a.kept_TK[i];
    a.kept_pairs += a.kept_TK[i];
  }
  for (int64_t e = 0; e < e_n; ++e)
    a.tokens_per_expert_E[e] = tokens_per_expert(cfg, t, a.capacity, a.tokens_per_expert_E[e]);
}

void router_backward(const RouterConfig& cfg, const RouterParams& p, const float* u, int64_t d, RouterActs& a,
                     const float* dweight_TK, float aux_grad, RouterGrads& g, float* du, float beta) {
  DSV3_CHECK(g.gate_w_ED != nullptr, "router_backward: gate weight gradient is null");
  if (a.t == 0) return;
  router_backward_logits(cfg, a, dweight_TK, aux_grad);
  linear_backward_weight(cpu_backend(), a.dlogits_TE.data(), u, g.gate_w_ED, a.t, d, cfg.num_experts,
                         Precision::kF32, a.lin);
  linear_backward_input(cpu_backend(), a.dlogits_TE.data(), p.gate_w_ED, du, a.t, d, cfg.num_experts,
                        Precision::kF32, a.lin, beta);
}

void router_backward_logits(const RouterConfig& cfg, RouterActs& a, const float* dweight_TK, float aux_grad) {
  a.dlogits_TE.resize(a.t * cfg.num_experts);
  RouteBackwardArgs b;
  b.cfg = route_select(cfg), b.t = a.t;
  b.scores_TE = a.scores_TE.data(), b.denom_T = a.denom_T.data(), b.dweight_TK = dweight_TK;
  b.idx_TK = a.idx_TK.data(), b.kept_TK = a.kept_TK.data();
  b.aux_dlogits_TE = a.has_aux_grad ? a.aux_dlogits_TE.data() : nullptr, b.aux_grad = aux_grad;
  b.dlogits_TE = a.dlogits_TE.data();
  route_backward_host(b);
}

}  // namespace dsv3
