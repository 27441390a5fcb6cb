// Megatron flag → ModelConfig field mapping (names in Megatron's arguments.py, fields in HF's config.json).
#include "train/model_from_args.h"

#include <algorithm>
#include <regex>

#include "core/error.h"

namespace dsv3 {
namespace {

std::string dash_name(std::string dest) {
  std::replace(dest.begin(), dest.end(), '_', '-');
  return dest;
}

}  // namespace

void parse_moe_layer_freq(const std::string& expr_in, int64_t num_layers, int64_t& first_k_dense,
                          int64_t& freq) {
  // Megatron evaluates the string as Python, so the seed's "([0]*3+[1]*58)" is valid too.
  std::string expr = expr_in;
  while (expr.size() >= 2 && expr.front() == '(' && expr.back() == ')')
    expr = expr.substr(1, expr.size() - 2);
  std::smatch m;
  if (std::regex_match(expr, m, std::regex(R"(\s*(\d+)\s*)"))) {
    first_k_dense = 0, freq = std::stoll(m[1]);
    return;
  }
  // Expand a list expression made of "[a, b, ...]*n" terms joined by '+'.
  std::vector<int> pattern;
  const std::regex term(R"(\s*\[([01,\s]*)\]\s*(?:\*\s*(\d+))?\s*(\+|$))");
  auto it = expr.cbegin();
  while (it != expr.cend()) {
    DSV3_CHECK(std::regex_search(it, expr.cend(), m, term, std::regex_constants::match_continuous),
               "--moe-layer-freq ", expr, ": expected an int or a list expression like [0]*3+[1]*58");
    std::vector<int> items;
    for (char c : m[1].str())
      if (c == '0' || c == '1') items.push_back(c - '0');
    const int n = m[2].matched ? std::stoi(m[2]) : 1;
    for (int r = 0; r < n; ++r) pattern.insert(pattern.end(), items.begin(), items.end());
    it = m[0].second;
  }
  DSV3_CHECK(static_cast<int64_t>(pattern.size()) == num_layers, "--moe-layer-freq ", expr, " describes ",
             pattern.size(), " layers but --num-layers is ", num_layers);
  first_k_dense = 0;
  while (first_k_dense < num_layers && pattern[first_k_dense] == 0) ++first_k_dense;
  for (int64_t i = first_k_dense; i < num_layers; ++i)
    DSV3_CHECK(pattern[i] == 1, "--moe-layer-freq ", expr,
               ": only 'first k dense, then all MoE' patterns are supported (layer ", i, " is dense)");
  freq = 1;
}

void check_architecture_flags(const TrainArgs& a) {
  // Megatron's defaults (LayerNorm, learned positions, dropout 0.1) matter only for a flag-built model, below.
  DSV3_CHECK(!a.given("normalization") || a.s("normalization") == "RMSNorm", "--normalization ",
             a.s("normalization"), " is not supported: DeepSeek-V3 uses RMSNorm");
  DSV3_CHECK(!a.given("position_embedding_type") || a.s("position_embedding_type") == "rope",
             "--position-embedding-type ", a.s("position_embedding_type"),
             " is not supported: DeepSeek-V3's attention uses RoPE");
  for (const char* dest : {"attention_dropout", "hidden_dropout"})
    if (a.given(dest))
      DSV3_CHECK(a.f(dest) == 0.0, "--", dash_name(dest), " ", a.s(dest),
                 " is not supported: dsv3 has no dropout (DeepSeek-V3 pretrains without it); pass 0");
  if (a.given("model_config")) return;  // the file describes the architecture
  // Without these flags Megatron builds another model (standard attention, GELU MLP, LayerNorm, learned positions,
  // tied embeddings, biases, dropout 0.1, softmax routing), so a flag-built model must name every one.
  const struct {
    const char *dest, *flag;
  } required[] = {{"multi_latent_attention", "--multi-latent-attention"},
                  {"qk_layernorm", "--qk-layernorm"},
                  {"swiglu", "--swiglu"},
                  {"normalization", "--normalization RMSNorm"},
                  {"position_embedding_type", "--position-embedding-type rope"},
                  {"untie_embeddings_and_output_weights", "--untie-embeddings-and-output-weights"},
                  {"disable_bias_linear", "--disable-bias-linear"},
                  {"attention_dropout", "--attention-dropout 0"},
                  {"hidden_dropout", "--hidden-dropout 0"},
                  {"moe_router_score_function", "--moe-router-score-function sigmoid"}};
  std::string missing;
  for (const auto& r : required)
    if (!a.given(r.dest)) missing += std::string(missing.empty() ? "" : " ") + r.flag;
  DSV3_CHECK(missing.empty(),
             "a model built from flags (no --model-config) must name DeepSeek-V3's architecture, "
             "or Megatron would build another model from its defaults; missing: ",
             missing);
}

ModelConfig model_config_from_args(const TrainArgs& a, int64_t tokenizer_size) {
  ModelConfig c;
  check_architecture_flags(a);
  const bool from_file = a.given("model_config");
  if (from_file) {
    c = ModelConfig::from_json_file(a.s("model_config"));
  } else {
    for (const char* req : {"num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                            "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim", "num_experts",
                            "moe_ffn_hidden_size", "moe_router_topk"})
      DSV3_CHECK(a.given(req), "--", req, " is required when no --model-config is given");
    c.rope_theta = 10000.0, c.rms_norm_eps = 1e-5, c.initializer_range = 0.02;
    c.n_group = 1, c.topk_group = 1, c.routed_scaling_factor = 1.0, c.norm_topk_prob = true;
  }
  auto set_i = [&](const char* dest, int64_t& field) {
    if (a.given(dest)) field = a.i(dest);
  };
  auto set_f = [&](const char* dest, double& field) {
    if (a.given(dest)) field = a.f(dest);
  };
  set_i("num_layers", c.num_hidden_layers);
  set_i("hidden_size", c.hidden_size);
  set_i("ffn_hidden_size", c.intermediate_size);
  set_i("num_attention_heads", c.num_attention_heads);
  set_i("q_lora_rank", c.q_lora_rank);
  set_i("kv_lora_rank", c.kv_lora_rank);
  set_i("qk_head_dim", c.qk_nope_head_dim);
  set_i("qk_pos_emb_head_dim", c.qk_rope_head_dim);
  set_i("v_head_dim", c.v_head_dim);
  set_f("norm_epsilon", c.rms_norm_eps);
  set_f("rotary_base", c.rope_theta);
  set_f("init_method_std", c.initializer_range);
  set_i("num_experts", c.n_routed_experts);
  set_i("moe_ffn_hidden_size", c.moe_intermediate_size);
  set_i("moe_router_topk", c.num_experts_per_tok);
  set_i("moe_router_num_groups", c.n_group);
  set_i("moe_router_group_topk", c.topk_group);
  set_f("moe_router_topk_scaling_factor", c.routed_scaling_factor);
  set_i("mtp_num_layers", c.num_nextn_predict_layers);
  if (a.given("moe_shared_expert_intermediate_size")) {
    const int64_t s = a.i("moe_shared_expert_intermediate_size");
    DSV3_CHECK(c.moe_intermediate_size > 0 && s % c.moe_intermediate_size == 0,
               "--moe-shared-expert-intermediate-size ", s, " must be a multiple of --moe-ffn-hidden-size ",
               c.moe_intermediate_size);
    c.n_shared_experts = s / c.moe_intermediate_size;
  }
  if (a.given("moe_layer_freq"))
    parse_moe_layer_freq(a.s("moe_layer_freq"), c.num_hidden_layers, c.first_k_dense_replace,
                         c.moe_layer_freq);
  if (a.given("max_position_embeddings")) c.max_position_embeddings = a.i("max_position_embeddings");
  // Flag-built models size their positions from --seq-length, as Megatron does without the flag.
  if (!from_file && !a.given("max_position_embeddings") && a.given("seq_length"))
    c.max_position_embeddings = a.i("seq_length");
  DSV3_CHECK(a.s("moe_router_score_function") == "sigmoid", "--moe-router-score-function ",
             a.s("moe_router_score_function"), " is not supported (DeepSeek-V3 routes with sigmoid)");
  if (!from_file) {
    // Megatron pads the tokenizer's vocab to a multiple of make_vocab_size_divisible_by × TP.
    DSV3_CHECK(tokenizer_size > 0,
               "--tokenizer-model is needed to size the vocabulary without --model-config");
    const int64_t mult = a.i("make_vocab_size_divisible_by") * a.i("tensor_model_parallel_size");
    c.vocab_size = (tokenizer_size + mult - 1) / mult * mult;
    fill_semantics(c, ConfigSource::kMegatron);
  }
  c.validate();
  return c;
}

}  // namespace dsv3
