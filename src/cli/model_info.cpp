// `dsv3 model-info`: loads a HF config.json, prints its layer plan, the Megatron/HF semantic fields and the
// parameter counts from the parameter table (optionally the whole table).
#include "cli/model_info.h"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "model/config.h"
#include "model/param_table.h"

namespace dsv3::cli {
namespace {

std::string grouped(int64_t v) {
  std::string s = std::to_string(v < 0 ? -v : v);
  for (int i = static_cast<int>(s.size()) - 3; i > 0; i -= 3) s.insert(static_cast<size_t>(i), ",");
  return v < 0 ? "-" + s : s;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string range(int64_t a, int64_t b) {
  return a == b ? "layer  " + std::to_string(a) : "layers " + std::to_string(a) + "-" + std::to_string(b);
}

}  // namespace

int model_info_main(int argc, char** argv) {
  CLI::App app{"Show a DeepSeek-V3 model config: layer plan, semantics and parameter counts",
               "dsv3 model-info"};
  std::string config_path;
  bool list_params = false;
  app.add_option("--model-config", config_path, "HuggingFace config.json of the model")->required();
  app.add_flag("--params", list_params, "Also list every parameter (HF name, shape, role, init)");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  const ModelConfig cfg = ModelConfig::from_json_file(config_path);
  const ParamTable table(cfg);

  std::printf("model config: %s\n", config_path.c_str());
  std::printf(
      "semantics: %s (group_score_topk %lld, latent_norm_eps %g, always_renormalise %s, "
      "yarn_softmax_mscale %.10g, yarn_attention_factor %.10g)\n",
      config_source_name(cfg.source), static_cast<long long>(cfg.group_score_topk), cfg.latent_norm_eps,
      cfg.always_renormalise ? "true" : "false", cfg.yarn_softmax_mscale, cfg.yarn_attention_factor);
  for (const auto& d : semantic_differences_from_hf(cfg))
    std::printf("  differs from transformers: %s\n", d.c_str());
  std::printf(
      "attention: MLA, %lld heads, q_lora %s, kv_lora %lld, qk %lld+%lld (rope), v %lld, softmax scale "
      "%.10g\n",
      static_cast<long long>(cfg.num_attention_heads),
      cfg.has_q_lora() ? std::to_string(cfg.q_lora_rank).c_str() : "none",
      static_cast<long long>(cfg.kv_lora_rank), static_cast<long long>(cfg.qk_nope_head_dim),
      static_cast<long long>(cfg.qk_rope_head_dim), static_cast<long long>(cfg.v_head_dim),
      cfg.softmax_scale());
  if (cfg.rope_scaling)
    std::printf("rope: theta %g, YaRN factor %g over %lld original positions (beta %g/%g)\n", cfg.rope_theta,
                cfg.rope_scaling->factor,
                static_cast<long long>(cfg.rope_scaling->original_max_position_embeddings),
                cfg.rope_scaling->beta_fast, cfg.rope_scaling->beta_slow);
  else
    std::printf("rope: theta %g, no scaling\n", cfg.rope_theta);
  std::printf("norms: rms_norm_eps %g, latent norms %g; max_position_embeddings %lld; vocab %lld\n",
              cfg.rms_norm_eps, cfg.latent_norm_eps, static_cast<long long>(cfg.max_position_embeddings),
              static_cast<long long>(cfg.vocab_size));

  std::printf("layer plan (%lld main layers: %lld dense, %lld MoE; %lld MTP):\n",
              static_cast<long long>(cfg.num_hidden_layers), static_cast<long long>(cfg.num_dense_layers()),
              static_cast<long long>(cfg.num_moe_layers()),
              static_cast<long long>(cfg.num_nextn_predict_layers));
  const std::string moe_desc =
      "MoE    MLA + " + std::to_string(cfg.n_routed_experts) + " experts x " +
      std::to_string(cfg.moe_intermediate_size) + " (top-" + std::to_string(cfg.num_experts_per_tok) + ", " +
      std::to_string(cfg.n_group) + " groups choose " + std::to_string(cfg.topk_group) + ") + " +
      std::to_string(cfg.n_shared_experts) + " shared x " + std::to_string(cfg.moe_intermediate_size);
  const std::string dense_desc = "dense  MLA + SwiGLU " + std::to_string(cfg.intermediate_size);
  for (int64_t i = 0; i < cfg.num_hidden_layers;) {
    int64_t j = i;
    while (j + 1 < cfg.num_hidden_layers && cfg.is_moe_layer(j + 1) == cfg.is_moe_layer(i)) ++j;
    std::printf("  %-14s %s\n", range(i, j).c_str(), (cfg.is_moe_layer(i) ? moe_desc : dense_desc).c_str());
    i = j + 1;
  }
  for (int64_t i = cfg.num_hidden_layers; i < cfg.num_layers_with_mtp(); ++i)
    std::printf(
        "  %-14s MTP    enorm/hnorm + eh_proj [%lld, %lld] + %s decoder layer; embedding and head shared\n",
        range(i, i).c_str(), static_cast<long long>(cfg.hidden_size),
        static_cast<long long>(2 * cfg.hidden_size), cfg.is_moe_layer(i) ? "MoE" : "dense");

  std::printf("parameters:\n");
  std::printf("  total, main model (excl. MTP):                 %s\n", grouped(table.total_main()).c_str());
  std::printf("  active per token (incl. embedding and head):   %s\n", grouped(table.active_main()).c_str());
  std::printf("  active per token (excl. embedding):            %s\n",
              grouped(table.active_main_excl_embedding()).c_str());
  if (cfg.num_nextn_predict_layers > 0) {
    std::printf("  MTP unique (excl. shared embedding/head):      %s (active per token %s)\n",
                grouped(table.total_mtp_unique()).c_str(), grouped(table.active_mtp_unique()).c_str());
    std::printf("  trained in total (main + MTP):                 %s\n",
                grouped(table.total_trainable_storage()).c_str());
    std::printf("  as the hub stores it (MTP embed/head copies):  %s\n", grouped(table.hub_total()).c_str());
  }
  if (list_params) {
    std::printf("parameter table (%zu entries):\n", table.size());
    for (const auto& p : table.params()) {
      std::string init = p.init == InitKind::kOnes ? "ones" : p.init == InitKind::kZeros ? "zeros" : "";
      if (init.empty()) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "normal(0, %.6g)", p.init_std);
        init = buf;
      }
      if (!p.tied_to.empty()) init = "= " + p.tied_to;
      std::printf("  %-60s %-16s %-13s %s%s%s\n", p.name.c_str(), shape_str(p.shape).c_str(),
                  param_role_name(p.role), init.c_str(), p.is_expert ? " expert" : "",
                  p.weight_decay ? "" : " no-wd");
    }
  }
  return 0;
}

}  // namespace dsv3::cli
