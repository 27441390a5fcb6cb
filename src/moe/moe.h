// DeepSeek-V3 MoE layer (spec §2.7, megatron-deepseek-system §7.1–7.2): sigmoid group-limited router, routed
// SwiGLU experts run over expert-grouped rows, and the shared expert added on top; forward and backward side
// by side.
//
//   out = Σ_k  down_e( silu(gate_e(x)) ⊙ up_e(x) ⊙ w_k )  +  shared(x)       e = idx[t, k], w_k its weight
//
// The gate weight multiplies the SwiGLU output before down_proj, as Megatron does
// (moe_apply_probs_on_input=False); HF multiplies after down_proj — the same function, rounding differs at
// the 1e-7 level.
//
// Parameter layout: routed experts stacked contiguously so each expert's GEMMs see one [F,D] / [D,F] block:
//   gate_proj_EFD[e] = mlp.experts.{e}.gate_proj.weight   [F, D]
//   up_proj_EFD[e]   = mlp.experts.{e}.up_proj.weight     [F, D]
//   down_proj_EDF[e] = mlp.experts.{e}.down_proj.weight   [D, F]
//   gate_w_ED        = mlp.gate.weight                     [E, D]
//   expert_bias_E    = mlp.gate.e_score_correction_bias    [E]  (fp32, no gradient)
//   shared_{gate,up} = mlp.shared_experts.{gate,up}_proj.weight [Fs, D];  shared_down [D, Fs];  Fs = n_shared·F
// Expert parallelism (MoeConfig::ep) hands a rank the contiguous slice of experts ExpertParallel::first_local..;
// the expert pointers then point at that slice ([L, F, D] etc.) and the dispatcher (moe/ep_dispatcher.h)
// brings the rows of every rank's tokens routed to them.
//
// Backward: parameter grads accumulate (+=); dx is assigned (beta 0) or accumulated (beta 1). The router
// receives dL/dw per (token, k) = ⟨d(down input), silu(gate)⊙up⟩ and adds its own gradient into dx. Padding
// rows of pad-to-capacity are never computed (probability 0: no output, no gradient).
//
// Legend: T tokens, D hidden, F expert width, Fs shared width, E experts, K topk, R routed rows (kept
// pairs).
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/linear.h"
#include "model/mlp.h"
#include "moe/ep_dispatcher.h"
#include "moe/permute.h"
#include "moe/router.h"
#include "parallel/tensor_parallel.h"

