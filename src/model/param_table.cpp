// Builds the ordered HF-named parameter list of a ModelConfig, its counts and its counter-based
// initialisation.
#include "model/param_table.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "core/philox.h"

namespace dsv3 {

const char* param_role_name(ParamRole r) {
  switch (r) {
    case ParamRole::kEmbedding:
      return "embedding";
    case ParamRole::kLinear:
      return "linear";
    case ParamRole::kOutputLinear:
      return "output_linear";
    case ParamRole::kNorm:
      return "norm";
    case ParamRole::kRouter:
      return "router";
    case ParamRole::kExpertBias:
      return "expert_bias";
    case ParamRole::kHead:
      return "head";
  }
  return "?";
}

void ParamTable::add(ParamInfo p) {
  p.numel = 1;
  for (int64_t d : p.shape) p.numel *= d;
  p.weight_decay = p.shape.size() >= 2;  // Megatron: no decay on 1-D params (norms) nor on biases
  const double sigma = cfg_.initializer_range;
  switch (p.role) {
    case ParamRole::kNorm:
      p.init = InitKind::kOnes;
      break;
    case ParamRole::kExpertBias:
      p.init = InitKind::kZeros;
      p.trainable = false;
      p.weight_decay = false;
      break;
    case ParamRole::kOutputLinear:
      p.init = InitKind::kNormal;
      p.init_std = sigma / std::sqrt(2.0 * static_cast<double>(cfg_.num_hidden_layers));
      break;
    default:
      p.init = InitKind::kNormal;
      p.init_std = sigma;
  }
  // Tensor parallelism: column-parallel (rows) and row-parallel (columns) linears, the vocab-parallel
  // embedding and head; MLA's latent path is replicated with its gradient summed over TP. The router stays
  // whole; routed experts are split like the dense FFN under expert tensor parallelism, else whole.
  auto ends = [&](const char* suffix) {
    const std::string x(suffix);
    return p.name.size() >= x.size() && p.name.compare(p.name.size() - x.size(), x.size(), x) == 0;
  };
  if (!p.is_expert || split_experts_) {
    if (ends("q_b_proj.weight") || ends("q_proj.weight") || ends("kv_b_proj.weight") ||
        ends("gate_proj.weight") || ends("up_proj.weight") || p.role == ParamRole::kEmbedding ||
        p.role == ParamRole::kHead)
      p.tp_split = TpSplit::kRows;
    else if (ends("o_proj.weight") || ends("down_proj.weight"))
      p.tp_split = TpSplit::kCols;
    else if (ends("q_a_proj.weight") || ends("q_a_layernorm.weight") || ends("kv_a_proj_with_mqa.weight") ||
             ends("kv_a_layernorm.weight"))
      p.tp_grad_sum = true;
  }
  DSV3_CHECK(index_.emplace(p.name, params_.size()).second, "duplicate parameter name ", p.name);
  params_.push_back(std::move(p));
}

ParamTable::ParamTable(const ModelConfig& cfg, bool split_experts)
    : cfg_(cfg), split_experts_(split_experts) {
  cfg_.validate();
  const int64_t d = cfg.hidden_size, V = cfg.vocab_size, H = cfg.num_attention_heads;
  auto P = [](std::string name, std::vector<int64_t> shape, ParamRole role, int64_t layer) {
    ParamInfo p;
    p.name = std::move(name);
    p.shape = std::move(shape);
    p.role = role;
    p.layer = layer;
    return p;
  };

  // One decoder layer (HF module registration order: self_attn, mlp, input_layernorm,
  // post_attention_layernorm).
  auto add_layer = [&](int64_t i, bool mtp) {
    const std::string pre = "model.layers." + std::to_string(i) + ".";
    auto L = [&](const std::string& suffix, std::vector<int64_t> shape, ParamRole role) {
      ParamInfo p = P(pre + suffix, std::move(shape), role, i);
      p.is_mtp = mtp;
      return p;
    };
    const std::string a = "self_attn.";
    if (cfg.has_q_lora()) {
      add(L(a + "q_a_proj.weight", {cfg.q_lora_rank, d}, ParamRole::kLinear));
      add(L(a + "q_a_layernorm.weight", {cfg.q_lora_rank}, ParamRole::kNorm));
      add(L(a + "q_b_proj.weight", {H * cfg.qk_head_dim(), cfg.q_lora_rank}, ParamRole::kLinear));
    } else {
      add(L(a + "q_proj.weight", {H * cfg.qk_head_dim(), d}, ParamRole::kLinear));
    }
    add(L(a + "kv_a_proj_with_mqa.weight", {cfg.kv_lora_rank + cfg.qk_rope_head_dim, d}, ParamRole::kLinear));
    add(L(a + "kv_a_layernorm.weight", {cfg.kv_lora_rank}, ParamRole::kNorm));
    add(L(a + "kv_b_proj.weight", {H * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank},
          ParamRole::kLinear));
    add(L(a + "o_proj.weight", {d, H * cfg.v_head_dim}, ParamRole::kOutputLinear));
    auto swiglu = [&](const std::string& p, int64_t width, int64_t expert) {
      for (const char* proj : {"gate_proj", "up_proj", "down_proj"}) {
        const bool down = std::string(proj) == "down_proj";
        ParamInfo q =
            L(p + proj + ".weight", down ? std::vector<int64_t>{d, width} : std::vector<int64_t>{width, d},
              down ? ParamRole::kOutputLinear : ParamRole::kLinear);
        q.expert = expert;
        q.is_expert = expert >= 0;
        add(std::move(q));
      }
    };
    if (cfg.is_moe_layer(i)) {
      for (int64_t e = 0; e < cfg.n_routed_experts; ++e)
        swiglu("mlp.experts." + std::to_string(e) + ".", cfg.moe_intermediate_size, e);
      add(L("mlp.gate.weight", {cfg.n_routed_experts, d}, ParamRole::kRouter));
      add(L("mlp.gate.e_score_correction_bias", {cfg.n_routed_experts}, ParamRole::kExpertBias));
      if (cfg.n_shared_experts > 0)
        swiglu("mlp.shared_experts.", cfg.moe_intermediate_size * cfg.n_shared_experts, -1);
    } else {
      swiglu("mlp.", cfg.intermediate_size, -1);
    }
    add(L("input_layernorm.weight", {d}, ParamRole::kNorm));
    add(L("post_attention_layernorm.weight", {d}, ParamRole::kNorm));
  };

  add(P("model.embed_tokens.weight", {V, d}, ParamRole::kEmbedding, -1));
  for (int64_t i = 0; i < cfg.num_hidden_layers; ++i) add_layer(i, false);
  add(P("model.norm.weight", {d}, ParamRole::kNorm, -1));
  add(P("lm_head.weight", {V, d}, ParamRole::kHead, -1));

  // MTP layers (HF hub layout, spec §2.9/§5.1): embedding and head are the main model's in training.
  for (int64_t k = 0; k < cfg.num_nextn_predict_layers; ++k) {
    const int64_t i = cfg.num_hidden_layers + k;
    const std::string pre = "model.layers." + std::to_string(i) + ".";
    auto M = [&](const std::string& suffix, std::vector<int64_t> shape, ParamRole role) {
      ParamInfo p = P(pre + suffix, std::move(shape), role, i);
      p.is_mtp = true;
      return p;
    };
    ParamInfo emb = M("embed_tokens.weight", {V, d}, ParamRole::kEmbedding);
    emb.tied_to = "model.embed_tokens.weight";
    add(std::move(emb));
    add(M("enorm.weight", {d}, ParamRole::kNorm));
    add(M("hnorm.weight", {d}, ParamRole::kNorm));
    // Columns 0..d-1 multiply the normed embedding, d..2d-1 the normed hidden state (spec §2.9).
    add(M("eh_proj.weight", {d, 2 * d}, ParamRole::kLinear));
    add_layer(i, true);
    add(M("shared_head.norm.weight", {d}, ParamRole::kNorm));
    ParamInfo head = M("shared_head.head.weight", {V, d}, ParamRole::kHead);
    head.tied_to = "lm_head.weight";
    add(std::move(head));
  }
}

const ParamInfo& ParamTable::at(const std::string& name) const {
  auto it = index_.find(name);
  DSV3_CHECK(it != index_.end(), "parameter '", name, "' is not in the model's parameter table");
  return params_[it->second];
}

int64_t ParamTable::total_main() const {
  int64_t n = 0;
  for (const auto& p : params_)
    if (!p.is_mtp && p.tied_to.empty()) n += p.numel;
  return n;
}

namespace {
// Owned params of the selected part, with routed experts counted at K/N_r (exact: each MoE layer holds N_r
// equally sized experts, so K·(sum over its experts)/N_r is an integer).
int64_t active_count(const std::vector<ParamInfo>& params, const ModelConfig& cfg, bool mtp) {
  int64_t dense = 0, experts = 0;
  for (const auto& p : params) {
    if (p.is_mtp != mtp || !p.tied_to.empty()) continue;
    (p.is_expert ? experts : dense) += p.numel;
  }
  if (experts == 0) return dense;
  return dense + experts / cfg.n_routed_experts * cfg.num_experts_per_tok;
}
}  // namespace

int64_t ParamTable::active_main() const {
  return active_count(params_, cfg_, false);
}

int64_t ParamTable::active_main_excl_embedding() const {
  return active_main() - at("model.embed_tokens.weight").numel;
}

int64_t ParamTable::total_mtp_unique() const {
  int64_t n = 0;
  for (const auto& p : params_)
    if (p.is_mtp && p.tied_to.empty()) n += p.numel;
  return n;
}

int64_t ParamTable::active_mtp_unique() const {
  return active_count(params_, cfg_, true);
}

int64_t ParamTable::total_trainable_storage() const {
  return total_main() + total_mtp_unique();
}

int64_t ParamTable::hub_total() const {
  int64_t n = 0;
  for (const auto& p : params_) n += p.numel;
  return n;
}

float init_value(const ParamInfo& p, uint64_t seed, int64_t index,
                 const std::optional<int64_t>& pad_token_id) {
  switch (p.init) {
    case InitKind::kOnes:
      return 1.0f;
    case InitKind::kZeros:
      return 0.0f;
    case InitKind::kNormal:
      break;
  }
  if (p.role == ParamRole::kEmbedding && pad_token_id && index / p.shape[1] == *pad_token_id) return 0.0f;
  // A tied copy draws from its owner's stream, so it equals the owner element for element.
  const std::string& stream = p.tied_to.empty() ? p.name : p.tied_to;
  return static_cast<float>(p.init_std *
                            philox_normal(seed, name_hash(stream), static_cast<uint64_t>(index)));
}

void init_param_block(const ParamInfo& p, uint64_t seed, const ModelConfig& cfg, int64_t row0, int64_t rows,
                      int64_t col0, int64_t cols, float* out) {
  const int64_t R = p.shape.size() == 2 ? p.shape[0] : 1;
  const int64_t C = p.shape.empty() ? 1 : p.shape.back();
  DSV3_CHECK(p.shape.size() <= 2, "init_param_block: ", p.name, " is not 1-D or 2-D");
  DSV3_CHECK(row0 >= 0 && rows >= 0 && row0 + rows <= R && col0 >= 0 && cols >= 0 && col0 + cols <= C,
             "init_param_block: block [", row0, "+", rows, ", ", col0, "+", cols, "] is outside ", p.name,
             " [", R, ", ", C, "]");
  if (p.init != InitKind::kNormal) {
    std::fill(out, out + rows * cols, p.init == InitKind::kOnes ? 1.0f : 0.0f);
    return;
  }
  const uint64_t stream = name_hash(p.tied_to.empty() ? p.name : p.tied_to);
  const bool pad = p.role == ParamRole::kEmbedding && cfg.pad_token_id.has_value();
#pragma omp parallel for schedule(static) if (rows * cols > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t gr = row0 + r;
    float* o = out + r * cols;
    if (pad && gr == *cfg.pad_token_id) {
      std::fill(o, o + cols, 0.0f);
      continue;
    }
    for (int64_t c = 0; c < cols; ++c)
      o[c] = static_cast<float>(p.init_std *
                                philox_normal(seed, stream, static_cast<uint64_t>(gr * C + col0 + c)));
  }
}

void init_param(const ParamInfo& p, uint64_t seed, const ModelConfig& cfg, float* out) {
  const int64_t R = p.shape.size() == 2 ? p.shape[0] : 1;
  init_param_block(p, seed, cfg, 0, R, 0, p.numel / R, out);
}

}  // namespace dsv3
