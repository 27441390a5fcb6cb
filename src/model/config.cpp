// config.json parsing, validation, Megatron-vs-HF semantic filling and the HF writer for ModelConfig.
#include "model/config.h"

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"

namespace dsv3 {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

const char* config_source_name(ConfigSource s) {
  return s == ConfigSource::kMegatron ? "megatron" : "huggingface";
}

double yarn_get_mscale(double factor, double mscale) {
  if (factor <= 1.0) return 1.0;
  return 0.1 * mscale * std::log(factor) + 1.0;
}

double ModelConfig::softmax_scale() const {
  return yarn_softmax_mscale / std::sqrt(static_cast<double>(qk_head_dim()));
}

bool ModelConfig::is_moe_layer(int64_t i) const {
  return i >= first_k_dense_replace && moe_layer_freq > 0 && i % moe_layer_freq == 0;
}

int64_t ModelConfig::num_moe_layers() const {
  int64_t n = 0;
  for (int64_t i = 0; i < num_hidden_layers; ++i) n += is_moe_layer(i);
  return n;
}

int64_t ModelConfig::num_dense_layers() const {
  return num_hidden_layers - num_moe_layers();
}

void fill_semantics(ModelConfig& c, ConfigSource source) {
  c.source = source;
  const bool yarn = c.rope_scaling.has_value();
  const double f = yarn ? c.rope_scaling->factor : 1.0;
  if (source == ConfigSource::kHuggingFace) {
    // transformers 4.57 DeepseekV3TopkRouter: `.topk(2, dim=-1)[0].sum(-1)` — hard-coded 2.
    c.group_score_topk = 2;
    // DeepseekV3Attention builds q_a_layernorm / kv_a_layernorm without rms_norm_eps: the class default 1e-6.
    c.latent_norm_eps = 1e-6;
    c.always_renormalise = c.norm_topk_prob;
    // DeepseekV3Attention: scaling *= mscale² only when rope_scaling is set and mscale_all_dim is truthy.
    c.yarn_softmax_mscale = 1.0;
    if (yarn && c.rope_scaling->mscale_all_dim != 0.0) {
      const double m = yarn_get_mscale(f, c.rope_scaling->mscale_all_dim);
      c.yarn_softmax_mscale = m * m;
    }
    // modeling_rope_utils._compute_yarn_parameters.
    c.yarn_attention_factor = 1.0;
    if (yarn) {
      const auto& y = *c.rope_scaling;
      if (y.attention_factor)
        c.yarn_attention_factor = *y.attention_factor;
      else if (y.mscale != 0.0 && y.mscale_all_dim != 0.0)
        c.yarn_attention_factor = yarn_get_mscale(f, y.mscale) / yarn_get_mscale(f, y.mscale_all_dim);
      else
        c.yarn_attention_factor = yarn_get_mscale(f, 1.0);
    }
  } else {
    // Megatron-Core group_limited_topk: sum of the top topk/group_topk scores per group.
    c.group_score_topk = c.topk_group > 0 ? c.num_experts_per_tok / c.topk_group : 0;
    // MLA's q_layernorm / kv_layernorm are built with config.layernorm_epsilon (--norm-epsilon).
    c.latent_norm_eps = c.rms_norm_eps;
    // topk_softmax_with_capacity, sigmoid path: `if topk > 1: probs = scores / (sum + 1e-20)`.
    c.always_renormalise = c.num_experts_per_tok > 1;
    // MLASelfAttention: softmax_scale = mscale(factor, mscale)² / sqrt(qk_head_dim); an absent mscale is 1.0.
    const double ms = yarn && c.rope_scaling->mscale != 0.0 ? c.rope_scaling->mscale : 1.0;
    const double ms_all =
        yarn && c.rope_scaling->mscale_all_dim != 0.0 ? c.rope_scaling->mscale_all_dim : 1.0;
    const double m = yarn ? yarn_get_mscale(f, ms) : 1.0;
    c.yarn_softmax_mscale = m * m;
    // YarnRotaryEmbedding: cos/sin scaled by mscale(f, mscale) / mscale(f, mscale_all_dim).
    c.yarn_attention_factor = yarn ? yarn_get_mscale(f, ms) / yarn_get_mscale(f, ms_all) : 1.0;
  }
}

std::vector<std::string> semantic_differences_from_hf(const ModelConfig& cfg) {
  ModelConfig hf = cfg;
  hf.norm_topk_prob = cfg.always_renormalise;  // what to_hf_json writes
  fill_semantics(hf, ConfigSource::kHuggingFace);
  std::vector<std::string> out;
  auto num = [](double v) {
    std::ostringstream os;
    os.precision(10);
    os << v;
    return os.str();
  };
  if (hf.group_score_topk != cfg.group_score_topk)
    out.push_back("group_score_topk: dsv3 sums the top " + std::to_string(cfg.group_score_topk) +
                  " scores per expert group; transformers hard-codes 2");
  if (hf.latent_norm_eps != cfg.latent_norm_eps)
    out.push_back("latent_norm_eps: dsv3 uses " + num(cfg.latent_norm_eps) +
                  " for q_a_layernorm/kv_a_layernorm; transformers always uses 1e-06");
  if (std::abs(hf.yarn_softmax_mscale - cfg.yarn_softmax_mscale) > 1e-12 * std::abs(cfg.yarn_softmax_mscale))
    out.push_back(
        "yarn_softmax_mscale: dsv3 multiplies the softmax scale by " + num(cfg.yarn_softmax_mscale) +
        "; transformers computes mscale(factor, mscale_all_dim)^2 = " + num(hf.yarn_softmax_mscale));
  if (std::abs(hf.yarn_attention_factor - cfg.yarn_attention_factor) >
      1e-12 * std::abs(cfg.yarn_attention_factor))
    out.push_back("yarn_attention_factor: dsv3 scales rotary cos/sin by " + num(cfg.yarn_attention_factor) +
                  "; transformers computes " + num(hf.yarn_attention_factor));
  if (cfg.source == ConfigSource::kMegatron && cfg.num_moe_layers() + cfg.num_nextn_predict_layers > 0 &&
      cfg.topk_group < cfg.n_group)
    out.push_back(
        "group mask: dsv3 (Megatron) excludes experts of unselected groups with -inf; transformers 4.57 "
        "masks them with 0.0, which differs only when a selected group's biased scores are negative");
  if (cfg.moe_layer_freq != 1)
    out.push_back(
        "moe_layer_freq: dsv3 makes layer i MoE iff i >= first_k_dense_replace and i % " +
        std::to_string(cfg.moe_layer_freq) +
        " == 0; transformers' native DeepseekV3 ignores moe_layer_freq (the hub modeling code honours it)");
  return out;
}

namespace {

// Field accessors that name the file and key in every error.
struct Reader {
  const json& j;
  const std::string& origin;

