// The MoE router's selection, sequence aux loss, token permutation and logits gradient as per-item bodies that a
// CPU loop and a CUDA kernel both run (one token, one expert or one sequence per call): the device's routing is
// the CPU's arithmetic, operation for operation (moe/router.cpp is the reference: its sigmoid, its top-k order —
// descending value, ties to the lower index —, its float and double sums in the same order), so the same logits
// give the same decisions on either side. The host router (moe/router.cpp) runs these bodies too, so there is one
// routing arithmetic in dsv3; expert and tensor parallelism route on the host (moe/moe.h says when).
//
// Legend: T tokens (t = b·S + s), E experts, K top-k, G groups, B sequences of S tokens, R = T·K rows.
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define DSV3_HD __host__ __device__
#else
#define DSV3_HD
#endif

namespace dsv3 {

// What the selection needs of RouterConfig, as plain values (a kernel takes it by value).
struct RouteSelect {
  int32_t e = 0, k = 0, n_group = 1, topk_group = 1, group_score_topk = 1;
  bool mask_neg_inf = true, normalise = true;
  float scaling = 1.f;
};

struct RouteForwardArgs {
  RouteSelect cfg;
  int64_t t = 0, batch = 1;
  const float* logits_TE = nullptr;
  const float* bias_E = nullptr;  // selection only; nullptr: zeros
  // outputs
  float *scores_TE = nullptr, *weight_TK = nullptr, *denom_T = nullptr;
  int32_t* idx_TK = nullptr;
  // The permutation by expert, rows of each expert in token order: expert e's rows are [offsets_E1[e],
  // offsets_E1[e+1]); row r holds token token_R[r], pair slot_R[r] = t·K + k; row_TK[t·K + k] = r.
  int32_t *offsets_E1 = nullptr, *token_R = nullptr, *slot_R = nullptr, *row_TK = nullptr;
  // The sequence aux loss (router.h) when aux_coeff > 0: its value and dL/dlogits.
  float aux_coeff = 0.f;
  float *aux_loss_1 = nullptr, *aux_dlogits_TE = nullptr;
  // Capacity dropping (Megatron apply_router_token_dropping, router.h) when capacity >= 0: kept_TK[t·K + k] = 0
  // for a dropped pair, routed_E1 the offsets before dropping, and the permutation above holds the kept pairs
  // only (row_TK = -1 for a dropped one). Dropless: kept_TK and routed_E1 are not written (may be null).
  int64_t capacity = -1;
  bool drop_by_position = false;  // DropPolicy::kPosition; otherwise kProbs
  uint8_t* kept_TK = nullptr;
  int32_t* routed_E1 = nullptr;
};

struct RouteBackwardArgs {
  RouteSelect cfg;
  int64_t t = 0;
  const float *scores_TE = nullptr, *denom_T = nullptr, *dweight_TK = nullptr;
  const int32_t* idx_TK = nullptr;
  const uint8_t* kept_TK = nullptr;       // nullptr: every pair kept
  const float* aux_dlogits_TE = nullptr;  // nullptr: no aux loss term
  float aux_grad = 0.f;
  float* dlogits_TE = nullptr;  // assigned
};

namespace route {

DSV3_HD inline float sigmoid(float x) {
  return 1.f / (1.f + expf(-x));
}

// (va, ia) comes before (vb, ib) in a stable descending sort.
DSV3_HD inline bool before(float va, int32_t ia, float vb, int32_t ib) {
  return va > vb || (va == vb && ia < ib);
}

// order[0..k) = the indices of the k largest v[0..n), by descending value, ties by lower index: k selection passes,
// each taking the first element after the previous pick (no scratch). Non-finite input is the caller's to refuse;
// an index is always written.
DSV3_HD inline void topk_desc(const float* v, int32_t n, int32_t k, int32_t* order) {
  for (int32_t j = 0; j < k; ++j) {
    int32_t best = -1;
    for (int32_t i = 0; i < n; ++i) {
      if (j > 0 && !before(v[order[j - 1]], order[j - 1], v[i], i)) continue;
      if (best < 0 || before(v[i], i, v[best], best)) best = i;
    }
    order[j] = best < 0 ? 0 : best;
  }
}

// Token t's selection from its sigmoid scores s_E: the group-limited top-k of s + bias, the gate weights
// (router.cpp route_token). choice_E, group_G and order_E are this token's scratch.
DSV3_HD inline void select_from_scores(const RouteSelect& c, const float* s, const float* bias_E,
                                       int32_t* idx, float* w, float* denom, float* choice, float* group,
                                       int32_t* order) {
  for (int32_t e = 0; e < c.e; ++e) choice[e] = bias_E ? s[e] + bias_E[e] : s[e];  // the bias only selects
  if (c.n_group > 1) {
    const int32_t gs = c.e / c.n_group;
    for (int32_t g = 0; g < c.n_group; ++g) {
      topk_desc(choice + g * gs, gs, c.group_score_topk, order);
      float sum = 0.f;  // descending order, as torch sums topk(...)[0]
      for (int32_t j = 0; j < c.group_score_topk; ++j) sum += choice[g * gs + order[j]];
      group[g] = sum;
    }
    topk_desc(group, c.n_group, c.topk_group, order);
    for (int32_t g = 0; g < c.n_group; ++g) group[g] = 0.f;  // reused as the kept-group flag
    for (int32_t j = 0; j < c.topk_group; ++j) group[order[j]] = 1.f;
    const float masked = c.mask_neg_inf ? -INFINITY : 0.f;
    for (int32_t g = 0; g < c.n_group; ++g)
      if (group[g] == 0.f)
        for (int32_t e = g * gs; e < (g + 1) * gs; ++e) choice[e] = masked;
  }
  topk_desc(choice, c.e, c.k, order);
  float sum = 0.f;
  for (int32_t j = 0; j < c.k; ++j) {
    idx[j] = order[j];
    w[j] = s[order[j]];
    sum += w[j];
  }
  if (c.normalise) {
    *denom = sum + 1e-20f;
    for (int32_t j = 0; j < c.k; ++j) w[j] /= *denom;
  } else {
    *denom = 0.f;
  }
  for (int32_t j = 0; j < c.k; ++j) w[j] *= c.scaling;
}

// Token t from its logits: s = sigmoid(logits), then the selection.
DSV3_HD inline void select_token(const RouteSelect& c, const float* logits_E, const float* bias_E, float* s,
                                 int32_t* idx, float* w, float* denom, float* choice, float* group,
                                 int32_t* order) {
  for (int32_t e = 0; e < c.e; ++e) s[e] = sigmoid(logits_E[e]);
  select_from_scores(c, s, bias_E, idx, w, denom, choice, group, order);
}

// Expert e: its rows, in token order, of the r = T·K pairs (router order t·K + k), after offsets_E1 is known.
// kept_TK (nullable): a dropped pair gets no row (row_TK = -1).
DSV3_HD inline void permute_expert(int32_t e, const int32_t* idx_TK, const uint8_t* kept_TK, int64_t r,
                                   int32_t k, const int32_t* offsets_E1, int32_t* token_R, int32_t* slot_R,
                                   int32_t* row_TK) {
  int32_t next = offsets_E1[e];
  for (int64_t i = 0; i < r; ++i) {
    if (idx_TK[i] != e) continue;
    if (kept_TK && !kept_TK[i]) {
      row_TK[i] = -1;
      continue;
    }
    token_R[next] = static_cast<int32_t>(i / k);
    slot_R[next] = static_cast<int32_t>(i);
    row_TK[i] = next++;
  }
}

// Expert e's (kept) pair count, written to offsets_E1[e + 1]; scan_offsets then turns the counts into offsets
// (serial: E + 1 values).
DSV3_HD inline void count_expert(int32_t e, const int32_t* idx_TK, const uint8_t* kept_TK, int64_t r,
                                 int32_t* offsets_E1) {
  int32_t n = 0;
  for (int64_t i = 0; i < r; ++i) n += idx_TK[i] == e && (!kept_TK || kept_TK[i]);
  offsets_E1[e + 1] = n;
}
DSV3_HD inline void scan_offsets(int32_t e_n, int32_t* offsets_E1) {
  offsets_E1[0] = 0;
  for (int32_t e = 0; e < e_n; ++e) offsets_E1[e + 1] += offsets_E1[e];
}

// Pair `slot`'s place in Megatron's token order, [S, B]: position s first, then sequence b (dsv3 stores
// t = b·S + s). It orders the capacity rule's candidates (router.h).
DSV3_HD inline int64_t megatron_order(int32_t slot, int32_t k, int64_t seq, int64_t batch) {
  const int64_t tok = slot / k;
  return (tok % seq) * batch + tok / seq;
}

// Capacity rule, row r of the permutation before dropping (its expert's candidates are the rows [offsets_E1[e],
// offsets_E1[e + 1])): the pair is kept iff fewer than `cap` candidates come before it — by gate weight
// descending, then Megatron's order (probs policy), or by that order alone (position policy). A token picks an
// expert at most once, so the order is strict and the kept set is exactly the first `cap` of a sort.
DSV3_HD inline void capacity_row(int64_t r, const int32_t* idx_TK, const int32_t* offsets_E1,
                                 const int32_t* slot_R, const float* w_TK, int32_t k, int64_t seq,
                                 int64_t batch, int64_t cap, bool by_position, uint8_t* kept_TK) {
  const int32_t si = slot_R[r], e = idx_TK[si];
  const int64_t oi = megatron_order(si, k, seq, batch);
  const float wi = w_TK[si];
  int64_t before_n = 0;
  for (int64_t j = offsets_E1[e]; j < offsets_E1[e + 1] && before_n < cap; ++j) {
    const int32_t sj = slot_R[j];
    const int64_t oj = megatron_order(sj, k, seq, batch);
    before_n += by_position ? oj < oi : (w_TK[sj] > wi || (w_TK[sj] == wi && oj < oi));
  }
  kept_TK[si] = before_n < cap;
}

// Sequence aux loss (router.cpp seq_aux_loss), token t: z_t = Σ_e sigmoid + 1e-20, p_t = sigmoid / z_t, and the
// top-k of p_t (the map its counts come from). order_E is scratch.
DSV3_HD inline void aux_token(int32_t e_n, int32_t k, const float* logits_E, float* z, float* p_E,
                              int32_t* map_K, int32_t* order) {
  float zs = 0.f;
  for (int32_t e = 0; e < e_n; ++e) zs += (p_E[e] = sigmoid(logits_E[e]));
  *z = zs + 1e-20f;
  for (int32_t e = 0; e < e_n; ++e) p_E[e] = p_E[e] / *z;
  topk_desc(p_E, e_n, k, order);
  for (int32_t j = 0; j < k; ++j) map_K[j] = order[j];
}

// Sequence b, expert e: Σ_s p[b,s,e] in position order, and how many of the sequence's tokens map to e.
DSV3_HD inline void aux_expert(int64_t b, int32_t e, int64_t seq, int32_t e_n, int32_t k, const float* p_TE,
                               const int32_t* map_TK, float* psum_BE, int32_t* count_BE) {
  float ps = 0.f;
  int32_t c = 0;
  for (int64_t s = 0; s < seq; ++s) {
    const int64_t t = b * seq + s;
    ps += p_TE[t * e_n + e];
    for (int32_t j = 0; j < k; ++j) c += map_TK[t * k + j] == e;
  }
  psum_BE[b * e_n + e] = ps;
  count_BE[b * e_n + e] = c;
}

// The loss from the sums (serial over b, then e, as router.cpp adds them).
DSV3_HD inline double aux_norm(int32_t e_n, int32_t k, int64_t seq) {
  return static_cast<double>(e_n) / (static_cast<double>(k) * seq * seq);
}
DSV3_HD inline float aux_loss(int64_t batch, int64_t seq, int32_t e_n, int32_t k, float coeff,
                              const float* psum_BE, const int32_t* count_BE) {
  const double norm = aux_norm(e_n, k, seq);
  double loss = 0.0;
  for (int64_t b = 0; b < batch; ++b) {
    double lb = 0.0;
    for (int32_t e = 0; e < e_n; ++e)
      lb += static_cast<double>(psum_BE[b * e_n + e]) * static_cast<int64_t>(count_BE[b * e_n + e]);
    loss += lb * norm;
  }
  return static_cast<float>(coeff * loss / batch);
}

// Token t of sequence b: dL_aux/dlogits (assign).
DSV3_HD inline void aux_grad_token(int64_t b, int64_t batch, int64_t seq, int32_t e_n, int32_t k, float coeff,
                                   const float* logits_E, float z, const int32_t* count_BE, float* dl_E) {
  const double norm = aux_norm(e_n, k, seq);
  float dot = 0.f;
  for (int32_t e = 0; e < e_n; ++e) {
    const float gp = static_cast<float>(coeff * norm * static_cast<int64_t>(count_BE[b * e_n + e]) / batch);
    dot += gp * (sigmoid(logits_E[e]) / z);
  }
  for (int32_t e = 0; e < e_n; ++e) {
    const float gp = static_cast<float>(coeff * norm * static_cast<int64_t>(count_BE[b * e_n + e]) / batch);
    const float sig = sigmoid(logits_E[e]);
    const float dsig = (gp - dot) / z;
    dl_E[e] = dsig * sig * (1.f - sig);
  }
}

// Token t's logits gradient (router.cpp router_backward_logits): through the normalisation, the scaling and the
// sigmoid, plus aux_grad times the aux loss's. kept_K (nullable): a dropped pair's gradient counts as 0.
DSV3_HD inline void backward_token(const RouteSelect& c, const float* s_E, const int32_t* idx_K,
                                   const uint8_t* kept_K, float z, const float* g_K, const float* aux_E,
                                   float aux_grad, float* dl_E) {
  for (int32_t e = 0; e < c.e; ++e) dl_E[e] = 0.f;
  float gs = 0.f;  // Σ_k g_k s_k
  if (c.normalise)
    for (int32_t j = 0; j < c.k; ++j) gs += (kept_K && !kept_K[j] ? 0.f : g_K[j]) * s_E[idx_K[j]];
  for (int32_t j = 0; j < c.k; ++j) {
    const float g = kept_K && !kept_K[j] ? 0.f : g_K[j];
    const float sm = s_E[idx_K[j]];
    const float ds = c.normalise ? c.scaling * (g / z - gs / (z * z)) : c.scaling * g;
    dl_E[idx_K[j]] = ds * sm * (1.f - sm);
  }
  if (aux_E && aux_grad != 0.f)
    for (int32_t e = 0; e < c.e; ++e) dl_E[e] += aux_grad * aux_E[e];
}

}  // namespace route
}  // namespace dsv3
