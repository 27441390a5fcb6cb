// `dsv3 model-info`: loads a HF config.json, prints its layer plan, the Megatron/HF semantic fields and the
// parameter counts from the parameter table (optionally the whole table), and, for a parallel layout, what
// each rank of each pipeline stage holds: its parameters (the ParamStore a training rank builds) and their
// static memory (fp32 weights and gradients, Adam moments, bf16 copies), then the memory plan of a training rank
// (train/memory_plan.h: activations, scratch, host buffers and the runtime) for the batch flags given.
#include "cli/model_info.h"

#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "core/error.h"
#include "model/config.h"
#include "model/param_store.h"
#include "model/param_table.h"
#include "train/memory_plan.h"

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

std::string gib(double bytes) {
  char b[32];
  std::snprintf(b, sizeof b, "%.2f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return b;
}

// Per pipeline stage, one rank's share (EP rank 0; every EP rank holds as many experts; under TP, TP rank 0: every
// TP rank holds as many elements of each split parameter, and the replicated ones whole). The expert grid folds
// TP x DP into ETP x EP x expert-DP (spec §8).
void print_layout(const ParamTable& table, int tp, int etp, int pp, int ep, int dp, int64_t first_layers,
                  int64_t last_layers, bool dist_opt, bool bf16) {
  const ModelConfig& cfg = table.config();
  DSV3_CHECK(tp >= 1 && etp >= 1 && pp >= 1 && ep >= 1 && dp >= 1, "model-info: parallel sizes must be >= 1");
  DSV3_CHECK((tp * dp) % (etp * ep) == 0, "model-info: --tensor-model-parallel-size x --data-parallel-size (",
             tp * dp,
             ") must be a multiple of --expert-tensor-parallel-size x --expert-model-parallel-size (",
             etp * ep, "): the expert grid folds the same ranks (rule: world % (ETP·EP·PP) == 0)");
  const int edp = tp * dp / (etp * ep);
  const auto stages = plan_pipeline_stages(cfg.num_hidden_layers, pp, first_layers, last_layers,
                                           cfg.num_nextn_predict_layers > 0);
  const std::string tp_part = tp > 1 ? "TP " + std::to_string(tp) + " x " : "";
  std::printf(
      "layout: %sPP %d x DP %d (ETP %d, EP %d, expert-DP %d) = %d ranks%s%s; per rank, the model's state:\n",
      tp_part.c_str(), pp, dp, etp, ep, edp, tp * pp * dp, dist_opt ? ", distributed optimizer" : "",
      bf16 ? ", bf16" : "");
  std::printf("  %-7s %-11s %19s %11s %11s %11s %11s\n", "stage", "layers", "parameters", "fp32 w+g", "Adam",
              "bf16 copies", "total");
  for (size_t q = 0; q < stages.size(); ++q) {
    const ParamStore store(table, ep, 0, stages[q], tp, 0);
    int64_t dense = 0, expert = 0, bf16_dense = 0;  // trainable, held by this rank
    for (const auto& p : table.params()) {
      if (!p.tied_to.empty() || !p.trainable || !store.contains(p.name)) continue;
      (p.is_expert ? expert : dense) += store.numel(p);
      if (!p.is_expert &&
          (p.role == ParamRole::kLinear || p.role == ParamRole::kOutputLinear || p.role == ParamRole::kHead))
        bf16_dense += store.numel(p);
    }
    const double wg = 8.0 * static_cast<double>(store.size());
    const double adam = 8.0 * (dist_opt ? static_cast<double>(dense) / dp + static_cast<double>(expert) / edp
                                        : static_cast<double>(dense + expert));
    const double copies = bf16 ? 2.0 * static_cast<double>(bf16_dense + expert) : 0.0;
    const std::string layers =
        std::to_string(stages[q].first_layer) + "-" + std::to_string(stages[q].last_layer - 1);
    std::printf("  %-7zu %-11s %19s %11s %11s %11s %11s\n", q, layers.c_str(), grouped(store.size()).c_str(),
                gib(wg).c_str(), gib(adam).c_str(), gib(copies).c_str(), gib(wg + adam + copies).c_str());
  }
}

}  // namespace