  bool has(const char* k) const { return j.contains(k) && !j.at(k).is_null(); }

  int64_t integer(const char* k) const {
    DSV3_CHECK(has(k), origin, ": config field '", k, "' is required");
    const json& v = j.at(k);
    // Out of int64 range is an error, never a wrapped (unsigned) or undefined (float) conversion.
    if (v.is_number_unsigned())
      DSV3_CHECK(v.get<uint64_t>() <= uint64_t(INT64_MAX), origin, ": config field '", k,
                 "' is out of range, got ", v.dump());
    if (v.is_number_integer()) return v.get<int64_t>();
    if (v.is_number_float()) {
      double d = v.get<double>();
      DSV3_CHECK(d == std::floor(d), origin, ": config field '", k, "' must be an integer, got ", d);
      DSV3_CHECK(d >= -0x1p63 && d < 0x1p63, origin, ": config field '", k, "' is out of range, got ",
                 v.dump());
      return static_cast<int64_t>(d);
    }
    fail(origin, ": config field '", k, "' must be an integer, got ", v.dump());
  }
  int64_t integer(const char* k, int64_t def) const { return has(k) ? integer(k) : def; }

  double number(const json& v, const std::string& k) const {
    DSV3_CHECK(v.is_number(), origin, ": config field '", k, "' must be a number, got ", v.dump());
    return v.get<double>();
  }
  double number(const char* k) const {
    DSV3_CHECK(has(k), origin, ": config field '", k, "' is required");
    return number(j.at(k), k);
  }
  double number(const char* k, double def) const { return has(k) ? number(k) : def; }

