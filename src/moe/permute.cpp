// Counting-sort permutation of routed (token, k) pairs by expert, and the gather/combine around it.
#include "moe/permute.h"

#include <algorithm>

#include "core/error.h"

namespace dsv3 {

void build_permutation(const int32_t* idx, const uint8_t* kept, int64_t t, int64_t k, int64_t e,
                       MoePermutation& p, const int64_t* padded) {
  p.t = t, p.k = k, p.e = e;
  p.offsets_E1.assign(e + 1, 0);
  for (int64_t i = 0; i < t * k; ++i) {
    DSV3_CHECK(idx[i] >= 0 && idx[i] < e, "build_permutation: expert id ", idx[i], " out of range [0, ", e,
               ")");
    if (!kept || kept[i]) ++p.offsets_E1[idx[i] + 1];
  }
  if (padded)
    for (int64_t x = 0; x < e; ++x) {
      DSV3_CHECK(padded[x] >= p.offsets_E1[x + 1], "build_permutation: expert ", x, " has ",
                 p.offsets_E1[x + 1], " routed pairs but only ", padded[x], " padded rows");
      p.offsets_E1[x + 1] = padded[x];
    }
  for (int64_t x = 0; x < e; ++x) p.offsets_E1[x + 1] += p.offsets_E1[x];
  const int64_t r_n = p.offsets_E1[e];
  p.token_R.assign(r_n, -1);
  p.slot_R.assign(r_n, -1);
  p.row_TK.resize(t * k);
  // Walking pairs in (t, k) order and appending keeps each expert's rows sorted by token: a stable order.
  std::vector<int64_t> next(p.offsets_E1.begin(), p.offsets_E1.end() - 1);
  for (int64_t i = 0; i < t * k; ++i) {
    if (kept && !kept[i]) {
      p.row_TK[i] = -1;
      continue;
    }
    const int64_t r = next[idx[i]]++;
    p.token_R[r] = static_cast<int32_t>(i / k);
    p.slot_R[r] = static_cast<int32_t>(i);
    p.row_TK[i] = static_cast<int32_t>(r);
  }
}

void permute_rows(const float* x, const int32_t* token_R, int64_t r_n, int64_t d, float* y) {
#pragma omp parallel for schedule(static) if (r_n * d > 65536)
  for (int64_t r = 0; r < r_n; ++r) {
    if (token_R[r] < 0)
      std::fill_n(y + r * d, d, 0.f);
    else
      std::copy_n(x + static_cast<int64_t>(token_R[r]) * d, d, y + r * d);
  }
}

void unpermute_sum(const float* y, const int32_t* row_TK, int64_t t_n, int64_t k_n, int64_t d, float* out,
                   float beta) {
#pragma omp parallel for schedule(static) if (t_n * k_n * d > 65536)
  for (int64_t t = 0; t < t_n; ++t) {
    float* o = out + t * d;
    if (beta == 0.f) std::fill(o, o + d, 0.f);
    for (int64_t j = 0; j < k_n; ++j) {
      const int32_t r = row_TK[t * k_n + j];
      if (r < 0) continue;
      const float* src = y + static_cast<int64_t>(r) * d;
      for (int64_t c = 0; c < d; ++c) o[c] += src[c];
    }
  }
}

void gather_or_zero(const float* v, const int32_t* index, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = index[i] < 0 ? 0.f : v[index[i]];
}

void permute_rows(const float* x, const MoePermutation& p, int64_t d, float* y) {
  permute_rows(x, p.token_R.data(), p.rows(), d, y);
}

void unpermute_sum(const float* y, const MoePermutation& p, int64_t d, float* out, float beta) {
  unpermute_sum(y, p.row_TK.data(), p.t, p.k, d, out, beta);
}

void permute_pairs(const float* v_TK, const MoePermutation& p, float* v_R) {
  gather_or_zero(v_TK, p.slot_R.data(), p.rows(), v_R);
}

void unpermute_pairs(const float* v_R, const MoePermutation& p, float* v_TK) {
  gather_or_zero(v_R, p.row_TK.data(), p.t * p.k, v_TK);
}

}  // namespace dsv3
