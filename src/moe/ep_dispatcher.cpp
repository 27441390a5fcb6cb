// Expert-parallel dispatch and combine (see ep_dispatcher.h). The alltoall path keeps everything in the
// sender's permutation order (grouped by global expert, hence by owner rank then local expert), so the only
// reordering is on the owner: received blocks [source][local expert] ↔ expert rows [local expert][source],
// one index map (recv_of_R) used both ways.
#include "moe/ep_dispatcher.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "core/grow.h"
#include "core/profile.h"

namespace dsv3 {
namespace {

double g_seconds = 0;

// Adds the wall time of one call to g_seconds.
class Timed {
 public:
  Timed() : t0_(std::chrono::steady_clock::now()) {}
  ~Timed() { g_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count(); }

 private:
  std::chrono::steady_clock::time_point t0_;
};

bool distributed(const ExpertParallel& ep) {
  return ep.comm && ep.comm->size() > 1;
}

// dst[r] = src[map[r]] (rows of w elements), or the reverse scatter dst[map[r]] = src[r].
void gather_rows(const float* src, const std::vector<int64_t>& map, int64_t w, float* dst) {
  const int64_t n = static_cast<int64_t>(map.size());
#pragma omp parallel for schedule(static) if (n * w > 65536)
  for (int64_t r = 0; r < n; ++r) std::copy_n(src + map[r] * w, w, dst + r * w);
}
void scatter_rows(const float* src, const std::vector<int64_t>& map, int64_t w, float* dst) {
  const int64_t n = static_cast<int64_t>(map.size());
#pragma omp parallel for schedule(static) if (n * w > 65536)
  for (int64_t r = 0; r < n; ++r) std::copy_n(src + r * w, w, dst + map[r] * w);
}

void alltoall_dispatch(const ExpertParallel& ep, const Routing& r, const float* x, DispatchState& s,
                       DeviceArray<float>& x_RD, DeviceArray<float>& prob_R) {
  const int P = ep.size();
  const int64_t L = s.local_experts, d = s.d, first = ep.first_local(r.e);
  build_permutation(r.idx_TK, r.kept_TK, r.t, r.k, r.e, s.perm, r.padded_rows_E);
  // Rows to (q, l) = this rank's rows of global expert q·L + l; rows from (p, l): exchanged, or with padding
  // known.
  std::vector<int64_t>& send_PL = s.send_PL;
  send_PL.resize(P * L);
  s.recv_rows_PL.assign(P * L, 0);
  for (int64_t e = 0; e < r.e; ++e) send_PL[e] = s.perm.count(e);
  if (r.padded_rows_E) {
    for (int p = 0; p < P; ++p)
      for (int64_t l = 0; l < L; ++l) s.recv_rows_PL[p * L + l] = r.padded_rows_E[first + l];
  } else {
    s.per_peer.assign(P, L);
    ep.comm->alltoallv(send_PL.data(), s.per_peer.data(), s.recv_rows_PL.data(), s.per_peer.data());
  }
  s.send_rows_P.assign(P, 0);
  s.recv_rows_P.assign(P, 0);
  for (int p = 0; p < P; ++p)
    for (int64_t l = 0; l < L; ++l)
      s.send_rows_P[p] += send_PL[p * L + l], s.recv_rows_P[p] += s.recv_rows_PL[p * L + l];
  s.send_el_P.resize(P), s.recv_el_P.resize(P);
  for (int p = 0; p < P; ++p) s.send_el_P[p] = s.send_rows_P[p] * d, s.recv_el_P[p] = s.recv_rows_P[p] * d;

  const int64_t sent = s.perm.rows();
  grow(s.send_RD, sent * d), grow(s.send_R, sent);
  permute_rows(x, s.perm, d, s.send_RD.data());
  permute_pairs(r.weight_TK, s.perm, s.send_R.data());
  int64_t received = 0;
  for (int64_t n : s.recv_rows_P) received += n;
  grow(s.recv_RD, received * d), grow(s.recv_R, received);
  ep.comm->alltoallv(s.send_RD.data(), s.send_el_P.data(), s.recv_RD.data(), s.recv_el_P.data());
  ep.comm->alltoallv(s.send_R.data(), s.send_rows_P.data(), s.recv_R.data(), s.recv_rows_P.data());

  // Received block (p, l) starts at start[p·L + l]; expert rows take them in (l, p) order.
  std::vector<int64_t>& start = s.start_PL;
  start.resize(P * L);
  for (int64_t i = 0, o = 0; i < P * L; ++i) start[i] = o, o += s.recv_rows_PL[i];
  s.offsets_L1.assign(L + 1, 0);
  s.recv_of_R.resize(received);
  for (int64_t l = 0, row = 0; l < L; ++l) {
    for (int p = 0; p < P; ++p)
      for (int64_t j = 0; j < s.recv_rows_PL[p * L + l]; ++j) s.recv_of_R[row++] = start[p * L + l] + j;
    s.offsets_L1[l + 1] = row;
  }
  grow(cpu_backend(), x_RD, received * d), grow(cpu_backend(), prob_R, received);
  gather_rows(s.recv_RD.data(), s.recv_of_R, d, x_RD.data());
  gather_rows(s.recv_R.data(), s.recv_of_R, 1, prob_R.data());
}

void allgather_dispatch(const ExpertParallel& ep, const Routing& r, const float* x, DispatchState& s,
                        DeviceArray<float>& x_RD, DeviceArray<float>& prob_R) {
  DSV3_CHECK(!r.padded_rows_E, "pad-to-capacity needs the alltoall token dispatcher");
  const int P = ep.size();
  const int64_t t = r.t, k = r.k, d = s.d, L = s.local_experts, first = ep.first_local(r.e);
  std::vector<uint8_t>& kept = s.kept_mine;
  kept.assign(t * k, 1);
  if (r.kept_TK) std::copy_n(r.kept_TK, t * k, kept.begin());
  s.idx_all.resize(P * t * k), s.kept_all.resize(P * t * k), s.weight_all.resize(P * t * k);
  grow(s.x_all, P * t * d);
  ep.comm->allgather(r.idx_TK, t * k, s.idx_all.data());
  ep.comm->allgather(kept.data(), t * k, s.kept_all.data());
  ep.comm->allgather(r.weight_TK, t * k, s.weight_all.data());
  ep.comm->allgather(x, t * d, s.x_all.data());
  // Pairs of other ranks' experts become "dropped" pairs of a local-expert permutation.
  for (int64_t i = 0; i < P * t * k; ++i) {
    const int64_t l = s.idx_all[i] - first;
    const bool local = l >= 0 && l < L;
    s.kept_all[i] = s.kept_all[i] && local;
    s.idx_all[i] = local ? static_cast<int32_t>(l) : 0;
  }
  build_permutation(s.idx_all.data(), s.kept_all.data(), P * t, k, L, s.perm);
  s.offsets_L1 = s.perm.offsets_E1;
  grow(cpu_backend(), x_RD, s.perm.rows() * d), grow(cpu_backend(), prob_R, s.perm.rows());
  permute_rows(s.x_all.data(), s.perm, d, x_RD.data());
  permute_pairs(s.weight_all.data(), s.perm, prob_R.data());
}

}  // namespace

DispatcherType parse_dispatcher_type(const std::string& name) {
  if (name == "allgather") return DispatcherType::kAllGather;
  if (name == "alltoall") return DispatcherType::kAllToAll;
  fail("--moe-token-dispatcher-type ", name, " is not supported (dsv3 implements allgather and alltoall)");
}

void ep_dispatch(const ExpertParallel& ep, const Routing& r, const float* x, int64_t d, DispatchState& s,
                 DeviceArray<float>& x_RD, DeviceArray<float>& prob_R) {
  DSV3_PROFILE("moe.dispatch");
  Timed timed;
  const int P = ep.size();
  DSV3_CHECK(r.e % P == 0, "expert parallelism: ", r.e, " experts do not split over ", P, " ranks");
  s.t = r.t, s.k = r.k, s.d = d, s.local_experts = ep.local_count(r.e);
  if (!distributed(ep)) {
    // One rank holds every expert: padding rows would only be zeros, so they are not made.
    build_permutation(r.idx_TK, r.kept_TK, r.t, r.k, r.e, s.perm);
    s.offsets_L1 = s.perm.offsets_E1;
    grow(cpu_backend(), x_RD, s.perm.rows() * d), grow(cpu_backend(), prob_R, s.perm.rows());
    permute_rows(x, s.perm, d, x_RD.data());
    permute_pairs(r.weight_TK, s.perm, prob_R.data());
  } else if (ep.type == DispatcherType::kAllToAll) {
    alltoall_dispatch(ep, r, x, s, x_RD, prob_R);
  } else {
    allgather_dispatch(ep, r, x, s, x_RD, prob_R);
  }
}

void ep_combine(const ExpertParallel& ep, DispatchState& s, const float* y_RD, float* out) {
  DSV3_PROFILE("moe.combine");
  Timed timed;
  const int64_t d = s.d;
  if (!distributed(ep)) {
    unpermute_sum(y_RD, s.perm, d, out, 0.f);
  } else if (ep.type == DispatcherType::kAllToAll) {
    scatter_rows(y_RD, s.recv_of_R, d, s.recv_RD.data());
    ep.comm->alltoallv(s.recv_RD.data(), s.recv_el_P.data(), s.send_RD.data(), s.send_el_P.data());
    unpermute_sum(s.send_RD.data(), s.perm, d, out, 0.f);
  } else {
    grow(s.sum_all, ep.size() * s.t * d);
    unpermute_sum(y_RD, s.perm, d, s.sum_all.data(), 0.f);
    ep.comm->reduce_scatter(s.sum_all.data(), out, s.t * d);
  }
}

void ep_dispatch_grad(const ExpertParallel& ep, DispatchState& s, const float* dout,
                      DeviceArray<float>& dy_RD) {
  DSV3_PROFILE("moe.dispatch");
  Timed timed;
  const int64_t d = s.d;
  const int64_t rows = s.offsets_L1.empty() ? 0 : s.offsets_L1.back();
  grow(cpu_backend(), dy_RD, rows * d);
  if (!distributed(ep)) {
    permute_rows(dout, s.perm, d, dy_RD.data());
  } else if (ep.type == DispatcherType::kAllToAll) {
    permute_rows(dout, s.perm, d, s.send_RD.data());
    ep.comm->alltoallv(s.send_RD.data(), s.send_el_P.data(), s.recv_RD.data(), s.recv_el_P.data());
    gather_rows(s.recv_RD.data(), s.recv_of_R, d, dy_RD.data());
  } else {
    grow(s.sum_all, ep.size() * s.t * d);
    ep.comm->allgather(dout, s.t * d, s.sum_all.data());
    permute_rows(s.sum_all.data(), s.perm, d, dy_RD.data());
  }
}

void ep_combine_grad(const ExpertParallel& ep, DispatchState& s, const float* dx_RD, const float* dprob_R,
                     float* dx, float beta, float* dweight_TK) {
  DSV3_PROFILE("moe.combine");
  Timed timed;
  const int64_t d = s.d, t = s.t, k = s.k;
  if (!distributed(ep)) {
    unpermute_sum(dx_RD, s.perm, d, dx, beta);
    unpermute_pairs(dprob_R, s.perm, dweight_TK);
  } else if (ep.type == DispatcherType::kAllToAll) {
    scatter_rows(dx_RD, s.recv_of_R, d, s.recv_RD.data());
    scatter_rows(dprob_R, s.recv_of_R, 1, s.recv_R.data());
    ep.comm->alltoallv(s.recv_RD.data(), s.recv_el_P.data(), s.send_RD.data(), s.send_el_P.data());
    ep.comm->alltoallv(s.recv_R.data(), s.recv_rows_P.data(), s.send_R.data(), s.send_rows_P.data());
    unpermute_sum(s.send_RD.data(), s.perm, d, dx, beta);
    unpermute_pairs(s.send_R.data(), s.perm, dweight_TK);
  } else {
    const int P = ep.size();
    grow(s.sum_all, P * t * d), grow(s.pair_all, P * t * k);
    unpermute_sum(dx_RD, s.perm, d, s.sum_all.data(), 0.f);
    unpermute_pairs(dprob_R, s.perm, s.pair_all.data());
    ep.comm->reduce_scatter(s.pair_all.data(), dweight_TK, t * k);
    if (beta == 0.f) {
      ep.comm->reduce_scatter(s.sum_all.data(), dx, t * d);
    } else {
      grow(s.x_all, t * d);  // free after dispatch: the expert rows hold their own copies
      ep.comm->reduce_scatter(s.sum_all.data(), s.x_all.data(), t * d);
      for (int64_t i = 0; i < t * d; ++i) dx[i] += s.x_all[i];
    }
  }
}

double ep_dispatch_seconds() {
  return g_seconds;
}
void ep_dispatch_seconds_reset() {
  g_seconds = 0;
}

}  // namespace dsv3