  bool boolean(const char* k, bool def) const {
    if (!has(k)) return def;
    DSV3_CHECK(j.at(k).is_boolean(), origin, ": config field '", k, "' must be true or false, got ",
               j.at(k).dump());
    return j.at(k).get<bool>();
  }
  std::string string(const char* k, const std::string& def) const {
    if (!has(k)) return def;
    DSV3_CHECK(j.at(k).is_string(), origin, ": config field '", k, "' must be a string, got ",
               j.at(k).dump());
    return j.at(k).get<std::string>();
  }
};

std::optional<YarnScaling> parse_rope_scaling(const json& rs, const std::string& origin) {
  if (rs.is_null()) return std::nullopt;
  DSV3_CHECK(rs.is_object(), origin, ": config field 'rope_scaling' must be an object or null");
  std::string type;
  if (rs.contains("rope_type") && rs["rope_type"].is_string()) type = rs["rope_type"].get<std::string>();
  if (rs.contains("type") && rs["type"].is_string()) {
    std::string t = rs["type"].get<std::string>();
    DSV3_CHECK(type.empty() || type == t, origin, ": rope_scaling has type '", t, "' and rope_type '", type,
               "'");
    type = t;
  }
  if (type == "default") return std::nullopt;
  DSV3_CHECK(type == "yarn", origin, ": rope_scaling type '", type,
             "' is not supported (DeepSeek-V3 uses 'yarn', or no rope_scaling)");
  Reader r{rs, origin};
  YarnScaling y;
  y.factor = r.number("factor");
  DSV3_CHECK(y.factor >= 1.0, origin, ": rope_scaling.factor must be >= 1, got ", y.factor);
  y.original_max_position_embeddings = r.integer("original_max_position_embeddings", 0);
  y.beta_fast = r.number("beta_fast", 32.0);
  y.beta_slow = r.number("beta_slow", 1.0);
  y.mscale = r.number("mscale", 0.0);
  y.mscale_all_dim = r.number("mscale_all_dim", 0.0);
  if (r.has("attention_factor")) y.attention_factor = r.number("attention_factor");
  y.truncate = r.boolean("truncate", true);
  return y;
}

}  // namespace

ModelConfig ModelConfig::from_json_string(const std::string& text, const std::string& origin) {
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    fail(origin, ": not valid JSON: ", e.what());
  }
  DSV3_CHECK(j.is_object(), origin, ": a model config must be a JSON object");
  Reader r{j, origin};
  ModelConfig c;

  const std::string model_type = r.string("model_type", "deepseek_v3");
  DSV3_CHECK(model_type == "deepseek_v3", origin, ": model_type '", model_type,
             "' is not supported (only deepseek_v3)");

  c.vocab_size = r.integer("vocab_size");
  c.hidden_size = r.integer("hidden_size");
  c.intermediate_size = r.integer("intermediate_size");
  c.moe_intermediate_size = r.integer("moe_intermediate_size");
  c.num_hidden_layers = r.integer("num_hidden_layers");
  c.first_k_dense_replace = r.integer("first_k_dense_replace", 0);
  c.moe_layer_freq = r.integer("moe_layer_freq", 1);
  c.num_attention_heads = r.integer("num_attention_heads");
  c.max_position_embeddings = r.integer("max_position_embeddings");
  c.num_nextn_predict_layers = r.integer("num_nextn_predict_layers", 0);

  c.n_routed_experts = r.integer("n_routed_experts");
  c.num_experts_per_tok = r.integer("num_experts_per_tok");
  c.n_group = r.integer("n_group", 1);
  c.topk_group = r.integer("topk_group", 1);
  c.n_shared_experts = r.integer("n_shared_experts", 0);
  c.routed_scaling_factor = r.number("routed_scaling_factor", 1.0);
  c.norm_topk_prob = r.boolean("norm_topk_prob", true);
  c.scoring_func = r.string("scoring_func", "sigmoid");
  c.topk_method = r.string("topk_method", "noaux_tc");