namespace dsv3 {

struct ModelConfig;

struct MoeConfig {
  int64_t hidden = 0;    // D
  int64_t ffn = 0;       // F = moe_intermediate_size
  int64_t n_shared = 0;  // shared experts; the shared MLP has width n_shared·F (0: none)
  RouterConfig router;
  Precision precision = Precision::kF32;  // expert GEMM operands; the router is always fp32
  ExpertParallel ep;                      // default: one rank, every expert local
  // Tensor parallelism splits the shared expert (gate/up column-parallel, down row-parallel); the router is
  // replicated. The routed experts follow expert tensor parallelism:
  // - expert_tp (ETP = TP): each routed expert is split like the shared one (expert_ffn() = F/TP rows of
  //   gate/up, columns of down), and the routed experts and the shared expert form one TP region: every TP rank
  //   runs its slice of each expert on the TP group's tokens (with SP the all-gathered micro-batch, routed as
  //   below), and the partial outputs of both are reduced together (all-reduce, or reduce-scatter with SP); the
  //   gate-weight gradients, partial over the F slices, are summed over TP before the router's backward.
  // - otherwise (ETP 1) the experts are whole. Without SP every TP rank routes the same tokens and runs every
  //   local expert on them, so their gradients agree without a reduction (a layer test setting; training refuses
  //   ETP 1 under TP without SP, as Megatron does). With SP the layer takes this rank's Tl = T/TP tokens, as
  //   Megatron's MoE layer does under ETP 1: the routed experts run on those only (their gradients are partial,
  //   summed over expert-DP, which then holds the TP ranks), and the shared expert is a TP region entered by an
  //   all-gather and left by a reduce-scatter.
  // Under SP the router decides on the whole micro-batch: its [Tl, E] logits are all-gathered and every TP rank
  // routes all T tokens, so the capacity rule and the sequence aux loss see the same tokens as one process
  // (Megatron drops per TP shard; dsv3 keeps one-process parity, the bar its parallel tests hold every layout to).
  TensorParallel tp;
  bool expert_tp = false;
  // Benchmarks only (Megatron's --moe-router-force-load-balancing, its RandomSTE): the router's logits are
  // replaced by standard normals, fixed per layer (`layer`) and token count, so routing is balanced whatever the
  // weights; the gradient goes to the real logits unchanged.
  bool force_load_balancing = false;
  int64_t layer = 0;
  // How the routed experts' bf16 GEMMs are issued. kAuto: on a CUDA backend one grouped GEMM per kind
  // (Backend::grouped_gemm, CUTLASS on Hopper: the per-expert row counts stay on the device;
  // DSV3_EXPERT_GEMM=per-expert turns it off), elsewhere per expert. kGrouped: the grouped call on any backend
  // (the CPU's is a loop over the experts: how tests run the grouped path's arguments without a GPU).
  // kPerExpert: one GEMM per expert (threads on the CPU, lanes on a GPU). A backend without a grouped kernel for
  // the shapes falls back to per expert. fp32 experts always run per expert.
  enum class ExpertGemm : uint8_t { kAuto, kGrouped, kPerExpert };
  ExpertGemm expert_gemm = ExpertGemm::kAuto;
  // This TP rank's routed-expert width.
  int64_t expert_ffn() const { return expert_tp ? ffn / tp.size : ffn; }
  int64_t local_experts() const { return ep.local_count(router.num_experts); }
  int64_t shared_ffn() const { return n_shared * ffn / tp.size; }  // this TP rank's shared-expert width
  void validate() const;
};

// From a ModelConfig: HF source → RouterConfig::hf semantics (0.0 group mask as transformers 4.57.6 does);
// Megatron source → RouterConfig::megatron. Capacity and aux-loss fields stay off (training flags set them).
MoeConfig moe_config_from_model(const ModelConfig& m, Precision p);

// bf16 copies of a layer's local experts, stacked as the bf16 expert GEMMs read them: per expert its gate rows
// then its up rows [2F, D] (one GEMM gives both), and down [D, F]. The model keeps one per MoE layer and refreshes
// it once per optimizer step (with the dense layers' copies), not once per micro-batch.
struct ExpertBf16 {
  DeviceArray<bf16> w_gu, w_down;  // [L, 2F, D], [L, D, F]
};
struct MoeParams;
void refresh_expert_bf16(Backend& be, const MoeConfig& c, const MoeParams& p, ExpertBf16& out);

struct MoeParams {
  const float* gate_w_ED = nullptr;
  const float* expert_bias_E = nullptr;  // nullptr = zeros
  const float* gate_proj_EFD = nullptr;  // the local experts: [L, F, D]
  const float* up_proj_EFD = nullptr;
  const float* down_proj_EDF = nullptr;
  const float* shared_gate_FsD = nullptr;
  const float* shared_up_FsD = nullptr;
  const float* shared_down_DFs = nullptr;
  const Bf16Weights* bf16_weights = nullptr;  // bf16 copies of the shared expert (nullable)
  const ExpertBf16* expert_bf16 = nullptr;    // bf16 copies of the local experts (nullable: made per forward)
};

struct MoeGrads {
  float* gate_w_ED = nullptr;
  float* gate_proj_EFD = nullptr;  // the local experts, as MoeParams
  float* up_proj_EFD = nullptr;
  float* down_proj_EDF = nullptr;
  float* shared_gate_FsD = nullptr;
  float* shared_up_FsD = nullptr;
  float* shared_down_DFs = nullptr;
};

// Every float buffer is memory of the layer's backend. On a device backend of one rank the router runs there too
// (Backend::route_forward: kernels/route.h, the host router's arithmetic, capacity rule included), and only the
// per-expert offsets and the aux loss come down (the expert GEMMs need the row counts on the host); otherwise
// (expert or tensor parallelism, or DSV3_ROUTER=host) the selection runs on the host (router_route /
// router_backward_logits, the same bodies over host memory): on a device the [T, E] logits come down and the
// routing goes up, once per layer and pass.
// What a layer's backward needs from its forward (one per MoE layer; one set under recompute).
struct MoeActs {
  const float* x_TD = nullptr;  // the layer input (not owned; must stay alive until backward)
  int64_t t = 0, batch = 0;
  RouterActs router;  // host memory (with SP: the whole micro-batch's T = t·TP tokens)
  // SP (host memory): this rank's logits and its rows of the routing.
  std::vector<float> logits_local_TE, weight_local_TK;
  std::vector<int32_t> idx_local_TK;
  std::vector<uint8_t> kept_local_TK;
  // SP: the TP region's gathered input [T, D] (the shared expert's; under expert_tp the routed experts' too).
  DeviceArray<float> shared_in_TD;
  DispatchState dispatch;                        // rows of the local experts (from every EP rank); host maps
  DeviceArray<int32_t> token_R, row_TK, slot_R;  // one rank: the permutation's maps in backend memory
  DeviceArray<float> weight_TK;                  // one rank: the gate weights in backend memory
  DeviceArray<float> x_RD;                       // gathered inputs
  DeviceArray<float> a_RF, b_RF;                 // gate / up pre-activations
  DeviceArray<float> z_RF;                       // silu(a)⊙b·w: the down_proj input
  DeviceArray<float> prob_R;                     // gate weight per row
  DeviceArray<float> y_RD;                       // expert outputs (already weighted)
  MlpActs shared;                                // shared expert
  LinearScratch lin;
  // device backend: the router's logits in backend memory; the bias on the host
  DeviceArray<float> logits_TE;
  std::vector<float> bias_E;
  // The router on the device (routes_on_device: one rank; kernels/route.h): its scores, choices, gate weights,
  // kept map and aux-loss gradient stay in backend memory; `readback` holds the expert offsets (E + 1), the aux
  // loss's bits and with capacity the offsets before dropping (E + 1): the one read of the layer's forward.
  DeviceArray<float> scores_TE, denom_T, aux_dlogits_TE;
  DeviceArray<int32_t> idx_TK, readback;
  DeviceArray<uint8_t> kept_TK;
  // force_load_balancing: the normals that replace the logits (the whole micro-batch's), and their backend copy
  std::vector<float> random_logits_TE;
  DeviceArray<float> random_logits_dev_TE;
  std::vector<int32_t> readback_host;
  // The grouped expert GEMMs' row offsets (E + 1) in backend memory: `readback` when the router ran on the device,
  // else `offsets_E1` (uploaded from the dispatch's); nullptr when the experts run per expert.
  const int32_t* expert_offsets_E1 = nullptr;
  DeviceArray<int32_t> offsets_E1;
  std::vector<int32_t> offsets_host_E1;
  // bf16 fast path (MoeConfig::precision == kBF16): every operand converted once per step and shared by the
  // expert GEMMs. a_RF then holds the fused [R, 2F] gate|up output (b_RF unused), the scratch's da_RF its gradient.
  ExpertBf16 own_bf;  // the expert copies when the caller has none (MoeParams::expert_bf16)
  const bf16 *w_gu_bf = nullptr, *w_down_bf = nullptr;  // the copies the forward used (for the backward)
  DeviceArray<bf16> x_bf, z_bf;
};

// Temporaries of one layer's forward or backward, shared by every MoE layer of a model (one layer runs at a time):
// the backward's row buffers (T·K rows of D and of F floats, several of each) exist once, not once per layer.
struct MoeScratch {
  MlpScratch shared;  // the shared expert's
  // TP: the region's partial output, reduced before the add (SP: [T, D]); SP: this rank's part of it [t, D]
  DeviceArray<float> shared_out_TD, shared_local_TD;
  // backward: the routed rows' gradients, the gate weights', the routed part of dx
  DeviceArray<float> dy_RD, dz_RF, da_RF, db_RF, dx_RD, dprob_R, dweight_TK, dx_routed_TD;
  // SP backward: the gathered output gradient and the partial input gradient [T, D]; host: the gathered
  // gate-weight gradient and this rank's rows of the logits' gradient
  DeviceArray<float> dshared_out_TD, dshared_in_TD;
  std::vector<float> dweight_full_TK, dlogits_local_TE;
  DeviceArray<float> dlogits_TE;       // device backend: the router logits' gradient
  std::vector<float> dweight_host_TK;  // device backend, host router: the gate-weight gradient
  DeviceArray<bf16> dy_bf, dab_bf;     // bf16 backward operands
};

// out_TD = MoE(x_TD). batch: the number of sequences among the T tokens (sequence aux loss only).
void moe_forward(Backend& be, const MoeConfig& c, const MoeParams& p, const float* x_TD, int64_t t,
                 int64_t batch, bool training, float* out_TD, MoeActs& a, MoeScratch& s);
// aux_grad: dL_total/dL_seq_aux (ignored when the aux loss is off).
void moe_backward(Backend& be, const MoeConfig& c, const MoeParams& p, MoeActs& a, const float* dout_TD,
                  float aux_grad, float* dx_TD, MoeGrads& g, float beta, MoeScratch& s);

}  // namespace dsv3
