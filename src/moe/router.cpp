// DeepSeek-V3 router forward/backward (see router.h for the math and the HF/Megatron choices).
#include "moe/router.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "kernels/backend.h"

namespace dsv3 {
namespace {

inline float sigmoidf(float x) {
  return 1.f / (1.f + std::exp(-x));
}

// Indices of the k largest v[i] for i in [0, n) into order[0..k), by descending value, equal values by lower
// index (the order of a stable descending sort). order must hold n slots.
void topk_desc(const float* v, int64_t n, int64_t k, int32_t* order) {
  std::iota(order, order + n, 0);
  std::partial_sort(order, order + k, order + n,
                    [v](int32_t a, int32_t b) { return v[a] > v[b] || (v[a] == v[b] && a < b); });
}

}  // namespace

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

int64_t expert_capacity(int64_t tokens, int64_t topk, int64_t experts, double capacity_factor) {
  return static_cast<int64_t>(
      std::ceil((static_cast<double>(tokens * topk) / static_cast<double>(experts)) * capacity_factor));
}

void route_token(const RouterConfig& cfg, const float* s, const float* bias, int32_t* idx, float* w,
                 float* denom, float* choice, float* group, int32_t* order) {
  const int64_t e_n = cfg.num_experts, k_n = cfg.topk, g_n = cfg.n_group;
  for (int64_t e = 0; e < e_n; ++e) choice[e] = bias ? s[e] + bias[e] : s[e];
  if (g_n > 1) {
    const int64_t gs = e_n / g_n;
    for (int64_t g = 0; g < g_n; ++g) {
      topk_desc(choice + g * gs, gs, cfg.group_score_topk, order);
      float sum = 0.f;  // descending order, as torch sums topk(...)[0]
      for (int64_t j = 0; j < cfg.group_score_topk; ++j) sum += choice[g * gs + order[j]];
      group[g] = sum;
    }
    topk_desc(group, g_n, cfg.topk_group, order);
    std::fill(group, group + g_n, 0.f);  // reuse as the kept-group flag
    for (int64_t j = 0; j < cfg.topk_group; ++j) group[order[j]] = 1.f;
    const float masked = cfg.group_mask == GroupMaskValue::kNegInf ? -INFINITY : 0.f;
    for (int64_t g = 0; g < g_n; ++g)
      if (group[g] == 0.f) std::fill(choice + g * gs, choice + (g + 1) * gs, masked);
  }
  topk_desc(choice, e_n, k_n, order);
  float sum = 0.f;
  for (int64_t j = 0; j < k_n; ++j) {
    idx[j] = order[j];
    w[j] = s[order[j]];  // the unbiased score: the bias only selects
    sum += w[j];
  }
  if (cfg.normalise) {
    *denom = sum + 1e-20f;
    for (int64_t j = 0; j < k_n; ++j) w[j] /= *denom;
  } else {
    *denom = 0.f;
  }
  for (int64_t j = 0; j < k_n; ++j) w[j] *= cfg.scaling_factor;
}

float seq_aux_loss(const float* logits, int64_t batch, int64_t seq, int64_t e_n, int64_t k_n, float coeff,
                   float* dlogits) {
  std::vector<float> sig(e_n), p(e_n), psum(e_n), gp(e_n);
  std::vector<int64_t> count(e_n);
  std::vector<int32_t> order(e_n);
  std::vector<float> z(seq);
  double loss = 0.0;
  const double norm = static_cast<double>(e_n) / (static_cast<double>(k_n) * seq * seq);
  for (int64_t b = 0; b < batch; ++b) {
    std::fill(count.begin(), count.end(), 0);
    std::fill(psum.begin(), psum.end(), 0.f);
    for (int64_t s = 0; s < seq; ++s) {
      const float* lg = logits + (b * seq + s) * e_n;
      float zs = 0.f;
      for (int64_t e = 0; e < e_n; ++e) zs += (sig[e] = sigmoidf(lg[e]));
      z[s] = zs + 1e-20f;
      for (int64_t e = 0; e < e_n; ++e) psum[e] += (p[e] = sig[e] / z[s]);
      topk_desc(p.data(), e_n, k_n, order.data());
      for (int64_t j = 0; j < k_n; ++j) ++count[order[j]];
    }
    double lb = 0.0;
    for (int64_t e = 0; e < e_n; ++e) lb += static_cast<double>(psum[e]) * count[e];
    loss += lb * norm;
    if (!dlogits) continue;
    // dL/dp[b,s,e] = coeff·E·c[b,e]/(B·k·S²), the same for every s of the sequence.
    for (int64_t e = 0; e < e_n; ++e) gp[e] = static_cast<float>(coeff * norm * count[e] / batch);
    for (int64_t s = 0; s < seq; ++s) {
      const float* lg = logits + (b * seq + s) * e_n;
      float* dl = dlogits + (b * seq + s) * e_n;
      float dot = 0.f;  // Σ_e gp_e p_e
      for (int64_t e = 0; e < e_n; ++e) {
        sig[e] = sigmoidf(lg[e]);
        dot += gp[e] * (sig[e] / z[s]);
      }
      for (int64_t e = 0; e < e_n; ++e) {
        const float dsig = (gp[e] - dot) / z[s];
        dl[e] = dsig * sig[e] * (1.f - sig[e]);
      }
    }
  }
  return static_cast<float>(coeff * loss / batch);
}

void router_forward(const RouterConfig& cfg, const RouterParams& p, const float* u, int64_t t, int64_t d,
                    int64_t batch, bool training, RouterActs& a) {
  DSV3_CHECK(p.gate_w_ED != nullptr, "router_forward: gate weight is null");
  DSV3_CHECK(t >= 0 && d > 0, "router_forward: bad shape T=", t, " D=", d);
  a.logits_TE.resize(t * cfg.num_experts);
  // Router math stays fp32 whatever the model precision (HF computes it in fp32; the bias needs fp32
  // resolution).
  if (t > 0)
    linear_forward(cpu_backend(), u, p.gate_w_ED, a.logits_TE.data(), t, d, cfg.num_experts, Precision::kF32,
                   a.lin);
  router_route(cfg, p.expert_bias_E, t, batch, training, a);
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
  a.routed_per_expert_E.assign(e_n, 0);
  a.tokens_per_expert_E.assign(e_n, 0);
  if (t == 0) return;
  for (int64_t i = 0; i < t * e_n; ++i) {
    const float x = a.logits_TE[i];
    DSV3_CHECK(std::isfinite(x), "router: logit of token ", i / e_n, ", expert ", i % e_n, " is ", x,
               " (the MoE input or the gate weight holds NaN/Inf)");
    a.scores_TE[i] = sigmoidf(x);
  }

  const int nth = omp_get_max_threads();
  a.choice_E.resize(static_cast<size_t>(nth) * e_n);
  a.group_G.resize(static_cast<size_t>(nth) * cfg.n_group);
  a.order_E.resize(static_cast<size_t>(nth) * e_n);
#pragma omp parallel for schedule(static) if (t * e_n > 16384)
  for (int64_t i = 0; i < t; ++i) {
    const int th = omp_get_thread_num();
    route_token(cfg, &a.scores_TE[i * e_n], bias_E, &a.idx_TK[i * k_n], &a.weight_TK[i * k_n], &a.denom_T[i],
                &a.choice_E[th * e_n], &a.group_G[th * cfg.n_group], &a.order_E[th * e_n]);
  }
  for (int64_t i = 0; i < t * k_n; ++i) ++a.routed_per_expert_E[a.idx_TK[i]];

  a.capacity = -1;
  if (cfg.dropless()) {
    a.tokens_per_expert_E = a.routed_per_expert_E;
  } else {
    const int64_t cap = expert_capacity(t, k_n, e_n, cfg.capacity_factor);
    a.capacity = cap;
    if (cap > t) {  // Megatron: the capacity exceeds the token count, nothing is dropped
      for (int64_t e = 0; e < e_n; ++e)
        a.tokens_per_expert_E[e] = cfg.pad_to_capacity ? t : a.routed_per_expert_E[e];
    } else {
      a.per_expert.resize(e_n);
      for (auto& v : a.per_expert) v.clear();
      // Candidates in Megatron's token order ([S, B]: position s first, then sequence b), which is what
      // "position" means there; it is also the tie order of the probs policy.
      const int64_t seq = t / batch;
      auto meg_order = [seq, batch, k_n](int32_t pair) {
        const int64_t tok = pair / k_n;
        return (tok % seq) * batch + tok / seq;
      };
      for (int64_t i = 0; i < t * k_n; ++i) a.per_expert[a.idx_TK[i]].push_back(static_cast<int32_t>(i));
      for (int64_t e = 0; e < e_n; ++e) {
        auto& c = a.per_expert[e];
        if (static_cast<int64_t>(c.size()) > cap) {
          const float* w = a.weight_TK.data();
          if (cfg.drop_policy == DropPolicy::kProbs)
            std::sort(c.begin(), c.end(), [&](int32_t x, int32_t y) {
              return w[x] > w[y] || (w[x] == w[y] && meg_order(x) < meg_order(y));
            });
          else
            std::sort(c.begin(), c.end(), [&](int32_t x, int32_t y) { return meg_order(x) < meg_order(y); });
          for (size_t j = cap; j < c.size(); ++j) a.kept_TK[c[j]] = 0;
        }
        a.tokens_per_expert_E[e] = cfg.pad_to_capacity ? cap : std::min<int64_t>(cap, c.size());
      }
    }
  }

  a.seq_aux_loss = 0.f;
  a.has_aux_grad = training && cfg.seq_aux_coeff > 0.f;
  if (a.has_aux_grad) {
    a.aux_dlogits_TE.resize(t * e_n);
    a.seq_aux_loss = seq_aux_loss(a.logits_TE.data(), batch, t / batch, e_n, k_n, cfg.seq_aux_coeff,
                                  a.aux_dlogits_TE.data());
  }
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
  const int64_t t = a.t, e_n = cfg.num_experts, k_n = cfg.topk;
  a.dlogits_TE.assign(t * e_n, 0.f);
  const float r = cfg.scaling_factor;
#pragma omp parallel for schedule(static) if (t * k_n > 16384)
  for (int64_t i = 0; i < t; ++i) {
    const float* s = &a.scores_TE[i * e_n];
    const int32_t* idx = &a.idx_TK[i * k_n];
    float* dl = &a.dlogits_TE[i * e_n];
    const float z = a.denom_T[i];
    float gs = 0.f;  // Σ_k g_k s_k
    if (cfg.normalise)
      for (int64_t j = 0; j < k_n; ++j) gs += dweight_TK[i * k_n + j] * a.kept_TK[i * k_n + j] * s[idx[j]];
    for (int64_t j = 0; j < k_n; ++j) {
      const float gk = a.kept_TK[i * k_n + j] ? dweight_TK[i * k_n + j] : 0.f;
      const float sm = s[idx[j]];
      const float ds = cfg.normalise ? r * (gk / z - gs / (z * z)) : r * gk;
      dl[idx[j]] = ds * sm * (1.f - sm);
    }
  }
  if (a.has_aux_grad && aux_grad != 0.f)
    for (int64_t i = 0; i < t * e_n; ++i) a.dlogits_TE[i] += aux_grad * a.aux_dlogits_TE[i];
}

}  // namespace dsv3
