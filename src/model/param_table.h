// The parameter table: for a ModelConfig, every parameter in a fixed order with its HuggingFace checkpoint
// name, shape, role (expert or not, weight decay) and initialisation rule, and the parameter counts derived
// from it.
//
// Initialisation (Megatron-Core's rule, DESIGN principle 4): element k of parameter `name` is
//   std · philox_normal(seed, name_hash(name), k)      for weights (embedding, linears, router, lm_head,
//   eh_proj)
// with std = initializer_range (Megatron's --init-method-std), divided by sqrt(2·num_hidden_layers) for the
// output projections o_proj and (dense, shared and expert) down_proj — Megatron's scaled_init_method_normal.
// Norm weights are 1, the expert bias is 0. If pad_token_id is set, that embedding row is 0 (as HF's
// nn.Embedding padding_idx). k is the row-major index in the *global* tensor, so any shard initialises to the
// same values as the whole.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/config.h"

namespace dsv3 {

enum class ParamRole {
  kEmbedding,     // model.embed_tokens.weight
  kLinear,        // column-style projections (q_a, q_b, q_proj, kv_a, kv_b, gate_proj, up_proj, eh_proj)
  kOutputLinear,  // o_proj and down_proj: scaled init
  kNorm,          // RMSNorm weights
  kRouter,        // mlp.gate.weight
  kExpertBias,    // mlp.gate.e_score_correction_bias: no gradient, updated by the aux-free rule
  kHead,          // lm_head.weight
};

enum class InitKind { kNormal, kOnes, kZeros };

// How tensor parallelism (Megatron's layout, spec §8) splits a parameter over the TP ranks: whole on every rank,
// by rows (column-parallel linears split by output: heads, FFN width, vocabulary) or by columns (row-parallel
// linears split by input: o_proj over heads, down_proj over the FFN width).
enum class TpSplit { kReplicated, kRows, kCols };

struct ParamInfo {
  std::string name;            // HF checkpoint name
  std::vector<int64_t> shape;  // global shape, HF layout ([out, in] for linears)
  int64_t numel = 0;
  ParamRole role = ParamRole::kLinear;
  int64_t layer = -1;      // decoder layer index (MTP layers at num_hidden_layers + k); -1 for global params
  int64_t expert = -1;     // routed expert index, -1 otherwise
  bool is_expert = false;  // a routed-expert weight (sharded over EP)
  bool is_mtp = false;     // belongs to an MTP layer (absent from HF DeepseekV3ForCausalLM)
  bool weight_decay = true;  // false for 1-D params (norms, expert bias)
  bool trainable = true;     // false for the expert bias (no gradient, not in the optimizer)
  // Non-empty when this checkpoint name is a copy of another parameter (the MTP layer's embed_tokens and
  // shared_head.head are the main embedding and lm_head in training; the hub stores physical copies).
  // Tied entries own no memory and are not counted.
  std::string tied_to;
  InitKind init = InitKind::kNormal;
  double init_std = 0.0;
  TpSplit tp_split = TpSplit::kReplicated;
  // Replicated over TP but fed by partial (per-TP-rank) gradients, so its gradient is summed over TP: MLA's
  // down-projections and latent norms, whose outputs reach only the rank's heads (Megatron reduces them alike).
  bool tp_grad_sum = false;
};

class ParamTable {
 public:
  // split_experts: expert tensor parallelism (ETP = TP): routed experts' gate/up split by rows, down by columns,
  // like the dense FFN; otherwise they are whole on every TP rank.
  explicit ParamTable(const ModelConfig& cfg, bool split_experts = false);

  const ModelConfig& config() const { return cfg_; }
  // Every entry in order: embedding, layers 0..L-1 (attention, norms, MLP/MoE), final norm, lm_head, MTP
  // layers.
  const std::vector<ParamInfo>& params() const { return params_; }
  size_t size() const { return params_.size(); }
  bool contains(const std::string& name) const { return index_.count(name) != 0; }
  // Throws dsv3::Error naming the parameter when absent.
  const ParamInfo& at(const std::string& name) const;

  // --- counts (tied entries excluded) ---
  int64_t total_main() const;   // main model without MTP (DeepSeek's "671B")
  int64_t active_main() const;  // per token, incl. embedding and head: K of N_r experts per MoE layer
  int64_t active_main_excl_embedding() const;
  int64_t total_mtp_unique() const;  // MTP layers without the shared embedding/head
  int64_t active_mtp_unique() const;
  int64_t total_trainable_storage() const;  // all owned params, main + MTP (what training allocates)
  int64_t hub_total() const;                // as the hub files store it: MTP with its embed/head copies

 private:
  void add(ParamInfo p);
  ModelConfig cfg_;
  bool split_experts_ = false;
  std::vector<ParamInfo> params_;
  std::unordered_map<std::string, size_t> index_;
};

// The initial value of global element `index` of parameter `p` (see the rule at the top of this file).
float init_value(const ParamInfo& p, uint64_t seed, int64_t index,
                 const std::optional<int64_t>& pad_token_id);
// Fills out[0..numel) with the whole parameter.
void init_param(const ParamInfo& p, uint64_t seed, const ModelConfig& cfg, float* out);
// Fills a [rows, cols] block starting at (row0, col0) of a 2-D parameter (1-D: row0 = 0, rows = 1, cols =
// slice), row-major with leading dimension `cols`: the same values the whole tensor has there.
void init_param_block(const ParamInfo& p, uint64_t seed, const ModelConfig& cfg, int64_t row0, int64_t rows,
                      int64_t col0, int64_t cols, float* out);

const char* param_role_name(ParamRole r);

}  // namespace dsv3
