// Expert-parallel token dispatch (spec §7.2): moves the routed (token, expert) rows of this rank's tokens to
// the ranks that own those experts, grouped so that each local expert's rows are contiguous, and brings the
// expert outputs back; forward and backward. Experts are split contiguously over the EP group: EP rank q owns
// the global experts [q·E/EP, (q+1)·E/EP), as Megatron's num_local_experts.
//
//   EP = 1 (no comm):  a local permutation by expert (moe_permute.h); nothing is communicated.
//   kAllToAll          Megatron's alltoall dispatcher: permute by global expert; exchange the per-expert row
//                      counts (one small alltoall); alltoallv the rows and their gate weights; reorder the
//                      received blocks from [source rank][local expert] to [local expert][source rank]. With
//                      pad-to-capacity every (rank, expert) block is exactly the expert's padded count
//                      (`capacity`, or T when the capacity exceeds T): fixed splits, no count exchange,
//                      padding rows are zeros with gate weight 0 (they add exact zeros to every output and
//                      gradient). combine is the exact reverse.
//   kAllGather         Megatron's allgather dispatcher: allgather the tokens, their expert ids and gate weights
//                      over the EP group; each rank keeps the pairs routed to its own experts; combine sums
//                      each gathered token's local expert outputs and reduce-scatters the sums back. No
//                      capacity (as Megatron).
//
// Both dispatchers hand the experts the same rows in the same order: by local expert, then source rank, then
// token (one token never picks an expert twice), so an expert's GEMMs see identical inputs either way.
//
// Backward: dispatch_grad brings dL/d(expert output) to the expert rows (the reverse of combine);
// combine_grad brings dL/d(expert input) rows and dL/d(gate weight) back to the tokens' ranks (the reverse of
// dispatch).
//
// Every call is collective over the EP group: all its ranks call the same sequence with the same T
// (Megatron's fixed micro-batch shape).
//
// Legend: T tokens on this rank, K top-k, E global experts, L = E/EP local experts, D hidden, R rows for the
// local experts, P = EP ranks.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/device_array.h"
#include "moe/permute.h"
#include "parallel/comm.h"

namespace dsv3 {

enum class DispatcherType : uint8_t {
  kAllGather,
  kAllToAll
};  // --moe-token-dispatcher-type (Megatron default first)

// "allgather" / "alltoall"; throws naming the value otherwise (flex and alltoall_seq are not implemented).
DispatcherType parse_dispatcher_type(const std::string& name);

struct ExpertParallel {
  Comm* comm = nullptr;  // the EP group; nullptr (or a group of one): this rank holds every expert
  DispatcherType type = DispatcherType::kAllGather;
  int size() const { return comm ? comm->size() : 1; }
  int rank() const { return comm ? comm->rank() : 0; }
  // The local experts of this rank among e global ones: [first_local(e), first_local(e) + local_count(e)).
  int64_t local_count(int64_t e) const { return e / size(); }
  int64_t first_local(int64_t e) const { return rank() * local_count(e); }
};

// One MoE layer's routing on this rank (not owned).
struct Routing {
  const int32_t* idx_TK = nullptr;   // global expert ids
  const uint8_t* kept_TK = nullptr;  // 1 = routed; nullptr: all
  const float* weight_TK = nullptr;  // gate weights (0 is fine for dropped pairs: they are not moved)
  // Pad-to-capacity: rows per expert including padding (the same on every rank), or null. Used by alltoall's
  // fixed splits; one rank needs no padding; allgather refuses it (Megatron: capacity needs alltoall).
  const int64_t* padded_rows_E = nullptr;
  int64_t t = 0, k = 0, e = 0;
};

// What dispatch leaves for combine and the backward (one per MoE layer and micro-batch; reused across steps).
struct DispatchState {
  int64_t t = 0, k = 0, d = 0, local_experts = 0;
  MoePermutation perm;  // EP=1 / alltoall: this rank's pairs by global expert (padding rows: token -1);
                        // allgather: the gathered pairs of local experts, by local expert
  std::vector<int64_t> offsets_L1;  // rows of local expert l: [offsets_L1[l], offsets_L1[l+1])
  // alltoall
  std::vector<int64_t> send_rows_P, recv_rows_P;        // rows sent to / received from each EP rank
  std::vector<int64_t> recv_rows_PL;                    // rows received from rank p for local expert l
  std::vector<int64_t> recv_of_R;                       // expert row r is received row recv_of_R[r]
  std::vector<int64_t> send_el_P, recv_el_P;            // the same row counts in floats (·D)
  std::vector<int64_t> send_PL, start_PL, per_peer;     // scratch
  std::vector<float> send_RD, recv_RD, send_R, recv_R;  // staging
  // allgather
  std::vector<int32_t> idx_all;
  std::vector<uint8_t> kept_mine, kept_all;
  std::vector<float> weight_all, x_all, sum_all, pair_all;
};

// Fills x_RD [R, D] and prob_R [R] for the local experts from this rank's tokens x_TD [T, D].
void ep_dispatch(const ExpertParallel& ep, const Routing& routing, const float* x_TD, int64_t d,
                 DispatchState& s, DeviceArray<float>& x_RD, DeviceArray<float>& prob_R);
// out_TD [T, D] ← Σ over each token's k expert outputs (assign). y_RD: the local experts' outputs (already
// weighted).
void ep_combine(const ExpertParallel& ep, DispatchState& s, const float* y_RD, float* out_TD);
// dy_RD [R, D] ← the rows of dout_TD [T, D] that the experts produced in the forward.
void ep_dispatch_grad(const ExpertParallel& ep, DispatchState& s, const float* dout_TD,
                      DeviceArray<float>& dy_RD);
// dx_TD = beta·dx_TD + Σ_k dx rows of each token (beta 0 or 1); dweight_TK ← dprob of each routed pair, 0
// otherwise.
void ep_combine_grad(const ExpertParallel& ep, DispatchState& s, const float* dx_RD, const float* dprob_R,
                     float* dx_TD, float beta, float* dweight_TK);

// Wall seconds spent in the four calls above since the last reset (this thread's process; for timers and
// benches).
double ep_dispatch_seconds();
void ep_dispatch_seconds_reset();

}  // namespace dsv3
