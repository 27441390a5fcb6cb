// The seed's command line, written out here flag by flag from its examples/deepseek/pretrain_deepseek.sh
// (HabanaAI/Megatron-LM 13c28dea; spec §1), independently of our launcher: the tests compare the launcher's
// dry run with it and run it with `dsv3 train`. The seed's hard-coded model sizes are taken from the HL_*
// size variables of our launcher when set (so that a test can scale the model down), else they are the
// seed's.
#pragma once
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace dsv3::testing {

using HlEnv = std::vector<std::pair<std::string, std::string>>;

class SeedVars {
 public:
  explicit SeedVars(const HlEnv& env) : env_(env.begin(), env.end()) {}
  bool set(const std::string& k) const { return env_.count(k) > 0; }
  std::string get(const std::string& k, const std::string& def) const {
    auto it = env_.find(k);
    return it == env_.end() || it->second.empty() ? def : it->second;  // the seed's ${VAR:-default}
  }
  int num(const std::string& k, int def) const { return std::stoi(get(k, std::to_string(def))); }

 private:
  std::map<std::string, std::string> env_;
};

// The arguments the seed passes to pretrain_gpt.py, in its order. HL_RESULTS_DIR must be set (the seed would
// otherwise name the output directory after the current time).
inline std::vector<std::string> seed_pretrain_args(const HlEnv& env) {
  const SeedVars v(env);
  if (!v.set("HL_RESULTS_DIR")) throw std::invalid_argument("seed_pretrain_args needs HL_RESULTS_DIR");
  const std::string out_dir = v.get("HL_RESULTS_DIR", "");
  const std::string data_dir = v.get("HL_DATA_DIR_ROOT", "/data/dataset_idx/red_pajama_deepseek");
  const std::string ckpt_dir = v.get("HL_CHECKPOINTS_DIR", out_dir + "/checkpoints");
  const int num_layers = v.num("HL_NUM_LAYERS", 61), skip = v.num("HL_MOE_SKIP_FIRST_LAYERS", 3);
  const std::string dispatcher = v.get("HL_TOKEN_DISPATCHER_TYPE", "allgather");
  const std::string dropout = v.get("HL_DROPOUT", "0.0");
  std::vector<std::string> a;
  auto add = [&](std::initializer_list<std::string> words) { a.insert(a.end(), words); };
  auto on = [&](const char* var, int def) { return v.num(var, def) == 1; };
  // clang-format off: one line per line of the seed's CMD, as it reads there
  add({"--transformer-impl", v.get("HL_TRANSFORMER_IMPL", "transformer_engine")});
  add({"--tensor-model-parallel-size", v.get("HL_TP", "2")});
  add({"--pipeline-model-parallel-size", v.get("HL_PP", "2")});
  if (v.num("HL_FISRT_PP_STAGE_LAYERS", 0) > 0)
    add({"--decoder-first-pipeline-num-layers", v.get("HL_FISRT_PP_STAGE_LAYERS", "")});
  if (v.num("HL_LAST_PP_STAGE_LAYERS", 0) > 0)
    add({"--decoder-last-pipeline-num-layers", v.get("HL_LAST_PP_STAGE_LAYERS", "")});
  add({"--distributed-backend", "nccl"});
  add({"--seq-length", v.get("HL_SEQ_LEN", "4096")});
  add({"--num-layers", std::to_string(num_layers)});
  add({"--hidden-size", v.get("HL_HIDDEN_SIZE", "7168")});
  add({"--num-attention-heads", v.get("HL_NUM_HEADS", "128")});
  add({"--num-query-groups", "128"});
  add({"--ffn-hidden-size", v.get("HL_FFN_HIDDEN_SIZE", "18432")});
  add({"--position-embedding-type", "rope"});
  add({"--rotary-base", v.get("HL_ROTARY_BASE", "10000")});
  add({"--max-position-embeddings", v.get("HL_SEQ_LEN", "4096")});
  add({"--normalization", "RMSNorm"});
  add({"--swiglu"});
  add({"--untie-embeddings-and-output-weights"});
  add({"--attention-dropout", dropout});
  add({"--hidden-dropout", dropout});
  // MOE_ARGS
  add({"--num-experts", v.get("HL_NUM_EXPERTS", "256")});
  add({"--moe-router-topk", v.get("HL_MOE_ROUTER_TOPK", "8")});
  add({"--expert-model-parallel-size", v.get("HL_EP", "2")});
  add({"--moe-router-load-balancing-type", "seq_aux_loss"});
  add({"--moe-router-bias-update-rate", "0.001"});
  add({"--moe-router-score-function", "sigmoid"});
  add({"--moe-router-topk-scaling-factor", v.get("HL_MOE_ROUTER_TOPK_SCALING_FACTOR", "2.5")});
  add({"--moe-router-num-groups", v.get("HL_MOE_ROUTER_NUM_GROUPS", "8")});
  add({"--moe-router-group-topk", v.get("HL_MOE_ROUTER_GROUP_TOPK", "4")});
  add({"--moe-router-enable-expert-bias"});
  add({"--moe-aux-loss-coeff", v.get("HL_AUX_LOSS_COEFF", "1e-4")});
  add({"--moe-token-dispatcher-type", dispatcher});
  add({"--moe-ffn-hidden-size", v.get("HL_MOE_FFN_HIDDEN_SIZE", "2048")});
  add({"--moe-shared-expert-intermediate-size", v.get("HL_SHARED_EXPERT_FFN_HIDDEN_SIZE", "2048")});
  if (dispatcher == "alltoall" && on("HL_ENABLE_SHARED_EXPERT_OVERLAP", 0))
    add({"--moe-shared-expert-overlap"});
  if (on("HL_TOKEN_DROP", 0))
    add({"--moe-expert-capacity-factor", "1.0", "--moe-pad-expert-input-to-capacity",
         "--moe-token-drop-policy", "probs"});
  if (on("HL_MOE_LAYER_RECOMPUTE", 0))
    add({"--recompute-granularity", "selective", "--recompute-modules", "moe"});
  if (skip > 0)
    add({"--moe-layer-freq",
         "([0]*" + std::to_string(skip) + "+[1]*" + std::to_string(num_layers - skip) + ")"});
  // MLA_ARGS
  add({"--multi-latent-attention"});
  add({"--q-lora-rank", v.get("HL_Q_LORA_RANK", "1536")});
  add({"--kv-lora-rank", v.get("HL_KV_LORA_RANK", "512")});
  add({"--qk-head-dim", v.get("HL_QK_HEAD_DIM", "128")});
  add({"--qk-layernorm"});
  add({"--qk-pos-emb-head-dim", v.get("HL_QK_POS_EMB_HEAD_DIM", "64")});
  add({"--v-head-dim", v.get("HL_V_HEAD_DIM", "128")});
  add({"--weight-decay", "1e-1"});
  add({"--clip-grad", "1.0"});
  add({"--adam-beta1", "0.9"});
  add({"--adam-beta2", "0.95"});
  add({"--adam-eps", "1e-8"});
  add({"--lr", v.get("HL_LR", "2.2e-4")});
  add({"--lr-decay-style", "cosine"});
  add({"--lr-warmup-iters", v.get("HL_LR_WARMUP_ITERS", "2000")});
  add({"--min-lr", v.get("HL_MIN_LR", "2.2e-5")});
  add({"--use-fused-sdpa-with-recompute", v.get("HL_USE_FUSED_SDPA_WITH_RECOMPUTE", "1")});
  add({"--use-fused-sdpa", v.get("HL_USE_FUSED_SDPA", "1")});
  add({"--use-fused-rmsnorm", v.get("HL_USE_FUSED_RMSNORM", "1")});
  add({"--use-fast-softmax", v.get("HL_USE_FAST_SOFTMAX", "1")});
  add({"--micro-batch-size", v.get("HL_MICRO_BATCH", "1")});
  add({"--global-batch-size", v.get("HL_GBS", "3072")});
  add({"--train-iters", v.get("HL_TRAIN_ITERS", "500000")});
  add({"--lr-decay-iters", v.get("HL_LR_DECAY_ITER", "320000")});
  add({"--log-interval", v.get("HL_LOG_INTERVAL", "10")});
  add({"--log-throughput"});
  add({"--disable-bias-linear"});
  add({"--optimizer", v.get("HL_OPTIMIZER", "fusedadamw")});
  add({"--no-gradient-accumulation-fusion"});
  add({"--no-masked-softmax-fusion"});
  add({"--use-mcore-models"});
  add({"--bf16"});
  add({"--exit-interval", v.get("HL_EXIT_INTERVAL", "0")});
  add({"--tensorboard-dir", v.get("HL_TENSORBOARD_DIR", out_dir + "/tensorboard")});
  add({"--log-validation-ppl-to-tensorboard"});
  add({"--log-timers-to-tensorboard"});
  add({"--load", v.get("HL_LOAD_DIR", ckpt_dir)});
  add({"--use-checkpoint-args"});
  add({"--eval-interval", v.get("HL_EVAL_INTERVAL", "1000")});
  add({"--eval-iters", v.get("HL_EVAL_ITERS", "10")});
  add({"--data-path",
       data_dir + "/" + v.get("HL_DATA_FILE_PREFIX", "rp_wiki_24B_deepseek_tok_text_document")});
  add({"--init-method-std", v.get("HL_INIT_STD", "6e-3")});
  add({"--num-workers", v.get("HL_NUM_WORKERS", "2")});
  add({"--no-rope-fusion"});
  add({"--kv-channels", "128"});
  add({"--use-torch-compile=" + v.get("HL_USE_TORCH_COMPILE", "0")});
  add({"--use-torch-compiled-autograd=" + v.get("HL_USE_TORCH_COMPILED_AUTOGRAD", "0")});
  add({"--distributed-timeout-minutes", "60"});
  if (on("HL_MOE_GROUPED_GEMM", 1)) add({"--moe-grouped-gemm"});
  if (on("HL_ENABLE_PARAM_GATHER_OVERLAP", 0)) add({"--overlap-param-gather"});
  if (on("HL_ENABLE_GRAD_REDUCE_OVERLAP", 0)) add({"--overlap-grad-reduce"});
  if (on("HL_SEQ_PARALLEL", 1)) add({"--sequence-parallel"});
  if (on("HL_CKP_ACT", 0))
    add({"--recompute-granularity=full", "--recompute-method", "uniform", "--recompute-num-layers",
         v.get("HL_RECOMPUTE_NUM_LAYERS", "1")});
  else if (v.num("HL_CKP_ACT", 0) == 2)
    add({"--recompute-granularity", "selective"});
  if (on("HL_USE_DISTRIBUTED_OPTIMIZER", 1)) {
    add({"--use-distributed-optimizer"});
    add({"--save-distrib-optimizer-method",
         v.get("HL_SAVE_DISTRIB_OPTIMIZER_METHOD", "parallel_multi_node")});
    add({"--load-distrib-optimizer-method", v.get("HL_LOAD_DISTRIB_OPTIMIZER_METHOD", "serial_per_node")});
  }
  if (on("HL_DETERMINISTIC_MODE", 0)) add({"--deterministic-mode"});
  if (v.set("HL_KILL_SWITCH_FILE")) add({"--kill-switch-file", v.get("HL_KILL_SWITCH_FILE", "")});
  if (v.set("HL_PROFILE_TYPE")) {
    add({"--profile-type", v.get("HL_PROFILE_TYPE", "")});
    add({"--profile-step-start", v.get("HL_PROFILE_STEP_START", "3")});
    add({"--profile-step-end", v.get("HL_PROFILE_STEP_END", "4")});
    if (v.set("HL_PROFILE_RANKS")) add({"--profile-ranks", v.get("HL_PROFILE_RANKS", "")});  // one rank here
  }
  if (on("HL_SAVE", 1)) {
    add({"--save", ckpt_dir});
    add({"--save-interval", v.get("HL_SAVE_INTERVAL", "2000")});
    add({"--ckpt-format", v.get("HL_CKPT_FORMAT", "torch_dist")});
    if (on("HL_VERIFY_CKPT", 0)) add({"--verify-checkpoint", "--verify-checkpoint-model-type", "DEEPSEEK"});
  }
  add({"--tokenizer-type", v.get("HL_TOKENIZER_TYPE", "HuggingFaceTokenizer")});
  add({"--tokenizer-model", v.get("HL_TOKENIZER_MODEL", data_dir)});
  if (v.set("HL_DATA_CACHE_DIR")) add({"--data-cache-path", v.get("HL_DATA_CACHE_DIR", "")});
  // clang-format on
  return a;
}

// The seed's mpirun words before `python pretrain_gpt.py` (one node, no HL_PE, no host NIC, no MPI_ROOT),
// with ENV_FLAGS as given.
inline std::vector<std::string> seed_mpirun_words(const HlEnv& env,
                                                  const std::vector<std::string>& env_flags) {
  const SeedVars v(env);
  const int n = v.num("HL_NUM_NODES", 1) * v.num("HL_DEVICES_PER_NODE", 8);
  std::vector<std::string> w = {"mpirun",
                                "--allow-run-as-root",
                                "--mca",
                                "plm_rsh_args",
                                "-p" + v.get("HL_SSH_PORT", "22"),
                                "-n",
                                std::to_string(n),
                                "--bind-to",
                                "none",
                                "-x",
                                "PT_HPU_GPU_MIGRATION=1",
                                "-x",
                                "PT_HPU_LAZY_MODE=" + v.get("HL_USE_LAZY_MODE", "0")};
  for (const auto& f : env_flags) w.insert(w.end(), {"-x", f});
  w.insert(w.end(), {"-x", "MASTER_ADDR=localhost", "-x", "MASTER_PORT=12345"});
  return w;
}

// The seed README's two examples, as written there.
inline HlEnv seed_readme_basic_example() {
  return {{"HL_USE_LAZY_MODE", "1"},
          {"HL_TOKENIZER_TYPE", "HuggingFaceTokenizer"},
          {"HL_DATA_DIR_ROOT", "/data/deepseek_preprocessed"},
          {"HL_DATA_FILE_PREFIX", "rp_wiki_24B_deepseek_tok_text_document"},
          {"HL_TOKENIZER_MODEL", "/data/deepseek_tokenizer"},
          {"HL_NUM_NODES", "1"},
          {"HL_DEVICES_PER_NODE", "8"},
          {"HL_DP", "8"},
          {"HL_TP", "1"},
          {"HL_PP", "1"},
          {"HL_EP", "8"},
          {"HL_GBS", "8"},
          {"HL_NUM_LAYERS", "4"},
          {"HL_TOKEN_DROP", "1"},
          {"HL_TOKEN_DISPATCHER_TYPE", "alltoall"},
          {"HL_MOE_SKIP_FIRST_LAYERS", "3"},
          {"HL_SEQ_LEN", "4096"}};
}
inline HlEnv seed_readme_multinode_example() {
  return {{"HL_USE_LAZY_MODE", "1"},
          {"HL_TOKENIZER_TYPE", "HuggingFaceTokenizer"},
          {"HL_DATA_DIR_ROOT", "/data/deepseek_preprocessed"},
          {"HL_DATA_FILE_PREFIX", "rp_wiki_24B_deepseek_tok_text_document"},
          {"HL_TOKENIZER_MODEL", "/data/deepseek_tokenizer"},
          {"HL_CKP_ACT", "1"},
          {"HL_NUM_NODES", "4"},
          {"HL_DEVICES_PER_NODE", "8"},
          {"HL_DP", "16"},
          {"HL_TP", "1"},
          {"HL_PP", "2"},
          {"HL_EP", "16"},
          {"HL_GBS", "1024"},
          {"HL_NUM_LAYERS", "16"},
          {"HL_TOKEN_DROP", "1"},
          {"HL_TOKEN_DISPATCHER_TYPE", "alltoall"},
          {"HL_MOE_SKIP_FIRST_LAYERS", "3"},
          {"HL_SEQ_LEN", "4096"}};
}

// Every optional flag of the seed switched on (spec §1.1): overlap, shared-expert overlap, selective MoE
// recompute, determinism, profiling, checkpoint verification, kill switch, data cache.
inline HlEnv seed_every_optional_flag(const std::string& dir) {
  return {{"HL_ENABLE_SHARED_EXPERT_OVERLAP", "1"},
          {"HL_MOE_LAYER_RECOMPUTE", "1"},
          {"HL_ENABLE_PARAM_GATHER_OVERLAP", "1"},
          {"HL_ENABLE_GRAD_REDUCE_OVERLAP", "1"},
          {"HL_DETERMINISTIC_MODE", "1"},
          {"HL_PROFILE_TYPE", "pt"},
          {"HL_PROFILE_RANKS", "0"},
          {"HL_VERIFY_CKPT", "1"},
          {"HL_KILL_SWITCH_FILE", dir + "/no-kill-switch"},
          {"HL_DATA_CACHE_DIR", dir + "/cache"}};
}

// A DeepSeek-V3 of the seed's shape scaled down to run in seconds on a 2-core machine (the launcher's HL_*
// size variables).
inline HlEnv seed_small_sizes() {
  return {{"HL_HIDDEN_SIZE", "64"},
          {"HL_FFN_HIDDEN_SIZE", "128"},
          {"HL_NUM_HEADS", "2"},
          {"HL_NUM_EXPERTS", "4"},
          {"HL_MOE_FFN_HIDDEN_SIZE", "32"},
          {"HL_SHARED_EXPERT_FFN_HIDDEN_SIZE", "32"},
          {"HL_Q_LORA_RANK", "32"},
          {"HL_KV_LORA_RANK", "16"},
          {"HL_QK_HEAD_DIM", "16"},
          {"HL_QK_POS_EMB_HEAD_DIM", "8"},
          {"HL_V_HEAD_DIM", "16"},
          {"HL_MOE_ROUTER_TOPK", "2"},
          {"HL_MOE_ROUTER_NUM_GROUPS", "2"},
          {"HL_MOE_ROUTER_GROUP_TOPK", "1"}};
}

// `env` with `more` set (replacing earlier values).
inline HlEnv with_vars(HlEnv e, const HlEnv& more) {
  for (const auto& kv : more) {
    bool replaced = false;
    for (auto& old : e)
      if (old.first == kv.first) old.second = kv.second, replaced = true;
    if (!replaced) e.push_back(kv);
  }
  return e;
}

// Words of a command printed by the launcher (single-quoted words as `quote` writes them).
inline std::vector<std::string> shell_words(const std::string& line) {
  std::vector<std::string> out;
  std::string w;
  bool in_word = false, quoted = false;
  for (size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (quoted) {
      if (c == '\'')
        quoted = false;
      else
        w += c;
    } else if (c == '\'') {
      quoted = in_word = true;
    } else if (c == '\\' && i + 1 < line.size()) {
      w += line[++i], in_word = true;
    } else if (c == ' ' || c == '\n' || c == '\t') {
      if (in_word) out.push_back(w), w.clear(), in_word = false;
    } else {
      w += c, in_word = true;
    }
  }
  if (in_word) out.push_back(w);
  return out;
}

}  // namespace dsv3::testing
