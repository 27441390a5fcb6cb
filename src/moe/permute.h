// Token permutation for the routed experts: rows grouped by expert (stable: by expert, then by token), gather
// of token rows into that order, and the deterministic combine back (each token sums its own k expert rows in
// k order, so the result does not depend on thread count or on how experts are scheduled). Dropped (token, k)
// pairs get no row. This is Megatron's permute/unpermute (moe_utils.permute with the routing map, scatter-add
// back) without the padding rows, which carry probability 0 and change nothing.
//
// Legend: T tokens, K = topk, E experts, D features, R rows (kept pairs, ≤ T·K).
#pragma once
#include <cstdint>
#include <vector>

namespace dsv3 {

struct MoePermutation {
  int64_t t = 0, k = 0, e = 0;
  std::vector<int64_t> offsets_E1;  // rows of expert e: [offsets[e], offsets[e+1])
  std::vector<int32_t> token_R;     // source token of row r (-1: a padding row)
  std::vector<int32_t> slot_R;      // t·K + k of row r (-1: a padding row)
  std::vector<int32_t> row_TK;      // row of pair (t, k), -1 when dropped
  int64_t rows() const { return offsets_E1.empty() ? 0 : offsets_E1.back(); }
  int64_t count(int64_t expert) const { return offsets_E1[expert + 1] - offsets_E1[expert]; }
};

// idx_TK: selected experts; kept_TK: 1 = keep (nullptr: keep all). padded_rows_E (nullable): expert e's block is
// padded_rows_E[e] rows (≥ its kept pairs), the kept rows first, then padding rows (Megatron's pad-to-capacity).
void build_permutation(const int32_t* idx_TK, const uint8_t* kept_TK, int64_t t, int64_t k, int64_t e,
                       MoePermutation& p, const int64_t* padded_rows_E = nullptr);
// The same three operations over raw maps (what the backends run: kernels/backend.h).
void permute_rows(const float* x_TD, const int32_t* token_R, int64_t r, int64_t d, float* x_RD);
void unpermute_sum(const float* y_RD, const int32_t* row_TK, int64_t t, int64_t k, int64_t d, float* out_TD,
                   float beta);
void gather_or_zero(const float* v, const int32_t* index_N, int64_t n, float* out_N);  // index < 0: 0

// x_RD[r] = x_TD[token_R[r]] (padding rows: 0)
void permute_rows(const float* x_TD, const MoePermutation& p, int64_t d, float* x_RD);
// out_TD[t] = beta·out_TD[t] + Σ_k y_RD[row_TK[t,k]] (k ascending; beta 0 or 1)
void unpermute_sum(const float* y_RD, const MoePermutation& p, int64_t d, float* out_TD, float beta);
// v_R[r] = v_TK[slot_R[r]] (padding rows: 0) and the inverse scatter (pairs without a row get 0).
void permute_pairs(const float* v_TK, const MoePermutation& p, float* v_R);
void unpermute_pairs(const float* v_R, const MoePermutation& p, float* v_TK);

}  // namespace dsv3
