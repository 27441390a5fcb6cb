// The flag table of `dsv3 train` and its parser.
#include "train/args.h"

#include <algorithm>
#include <cstdlib>

#include "core/error.h"
#include "train/log_format.h"

namespace dsv3 {
namespace {

enum class Kind { kInt, kFloat, kString, kFlag, kList };

struct Spec {
  const char* flag;
  Kind kind;
  const char* def;  // nullptr: None
};

// Megatron's flags that dsv3 train implements, in the order of its arguments block (defaults as Megatron's, except
// where the seed script's differ and are noted in spec §1.2 — those come from the launcher, not from here).
const Spec kSpecs[] = {
    // model
    {"--model-config", Kind::kString, nullptr},
    {"--num-layers", Kind::kInt, nullptr},
    {"--hidden-size", Kind::kInt, nullptr},
    {"--ffn-hidden-size", Kind::kInt, nullptr},
    {"--num-attention-heads", Kind::kInt, nullptr},
    {"--max-position-embeddings", Kind::kInt, nullptr},
    {"--q-lora-rank", Kind::kInt, nullptr},
    {"--kv-lora-rank", Kind::kInt, nullptr},
    {"--qk-head-dim", Kind::kInt, nullptr},
    {"--qk-pos-emb-head-dim", Kind::kInt, nullptr},
    {"--v-head-dim", Kind::kInt, nullptr},
    {"--norm-epsilon", Kind::kFloat, nullptr},
    {"--rotary-base", Kind::kFloat, nullptr},
    {"--init-method-std", Kind::kFloat, nullptr},
    {"--make-vocab-size-divisible-by", Kind::kInt, "128"},
    {"--num-experts", Kind::kInt, nullptr},
    {"--moe-ffn-hidden-size", Kind::kInt, nullptr},
    {"--moe-shared-expert-intermediate-size", Kind::kInt, nullptr},
    {"--moe-layer-freq", Kind::kString, nullptr},
    {"--moe-router-topk", Kind::kInt, nullptr},
    {"--moe-router-score-function", Kind::kString, "sigmoid"},
    {"--moe-router-topk-scaling-factor", Kind::kFloat, nullptr},
    {"--moe-router-num-groups", Kind::kInt, nullptr},
    {"--moe-router-group-topk", Kind::kInt, nullptr},
    {"--moe-router-enable-expert-bias", Kind::kFlag, nullptr},
    {"--moe-router-bias-update-rate", Kind::kFloat, "0.001"},
    {"--moe-router-load-balancing-type", Kind::kString, "aux_loss"},
    {"--moe-aux-loss-coeff", Kind::kFloat, "0.0"},
    {"--moe-expert-capacity-factor", Kind::kFloat, nullptr},
    {"--moe-token-drop-policy", Kind::kString, "probs"},
    {"--moe-pad-expert-input-to-capacity", Kind::kFlag, nullptr},
    {"--moe-token-dispatcher-type", Kind::kString, "allgather"},
    {"--mtp-num-layers", Kind::kInt, nullptr},
    {"--mtp-loss-scaling-factor", Kind::kFloat, "0.1"},
    // training
    {"--micro-batch-size", Kind::kInt, "1"},
    {"--global-batch-size", Kind::kInt, nullptr},
    {"--seq-length", Kind::kInt, nullptr},
    {"--train-iters", Kind::kInt, nullptr},
    {"--lr", Kind::kFloat, nullptr},
    {"--min-lr", Kind::kFloat, "0.0"},
    {"--lr-warmup-iters", Kind::kInt, "0"},
    {"--lr-decay-iters", Kind::kInt, nullptr},
    {"--lr-decay-style", Kind::kString, "linear"},
    {"--weight-decay", Kind::kFloat, "0.01"},
    {"--adam-beta1", Kind::kFloat, "0.9"},
    {"--adam-beta2", Kind::kFloat, "0.999"},
    {"--adam-eps", Kind::kFloat, "1e-08"},
    {"--clip-grad", Kind::kFloat, "1.0"},
    {"--bf16", Kind::kFlag, nullptr},
    {"--seed", Kind::kInt, "1234"},
    {"--recompute-granularity", Kind::kString, nullptr},
    {"--recompute-method", Kind::kString, nullptr},
    {"--recompute-num-layers", Kind::kInt, nullptr},
    {"--check-for-nan-in-loss-and-grad", Kind::kFlag, "true"},
    // data
    {"--data-path", Kind::kList, nullptr},
    {"--split", Kind::kString, "969, 30, 1"},
    {"--data-cache-path", Kind::kString, nullptr},
    {"--tokenizer-type", Kind::kString, nullptr},
    {"--tokenizer-model", Kind::kString, nullptr},
    {"--num-workers", Kind::kInt, "2"},
    // checkpoints, logging, exits
    {"--save", Kind::kString, nullptr},
    {"--load", Kind::kString, nullptr},
    {"--save-interval", Kind::kInt, nullptr},
    {"--no-load-optim", Kind::kFlag, nullptr},
    {"--use-checkpoint-args", Kind::kFlag, nullptr},
    {"--log-interval", Kind::kInt, "100"},
    {"--log-throughput", Kind::kFlag, nullptr},
    {"--eval-interval", Kind::kInt, "1000"},
    {"--eval-iters", Kind::kInt, "100"},
    {"--tensorboard-dir", Kind::kString, nullptr},
    {"--exit-interval", Kind::kInt, nullptr},
    {"--exit-duration-in-mins", Kind::kInt, nullptr},
    {"--exit-signal-handler", Kind::kFlag, nullptr},
    {"--kill-switch-file", Kind::kString, nullptr},
    // parallel sizes (accepted; > 1 needs the distributed runtime)
    {"--tensor-model-parallel-size", Kind::kInt, "1"},
    {"--pipeline-model-parallel-size", Kind::kInt, "1"},
    {"--expert-model-parallel-size", Kind::kInt, "1"},
    {"--expert-tensor-parallel-size", Kind::kInt, nullptr},
    {"--context-parallel-size", Kind::kInt, "1"},
    {"--decoder-first-pipeline-num-layers", Kind::kInt, nullptr},
    {"--decoder-last-pipeline-num-layers", Kind::kInt, nullptr},
    {"--sequence-parallel", Kind::kFlag, nullptr},
    {"--use-distributed-optimizer", Kind::kFlag, nullptr},
    // timers: level >= 1 prints Megatron's "(min, max) time across ranks (ms):" block after each log line
    {"--timing-log-level", Kind::kInt, "0"},
    {"--timing-log-option", Kind::kString, "minmax"},
};

// Megatron flags that ask for what dsv3 computes (DeepSeek-V3's architecture, AdamW, grouped experts): taken and
// applied, with the values model_from_args and the trainer check. They are kept out of the arguments block, which
// lists kSpecs only, so that the block and the checkpoint's args stay as earlier dsv3 runs wrote them. Defaults are
// Megatron's, so that a flag-built model can tell which architecture flags were left out.
const Spec kApplied[] = {
    {"--use-mcore-models", Kind::kFlag, nullptr},
    {"--multi-latent-attention", Kind::kFlag, nullptr},
    {"--qk-layernorm", Kind::kFlag, nullptr},
    {"--swiglu", Kind::kFlag, nullptr},
    {"--normalization", Kind::kString, "LayerNorm"},
    {"--position-embedding-type", Kind::kString, "learned_absolute"},
    {"--untie-embeddings-and-output-weights", Kind::kFlag, nullptr},
    {"--disable-bias-linear", Kind::kFlag, nullptr},
    {"--attention-dropout", Kind::kFloat, "0.1"},
    {"--hidden-dropout", Kind::kFloat, "0.1"},
    {"--num-query-groups", Kind::kInt, nullptr},   // used by Megatron only with --group-query-attention
    {"--kv-channels", Kind::kInt, nullptr},        // unused by MLA, whose head dims have their own flags
    {"--moe-grouped-gemm", Kind::kFlag, nullptr},  // dsv3 always runs each rank's experts as one group
    {"--optimizer", Kind::kString, "adam"},  // Megatron's adam is AdamW; the seed's fusedadamw is the same
    {"--device", Kind::kString, "auto"},     // dsv3's own: auto | cpu | cuda | host-guarded (tests)
    // The collective watchdog (parallel/comm.h): Megatron's default, fractions accepted; 0 turns it off.
    {"--distributed-timeout-minutes", Kind::kFloat, "10"},
    // dsv3's own, for tests and short jobs: the same timeout in seconds; when given it wins over the minutes.
    {"--distributed-timeout-seconds", Kind::kFloat, nullptr},
};

// Megatron (and Gaudi Megatron) flags that choose how something is computed or run, not what: accepted with their
// argument and listed once at start-up with the reason they change nothing here. kList takes zero or more values.
struct NoEffect {
  const char* flag;
  Kind kind;
  const char* why;
};
const char* const kImpl = "kernel and fusion choices: dsv3 has one implementation of each op";
const char* const kCompile = "PyTorch compilation: dsv3 is compiled C++";
const char* const kComm = "communication runtime: dsv3's ranks talk over MPI, without overlap";
const char* const kCkpt = "checkpoint format: dsv3 writes HF safetensors with its own metadata";
const char* const kTb = "TensorBoard extras: dsv3 always writes validation PPL, never timers or memory";
const char* const kDet = "dsv3's runs are always deterministic";
const char* const kProf = "PyTorch/Gaudi profiler: dsv3 times its steps with --timing-log-level";
const char* const kRecompute =
    "selective recompute: dsv3 recomputes whole layers (--recompute-granularity full) or none";
const NoEffect kNoEffect[] = {
    {"--transformer-impl", Kind::kString, kImpl},
    {"--use-fused-sdpa", Kind::kString, kImpl},
    {"--use-fused-sdpa-with-recompute", Kind::kString, kImpl},
    {"--use-fused-rmsnorm", Kind::kString, kImpl},
    {"--use-fast-softmax", Kind::kString, kImpl},
    {"--no-gradient-accumulation-fusion", Kind::kFlag, kImpl},
    {"--no-masked-softmax-fusion", Kind::kFlag, kImpl},
    {"--no-rope-fusion", Kind::kFlag, kImpl},
    {"--no-bias-swiglu-fusion", Kind::kFlag, kImpl},
    {"--no-bias-dropout-fusion", Kind::kFlag, kImpl},
    {"--moe-permute-fusion", Kind::kFlag, kImpl},
    {"--cross-entropy-loss-fusion", Kind::kFlag, kImpl},
    {"--use-torch-compile", Kind::kString, kCompile},
    {"--use-torch-compiled-autograd", Kind::kString, kCompile},
    {"--distributed-backend", Kind::kString, kComm},
    {"--overlap-grad-reduce", Kind::kFlag, kComm},
    {"--overlap-param-gather", Kind::kFlag, kComm},
    {"--moe-shared-expert-overlap", Kind::kFlag, kComm},
    {"--ckpt-format", Kind::kString, kCkpt},
    {"--save-distrib-optimizer-method", Kind::kString, kCkpt},
    {"--load-distrib-optimizer-method", Kind::kString, kCkpt},
    {"--verify-checkpoint", Kind::kFlag, kCkpt},
    {"--verify-checkpoint-model-type", Kind::kString, kCkpt},
    {"--log-validation-ppl-to-tensorboard", Kind::kFlag, kTb},
    {"--log-timers-to-tensorboard", Kind::kFlag, kTb},
    {"--log-memory-to-tensorboard", Kind::kFlag, kTb},
    {"--deterministic-mode", Kind::kFlag, kDet},
    {"--profile", Kind::kFlag, kProf},
    {"--profile-type", Kind::kString, kProf},
    {"--profile-step-start", Kind::kInt, kProf},
    {"--profile-step-end", Kind::kInt, kProf},
    {"--profile-ranks", Kind::kList, kProf},
    {"--recompute-modules", Kind::kList, kRecompute},
};

// Megatron flags that ask for other numbers than dsv3 computes (or for a feature it lacks): refused by name with
// the reason.
const std::pair<const char*, const char*> kUnsupported[] = {
    {"--fp16", "fp16 training (use --bf16)"},
    {"--num-layers-per-virtual-pipeline-stage", "virtual pipeline stages"},
    {"--moe-router-pre-softmax", "softmax routing (DeepSeek-V3 uses sigmoid)"},
    {"--group-query-attention", "grouped-query attention (DeepSeek-V3 uses multi-latent attention)"},
    {"--add-qkv-bias", "attention biases (DeepSeek-V3 has none)"},
    {"--apply-layernorm-1p", "zero-centred LayerNorm (DeepSeek-V3 uses RMSNorm)"},
    {"--squared-relu", "squared-ReLU MLPs (DeepSeek-V3 uses SwiGLU)"},
    {"--moe-z-loss-coeff", "router z-loss (DeepSeek-V3 balances with the sequence aux loss and expert bias)"},
    {"--moe-input-jitter-eps", "router input jitter"},
    {"--eod-mask-loss", "EOD loss masking"},
    {"--reset-position-ids", "position id reset"},
    {"--reset-attention-mask", "attention mask reset"},
    {"--finetune", "fine-tuning mode"},
};

std::string dest_of(const std::string& flag) {
  std::string d = flag.substr(2);
  std::replace(d.begin(), d.end(), '-', '_');
  return d;
}

const Spec* find_spec(const std::string& flag) {
  for (const auto& s : kSpecs)
    if (flag == s.flag) return &s;
  for (const auto& s : kApplied)
    if (flag == s.flag) return &s;
  return nullptr;
}

const NoEffect* find_no_effect(const std::string& flag) {
  for (const auto& n : kNoEffect)
    if (flag == n.flag) return &n;
  return nullptr;
}

void check_value(const char* flag, Kind kind, const std::string& v) {
  char* end = nullptr;
  if (kind == Kind::kInt) {
    std::strtoll(v.c_str(), &end, 10);
    DSV3_CHECK(!v.empty() && *end == 0, "argument ", flag, ": invalid int value: '", v, "'");
  } else if (kind == Kind::kFloat) {
    std::strtod(v.c_str(), &end);
    DSV3_CHECK(!v.empty() && *end == 0, "argument ", flag, ": invalid float value: '", v, "'");
  }
}

// The values of the flag at args[k] (k is left on its last value), as argparse reads them: none for a switch, one
// for a typed option (inline after '=' or the next word), the following words up to the next flag for a list.
std::vector<std::string> take_values(const std::vector<std::string>& args, size_t& k, const char* flag,
                                     Kind kind, bool has_inline, const std::string& inline_value,
                                     bool list_may_be_empty) {
  if (kind == Kind::kFlag) {
    DSV3_CHECK(!has_inline, "argument ", flag, ": ignored explicit argument '", inline_value, "'");
    return {};
  }
  std::vector<std::string> vals;
  if (has_inline) vals.push_back(inline_value);
  if (kind == Kind::kList) {
    while (k + 1 < args.size() && args[k + 1].rfind("--", 0) != 0) vals.push_back(args[++k]);
    DSV3_CHECK(list_may_be_empty || !vals.empty(), "argument ", flag, ": expected at least one argument");
    return vals;
  }
  if (!has_inline) {
    DSV3_CHECK(k + 1 < args.size() && args[k + 1].rfind("--", 0) != 0, "argument ", flag,
               ": expected one argument");
    vals.push_back(args[++k]);
  }
  check_value(flag, kind, vals[0]);
  return vals;
}

}  // namespace

TrainArgs TrainArgs::parse(int argc, char** argv) {
  std::vector<std::string> a;
  for (int k = 1; k < argc; ++k) a.emplace_back(argv[k]);
  return parse(a);
}

TrainArgs TrainArgs::parse(const std::vector<std::string>& args) {
  TrainArgs out;
  for (const auto& s : kSpecs)
    if (s.def) out.values_[dest_of(s.flag)] = {s.def};
  for (const auto& s : kApplied)
    if (s.def) out.values_[dest_of(s.flag)] = {s.def};
  std::vector<std::string> unknown;
  for (size_t k = 0; k < args.size(); ++k) {
    std::string flag = args[k], inline_value;
    bool has_inline = false;
    if (auto eq = flag.find('='); flag.rfind("--", 0) == 0 && eq != std::string::npos) {
      inline_value = flag.substr(eq + 1), flag = flag.substr(0, eq), has_inline = true;
    }
    for (const auto& [name, why] : kUnsupported)
      DSV3_CHECK(flag != name, name, " is not supported by dsv3 train: ", why);
    if (const NoEffect* n = find_no_effect(flag)) {
      const auto vals = take_values(args, k, n->flag, n->kind, has_inline, inline_value, true);
      std::string text = n->flag;
      for (const auto& v : vals) text += " " + v;
      out.no_effect_.emplace_back(text, n->why);
      continue;
    }
    // --no-X negates a default-true flag, as Megatron's store_false options do.
    if (flag.rfind("--no-", 0) == 0 && !find_spec(flag)) {
      const Spec* pos = find_spec("--" + flag.substr(5));
      if (pos && pos->kind == Kind::kFlag) {
        out.values_[dest_of(pos->flag)] = {"false"};
        out.given_[dest_of(pos->flag)] = true;
        continue;
      }
    }
    const Spec* s = find_spec(flag);
    if (!s) {
      unknown.push_back(args[k]);
      continue;
    }
    const std::string dest = dest_of(flag);
    out.given_[dest] = true;
    auto vals = take_values(args, k, s->flag, s->kind, has_inline, inline_value, false);
    if (s->kind == Kind::kFlag) {
      out.values_[dest] = {"true"};
    } else if (s->kind == Kind::kList) {
      auto& dst = out.values_[dest];
      dst.insert(dst.end(), vals.begin(), vals.end());  // repeated --data-path flags append
    } else {
      out.values_[dest] = std::move(vals);
    }
  }
  // Megatron keeps the last value, so the seed's "selective ... --recompute-granularity=full" recomputes full.
  if (out.values_.count("recompute_granularity") && out.values_["recompute_granularity"][0] == "selective")
    out.no_effect_.emplace_back("--recompute-granularity selective", kRecompute);
  if (!unknown.empty()) {
    std::string u;
    for (const auto& x : unknown) u += (u.empty() ? "" : " ") + x;
    fail("unrecognized arguments: ", u);
  }
  return out;
}

bool TrainArgs::given(const std::string& dest) const {
  return given_.count(dest) && given_.at(dest);
}

const std::string& TrainArgs::s(const std::string& dest) const {
  auto it = values_.find(dest);
  DSV3_CHECK(it != values_.end() && !it->second.empty(), "the argument --", dest, " is required");
  return it->second[0];
}

int64_t TrainArgs::i(const std::string& dest) const {
  return std::strtoll(s(dest).c_str(), nullptr, 10);
}
double TrainArgs::f(const std::string& dest) const {
  return std::strtod(s(dest).c_str(), nullptr);
}
bool TrainArgs::b(const std::string& dest) const {
  auto it = values_.find(dest);
  return it != values_.end() && !it->second.empty() && it->second[0] == "true";
}

const std::vector<std::string>& TrainArgs::list(const std::string& dest) const {
  static const std::vector<std::string> kEmpty;
  auto it = values_.find(dest);
  return it == values_.end() ? kEmpty : it->second;
}

std::optional<int64_t> TrainArgs::opt_i(const std::string& dest) const {
  if (!values_.count(dest)) return std::nullopt;
  return i(dest);
}
std::optional<double> TrainArgs::opt_f(const std::string& dest) const {
  if (!values_.count(dest)) return std::nullopt;
  return f(dest);
}
std::optional<std::string> TrainArgs::opt_s(const std::string& dest) const {
  if (!values_.count(dest)) return std::nullopt;
  return s(dest);
}

void TrainArgs::set(const std::string& dest, const std::string& value) {
  values_[dest] = {value};
}

std::vector<std::pair<std::string, std::string>> TrainArgs::all() const {
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& sp : kSpecs) {
    const std::string d = dest_of(sp.flag);
    auto it = values_.find(d);
    std::string v = "None";
    if (it != values_.end()) {
      if (sp.kind == Kind::kList) {
        v = "[";
        for (size_t k = 0; k < it->second.size(); ++k) v += (k ? ", '" : "'") + it->second[k] + "'";
        v += "]";
      } else if (sp.kind == Kind::kFlag) {
        v = it->second[0] == "true" ? "True" : "False";
      } else if (sp.kind == Kind::kFloat) {
        v = python_float_str(std::strtod(it->second[0].c_str(), nullptr));  // 3e-3 prints as 0.003
      } else {
        v = it->second[0];
      }
    } else if (sp.kind == Kind::kFlag) {
      v = "False";
    }
    out.emplace_back(d, v);
  }
  return out;
}

std::map<std::string, std::string> TrainArgs::all_map() const {
  auto v = all();
  return {v.begin(), v.end()};
}

std::string format_no_effect_line(const std::vector<std::pair<std::string, std::string>>& flags) {
  std::vector<std::string> reasons;  // in order of first appearance
  for (const auto& f : flags)
    if (std::find(reasons.begin(), reasons.end(), f.second) == reasons.end()) reasons.push_back(f.second);
  std::string line;
  for (const auto& why : reasons) {
    std::string group;
    for (const auto& [text, w] : flags)
      if (w == why) group += (group.empty() ? "" : ", ") + text;
    line += (line.empty() ? "" : "; ") + group + " (" + why + ")";
  }
  return line.empty() ? line : "note: these flags have no effect in dsv3: " + line;
}

}  // namespace dsv3
