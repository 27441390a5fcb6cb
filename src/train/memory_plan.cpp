// The memory plan (see the header). Every term names the buffer it stands for; when the model code grows a new
// buffer, the plan gains its term here, or the byte-counter test (tests/train/memory_plan_test.cpp) fails.
#include "train/memory_plan.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <initializer_list>
#include <string>

#include "core/error.h"
#include "kernels/cpu/gemm.h"
#include "model/param_store.h"
#include "model/param_table.h"
#include "parallel/data_parallel.h"

namespace dsv3 {
namespace {

constexpr int64_t kF32 = 4, kBf16 = 2, kI32 = 4;

// What a grow-only DeviceArray holds after growing to each size in turn (device_array.h: the first sizing is
// exact, a re-grow takes 1.5x headroom).
int64_t grown(std::initializer_list<int64_t> sizes) {
  int64_t n = 0, cap = 0;
  for (int64_t x : sizes) {
    if (x <= n) continue;
    if (x > cap) cap = n == 0 ? x : std::max(x, n + n / 2);
    n = x;
  }
  return cap;
}

// One rank's share of a layer's shapes (TP splits heads and FFN widths; EP the routed experts).
struct Shapes {
  int64_t T, Tl, Tr;  // tokens of a micro-batch, this rank's (T / TP with SP), the routed experts' (ETP: T)
  int64_t D, H, K, Ekv, C, Lkv, Lq, dv;  // MLA (Ekv: kv_b rows per head)
  int64_t F;                             // dense FFN width
  int64_t Fe, Fs, E, k, rows;            // MoE: expert width, shared width, experts, top-k, routed rows
  bool bf16, tp, gpu, sp, etp;           // etp: routed experts split over TP (expert tensor parallelism)
};

// A SwiGLU MLP's saved forward state (mlp.h MlpActs) and backward scratch (MlpScratch), width f.
int64_t mlp_acts(const Shapes& s, int64_t f) {
  int64_t b = kF32 * (2 * s.T * f + s.T * f);      // ab_T2F, h_TF
  if (s.bf16) b += kBf16 * (s.T * s.D + s.T * f);  // x_bf, h_bf
  return b;
}
int64_t mlp_scratch(const Shapes& s, int64_t f) {
  int64_t b = kF32 * (s.T * f + 2 * s.T * f);                // dh_TF, dab_T2F
  if (s.bf16) b += kBf16 * grown({s.T * s.D, 2 * s.T * f});  // lin.a: dy, then dab
  return b;
}

// MlaActs: the projections' outputs, q and k with rope, the attention output and its logsumexp. With SP the
// down-projections run on this rank's Tl positions and their latents are gathered (mla.cpp).
int64_t mla_acts(const Shapes& s) {
  const int64_t T = s.T, Tl = s.Tl, HK = s.H * s.K;
  int64_t b = kF32 * (T * HK + T * s.C + T * s.Lkv + T * s.H * s.Ekv + T + T * HK + T * s.H * s.dv + T * s.H);
  if (s.Lq) b += kF32 * (Tl * s.Lq + T * s.Lq + Tl);                            // cq, cqn (gathered), rstd_q
  if (s.bf16) b += kBf16 * (Tl * s.D + T * s.Lq + T * s.Lkv + T * s.H * s.dv);  // x, cqn, ckvn, o operands
  if (s.sp && !s.Lq) b += (kF32 + (s.bf16 ? kBf16 : 0)) * T * s.D;              // x gathered for q_proj
  return b;
}
// MlaScratch (shared by every layer).
int64_t mla_scratch(const Shapes& s, int64_t seq, int64_t rope_dim) {
  const int64_t T = s.T, Tl = s.Tl, HK = s.H * s.K;
  int64_t b =
      kF32 * (T * s.H * s.dv + 2 * T * HK + T * s.H * s.Ekv + T * s.C + T * s.Lkv + T * s.Lq + Tl * s.Lq);
  if (s.sp) b += kF32 * (2 * Tl * s.Lq + 2 * Tl * s.C);  // this rank's cqn, ckv and their gradients
  if (s.sp && !s.Lq) b += kF32 * (T + Tl) * s.D;  // q_proj's input gradient, whole and reduce-scattered
  b += kF32 * 2 * seq * (rope_dim / 2);           // rope cos/sin table
  // lin.a: each output gradient as a bf16 operand, in the backward's order (o_proj, kv_b, q_b, kv_a, q_a).
  if (s.bf16) b += kBf16 * grown({T * s.D, T * s.H * s.Ekv, T * HK, T * s.C, T * s.Lq});
  return b;
}

// MoeActs (moe.h): the router's maps, the permuted rows and their SwiGLU, the shared expert's state, the bf16
// expert operands. Per MoE layer (one set under recompute).
int64_t moe_acts(const Shapes& s, bool ep) {
  const int64_t T = s.Tr, D = s.D, R = s.rows, F = s.Fe, k = s.k;  // the routed experts' tokens
  int64_t b = 0;
  if (s.gpu) b += kF32 * s.Tl * s.E;                            // logits_TE: the router's GEMM on the GPU
  if (!ep) b += kI32 * (2 * R + T * k) + kF32 * T * k;          // token_R, slot_R, row_TK, weight_TK
  b += kF32 * (R * D + R + R * D);                              // x_RD, prob_R, y_RD
  b += kF32 * (s.bf16 ? 2 * R * F : R * F) + kF32 * 2 * R * F;  // a_RF (bf16: fused gate|up), b_RF, z_RF
  if (s.Fs) b += mlp_acts(s, s.Fs);                  // the shared expert: every token of the micro-batch
  if (s.sp && (s.Fs || s.etp)) b += kF32 * s.T * D;  // shared_in_TD: the TP region's gathered input
  if (s.bf16) b += kBf16 * (R * D + R * F);          // x_bf, z_bf
  return b;
}
// MoeScratch (moe.h): one layer's forward and backward temporaries, shared by every MoE layer of the model.
int64_t moe_scratch(const Shapes& s) {
  const int64_t T = s.Tr, D = s.D, R = s.rows, F = s.Fe, k = s.k;
  int64_t b = 0;
  if (s.gpu) b += kF32 * s.Tl * s.E;    // dlogits_TE
  b += kF32 * (2 * R * D + R + T * k);  // dy_RD, dx_RD, dprob_R, dweight_TK
  b += kF32 * (s.bf16 ? grown({R * F, 2 * R * F}) : R * F) +
       kF32 * 2 * R * F;  // da_RF (bf16: regrown), dz, db
  if (s.Fs) {
    b += kF32 * T * D;                        // dx_routed_TD: the routed part added after the shared expert's
    b += mlp_scratch(s, s.Fs);                // the shared expert's
    if (s.tp && !s.etp) b += kF32 * s.T * D;  // shared_out_TD
    if (s.sp && !s.etp) b += kF32 * (2 * s.T + s.Tl) * D;  // dshared_out, dshared_in, shared_local
  }
  // ETP with SP: the region's partial output, gathered output gradient and partial input gradient.
  if (s.sp && s.etp) b += kF32 * 3 * s.T * D;
  if (s.bf16) b += kBf16 * (R * D + 2 * R * F);  // dy_bf, dab_bf
  return b;
}
// The router's and the permutation's host vectors (router.h RouterActs, DispatchState), per MoE layer; under EP
// the dispatcher's staging (ep_dispatcher.h): alltoall sends the rows bound for other ranks and receives this
// rank's, allgather gathers every rank's tokens and sums.
int64_t moe_host(const Shapes& s, bool capacity, int ep, bool alltoall) {
  const int64_t T = s.T, E = s.E, k = s.k;
  int64_t b = kF32 * 4 * T * E;                         // logits, scores, aux_dlogits, dlogits
  b += kI32 * T * k + kF32 * T * k + T * k + kF32 * T;  // idx, weight, kept, denom
  if (capacity) b += kI32 * (3 * T * k + 2 * (E + 1));  // the capacity rule's permutation (router.h)
  b += kI32 * (2 * s.rows + T * k);                     // permutation: token_R, slot_R, row_TK
  if (ep > 1 && alltoall) b += kF32 * (s.D + 1) * (T * k * (ep - 1) / ep + s.rows);  // send_RD/R, recv_RD/R
  if (ep > 1 && !alltoall)
    b += kF32 * ep * T * (2 * s.D + 2 * k) + kI32 * ep * T * k;  // x/sum/pair/weight_all
  return b;
}

// A decoder block's BlockActs for one micro-batch: the norms' state, MLA's, then the FFN's.
int64_t block_acts_common(const Shapes& s) {
  return kF32 * (4 * s.Tl * s.D + 2 * s.Tl) + mla_acts(s);  // xn1, rstd1, h_mid, xn2, rstd2, tmp
}
int64_t block_acts(const Shapes& s, bool moe, bool ep) {
  int64_t b = block_acts_common(s);
  b += moe ? moe_acts(s, ep) : mlp_acts(s, s.F) + (s.sp ? kF32 * s.T * s.D : 0);  // SP: xn2 gathered
  return b;
}

}  // namespace

std::vector<StageMemory> plan_memory(const ModelConfig& cfg, const MemoryLayout& lay, const MemoryRun& run) {
  DSV3_CHECK(lay.tp >= 1 && lay.pp >= 1 && lay.ep >= 1 && lay.dp >= 1,
             "memory plan: parallel sizes must be >= 1");
  const int etp = lay.expert_tp();
  DSV3_CHECK(etp >= 1 && (lay.tp * lay.dp) % (etp * lay.ep) == 0, "memory plan: TP x DP (", lay.tp * lay.dp,
             ") must be a multiple of the expert tensor parallel size x the expert-parallel size (",
             etp * lay.ep, ")");
  const bool split_experts = etp > 1 && lay.tp > 1;
  const ParamTable table(cfg, split_experts);
  const bool mtp_model = cfg.num_nextn_predict_layers > 0;
  const auto stages =
      !lay.stages.empty()
          ? lay.stages
          : plan_pipeline_stages(cfg.num_hidden_layers, lay.pp, lay.first_layers, lay.last_layers, mtp_model);
  const int edp = lay.expert_dp();
  const bool bf16 = run.precision == Precision::kBF16;
  const int64_t T = run.micro_batch * run.seq, D = cfg.hidden_size, L = cfg.num_hidden_layers;

  Shapes s{};
  const bool sp = run.sequence_parallel && lay.tp > 1;
  const int64_t Tl = sp ? T / lay.tp : T;  // with SP the residual stream holds this rank's positions
  s.T = T, s.Tl = Tl, s.Tr = split_experts ? T : Tl, s.D = D, s.sp = sp, s.etp = split_experts;
  s.H = cfg.num_attention_heads / lay.tp, s.K = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim;
  s.Ekv = cfg.qk_nope_head_dim + cfg.v_head_dim, s.C = cfg.kv_lora_rank + cfg.qk_rope_head_dim;
  s.Lkv = cfg.kv_lora_rank, s.Lq = cfg.has_q_lora() ? cfg.q_lora_rank : 0, s.dv = cfg.v_head_dim;
  s.F = cfg.intermediate_size / lay.tp;
  s.Fe = cfg.moe_intermediate_size / (split_experts ? lay.tp : 1),
  s.Fs = cfg.n_shared_experts * cfg.moe_intermediate_size / lay.tp;
  s.E = cfg.n_routed_experts, s.k = cfg.num_experts_per_tok;
  s.bf16 = bf16, s.tp = lay.tp > 1, s.gpu = !run.cpu;
  // Routed rows per MoE layer: T·k (dropless; with EP the average a rank receives); the capacity rule keeps at
  // most E·capacity of them.
  s.rows = s.Tr * s.k;
  const bool capacity = run.capacity_factor > 0;
  if (capacity && s.E > 0) {
    const auto cap = static_cast<int64_t>(
        std::ceil(static_cast<double>(T * s.k) / static_cast<double>(s.E) * run.capacity_factor));
    if (cap <= T) s.rows = std::min(s.rows, s.E * cap);
  }
  const bool ep = lay.ep > 1;
  // Under EP the rows a rank receives change every step (T·k on average); its buffers grow to the largest count
  // met, with 1.5x headroom when they re-grow (device_array.h): the plan takes a quarter more than the average.
  if (ep) s.rows += s.rows / 4;

  std::vector<StageMemory> out;
  for (const auto& st : stages) {
    StageMemory m;
    m.first_layer = st.first_layer, m.end_layer = st.end(L);
    const ParamStore store(table, lay.ep, 0, st, lay.tp, 0);
    int64_t dense = 0, expert = 0, copies = 0;
    for (const auto& p : table.params()) {
      if (!p.tied_to.empty() || !store.contains(p.name)) continue;
      if (p.trainable) (p.is_expert ? expert : dense) += store.numel(p);
      // bf16 copies: the dense projections and the head (Bf16Weights), and the local experts (ExpertBf16)
      if (p.is_expert || p.role == ParamRole::kLinear || p.role == ParamRole::kOutputLinear ||
          p.role == ParamRole::kHead)
        copies += store.numel(p);
    }
    m.params = store.size();
    m.weights_grads = 2 * kF32 * store.size();
    if (bf16) m.bf16_copies = kBf16 * copies;
    if (lay.dist_opt) {
      // Moments of this rank's shard of each bucket (dense over DP, experts over expert-DP), and one shard's
      // reduce-scatter receive buffer.
      const int64_t shard_dense = (dense + lay.dp - 1) / lay.dp, shard_expert = (expert + edp - 1) / edp;
      m.adam = 2 * kF32 * (shard_dense + shard_expert);
      m.optimizer_buffers = kF32 * std::max(shard_dense, shard_expert);
    } else {
      m.adam = 2 * kF32 * store.size();
    }
    // MPI's own staging for the gradient buckets (data_parallel.h: Megatron's max(40M, 1M·DP) elements; dense and
    // expert ranges share buckets when they share a group): measured with OpenMPI 4.1 on the proxy config, a
    // reduce-scatter holds about the part it receives from the other ranks, an all-reduce half a shard.
    const int64_t bucket = DataParallelGrads::default_bucket_numel(lay.dp);
    auto staging = [&](int64_t n, int group) -> int64_t {
      if (group <= 1) return 0;
      n = std::min(bucket, n);
      return lay.dist_opt ? kF32 * n * (group - 1) / group : kF32 * n / (2 * group);
    };
    const bool one_group = lay.ep == 1 && etp == lay.tp;  // the DP and expert-DP groups coincide
    m.optimizer_buffers +=
        one_group ? staging(dense + expert, lay.dp) : std::max(staging(dense, lay.dp), staging(expert, edp));

    const bool post = st.post_process;
    const bool mtp = run.mtp && mtp_model && post;
    const int64_t layers = m.end_layer - m.first_layer;
    int64_t moe_layers = 0, dense_layers = 0;
    for (int64_t i = m.first_layer; i < m.end_layer; ++i) (cfg.is_moe_layer(i) ? moe_layers : dense_layers)++;

    // One micro-batch's set (Model::Activations): ids, labels, the residual stream h_first..h_end, the blocks'
    // state (under recompute one block's, holding both the dense MLP's and the MoE's members when the stage has
    // both kinds), the final norm and the loss.
    int64_t set = kI32 * 2 * T + kF32 * (layers + 1) * Tl * D;
    const int64_t moe_block = block_acts(s, true, ep), dense_block = block_acts(s, false, ep);
    if (run.recompute)
      set += moe_layers && dense_layers ? moe_block + dense_block - block_acts_common(s)
                                        : (moe_layers ? moe_block : dense_block);
    else
      set += moe_layers * moe_block + dense_layers * dense_block;
    if (post)
      set +=
          kF32 * (Tl * D + Tl + 2 * T) + (sp ? kF32 * T * D : 0);  // hf, rstd_f, loss, lse; SP: hf gathered
    m.activations = set;
    // 1F1B: stage q holds PP - q micro-batches (train_step.cpp's ring); evaluation under PP runs on the model's
    // own set, one more.
    const int64_t q = static_cast<int64_t>(&st - stages.data());
    m.sets = lay.pp == 1 ? 1 : std::min<int64_t>(lay.pp - q, run.micro_batches) + (run.eval ? 1 : 0);

    // Shared backward scratch: dA/dB/dhf, the block's dxn/dh_mid, the dense MLP's and MLA's scratch.
    int64_t scratch = kF32 * 3 * Tl * D + kF32 * 2 * Tl * D + 8;
    if (sp)
      scratch += kF32 * 3 * T * D;  // the regions' whole-sequence partials and gradients; the model's full_TD
    if (layers > 0) scratch += mla_scratch(s, run.seq, cfg.qk_rope_head_dim);
    if (dense_layers > 0) scratch += mlp_scratch(s, s.F);
    bool any_moe = moe_layers > 0;
    for (int64_t k = 0; mtp && k < cfg.num_nextn_predict_layers; ++k) any_moe |= cfg.is_moe_layer(L + k);
    if (any_moe) scratch += moe_scratch(s);
    int64_t host = kI32 * 2 * run.micro_batch * run.seq;  // the trainer's batch (ids, labels)
    if (lay.pp > 1) host += 2 * kF32 * T * D;             // pipeline send/receive buffers
    // The router's host maps live in the block's state: one set per MoE layer (one block under recompute) and
    // activation set.
    host += (run.recompute ? std::min<int64_t>(moe_layers, 1) : moe_layers) *
            moe_host(s, capacity, lay.ep, run.alltoall) * m.sets;
    host += 12 * run.samples;  // the dataset's sample and shuffle indices (int32 pairs, uint32)
    if (mtp) {
      for (int64_t k = 0; k < cfg.num_nextn_predict_layers; ++k) {
        const bool moe = cfg.is_moe_layer(L + k);
        // Depth: ids, labels, e, rstd_e, rstd_h, cat [T,2D], z, zout, h, rstd_o, loss, lse, and its block.
        scratch += kI32 * 2 * T + kF32 * (6 * Tl * D + 3 * Tl + 2 * T) + block_acts(s, moe, ep);
        if (sp) scratch += kF32 * T * D;  // the depth's head input, gathered
        if (moe) host += moe_host(s, capacity, lay.ep, run.alltoall);
      }
      scratch += kF32 * 2 * Tl * D;  // dh_TF: eh_proj's input gradient [T, 2D]
      if (bf16)
        scratch += kBf16 * (2 * Tl * D + grown({2 * D * D, 2 * Tl * D}));  // eh_proj operands (lin.a/b)
      if (dense_layers == 0 && !cfg.is_moe_layer(L)) scratch += mlp_scratch(s, s.F);
    }
    // The head's cross-entropy works through vocabulary chunks of about 32 MiB of fp32 logits (cross_entropy.cpp);
    // under TP the vocab-parallel head holds [T, V/TP] logits (vocab_parallel.h).
    int64_t chunk = 0;
    if (post && run.cpu) {
      const int64_t v_local =
          store.contains("lm_head.weight") ? store.numel(table.at("lm_head.weight")) / D : 0;
      if (lay.tp > 1) {
        chunk = v_local;  // the vocab-parallel head works on all of this rank's columns at once
        host += kF32 * (T * v_local + 3 * T);  // vocab_parallel.h: this rank's [T, V/TP] logits
        // bf16: the head GEMMs' operands (lin.a: h then dlogits; lin.b: the weight then h), per MTP depth too
        if (bf16) scratch += kBf16 * (grown({T * D, T * v_local}) + grown({v_local * D, T * D}));
      } else {
        chunk = std::min(v_local, std::max<int64_t>(256, (int64_t{1} << 23) / std::max<int64_t>(T, 1)));
        host += kF32 * (T * chunk + 3 * T);
        if (bf16) host += kBf16 * (T * D + chunk * D + T * chunk);  // h, a weight chunk, dlogits as operands
      }
    }
    if (run.cpu && bf16 && !gemm_bf16_native()) {
      // No bf16 matmul on this CPU: each thread widens a GEMM's operands to fp32 (gemm_bf16_via_f32); the
      // largest are the head's dlogits chunk [T, chunk] and the widest activation operand.
      const int64_t widest = std::max({D, s.H * s.K, s.H * s.Ekv, 2 * s.F, 2 * s.Fs, 2 * D});
      host += kF32 * (T * chunk + T * widest);
    }
    // fp32 MoE experts run exact-shape GEMM kernels, one per row count met (gemm.cpp): up to the cap, ~20 KB each.
    if (run.cpu && !bf16 && (moe_layers > 0 || mtp)) m.kernels = kGemmMaxKernels * (20 << 10);
    m.scratch = scratch;
    m.host = host;
    if (!run.cpu) {
      // The CUDA backend's own: the context (~500 MiB), cuBLASLt's 32 MiB workspaces (one per expert lane, 4 more
      // with MoE layers), the head's ~256 MiB fp32 logits chunk with its bf16 gradient (cuda_backend.cu), attention
      // and norm scratch: about 1 GiB in all.
      m.gpu = true;
      m.device_extras = int64_t{1} << 30;
    }
    out.push_back(m);
  }
  return out;
}

namespace {
std::string mib(int64_t bytes) {
  char b[32];
  const double v = static_cast<double>(bytes);
  if (v >= 1024.0 * 1024 * 1024)
    std::snprintf(b, sizeof b, "%.1f GiB", v / (1024.0 * 1024 * 1024));
  else
    std::snprintf(b, sizeof b, "%.1f MiB", v / (1024.0 * 1024));
  return b;
}
}  // namespace

std::string format_memory_plan(const std::vector<StageMemory>& stages, int64_t runtime,
                               const std::string& note) {
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "  %-7s %-9s %11s %11s %11s %11s %5s %11s %11s %11s\n", "stage", "layers",
                "w+grads", "bf16 w", "Adam", "acts/mb", "sets", "scratch", "host", "peak");
  out += line;
  for (size_t q = 0; q < stages.size(); ++q) {
    const StageMemory& m = stages[q];
    const std::string layers = std::to_string(m.first_layer) + "-" + std::to_string(m.end_layer - 1);
    std::snprintf(line, sizeof line, "  %-7zu %-9s %11s %11s %11s %11s %5lld %11s %11s %11s\n", q,
                  layers.c_str(), mib(m.weights_grads).c_str(), mib(m.bf16_copies).c_str(),
                  mib(m.adam + m.optimizer_buffers).c_str(), mib(m.activations).c_str(),
                  static_cast<long long>(m.sets), mib(m.scratch).c_str(), mib(m.host + m.kernels).c_str(),
                  mib(m.gpu ? m.device() : m.total() + runtime).c_str());
    out += line;
  }
  if (!stages.empty() && stages[0].gpu)
    out +=
        "  peak: GPU memory (weights, gradients, copies, Adam moments, activations, scratch, ~1 GiB of "
        "CUDA's own)\n";
  else
    out += "  peak includes the runtime: " + mib(runtime) + " (" + note + ")\n";
  return out;
}

namespace {
int64_t proc_status_kb(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string k;
  while (f >> k) {
    if (k == key) {
      int64_t v = -1;
      f >> v;
      return v;
    }
    std::getline(f, k);
  }
  return -1;
}
}  // namespace

int64_t resident_bytes() {
  const int64_t kb = proc_status_kb("VmRSS:");
  return kb < 0 ? -1 : kb * 1024;
}
int64_t peak_resident_bytes() {
  const int64_t kb = proc_status_kb("VmHWM:");
  return kb < 0 ? -1 : kb * 1024;
}

}  // namespace dsv3
