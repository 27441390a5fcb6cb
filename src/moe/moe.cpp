// DeepSeek-V3 MoE layer forward/backward (see moe.h). On the CPU, experts run in parallel over the threads, each
// GEMM on one thread (oneDNN runs single-threaded inside a parallel region): per-expert GEMMs are small, and one
// fork/join per expert loop instead of one per GEMM keeps the threads busy (and a descheduled thread on a shared
// machine stalls the others once per loop, not once per GEMM). On a device backend each expert's GEMMs are issued
// in its own lane (several streams on a GPU). Element-wise kernels (swiglu, permutation) parallelise themselves.
//
// Backend seam (kernels/backend.h): the GEMMs (router, routed experts, shared expert), the SwiGLUs and, on one
// rank, the token permutation run on the Backend passed in; on a device of one rank the router's selection too
// (moe.h says where it runs otherwise); expert parallelism (ep_dispatch and the rest, moe/ep_dispatcher.h) is host
// memory, so the CPU's.
#include "moe/moe.h"

#include <array>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>

#include "core/error.h"
#include "core/philox.h"
#include "core/profile.h"
#include "kernels/cpu/gemm.h"
#include "model/config.h"

namespace dsv3 {
namespace {

// f(e, o, n) for each local expert e that has rows (its rows are [o, o + n)), experts spread over the
// threads, each GEMM on one thread (see the top of this file); on a device each expert's GEMMs in a lane of their
// own (Backend::lane: several streams on a GPU), so f may issue GEMMs only. varying_rows: the bf16 GEMMs'
// runtime dimensions (below).
template <typename F>
void for_each_expert(Backend& be, const DispatchState& s, bool varying_rows, F&& f) {
  const int64_t e_n = static_cast<int64_t>(s.offsets_L1.size()) - 1;
  if (be.kind() != DeviceKind::kCpu) {
    // A backend over host memory (the guarded one) runs the CPU's GEMMs: the same primitives as the CPU path, or
    // its bits differ where oneDNN's runtime-dimension kernels round otherwise (AMX bf16). No effect on a GPU.
    std::optional<GemmVaryingRows> rows;
    if (varying_rows) rows.emplace();
    be.lanes_begin();
    for (int64_t e = 0; e < e_n; ++e) {
      const int64_t o = s.offsets_L1[e], n = s.offsets_L1[e + 1] - o;
      if (n == 0) continue;
      be.lane(e);
      f(e, o, n);
    }
    be.lanes_end();
    return;
  }
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
// The routed experts' bf16 GEMMs `gs` (each one kind of GEMM over every local expert): one grouped GEMM each
// where the layer uses them (MoeActs::expert_offsets_E1) and the backend runs it, else every expert's GEMMs in
// turn (threads, or lanes on a device). Either way each expert's GEMM is grouped_gemm_group's.
void expert_gemms(Backend& be, const MoeActs& a, std::initializer_list<GroupedGemmArgs> gs) {
  const DispatchState& s = a.dispatch;
  std::array<GroupedGemmArgs, 3> rest;
  size_t n_rest = 0;
  for (GroupedGemmArgs g : gs) {
    g.groups = static_cast<int64_t>(s.offsets_L1.size()) - 1;
    g.offsets_G1 = a.expert_offsets_E1;
    if (!g.offsets_G1 || !be.grouped_gemm(g)) rest.at(n_rest++) = g;
  }
  if (n_rest == 0) return;
  for_each_expert(be, s, true, [&](int64_t e, int64_t o, int64_t n) {
    for (size_t i = 0; i < n_rest; ++i) be.gemm(grouped_gemm_group(rest[i], e, o, n));
  });
}

// A kRows grouped GEMM: C[rows, n] = A[rows, k] · op(W_e) over the routed rows.
GroupedGemmArgs rows_gemm(const bf16* x, int64_t lda, const bf16* w, int64_t w_stride, bool trans_w, float* y,
                          int64_t n, int64_t k) {
  GroupedGemmArgs g;
  g.kind = GroupedGemmArgs::Kind::kRows;
  g.n = n, g.k = k, g.a = x, g.lda = lda;
  g.b = w, g.ldb = trans_w ? k : n, g.b_stride = w_stride, g.trans_b = trans_w;
  g.c = y, g.ldc = n;
  return g;
}
// A kReduce grouped GEMM: dW_e[m, n] += dY[rows, m]^T · X[rows, n] (dY rows of stride ld_dy).
GroupedGemmArgs weight_grad_gemm(const bf16* dy, int64_t ld_dy, const bf16* x, float* dw, int64_t m,
                                 int64_t n) {
  GroupedGemmArgs g;
  g.kind = GroupedGemmArgs::Kind::kReduce;
  g.m = m, g.n = n, g.a = dy, g.lda = ld_dy, g.b = x, g.ldb = n;
  g.c = dw, g.ldc = n, g.c_stride = m * n;
  return g;
}

// bf16 experts: the weights (gate and up stacked per expert, so one GEMM gives both) and the activations are
// converted to bf16 once per layer and step, and reused by the backward; results equal the per-GEMM
// conversions. On the CPU their GEMMs run with oneDNN runtime dimensions (GemmVaryingRows): an expert's row
// count changes every step and an exact-shape primitive would be re-created each time (in real training 1.27x
// slower steps on proxy-cpu). The fp32 path, dsv3's verification mode, keeps exact-shape primitives: their
// rows do not depend on the row count of the GEMM, so parallel layouts reproduce the serial run to ~1e-7
// (runtime-dimension GEMMs reach 1e-6).
void experts_forward_bf16(Backend& be, const MoeConfig& c, const MoeParams& p, MoeActs& a) {
  const int64_t d = c.hidden, f = c.expert_ffn(), r_n = a.dispatch.offsets_L1.back();
  const Precision bf = Precision::kBF16;
  if (!p.expert_bf16) refresh_expert_bf16(be, c, p, a.own_bf);
  const ExpertBf16& w = p.expert_bf16 ? *p.expert_bf16 : a.own_bf;
  const bf16* w_gu = a.w_gu_bf = w.w_gu.data();
  const bf16* w_down = a.w_down_bf = w.w_down.data();
  grow(be, a.a_RF, r_n * 2 * f);
  const bf16* x = static_cast<const bf16*>(linear_operand(be, a.x_RD.data(), r_n * d, bf, a.x_bf));
  expert_gemms(be, a, {rows_gemm(x, d, w_gu, 2 * f * d, true, a.a_RF.data(), 2 * f, d)});
  be.swiglu_forward(a.a_RF.data(), a.a_RF.data() + f, 2 * f, a.prob_R.data(), a.z_RF.data(), r_n, f);
  const bf16* z = static_cast<const bf16*>(linear_operand(be, a.z_RF.data(), r_n * f, bf, a.z_bf));
  expert_gemms(be, a, {rows_gemm(z, f, w_down, d * f, true, a.y_RD.data(), d, f)});
}

}  // namespace

void refresh_expert_bf16(Backend& be, const MoeConfig& c, const MoeParams& p, ExpertBf16& out) {
  const int64_t d = c.hidden, f = c.expert_ffn(), e_n = c.local_experts();
  bf16* w_gu = grow(be, out.w_gu, e_n * 2 * f * d);
  bf16* w_down = grow(be, out.w_down, e_n * d * f);
  const bool host = be.kind() == DeviceKind::kCpu;
#pragma omp parallel for schedule(static) if (host)
  for (int64_t e = 0; e < e_n; ++e) {
    be.to_bf16(p.gate_proj_EFD + e * f * d, w_gu + e * 2 * f * d, f * d);
    be.to_bf16(p.up_proj_EFD + e * f * d, w_gu + e * 2 * f * d + f * d, f * d);
    be.to_bf16(p.down_proj_EDF + e * d * f, w_down + e * d * f, d * f);
  }
}

namespace {

void experts_backward_bf16(Backend& be, const MoeConfig& c, MoeGrads& g, MoeActs& a, MoeScratch& s) {
  const int64_t d = c.hidden, f = c.expert_ffn(), r_n = a.dispatch.offsets_L1.back();
  const Precision bf = Precision::kBF16;
  const bf16* dy = static_cast<const bf16*>(linear_operand(be, s.dy_RD.data(), r_n * d, bf, s.dy_bf));
  const bf16* z = a.z_bf.data();
  const bf16* x = a.x_bf.data();
  expert_gemms(be, a,
               {weight_grad_gemm(dy, d, z, g.down_proj_EDF, d, f),
                rows_gemm(dy, d, a.w_down_bf, d * f, false, s.dz_RF.data(), f, d)});
  grow(be, s.da_RF, r_n * 2 * f);
  be.swiglu_backward(s.dz_RF.data(), a.a_RF.data(), a.a_RF.data() + f, 2 * f, a.prob_R.data(), s.da_RF.data(),
                     s.da_RF.data() + f, 2 * f, s.dprob_R.data(), r_n, f);
  const bf16* dab = static_cast<const bf16*>(linear_operand(be, s.da_RF.data(), r_n * 2 * f, bf, s.dab_bf));
  expert_gemms(be, a,
               {weight_grad_gemm(dab, 2 * f, x, g.gate_proj_EFD, f, d),
                weight_grad_gemm(dab + f, 2 * f, x, g.up_proj_EFD, f, d),
                rows_gemm(dab, 2 * f, a.w_gu_bf, 2 * f * d, false, s.dx_RD.data(), d, 2 * f)});
}

// The routing of the rows the routed experts see (dispatch reads it): the router's own (under SP with expert_tp
// the whole micro-batch's, the experts' TP region), or under SP the local slice of the whole micro-batch's.
struct LocalRouting {
  const int32_t* idx_TK;
  const uint8_t* kept_TK;
  const float* weight_TK;
};
LocalRouting local_routing(const MoeConfig& c, const MoeActs& a) {
  if (c.tp.sp() && !c.expert_tp)
    return {a.idx_local_TK.data(), a.kept_local_TK.data(), a.weight_local_TK.data()};
  return {a.router.idx_TK.data(), a.router.kept_TK.data(), a.router.weight_TK.data()};
}

// force_load_balancing (moe.h): the layer's normals for T tokens, made when T changes.
const std::vector<float>& random_logits(const MoeConfig& c, int64_t T, MoeActs& a) {
  const int64_t n = T * c.router.num_experts;
  if (static_cast<int64_t>(a.random_logits_TE.size()) != n) {
    a.random_logits_TE.resize(n);
    for (int64_t i = 0; i < n; ++i)
      a.random_logits_TE[i] = philox_normal(42, 0x5eed0000ull + static_cast<uint64_t>(c.layer), i);
  }
  return a.random_logits_TE;
}
// Replaces the router's logits in host memory (the host router's paths).
void force_balance_host(const MoeConfig& c, int64_t T, MoeActs& a) {
  if (c.force_load_balancing) a.router.logits_TE = random_logits(c, T, a);
}

// Sequence parallelism (moe.h): this rank's logits gathered over TP, the whole micro-batch routed (the same on
// every TP rank), then this rank's rows kept. TP runs on the CPU backend.
void route_sequence_parallel(Backend& be, const MoeConfig& c, const MoeParams& p, const float* x, int64_t t,
                             int64_t batch, bool training, MoeActs& a) {
  const int64_t e = c.router.num_experts, k = c.router.topk, sl = t / batch, T = t * c.tp.size;
  a.logits_local_TE.resize(t * e);
  linear_forward(be, x, p.gate_w_ED, a.logits_local_TE.data(), t, c.hidden, e, Precision::kF32, a.router.lin);
  a.router.logits_TE.resize(T * e);
  c.tp.sp_all_gather(a.logits_local_TE.data(), a.router.logits_TE.data(), batch, sl, e);
  force_balance_host(c, T, a);
  router_route(c.router, p.expert_bias_E, T, batch, training, a.router);
  a.idx_local_TK.resize(t * k), a.kept_local_TK.resize(t * k), a.weight_local_TK.resize(t * k);
  c.tp.sp_slice(a.router.idx_TK.data(), a.idx_local_TK.data(), batch, sl, k);
  c.tp.sp_slice(a.router.kept_TK.data(), a.kept_local_TK.data(), batch, sl, k);
  c.tp.sp_slice(a.router.weight_TK.data(), a.weight_local_TK.data(), batch, sl, k);
}

// Its backward: the gate-weight gradients of every TP rank's rows gathered (under expert_tp they are already
// the whole micro-batch's), the logits' gradient of the whole micro-batch (the aux loss term needs every
// token's), then this rank's rows through the GEMMs.
void router_backward_sequence_parallel(Backend& be, const MoeConfig& c, const MoeParams& p, const float* x,
                                       float aux_grad, MoeActs& a, MoeScratch& s, MoeGrads& g, float* dx) {
  const int64_t t = a.t, e = c.router.num_experts, k = c.router.topk, sl = t / a.batch;
  const float* dweight = s.dweight_TK.data();  // expert_tp: already the whole micro-batch's (summed over TP)
  if (!c.expert_tp) {
    s.dweight_full_TK.resize(t * c.tp.size * k);
    c.tp.sp_all_gather(s.dweight_TK.data(), s.dweight_full_TK.data(), a.batch, sl, k);
    dweight = s.dweight_full_TK.data();
  }
  router_backward_logits(c.router, a.router, dweight, aux_grad);
  s.dlogits_local_TE.resize(t * e);
  c.tp.sp_slice(a.router.dlogits_TE.data(), s.dlogits_local_TE.data(), a.batch, sl, e);
  linear_backward_weight(be, s.dlogits_local_TE.data(), x, g.gate_w_ED, t, c.hidden, e, Precision::kF32,
                         a.router.lin);
  linear_backward_input(be, s.dlogits_local_TE.data(), p.gate_w_ED, dx, t, c.hidden, e, Precision::kF32,
                        a.router.lin, 1.f);
}

// Whether the router runs on the layer's device (moe.h MoeActs): a device backend, one rank.
// DSV3_ROUTER=host keeps it on the host (the A/B and the fallback).
bool routes_on_device(const Backend& be, const MoeConfig& c) {
  static const bool host = [] {
    const char* v = std::getenv("DSV3_ROUTER");
    return v && std::string(v) == "host";
  }();
  return be.kind() != DeviceKind::kCpu && !host && c.ep.size() == 1 && !c.tp.on();
}

// The router on the device: logits, selection, capacity rule, permutation and aux loss in backend memory; the
// offsets (kept and, with capacity, routed) and the loss come down in one read. RouterActs gets what the trainer
// reads (counts, aux loss, the kept pair count).
void route_on_device(Backend& be, const MoeConfig& c, const MoeParams& p, const float* x, int64_t t,
                     int64_t batch, bool training, MoeActs& a) {
  const int64_t e = c.router.num_experts, k = c.router.topk;
  RouteForwardArgs f;
  f.cfg = route_select(c.router), f.t = t, f.batch = batch;
  float* logits = grow(be, a.logits_TE, t * e);
  if (t > 0) linear_forward(be, x, p.gate_w_ED, logits, t, c.hidden, e, Precision::kF32, a.lin);
  if (c.force_load_balancing && t > 0) {  // the normals go up once, then device to device
    const int64_t n = t * e;
    // A normal depends on its index only: a longer upload serves a shorter micro-batch too.
    if (a.random_logits_dev_TE.size() < n) {
      grow(be, a.random_logits_dev_TE, n);
      a.random_logits_dev_TE.copy_from_host(random_logits(c, t, a).data(), n);
    }
    be.copy(logits, a.random_logits_dev_TE.data(), n * sizeof(float));
  }
  f.logits_TE = logits;
  f.bias_E = p.expert_bias_E;
  f.scores_TE = grow(be, a.scores_TE, t * e), f.denom_T = grow(be, a.denom_T, t);
  f.weight_TK = grow(be, a.weight_TK, t * k), f.idx_TK = grow(be, a.idx_TK, t * k);
  f.token_R = grow(be, a.token_R, t * k), f.slot_R = grow(be, a.slot_R, t * k),
  f.row_TK = grow(be, a.row_TK, t * k);
  // The read-back block: kept offsets [E + 1], the aux loss's bits, routed offsets [E + 1] (capacity only).
  const bool drop = !c.router.dropless();
  int32_t* rb = grow(be, a.readback, 2 * (e + 1) + 1);
  f.offsets_E1 = rb;
  RouterActs& r = a.router;
  r.t = t;
  r.capacity = drop ? expert_capacity(t, k, e, c.router.capacity_factor) : -1;
  if (drop) {
    f.capacity = r.capacity, f.drop_by_position = c.router.drop_policy == DropPolicy::kPosition;
    f.kept_TK = grow(be, a.kept_TK, t * k), f.routed_E1 = rb + e + 2;
  }
  r.has_aux_grad = training && c.router.seq_aux_coeff > 0.f;
  if (r.has_aux_grad) {
    f.aux_coeff = c.router.seq_aux_coeff;
    f.aux_loss_1 = reinterpret_cast<float*>(rb + e + 1);
    f.aux_dlogits_TE = grow(be, a.aux_dlogits_TE, t * e);
  }
  be.route_forward(f);
  const int64_t n = drop ? 2 * (e + 1) + 1 : e + 2;
  a.readback_host.resize(n);
  be.copy_to_host(a.readback_host.data(), rb, n * sizeof(int32_t));
  const int32_t* kept = a.readback_host.data();
  const int32_t* routed = drop ? kept + e + 2 : kept;
  r.seq_aux_loss = 0.f;
  if (r.has_aux_grad) std::memcpy(&r.seq_aux_loss, &a.readback_host[e + 1], sizeof(float));
  r.routed_per_expert_E.resize(e), r.tokens_per_expert_E.resize(e);
  for (int64_t i = 0; i < e; ++i) {
    r.routed_per_expert_E[i] = routed[i + 1] - routed[i];
    r.tokens_per_expert_E[i] = tokens_per_expert(c.router, t, r.capacity, kept[i + 1] - kept[i]);
  }
  r.kept_pairs = kept[e];
}

// The router: its GEMMs on the backend, the selection on the device or the host (see moe.h).
void run_router(Backend& be, const MoeConfig& c, const MoeParams& p, const float* x, int64_t t, int64_t batch,
                bool training, MoeActs& a) {
  if (c.tp.sp()) return route_sequence_parallel(be, c, p, x, t, batch, training, a);
  if (routes_on_device(be, c)) return route_on_device(be, c, p, x, t, batch, training, a);
  const int64_t e = c.router.num_experts;
  a.router.logits_TE.resize(t * e);
  if (be.kind() == DeviceKind::kCpu) {
    if (t > 0)
      linear_forward(be, x, p.gate_w_ED, a.router.logits_TE.data(), t, c.hidden, e, Precision::kF32,
                     a.router.lin);
    force_balance_host(c, t, a);
    return router_route(c.router, p.expert_bias_E, t, batch, training, a.router);
  }
  if (t > 0) {
    float* logits = grow(be, a.logits_TE, t * e);
    linear_forward(be, x, p.gate_w_ED, logits, t, c.hidden, e, Precision::kF32, a.lin);
    be.copy_to_host(a.router.logits_TE.data(), logits, t * e * sizeof(float));
  }
  force_balance_host(c, t, a);
  if (p.expert_bias_E)
    a.bias_E.resize(e), be.copy_to_host(a.bias_E.data(), p.expert_bias_E, e * sizeof(float));
  router_route(c.router, p.expert_bias_E ? a.bias_E.data() : nullptr, t, batch, training, a.router);
}

void router_backward_on(Backend& be, const MoeConfig& c, const MoeParams& p, const float* x, float aux_grad,
                        MoeActs& a, MoeScratch& s, MoeGrads& g, float* dx) {
  if (c.tp.sp()) return router_backward_sequence_parallel(be, c, p, x, aux_grad, a, s, g, dx);
  const RouterParams rp{p.gate_w_ED, p.expert_bias_E};
  RouterGrads rg{g.gate_w_ED};
  if (be.kind() == DeviceKind::kCpu)
    return router_backward(c.router, rp, x, c.hidden, a.router, s.dweight_TK.data(), aux_grad, rg, dx, 1.f);
  const int64_t t = a.t, e = c.router.num_experts, k = c.router.topk;
  if (t == 0) return;
  float* dl = grow(be, s.dlogits_TE, t * e);
  if (routes_on_device(be, c)) {
    RouteBackwardArgs b;
    b.cfg = route_select(c.router), b.t = t;
    b.scores_TE = a.scores_TE.data(), b.denom_T = a.denom_T.data(), b.idx_TK = a.idx_TK.data();
    b.kept_TK = c.router.dropless() ? nullptr : a.kept_TK.data();
    b.dweight_TK = s.dweight_TK.data();
    b.aux_dlogits_TE = a.router.has_aux_grad ? a.aux_dlogits_TE.data() : nullptr, b.aux_grad = aux_grad;
    b.dlogits_TE = dl;
    be.route_backward(b);
  } else {
    s.dweight_host_TK.resize(t * k);
    be.copy_to_host(s.dweight_host_TK.data(), s.dweight_TK.data(), t * k * sizeof(float));
    router_backward_logits(c.router, a.router, s.dweight_host_TK.data(), aux_grad);
    s.dlogits_TE.copy_from_host(a.router.dlogits_TE.data(), t * e);
  }
  linear_backward_weight(be, dl, x, g.gate_w_ED, t, c.hidden, e, Precision::kF32, a.lin);
  linear_backward_input(be, dl, p.gate_w_ED, dx, t, c.hidden, e, Precision::kF32, a.lin, 1.f);
}

// The local experts' rows and their gate weights, from the t tokens x the routed experts see. One rank: the
// permutation is the device router's, or built on the host (a counting sort of T·K ids) with its maps sent to the
// backend, which gathers; expert parallelism: the dispatcher.
void dispatch(Backend& be, const MoeConfig& c, const float* x, int64_t t, MoeActs& a) {
  const int64_t d = c.hidden, k = c.router.topk, e = c.router.num_experts;
  const RouterActs& r = a.router;
  const LocalRouting lr = local_routing(c, a);
  if (c.ep.size() > 1) {
    // With pad-to-capacity the router's counts are the padded ones; the dispatcher decides what padding it needs
    // (under SP this rank's pairs are a subset of the counted ones: the rest of each block is padding).
    const int64_t* padded = c.router.pad_to_capacity ? r.tokens_per_expert_E.data() : nullptr;
    const Routing routing{lr.idx_TK, lr.kept_TK, lr.weight_TK, padded, t, k, e};
    return ep_dispatch(c.ep, routing, x, d, a.dispatch, a.x_RD, a.prob_R);
  }
  // One rank holds every expert: padding rows would only be zeros, so they are not made.
  DispatchState& s = a.dispatch;
  s.t = t, s.k = k, s.d = d, s.local_experts = e;
  if (routes_on_device(be, c)) {  // the permutation is already in backend memory; its offsets came down
    s.offsets_L1.assign(a.readback_host.begin(), a.readback_host.begin() + e + 1);
    const int64_t r_n = t * k;
    be.permute_rows(x, a.token_R.data(), r_n, d, grow(be, a.x_RD, r_n * d));
    be.gather_or_zero(a.weight_TK.data(), a.slot_R.data(), r_n, grow(be, a.prob_R, r_n));
    return;
  }
  build_permutation(lr.idx_TK, lr.kept_TK, t, k, e, s.perm);
  s.offsets_L1 = s.perm.offsets_E1;
  const int64_t r_n = s.perm.rows();
  grow(be, a.token_R, r_n), grow(be, a.slot_R, r_n), grow(be, a.row_TK, t * k), grow(be, a.weight_TK, t * k);
  a.token_R.copy_from_host(s.perm.token_R.data(), r_n), a.slot_R.copy_from_host(s.perm.slot_R.data(), r_n);
  a.row_TK.copy_from_host(s.perm.row_TK.data(), t * k), a.weight_TK.copy_from_host(lr.weight_TK, t * k);
  be.permute_rows(x, a.token_R.data(), r_n, d, grow(be, a.x_RD, r_n * d));
  be.gather_or_zero(a.weight_TK.data(), a.slot_R.data(), r_n, grow(be, a.prob_R, r_n));
}

// Whether the routed experts' bf16 GEMMs go to Backend::grouped_gemm (MoeConfig::expert_gemm).
bool uses_grouped_gemm(const Backend& be, const MoeConfig& c) {
  static const bool per_expert = [] {
    const char* v = std::getenv("DSV3_EXPERT_GEMM");
    return v && std::string(v) == "per-expert";
  }();
  if (c.precision != Precision::kBF16) return false;
  switch (c.expert_gemm) {
    case MoeConfig::ExpertGemm::kGrouped:
      return true;
    case MoeConfig::ExpertGemm::kPerExpert:
      return false;
    case MoeConfig::ExpertGemm::kAuto:
      break;
  }
  return be.kind() == DeviceKind::kCuda && !per_expert;
}

// MoeActs::expert_offsets_E1 for this forward: the device router's offsets where they are, else the
// dispatch's uploaded (E + 1 int32: one small copy per layer).
void set_expert_offsets(Backend& be, const MoeConfig& c, MoeActs& a) {
  a.expert_offsets_E1 = nullptr;
  if (!uses_grouped_gemm(be, c)) return;
  const std::vector<int64_t>& o = a.dispatch.offsets_L1;
  if (routes_on_device(be, c) && c.ep.size() == 1) {
    a.expert_offsets_E1 = a.readback.data();
    return;
  }
  a.offsets_host_E1.assign(o.begin(), o.end());
  grow(be, a.offsets_E1, static_cast<int64_t>(o.size()));
  a.offsets_E1.copy_from_host(a.offsets_host_E1.data(), static_cast<int64_t>(o.size()));
  a.expert_offsets_E1 = a.offsets_E1.data();
}

}  // namespace

void MoeConfig::validate() const {
  DSV3_CHECK(hidden > 0 && ffn > 0, "moe: hidden and ffn must be > 0, got ", hidden, ", ", ffn);
  DSV3_CHECK(n_shared >= 0, "moe: n_shared must be >= 0, got ", n_shared);
  DSV3_CHECK(!expert_tp || (tp.on() && ffn % tp.size == 0),
             "moe: expert tensor parallelism splits the expert width ", ffn, " over the ", tp.size,
             " TP ranks: it must divide");
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
                 int64_t batch, bool training, float* out, MoeActs& a, MoeScratch& s) {
  c.validate();
  DSV3_CHECK(p.gate_proj_EFD && p.up_proj_EFD && p.down_proj_EDF, "moe_forward: expert weights are null");
  DSV3_CHECK(c.n_shared == 0 || (p.shared_gate_FsD && p.shared_up_FsD && p.shared_down_DFs),
             "moe_forward: shared expert weights are null");
  const int64_t d = c.hidden, f = c.expert_ffn(), k_n = c.router.topk;
  a.x_TD = x;
  a.t = t, a.batch = batch;
  {
    DSV3_PROFILE("fwd.moe.router");
    run_router(be, c, p, x, t, batch, training, a);
  }
  // Under SP the TP region (the shared expert; with expert_tp the routed experts too) runs on the gathered
  // micro-batch [T, D].
  const int64_t T = c.tp.sp() ? t * c.tp.size : t;
  const float* x_all = x;
  if (c.tp.sp() && (c.n_shared > 0 || c.expert_tp)) {
    float* in = grow(be, a.shared_in_TD, T * d);
    if (t > 0) c.tp.sp_all_gather(x, in, batch, t / batch, d);
    x_all = in;
  }
  const float* x_routed = c.expert_tp ? x_all : x;
  const int64_t t_routed = c.expert_tp ? T : t;
  dispatch(be, c, x_routed, t_routed, a);
  set_expert_offsets(be, c, a);
  const int64_t r_n = a.dispatch.offsets_L1.back();
  grow(be, a.a_RF, r_n * f);
  grow(be, a.b_RF, r_n * f);
  grow(be, a.z_RF, r_n * f);
  grow(be, a.y_RD, r_n * d);

  DSV3_PROFILE_BEGIN(fwd_experts, "fwd.moe.experts");
  if (c.precision == Precision::kBF16) {
    experts_forward_bf16(be, c, p, a);
  } else {
    for_each_expert(be, a.dispatch, false, [&](int64_t e, int64_t o, int64_t n) {
      linear_forward(be, a.x_RD.data() + o * d, p.gate_proj_EFD + e * f * d, a.a_RF.data() + o * f, n, d, f,
                     c.precision, a.lin);
      linear_forward(be, a.x_RD.data() + o * d, p.up_proj_EFD + e * f * d, a.b_RF.data() + o * f, n, d, f,
                     c.precision, a.lin);
    });
    be.swiglu_forward(a.a_RF.data(), a.b_RF.data(), f, a.prob_R.data(), a.z_RF.data(), r_n, f);
    for_each_expert(be, a.dispatch, false, [&](int64_t e, int64_t o, int64_t n) {
      linear_forward(be, a.z_RF.data() + o * f, p.down_proj_EDF + e * d * f, a.y_RD.data() + o * d, n, f, d,
                     c.precision, a.lin);
    });
  }
  DSV3_PROFILE_END(fwd_experts);
  // Routed sum first, then the shared expert added on top (HF's order). Under expert_tp both are partial sums
  // over the TP ranks' F slices, added into one buffer and reduced together.
  const bool sp_region = c.expert_tp && c.tp.sp();
  float* routed = sp_region ? grow(be, s.shared_out_TD, T * d) : out;
  if (c.ep.size() == 1)
    be.unpermute_sum(a.y_RD.data(), a.row_TK.data(), t_routed, k_n, d, routed, 0.f);
  else
    ep_combine(c.ep, a.dispatch, a.y_RD.data(), routed);
  if (c.n_shared > 0 && t > 0) {
    DSV3_PROFILE("fwd.moe.shared");
    const MlpParams mp{p.shared_gate_FsD, p.shared_up_FsD, p.shared_down_DFs, p.bf16_weights};
    if (!c.tp.on() || c.expert_tp) {
      mlp_forward(be, d, c.shared_ffn(), mp, x_all, T, routed, 1.f, a.shared, s.shared, c.precision);
    } else if (c.tp.sp()) {  // a TP region over the whole sequence: gathered in, reduce-scattered out
      float* part = grow(be, s.shared_out_TD, T * d);
      mlp_forward(be, d, c.shared_ffn(), mp, x_all, T, part, 0.f, a.shared, s.shared, c.precision);
      float* mine = grow(be, s.shared_local_TD, t * d);
      c.tp.sp_reduce_scatter(part, mine, batch, t / batch, d);
      be.add(out, out, mine, t * d);
    } else {  // the partial sums over the TP ranks' columns are reduced before the routed part joins them
      float* part = grow(be, s.shared_out_TD, t * d);
      mlp_forward(be, d, c.shared_ffn(), mp, x, t, part, 0.f, a.shared, s.shared, c.precision);
      c.tp.reduce_from_forward(part, t * d);
      be.add(out, out, part, t * d);
    }
  }
  if (sp_region && t > 0)
    c.tp.sp_reduce_scatter(routed, out, batch, t / batch, d);
  else if (c.expert_tp)
    c.tp.reduce_from_forward(out, t * d);
}

void moe_backward(Backend& be, const MoeConfig& c, const MoeParams& p, MoeActs& a, const float* dout,
                  float aux_grad, float* dx, MoeGrads& g, float beta, MoeScratch& s) {
  DSV3_CHECK(g.gate_w_ED && g.gate_proj_EFD && g.up_proj_EFD && g.down_proj_EDF,
             "moe_backward: null gradients");
  DSV3_CHECK(c.n_shared == 0 || (g.shared_gate_FsD && g.shared_up_FsD && g.shared_down_DFs),
             "moe_backward: null shared expert gradients");
  DSV3_CHECK(!c.tp.on() || beta == 0.f, "moe_backward: under tensor parallelism dx is assigned (beta 0)");
  const int64_t d = c.hidden, f = c.expert_ffn(), k_n = c.router.topk, t = a.t;
  const int64_t T = c.tp.sp() ? t * c.tp.size : t;
  const float* x = a.x_TD;
  // Under SP the region's output gradient is gathered (the shared expert's; with expert_tp the routed experts'
  // too), and under expert_tp the region's input gradient dx_all is partial until reduced below.
  const float* dout_all = dout;
  if (c.tp.sp() && (c.n_shared > 0 || c.expert_tp)) {
    float* dfull = grow(be, s.dshared_out_TD, T * d);
    if (t > 0) c.tp.sp_all_gather(dout, dfull, a.batch, t / a.batch, d);
    dout_all = dfull;
  }
  const bool sp_region = c.expert_tp && c.tp.sp();
  float* dx_all = sp_region ? grow(be, s.dshared_in_TD, T * d) : dx;
  float dx_beta = beta;
  if (c.n_shared > 0 && t > 0) {
    DSV3_PROFILE("bwd.moe.shared");
    const MlpParams mp{p.shared_gate_FsD, p.shared_up_FsD, p.shared_down_DFs, p.bf16_weights};
    MlpGrads mg{g.shared_gate_FsD, g.shared_up_FsD, g.shared_down_DFs};
    if (c.tp.sp() && !c.expert_tp) {
      float* dxfull = grow(be, s.dshared_in_TD, T * d);
      mlp_backward(be, d, c.shared_ffn(), mp, a.shared, dout_all, dxfull, 0.f, mg, s.shared, c.precision);
      c.tp.sp_reduce_scatter(dxfull, dx, a.batch, t / a.batch, d);
    } else {
      mlp_backward(be, d, c.shared_ffn(), mp, a.shared, dout_all, dx_all, beta, mg, s.shared, c.precision);
      // Without expert_tp: the shared expert's part only (the routed part is whole on every rank).
      if (!c.expert_tp) c.tp.copy_to_backward(dx, t * d);
    }
    dx_beta = 1.f;
  }

  const float* dout_routed = c.expert_tp ? dout_all : dout;
  const int64_t t_routed = a.dispatch.t;
  const int64_t r_n = a.dispatch.offsets_L1.back();
  if (c.ep.size() == 1)
    be.permute_rows(dout_routed, a.token_R.data(), r_n, d, grow(be, s.dy_RD, r_n * d));
  else
    ep_dispatch_grad(c.ep, a.dispatch, dout_routed, s.dy_RD);
  grow(be, s.dz_RF, r_n * f);
  grow(be, s.da_RF, r_n * f);
  grow(be, s.db_RF, r_n * f);
  grow(be, s.dx_RD, r_n * d);
  grow(be, s.dprob_R, r_n);
  grow(be, s.dweight_TK, t_routed * k_n);
  DSV3_PROFILE_BEGIN(bwd_experts, "bwd.moe.experts");
  if (c.precision == Precision::kBF16) {
    experts_backward_bf16(be, c, g, a, s);
  } else {
    for_each_expert(be, a.dispatch, false, [&](int64_t e, int64_t o, int64_t n) {
      linear_backward_weight(be, s.dy_RD.data() + o * d, a.z_RF.data() + o * f, g.down_proj_EDF + e * d * f,
                             n, f, d, c.precision, a.lin);
      linear_backward_input(be, s.dy_RD.data() + o * d, p.down_proj_EDF + e * d * f, s.dz_RF.data() + o * f,
                            n, f, d, c.precision, a.lin);
    });
    // z = silu(a)⊙b·w: the gate weight w of each row gets dw = Σ_f dz·silu(a)·b here.
    be.swiglu_backward(s.dz_RF.data(), a.a_RF.data(), a.b_RF.data(), f, a.prob_R.data(), s.da_RF.data(),
                       s.db_RF.data(), f, s.dprob_R.data(), r_n, f);
    for_each_expert(be, a.dispatch, false, [&](int64_t e, int64_t o, int64_t n) {
      const float* xe = a.x_RD.data() + o * d;
      linear_backward_weight(be, s.da_RF.data() + o * f, xe, g.gate_proj_EFD + e * f * d, n, d, f,
                             c.precision, a.lin);
      linear_backward_weight(be, s.db_RF.data() + o * f, xe, g.up_proj_EFD + e * f * d, n, d, f, c.precision,
                             a.lin);
      linear_backward_input(be, s.da_RF.data() + o * f, p.gate_proj_EFD + e * f * d, s.dx_RD.data() + o * d,
                            n, d, f, c.precision, a.lin);
      linear_backward_input(be, s.db_RF.data() + o * f, p.up_proj_EFD + e * f * d, s.dx_RD.data() + o * d, n,
                            d, f, c.precision, a.lin, 1.f);
    });
  }
  DSV3_PROFILE_END(bwd_experts);
  // The routed rows are summed per token first, then added to what is already in dx (the shared expert's part):
  // the order the allgather dispatcher's reduce-scatter imposes, so every dispatcher and layout adds the same
  // terms in the same order (exactly, for top-2 routing).
  float* dx_routed = c.expert_tp ? dx_all : dx;
  float* routed = dx_beta == 0.f ? dx_routed : grow(be, s.dx_routed_TD, t_routed * d);
  if (c.ep.size() == 1) {
    be.unpermute_sum(s.dx_RD.data(), a.row_TK.data(), t_routed, k_n, d, routed, 0.f);
    be.gather_or_zero(s.dprob_R.data(), a.row_TK.data(), t_routed * k_n, s.dweight_TK.data());
  } else {
    ep_combine_grad(c.ep, a.dispatch, s.dx_RD.data(), s.dprob_R.data(), routed, 0.f, s.dweight_TK.data());
  }
  if (routed != dx_routed) be.add(dx_routed, dx_routed, routed, t_routed * d);
  if (c.expert_tp) {  // the region's gradients are partial over the F slices: summed over TP
    c.tp.sum(s.dweight_TK.data(), t_routed * k_n);
    if (sp_region && t > 0)
      c.tp.sp_reduce_scatter(dx_all, dx, a.batch, t / a.batch, d);
    else
      c.tp.copy_to_backward(dx, t * d);
  }
  DSV3_PROFILE("bwd.moe.router");
  router_backward_on(be, c, p, x, aux_grad, a, s, g, dx);
}

}  // namespace dsv3