  c.q_lora_rank = r.integer("q_lora_rank", 0);  // null and 0 both mean "no query compression"
  c.kv_lora_rank = r.integer("kv_lora_rank");
  c.qk_nope_head_dim = r.integer("qk_nope_head_dim");
  c.qk_rope_head_dim = r.integer("qk_rope_head_dim");
  c.v_head_dim = r.integer("v_head_dim");

  c.rope_theta = r.number("rope_theta", 10000.0);
  if (j.contains("rope_scaling")) c.rope_scaling = parse_rope_scaling(j["rope_scaling"], origin);
  c.rms_norm_eps = r.number("rms_norm_eps", 1e-6);
  c.initializer_range = r.number("initializer_range", 0.02);
  if (r.has("pad_token_id")) c.pad_token_id = r.integer("pad_token_id");
  if (r.has("bos_token_id")) c.bos_token_id = r.integer("bos_token_id");
  if (r.has("eos_token_id") && j["eos_token_id"].is_number()) c.eos_token_id = r.integer("eos_token_id");
  c.tie_word_embeddings = r.boolean("tie_word_embeddings", false);
  c.attention_bias = r.boolean("attention_bias", false);

  // Fields that would change the math but have only one supported value.
  const std::string act = r.string("hidden_act", "silu");
  DSV3_CHECK(act == "silu", origin, ": hidden_act '", act, "' is not supported (DeepSeek-V3 uses silu)");
  DSV3_CHECK(r.boolean("rope_interleave", true), origin,
             ": rope_interleave false is not supported (DeepSeek weights store rope rows interleaved)");
  if (r.has("num_key_value_heads"))
    DSV3_CHECK(r.integer("num_key_value_heads") == c.num_attention_heads, origin, ": num_key_value_heads (",
               r.integer("num_key_value_heads"), ") must equal num_attention_heads (", c.num_attention_heads,
               "): MLA has no grouped-query attention");
  if (r.has("attention_dropout"))
    DSV3_CHECK(r.number("attention_dropout") == 0.0, origin, ": attention_dropout must be 0");

  fill_semantics(c, ConfigSource::kHuggingFace);
  if (j.contains("dsv3_semantics") && !j["dsv3_semantics"].is_null()) {
    const json& s = j["dsv3_semantics"];
    DSV3_CHECK(s.is_object(), origin, ": dsv3_semantics must be an object");
    Reader sr{s, origin};
    const std::string src = sr.string("source", "huggingface");
    if (src == "megatron")
      fill_semantics(c, ConfigSource::kMegatron);
    else
      DSV3_CHECK(src == "huggingface", origin,
                 ": dsv3_semantics.source must be 'huggingface' or 'megatron', got '", src, "'");
    // Explicit values win over what the source would compute.
    c.group_score_topk = sr.integer("group_score_topk", c.group_score_topk);
    c.latent_norm_eps = sr.number("latent_norm_eps", c.latent_norm_eps);
    c.always_renormalise = sr.boolean("always_renormalise", c.always_renormalise);
    c.yarn_softmax_mscale = sr.number("yarn_softmax_mscale", c.yarn_softmax_mscale);
    c.yarn_attention_factor = sr.number("yarn_attention_factor", c.yarn_attention_factor);
  }
  try {
    c.validate();
  } catch (const Error& e) {
    fail(origin, ": ", e.what());
  }
  return c;
}

ModelConfig ModelConfig::from_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DSV3_CHECK(in.good(), "cannot open model config ", path);
  std::stringstream ss;
  ss << in.rdbuf();
  return from_json_string(ss.str(), path);
}

