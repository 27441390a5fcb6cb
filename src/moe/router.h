// DeepSeek-V3 sigmoid router: fp32 logits u·W_gᵀ, group-limited top-k on the bias-corrected scores, gate
// weights from the unbiased scores, optional capacity dropping (Megatron), and the sequence-wise balance
// loss; forward and backward side by side. Where HF transformers 4.57.6 and Megatron-Core 0.16.1 compute
// differently the choice is an explicit RouterConfig field (see RouterConfig::hf / ::megatron).
//
// Forward (spec §2.7, megatron-deepseek-system §7.1):
//   logits = u·W_gᵀ (fp32)      s = sigmoid(logits)      choice = s + b   (b: selection only, no gradient)
//   group g score = sum of the top `group_score_topk` choice values among experts [g·E/G, (g+1)·E/G)
//   keep the top `topk_group` groups; the other experts' choice := mask value (−inf, or 0.0 as HF 4.57.6 does)
//   idx = top-k of the masked choice;  w = s[idx] (/ (Σ w + 1e-20) if normalise) · scaling_factor
//   capacity (Megatron apply_router_token_dropping): cap = ceil(T·k/E · cf); per expert keep the `cap` routed
//   tokens with the highest w (policy kProbs) or the first `cap` routed tokens (kPosition) in Megatron's
//   token order, which is [S, B] (position s first, then sequence b; dsv3 stores t = b·S + s); dropped pairs
//   get weight 0 and are not renormalised. With pad_to_capacity the routing map becomes the capacity mask:
//   every expert then counts `cap` tokens (the padding pairs carry weight 0 and change no output or gradient,
//   so they are only counted, never computed). If cap > T nothing is dropped (and with pad every expert
//   counts all T tokens). tokens_per_expert = column sums of that final routing map (what Megatron
//   accumulates for the bias update).
//
// Ties: every top-k here (groups, experts, capacity) prefers the lower index among equal values (for
// capacity: the earlier token in Megatron's order), i.e. the order of a stable descending sort. torch.topk on
// CPU does NOT guarantee this (e.g. 8 equal values, k=2 gives [6, 5]), so on exact ties torch-based
// references can pick a different but equally valid set.
//
// Sequence aux loss (Megatron _apply_seq_aux_loss + compute_routing_scores_for_aux_loss, spec §4.2/§7.1.7):
// with p = s / (Σ_e s + 1e-20) and map = top-k of p (no bias, no groups), per sequence b of S tokens
//   L = coeff/B · Σ_b Σ_e (Σ_s p[b,s,e]) · c[b,e] · E / (k·S²),   c[b,e] = #tokens of b whose map holds e.
// Its gradient w.r.t. the logits is stored in the forward (aux_dlogits_TE) and added, times aux_grad, in
// backward.
//
// The arithmetic is kernels/route.h's per-token bodies (the CPU loops of kernels/cpu/route.cpp), which a device
// backend runs too: one routing code for every path.
//
// Backward (spec §3.4): with g_k = dL/dw_k (0 for dropped pairs), Z = Σ s_sel + 1e-20 and r = scaling_factor,
//   dL/ds_m = r·(g_m/Z − Σ_k g_k s_k/Z²) (normalise) or r·g_m
//   dlogits = ds · s(1−s) + aux_grad · aux_dlogits
//   dW_g   += dlogitsᵀ u (accumulate);   du = or += dlogits · W_g (beta)
//
// Legend: T tokens, D hidden, E routed experts, K = topk, G groups, B sequences of S tokens (t = b·S + s).
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/cpu/linear.h"
#include "kernels/route.h"

namespace dsv3 {

enum class GroupMaskValue : uint8_t {
  kNegInf,  // official inference code, Megatron-Core, HF after PR #45441
  kZero,    // HF transformers 4.57.6 DeepseekV3TopkRouter.get_topk_indices: masked_fill(..., 0.0)
};
enum class DropPolicy : uint8_t { kProbs, kPosition };

struct RouterConfig {
  int64_t num_experts = 0;  // E (n_routed_experts / --num-experts)
  int64_t topk = 0;         // K (num_experts_per_tok / --moe-router-topk)
  int64_t n_group = 1;      // G, groups of E/G consecutive experts (1: no group limit)
  int64_t topk_group = 1;   // groups kept per token
  int64_t group_score_topk =
      2;  // group score = sum of the top this-many choice scores (HF: 2; Megatron: K/topk_group)
  GroupMaskValue group_mask = GroupMaskValue::kNegInf;
  bool normalise = true;        // HF: norm_topk_prob; Megatron: always when K > 1 (sigmoid)
  float scaling_factor = 1.f;   // routed_scaling_factor / --moe-router-topk-scaling-factor
  double capacity_factor = -1;  // < 0: dropless (--moe-expert-capacity-factor unset)
  DropPolicy drop_policy = DropPolicy::kProbs;
  bool pad_to_capacity = false;  // --moe-pad-expert-input-to-capacity
  float seq_aux_coeff = 0.f;     // --moe-aux-loss-coeff with --moe-router-load-balancing-type seq_aux_loss

