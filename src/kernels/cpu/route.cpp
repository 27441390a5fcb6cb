// The router bodies of kernels/route.h in CPU loops (see route.h beside this file): the CPU backend's route op and
// the host router (moe/router.cpp) both run this.
#include "kernels/cpu/route.h"

#include <omp.h>

#include <algorithm>
#include <vector>

#include "core/error.h"

namespace dsv3 {
namespace {

// The permutation of the pairs by expert (kept: nullable), offsets first.
void permute_pairs_by_expert(const RouteForwardArgs& a, const uint8_t* kept) {
  const int64_t r = a.t * a.cfg.k;
  for (int32_t e = 0; e < a.cfg.e; ++e) route::count_expert(e, a.idx_TK, kept, r, a.offsets_E1);
  route::scan_offsets(a.cfg.e, a.offsets_E1);
#pragma omp parallel for schedule(static) if (r * a.cfg.e > 65536)
  for (int32_t e = 0; e < a.cfg.e; ++e)
    route::permute_expert(e, a.idx_TK, kept, r, a.cfg.k, a.offsets_E1, a.token_R, a.slot_R, a.row_TK);
}

// Scratch of the calling thread, grown on first use and reused: the router runs in every MoE layer's forward,
// and a training step allocates nothing once warm (what the device path promises too).
struct HostScratch {
  std::vector<float> choice, group, z, p, psum;
  std::vector<int32_t> order, map, count;
};
template <typename T>
T* sized(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

}  // namespace

void route_forward_host(const RouteForwardArgs& a) {
  const RouteSelect& c = a.cfg;
  const int64_t t_n = a.t, e_n = c.e, k_n = c.k, g_n = c.n_group;
  DSV3_CHECK(t_n >= 0 && a.batch > 0 && t_n % a.batch == 0, "route_forward: T=", t_n,
             " tokens is not a multiple of batch=", a.batch);
  const bool drop = a.capacity >= 0;
  DSV3_CHECK(!drop || (a.token_R && a.kept_TK && a.routed_E1),
             "route_forward: capacity dropping needs the permutation, the kept map and the routed offsets");
  for (int64_t i = 0; i < t_n * e_n; ++i)
    DSV3_CHECK(std::isfinite(a.logits_TE[i]), "router: logit of token ", i / e_n, ", expert ", i % e_n,
               " is ", a.logits_TE[i], " (the MoE input or the gate weight holds NaN/Inf)");
  const int nth = omp_get_max_threads();
  thread_local HostScratch s;
  float* choice = sized(s.choice, nth * e_n);
  float* group = sized(s.group, nth * g_n);
  int32_t* order = sized(s.order, std::max<int64_t>(t_n, nth) * e_n);
#pragma omp parallel for schedule(static) if (t_n * e_n > 16384)
  for (int64_t t = 0; t < t_n; ++t) {
    const int th = omp_get_thread_num();
    route::select_token(c, a.logits_TE + t * e_n, a.bias_E, a.scores_TE + t * e_n, a.idx_TK + t * k_n,
                        a.weight_TK + t * k_n, a.denom_T + t, &choice[th * e_n], &group[th * g_n],
                        &order[th * e_n]);
  }
  if (a.token_R) {  // the host router without dropping needs no permutation
    permute_pairs_by_expert(a, nullptr);
    if (drop) {
      std::copy_n(a.offsets_E1, e_n + 1, a.routed_E1);
      const int64_t seq = t_n / a.batch;
#pragma omp parallel for schedule(static) if (t_n * k_n > 4096)
      for (int64_t r = 0; r < t_n * k_n; ++r)
        route::capacity_row(r, a.idx_TK, a.routed_E1, a.slot_R, a.weight_TK, c.k, seq, a.batch, a.capacity,
                            a.drop_by_position, a.kept_TK);
      permute_pairs_by_expert(a, a.kept_TK);
    }
  }
  if (a.aux_coeff <= 0.f) return;
  if (t_n == 0) {  // no aux loss for an empty batch
    *a.aux_loss_1 = 0.f;
    return;
  }
  const int64_t seq = t_n / a.batch;
  float *z = sized(s.z, t_n), *p = sized(s.p, t_n * e_n), *psum = sized(s.psum, a.batch * e_n);
  int32_t *map = sized(s.map, t_n * k_n), *count = sized(s.count, a.batch * e_n);
#pragma omp parallel for schedule(static) if (t_n * e_n > 16384)
  for (int64_t t = 0; t < t_n; ++t)
    route::aux_token(c.e, c.k, a.logits_TE + t * e_n, &z[t], &p[t * e_n], &map[t * k_n], &order[t * e_n]);
  for (int64_t b = 0; b < a.batch; ++b)
    for (int32_t e = 0; e < c.e; ++e) route::aux_expert(b, e, seq, c.e, c.k, p, map, psum, count);
  *a.aux_loss_1 = route::aux_loss(a.batch, seq, c.e, c.k, a.aux_coeff, psum, count);
#pragma omp parallel for schedule(static) if (t_n * e_n > 16384)
  for (int64_t t = 0; t < t_n; ++t)
    route::aux_grad_token(t / seq, a.batch, seq, c.e, c.k, a.aux_coeff, a.logits_TE + t * e_n, z[t], count,
                          a.aux_dlogits_TE + t * e_n);
}

void route_backward_host(const RouteBackwardArgs& a) {
  const int64_t e_n = a.cfg.e, k_n = a.cfg.k;
#pragma omp parallel for schedule(static) if (a.t * k_n > 16384)
  for (int64_t t = 0; t < a.t; ++t)
    route::backward_token(a.cfg, a.scores_TE + t * e_n, a.idx_TK + t * k_n,
                          a.kept_TK ? a.kept_TK + t * k_n : nullptr, a.denom_T[t], a.dweight_TK + t * k_n,
                          a.aux_dlogits_TE ? a.aux_dlogits_TE + t * e_n : nullptr, a.aux_grad,
                          a.dlogits_TE + t * e_n);
}

}  // namespace dsv3