int model_info_main(int argc, char** argv) {
  CLI::App app{"Show a DeepSeek-V3 model config: layer plan, semantics and parameter counts",
               "dsv3 model-info"};
  std::string config_path;
  bool list_params = false;
  app.add_option("--model-config", config_path, "HuggingFace config.json of the model")->required();
  app.add_flag("--params", list_params, "Also list every parameter (HF name, shape, role, init)");
  int tp = 1, etp = -1, pp = 1, ep = 1, dp = 1;
  int64_t first_layers = 0, last_layers = 0;
  bool dist_opt = false, bf16 = false;
  app.add_option("--tensor-model-parallel-size", tp,
                 "Tensor-parallel ranks (heads, FFN widths and vocabulary split; world = TP x DP x PP)");
  app.add_option("--expert-tensor-parallel-size", etp,
                 "Routed experts split over this many TP ranks: TP (the default, Megatron's) or 1 (whole)");
  app.add_option("--pipeline-model-parallel-size", pp, "Pipeline stages of the layout to size");
  app.add_option("--expert-model-parallel-size", ep, "Expert-parallel ranks of the layout");
  app.add_option("--data-parallel-size", dp, "Data-parallel ranks (world = DP x PP)");
  app.add_option("--decoder-first-pipeline-num-layers", first_layers, "Layers of the first stage");
  app.add_option("--decoder-last-pipeline-num-layers", last_layers, "Layers of the last stage");
  app.add_flag("--use-distributed-optimizer", dist_opt,
               "Adam moments sharded over DP (experts over expert-DP)");
  app.add_flag("--bf16", bf16, "Count the bf16 weight copies bf16 training keeps");
  int64_t num_layers = 0;
  app.add_option("--num-layers", num_layers, "Decoder layers (overrides the config's num_hidden_layers)");
  MemoryRun run;
  int64_t global_batch = 0;
  std::string recompute, dispatcher = "allgather";
  app.add_option("--seq-length", run.seq, "Sequence length of the memory plan (default 4096)");
  app.add_option("--micro-batch-size", run.micro_batch, "Micro-batch size of the memory plan (default 1)");
  app.add_option(
      "--global-batch-size", global_batch,
      "Global batch (micro-batches per rank = global / (micro x DP); pipeline stages hold several)");
  app.add_option("--recompute-granularity", recompute, "full: only each layer's input is kept")
      ->check(CLI::IsMember({"full", "selective"}));
  app.add_option("--moe-expert-capacity-factor", run.capacity_factor, "Token dropping capacity factor");
  app.add_option("--moe-token-dispatcher-type", dispatcher, "EP dispatcher: allgather or alltoall")
      ->check(CLI::IsMember({"allgather", "alltoall"}));
  app.add_flag("--sequence-parallel", run.sequence_parallel, "Sequence parallelism (with TP > 1)");
  std::string device = "cpu";
  app.add_option("--device", device, "Plan a CPU rank's resident memory or a GPU's device memory")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  ModelConfig cfg = ModelConfig::from_json_file(config_path);
  if (num_layers > 0) {
    DSV3_CHECK(num_layers >= cfg.first_k_dense_replace, "model-info: --num-layers ", num_layers,
               " is fewer than the config's first_k_dense_replace (", cfg.first_k_dense_replace, ")");
    cfg.num_hidden_layers = num_layers;
  }
  if (etp < 0) etp = tp;
  DSV3_CHECK(etp == 1 || etp == tp, "model-info: --expert-tensor-parallel-size ", etp,
             ": 1 or the tensor model parallel size (", tp, ")");
  const ParamTable table(cfg, etp > 1);

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
  print_layout(table, tp, etp, pp, ep, dp, first_layers, last_layers, dist_opt, bf16);

  MemoryLayout layout;
  layout.tp = tp, layout.etp = etp, layout.pp = pp, layout.ep = ep, layout.dp = dp;
  layout.first_layers = first_layers, layout.last_layers = last_layers, layout.dist_opt = dist_opt;
  run.precision = bf16 ? Precision::kBF16 : Precision::kF32;
  run.recompute = recompute == "full";
  run.alltoall = dispatcher == "alltoall";
  run.cpu = device == "cpu";
  DSV3_CHECK(run.seq > 0 && run.micro_batch > 0,
             "model-info: --seq-length and --micro-batch-size must be > 0");
  if (global_batch > 0) {
    DSV3_CHECK(global_batch % (run.micro_batch * dp) == 0, "model-info: --global-batch-size (", global_batch,
               ") must be a multiple of --micro-batch-size x --data-parallel-size (", run.micro_batch * dp,
               ")");
    run.micro_batches = global_batch / (run.micro_batch * dp);
  }
  std::printf(
      "memory plan per rank (%s; seq %lld, micro-batch %lld, %lld micro-batches per iteration%s%s):\n",
      run.cpu ? "CPU" : "GPU", static_cast<long long>(run.seq), static_cast<long long>(run.micro_batch),
      static_cast<long long>(run.micro_batches), run.recompute ? ", full recompute" : "",
      run.capacity_factor > 0 ? ", token drop" : "");
  std::fputs(format_memory_plan(plan_memory(cfg, layout, run), kRuntimeEstimate + kRuntimeGrowth,
                                "an estimate; dsv3 train measures it")
                 .c_str(),
             stdout);
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
