// ModelConfig: the DeepSeek-V3 architecture as HuggingFace's config.json describes it, plus the four places
// where Megatron-Core and HF compute differently, made explicit fields filled the way the source (HF or
// Megatron) means.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dsv3 {

// Who the numbers came from: config.json (HF) or Megatron-style flags. It decides how the semantic fields
// below are filled; they agree at DeepSeek-V3's own sizes but not in general.
enum class ConfigSource { kHuggingFace, kMegatron };
const char* config_source_name(ConfigSource s);

// rope_scaling: only YaRN (or none) is accepted. 0 for mscale / mscale_all_dim means "absent" — HF treats an
// absent key and 0 the same way (both falsy).
struct YarnScaling {
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;  // 0: absent (HF then falls back to max_position_embeddings)
  double beta_fast = 32.0;
  double beta_slow = 1.0;
  double mscale = 0.0;
  double mscale_all_dim = 0.0;
  std::optional<double> attention_factor;  // HF's explicit override of the cos/sin amplitude
  bool truncate = true;                    // HF: floor/ceil the correction range (DeepSeek: true)
};

struct ModelConfig {
  // --- sizes (config.json names) ---
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;      // dense SwiGLU width
  int64_t moe_intermediate_size = 0;  // per-expert SwiGLU width
  int64_t num_hidden_layers = 0;
  int64_t first_k_dense_replace = 0;
  int64_t moe_layer_freq = 1;
  int64_t num_attention_heads = 0;
  int64_t max_position_embeddings = 0;
  int64_t num_nextn_predict_layers = 0;  // MTP depth D (layers at index num_hidden_layers .. +D-1)

  // --- MoE router ---
  int64_t n_routed_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t n_group = 1;
  int64_t topk_group = 1;
  int64_t n_shared_experts = 0;
  double routed_scaling_factor = 1.0;
  bool norm_topk_prob = true;
  std::string scoring_func = "sigmoid";  // only sigmoid accepted
  std::string topk_method = "noaux_tc";  // only noaux_tc accepted

  // --- MLA ---
  int64_t q_lora_rank = 0;  // 0: no query compression (HF null, official 0) → q_proj
  int64_t kv_lora_rank = 0;
  int64_t qk_nope_head_dim = 0;
  int64_t qk_rope_head_dim = 0;
  int64_t v_head_dim = 0;

  // --- RoPE, norms, misc ---
  double rope_theta = 10000.0;
  std::optional<YarnScaling> rope_scaling;  // nullopt: plain RoPE
  double rms_norm_eps = 1e-6;
  double initializer_range = 0.02;  // Megatron's --init-method-std
  std::optional<int64_t> pad_token_id;
  std::optional<int64_t> bos_token_id;
  std::optional<int64_t> eos_token_id;
  bool tie_word_embeddings = false;  // must be false (rejected by name)
  bool attention_bias = false;       // must be false (rejected by name)

  // --- semantic fields where Megatron-Core and HF differ (fill_semantics) ---
  ConfigSource source = ConfigSource::kHuggingFace;
  // Group score = sum of the top `group_score_topk` biased scores in each group. HF: 2; Megatron:
  // topk/topk_group.
  int64_t group_score_topk = 2;
  // eps of q_a_layernorm / kv_a_layernorm. HF: fixed 1e-6; Megatron: --norm-epsilon (= rms_norm_eps).
  double latent_norm_eps = 1e-6;
  // Renormalise the selected top-k weights to sum 1. HF: norm_topk_prob; Megatron: always for sigmoid top-k
  // > 1.
  bool always_renormalise = true;
  // Multiplier of 1/sqrt(qk_head_dim) in the attention softmax (YaRN m²). HF: mscale(factor, mscale_all_dim)²
  // (1 when mscale_all_dim is absent); Megatron: mscale(factor, mscale)².
  double yarn_softmax_mscale = 1.0;
  // Amplitude multiplier of cos/sin (HF "attention_factor"). Both: mscale(f, mscale)/mscale(f,
  // mscale_all_dim); HF falls back to mscale(f, 1) when either is absent, or uses
  // rope_scaling.attention_factor when given.
  double yarn_attention_factor = 1.0;

  // --- derived ---
  int64_t qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
  bool has_q_lora() const { return q_lora_rank > 0; }
  int64_t num_layers_with_mtp() const { return num_hidden_layers + num_nextn_predict_layers; }
  // The context length YaRN's correction range uses: rope_scaling.original_max_position_embeddings, or (as HF
  // falls back) max_position_embeddings when absent.
  int64_t yarn_original_max_position() const {
    return rope_scaling && rope_scaling->original_max_position_embeddings > 0
               ? rope_scaling->original_max_position_embeddings
               : max_position_embeddings;
  }
  // Softmax scale of MLA: yarn_softmax_mscale / sqrt(qk_head_dim).
  double softmax_scale() const;
  // Layer i (0 <= i < num_layers_with_mtp()) uses MoE iff i >= first_k_dense_replace && i % moe_layer_freq ==
  // 0 (the hub modeling code's rule; transformers' native class ignores moe_layer_freq, see to_hf_json).
  bool is_moe_layer(int64_t i) const;
  bool is_mtp_layer(int64_t i) const { return i >= num_hidden_layers && i < num_layers_with_mtp(); }
  int64_t num_moe_layers() const;    // among the main layers
  int64_t num_dense_layers() const;  // among the main layers

  // Throws dsv3::Error naming the field on anything unsupported or inconsistent.
  void validate() const;

  // Parses a HuggingFace config.json. A `dsv3_semantics` object (written by to_hf_json) restores the source
  // and any explicitly given semantic field; otherwise the semantic fields are filled HF-style.
  static ModelConfig from_json_string(const std::string& text, const std::string& origin = "<string>");
  static ModelConfig from_json_file(const std::string& path);

  // A config.json transformers 4.57 loads as DeepseekV3ForCausalLM. When a semantic field differs from what
  // HF would compute from the written fields (or moe_layer_freq != 1), a `dsv3_semantics` object records the
  // values and a note says what HF would do instead — never silently.
  std::string to_hf_json(const std::string& torch_dtype = "float32") const;
};

// Fills group_score_topk, latent_norm_eps, always_renormalise, yarn_softmax_mscale and yarn_attention_factor
// the way `source` computes them, and sets cfg.source.
void fill_semantics(ModelConfig& cfg, ConfigSource source);

// YaRN's mscale(f, m) = 0.1·m·ln f + 1 for f > 1, else 1.
double yarn_get_mscale(double factor, double mscale);

// Human-readable differences between what dsv3 computes for cfg and what transformers 4.57 would compute from
// cfg's HF fields (empty when they agree): the semantic fields, the group mask value (-inf for Megatron
// source, 0.0 in transformers 4.57), and moe_layer_freq (ignored by transformers' native class).
std::vector<std::string> semantic_differences_from_hf(const ModelConfig& cfg);

}  // namespace dsv3