  bool dropless() const { return capacity_factor < 0; }
  // HF 4.57.6 semantics: top-2 group score, 0.0 group mask, renormalise iff norm_topk_prob.
  static RouterConfig hf(int64_t e, int64_t k, int64_t n_group, int64_t topk_group, bool norm_topk_prob,
                         float scaling);
  // Megatron-Core semantics: top-(K/topk_group) group score, −inf mask, renormalise iff K > 1.
  static RouterConfig megatron(int64_t e, int64_t k, int64_t n_group, int64_t topk_group, float scaling);
  void validate() const;  // throws dsv3::Error naming the bad field
};

// Capacity per expert, Megatron get_capacity(T·K, E, cf) = ceil(T·K/E · cf) (computed in double as Python
// does).
int64_t expert_capacity(int64_t tokens, int64_t topk, int64_t experts, double capacity_factor);
// An expert's entry of tokens_per_expert_E from its kept pairs: the capacity under pad-to-capacity (T when the
// capacity exceeds T), else the kept count.
int64_t tokens_per_expert(const RouterConfig& cfg, int64_t t, int64_t capacity, int64_t kept);
// The selection's fields as the routing bodies take them (kernels/route.h).
RouteSelect route_select(const RouterConfig& cfg);

struct RouterParams {
  const float* gate_w_ED = nullptr;      // mlp.gate.weight
  const float* expert_bias_E = nullptr;  // mlp.gate.e_score_correction_bias (fp32); nullptr = zeros
};

struct RouterActs {
  int64_t t = 0;
  int64_t kept_pairs = 0;                    // pairs the capacity rule kept (T·K when dropless)
  std::vector<float> logits_TE, scores_TE;   // fp32 logits and sigmoid scores
  std::vector<int32_t> idx_TK;               // selected experts, by descending masked choice (ties: lower id)
  std::vector<float> weight_TK;              // gate weights after normalise·scale, before dropping
  std::vector<float> denom_T;                // Σ selected s + 1e-20 (normalise only)
  std::vector<uint8_t> kept_TK;              // 1 unless the pair was dropped by the capacity rule
  std::vector<int64_t> routed_per_expert_E;  // top-k counts before dropping
  std::vector<int64_t> tokens_per_expert_E;  // final routing map counts (after dropping; = capacity with pad)
  int64_t capacity = -1;                     // -1: dropless
  float seq_aux_loss = 0.f;                  // L above (0 when not computed)
  bool has_aux_grad = false;
  std::vector<float> aux_dlogits_TE;  // dL_aux/dlogits
  // scratch
  std::vector<float> dlogits_TE;
  std::vector<int32_t> offsets_E1, routed_E1, token_R, slot_R, row_TK;  // capacity rule: the permutation
  LinearScratch lin;
};

struct RouterGrads {
  float* gate_w_ED = nullptr;  // accumulated
};

// The routing from the logits the caller put in a.logits_TE ([T, E]); bias_E may be null. training: compute the
// sequence aux loss (when seq_aux_coeff > 0), as Megatron does only with grad enabled. batch = B, the number of
// sequences in the T = B·S tokens (used by the aux loss only).
void router_route(const RouterConfig& cfg, const float* bias_E, int64_t t, int64_t batch, bool training,
                  RouterActs& a);

// dweight_TK: dL/d(final gate weight) per (t, k). aux_grad: dL_total/dL_aux (1, or Megatron's loss scale).
void router_backward(const RouterConfig& cfg, const RouterParams& p, const float* u_TD, int64_t d,
                     RouterActs& a, const float* dweight_TK, float aux_grad, RouterGrads& g, float* du_TD,
                     float beta);

// The logits part of router_backward: fills a.dlogits_TE.
void router_backward_logits(const RouterConfig& cfg, RouterActs& a, const float* dweight_TK, float aux_grad);

}  // namespace dsv3