void ModelConfig::validate() const {
  auto positive = [](int64_t v, const char* name) { DSV3_CHECK(v > 0, name, " must be positive, got ", v); };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(num_hidden_layers, "num_hidden_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(kv_lora_rank, "kv_lora_rank");
  positive(qk_nope_head_dim, "qk_nope_head_dim");
  positive(qk_rope_head_dim, "qk_rope_head_dim");
  positive(v_head_dim, "v_head_dim");
  positive(max_position_embeddings, "max_position_embeddings");
  positive(moe_layer_freq, "moe_layer_freq");
  DSV3_CHECK(q_lora_rank >= 0, "q_lora_rank must be null or positive, got ", q_lora_rank);
  DSV3_CHECK(qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even, got ", qk_rope_head_dim);
  DSV3_CHECK(first_k_dense_replace >= 0, "first_k_dense_replace must be >= 0, got ", first_k_dense_replace);
  DSV3_CHECK(num_nextn_predict_layers >= 0, "num_nextn_predict_layers must be >= 0, got ",
             num_nextn_predict_layers);
  DSV3_CHECK(!tie_word_embeddings,
             "tie_word_embeddings true is not supported (DeepSeek-V3 unties the embedding "
             "and lm_head)");
  DSV3_CHECK(!attention_bias, "attention_bias true is not supported (DeepSeek-V3 has no linear biases)");
  DSV3_CHECK(scoring_func == "sigmoid", "scoring_func '", scoring_func,
             "' is not supported (only sigmoid, DeepSeek-V3's router)");
  DSV3_CHECK(topk_method == "noaux_tc", "topk_method '", topk_method,
             "' is not supported (only noaux_tc, DeepSeek-V3's biased group-limited top-k)");
  DSV3_CHECK(rms_norm_eps > 0 && latent_norm_eps > 0, "rms_norm_eps and latent_norm_eps must be positive");
  DSV3_CHECK(rope_theta > 0, "rope_theta must be positive, got ", rope_theta);
  DSV3_CHECK(initializer_range >= 0, "initializer_range must be >= 0, got ", initializer_range);
  if (pad_token_id)
    DSV3_CHECK(*pad_token_id >= 0 && *pad_token_id < vocab_size, "pad_token_id ", *pad_token_id,
               " is outside the vocabulary (vocab_size ", vocab_size, ")");
  if (rope_scaling) {
    DSV3_CHECK(rope_scaling->factor >= 1.0, "rope_scaling.factor must be >= 1, got ", rope_scaling->factor);
    DSV3_CHECK(rope_scaling->beta_fast > 0 && rope_scaling->beta_slow > 0,
               "rope_scaling.beta_fast and beta_slow must be positive");
  }
  bool any_moe = false, any_dense = false;
  for (int64_t i = 0; i < num_layers_with_mtp(); ++i) (is_moe_layer(i) ? any_moe : any_dense) = true;
  if (any_dense) positive(intermediate_size, "intermediate_size");
  if (any_moe) {
    positive(n_routed_experts, "n_routed_experts");
    positive(moe_intermediate_size, "moe_intermediate_size");
    positive(num_experts_per_tok, "num_experts_per_tok");
    positive(n_group, "n_group");
    positive(topk_group, "topk_group");
    DSV3_CHECK(n_shared_experts >= 0, "n_shared_experts must be >= 0, got ", n_shared_experts);
    DSV3_CHECK(n_routed_experts % n_group == 0, "n_routed_experts (", n_routed_experts,
               ") must be divisible by n_group (", n_group, ")");
    DSV3_CHECK(topk_group <= n_group, "topk_group (", topk_group, ") must be <= n_group (", n_group, ")");
    const int64_t per_group = n_routed_experts / n_group;
    DSV3_CHECK(num_experts_per_tok <= topk_group * per_group, "num_experts_per_tok (", num_experts_per_tok,
               ") exceeds the experts in topk_group groups (", topk_group, " x ", per_group, ")");
    DSV3_CHECK(group_score_topk >= 1 && group_score_topk <= per_group, "group_score_topk (", group_score_topk,
               ") must be in [1, experts per group = ", per_group, "]");
  }
}

std::string ModelConfig::to_hf_json(const std::string& torch_dtype) const {
  validate();
  ojson j;
  j["architectures"] = {"DeepseekV3ForCausalLM"};
  j["model_type"] = "deepseek_v3";
  j["vocab_size"] = vocab_size;
  j["hidden_size"] = hidden_size;
  j["intermediate_size"] = intermediate_size;
  j["moe_intermediate_size"] = moe_intermediate_size;
  j["num_hidden_layers"] = num_hidden_layers;
  j["first_k_dense_replace"] = first_k_dense_replace;
  j["moe_layer_freq"] = moe_layer_freq;
  j["num_attention_heads"] = num_attention_heads;
  j["num_key_value_heads"] = num_attention_heads;
  j["n_routed_experts"] = n_routed_experts;
  j["num_experts_per_tok"] = num_experts_per_tok;
  j["n_group"] = n_group;
  j["topk_group"] = topk_group;
  j["n_shared_experts"] = n_shared_experts;
  j["routed_scaling_factor"] = routed_scaling_factor;
  j["scoring_func"] = scoring_func;
  j["topk_method"] = topk_method;
  // HF reads norm_topk_prob to decide renormalisation, so write what dsv3 does.
  j["norm_topk_prob"] = always_renormalise;
  if (has_q_lora())
    j["q_lora_rank"] = q_lora_rank;
  else
    j["q_lora_rank"] = nullptr;
  j["kv_lora_rank"] = kv_lora_rank;
  j["qk_nope_head_dim"] = qk_nope_head_dim;
  j["qk_rope_head_dim"] = qk_rope_head_dim;
  j["v_head_dim"] = v_head_dim;
  j["hidden_act"] = "silu";
  j["rope_theta"] = rope_theta;
  if (rope_scaling) {
    ojson rs;
    rs["type"] = "yarn";
    rs["rope_type"] = "yarn";
    rs["factor"] = rope_scaling->factor;
    if (rope_scaling->original_max_position_embeddings > 0)
      rs["original_max_position_embeddings"] = rope_scaling->original_max_position_embeddings;
    rs["beta_fast"] = rope_scaling->beta_fast;
    rs["beta_slow"] = rope_scaling->beta_slow;
    if (rope_scaling->mscale != 0.0) rs["mscale"] = rope_scaling->mscale;
    if (rope_scaling->mscale_all_dim != 0.0) rs["mscale_all_dim"] = rope_scaling->mscale_all_dim;
    if (rope_scaling->attention_factor) rs["attention_factor"] = *rope_scaling->attention_factor;
    if (!rope_scaling->truncate) rs["truncate"] = false;
    j["rope_scaling"] = rs;
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["rope_interleave"] = true;
  j["max_position_embeddings"] = max_position_embeddings;
  j["rms_norm_eps"] = rms_norm_eps;
  j["initializer_range"] = initializer_range;
  j["num_nextn_predict_layers"] = num_nextn_predict_layers;
  j["attention_bias"] = false;
  j["attention_dropout"] = 0.0;
  j["tie_word_embeddings"] = false;
  j["pad_token_id"] = pad_token_id ? ojson(*pad_token_id) : ojson(nullptr);
  j["bos_token_id"] = bos_token_id ? ojson(*bos_token_id) : ojson(nullptr);
  j["eos_token_id"] = eos_token_id ? ojson(*eos_token_id) : ojson(nullptr);
  j["torch_dtype"] = torch_dtype;
  j["use_cache"] = true;
  const auto diffs = semantic_differences_from_hf(*this);
  if (source == ConfigSource::kMegatron || !diffs.empty()) {
    ojson s;
    s["source"] = config_source_name(source);
    s["group_score_topk"] = group_score_topk;
    s["latent_norm_eps"] = latent_norm_eps;
    s["always_renormalise"] = always_renormalise;
    s["yarn_softmax_mscale"] = yarn_softmax_mscale;
    s["yarn_attention_factor"] = yarn_attention_factor;
    if (diffs.empty()) {
      s["note"] = "filled Megatron-style; transformers computes the same for this config";
    } else {
      std::string note = "transformers computes differently from dsv3 here: ";
      for (size_t i = 0; i < diffs.size(); ++i) note += (i ? "; " : "") + diffs[i];
      s["note"] = note;
    }
    j["dsv3_semantics"] = s;
  }
  return j.dump(2) + "\n";
}

}  // namespace dsv3
