// Flags → TrainConfig, with every start-up check, in the order a run meets them: required flags, the model,
// the parallel layout, the batch, how the model runs, the optimizer, the data, and the run's controls.
#include "train/train_config.h"

#include <cmath>

#include "core/error.h"
#include "data/tokenizer/tokenizer.h"
#include "moe/ep_dispatcher.h"
#include "train/device_select.h"
#include "train/model_from_args.h"

namespace dsv3 {
namespace {

std::optional<std::string> string_if_given(const TrainArgs& a, const char* dest) {
  if (!a.given(dest)) return std::nullopt;
  return a.s(dest);
}

void read_required(const TrainArgs& a) {
  DSV3_CHECK(a.given("seq_length"), "--seq-length is required");
  DSV3_CHECK(a.given("train_iters"), "--train-iters is required");
  DSV3_CHECK(a.given("lr"), "--lr is required");
  DSV3_CHECK(!a.list("data_path").empty(), "--data-path is required");
  const std::string opt = a.s("optimizer");
  DSV3_CHECK(opt == "adam" || opt == "adamw" || opt == "fusedadamw", "--optimizer ", opt,
             " is not supported: dsv3 trains with AdamW (adam, adamw, fusedadamw)");
}

// Last, once the run is known: what it asks for that the CUDA path does not run yet keeps it off the GPU
// (--device auto) or is refused (--device cuda), by name.
void read_device(const TrainArgs& a, int world_size, TrainConfig& c) {
  std::vector<std::string> blockers;
  if (world_size > 1)
    blockers.push_back("runs one process only (" + std::to_string(world_size) +
                       " ranks: multi-GPU comes with NCCL)");
  std::string why;
  for (const auto& b : blockers) why += (why.empty() ? "" : ", ") + b;
  c.device = a.s("device");
  DeviceChoice d = choose_device(c.device, why);
  c.device_line = d.line, c.backend = d.backend;
  if (c.backend) c.model_options.backend = c.backend.get();
}

void read_model(const TrainArgs& a, TrainConfig& c) {
  if (a.given("tokenizer_model")) c.tokenizer_size = Tokenizer::from_directory(a.s("tokenizer_model")).size();
  c.model = model_config_from_args(a, c.tokenizer_size);
  c.seed = static_cast<uint64_t>(a.i("seed"));
  c.mtp_loss_scaling_factor = a.f("mtp_loss_scaling_factor");
}

// Tensor parallelism (Megatron's layout; model/param_table.h TpSplit): the sizes it splits must divide, and
// what does not run with it yet is refused by name.
void read_tensor_parallel(const TrainArgs& a, const TrainConfig& c) {
  const int tp = c.parallel.tp;
  const ModelConfig& m = c.model;
  auto divides = [&](int64_t n, const char* what) {
    DSV3_CHECK(n % tp == 0, "--tensor-model-parallel-size ", tp, ": ", what, " (", n,
               ") must be divisible by the tensor model parallel size");
  };
  divides(m.num_attention_heads, "the number of attention heads");
  divides(m.intermediate_size, "the dense FFN width (--ffn-hidden-size)");
  divides(m.moe_intermediate_size * m.n_shared_experts, "the shared experts' width");
  if (c.model_options.expert_tensor_parallel)
    divides(m.moe_intermediate_size,
            "the routed experts' width (--moe-ffn-hidden-size; expert tensor parallelism "
            "splits it)");
  DSV3_CHECK(m.vocab_size % tp == 0, "--tensor-model-parallel-size ", tp, ": the vocabulary (", m.vocab_size,
             ") must be divisible by the tensor model parallel size (Megatron pads it to a multiple of "
             "--make-vocab-size-divisible-by × TP; a --model-config vocab_size must already be)");
  // Sequence parallelism splits every sequence into TP equal shards (Megatron's scatter of dim 0, [S, B, h]).
  const int64_t seq = a.i("seq_length");
  DSV3_CHECK(!a.b("sequence_parallel") || seq % tp == 0,
             "--sequence-parallel with --tensor-model-parallel-size ", tp, ": --seq-length ", seq,
             " must be divisible by the tensor model parallel size (rule: seq_length "
             "% TP == 0; each TP rank holds seq_length/TP positions of every sequence)");
}

// The layout (spec §8): impossible sizes are refused with the rule they break (ProcessGroups::build, which
// every rank calls again for itself); then the parts of the layout that are not implemented yet are refused
// by flag.
void read_layout(TrainArgs& a, int world_size, TrainConfig& c) {
  c.parallel.tp = static_cast<int>(a.i("tensor_model_parallel_size"));
  c.parallel.cp = static_cast<int>(a.i("context_parallel_size"));
  c.parallel.ep = static_cast<int>(a.i("expert_model_parallel_size"));
  c.parallel.pp = static_cast<int>(a.i("pipeline_model_parallel_size"));
  if (a.given("expert_tensor_parallel_size"))
    c.parallel.etp = static_cast<int>(a.i("expert_tensor_parallel_size"));
  if (c.model.n_routed_experts > 0) c.parallel.num_experts = c.model.n_routed_experts;
  c.dp = ProcessGroups::build(world_size, 0, c.parallel).dp;
  const struct {
    const char *dest, *flag, *what;
  } unimplemented[] = {{"context_parallel_size", "--context-parallel-size", "context"}};
  for (const auto& u : unimplemented)
    DSV3_CHECK(
        a.i(u.dest) == 1, u.flag, " ", a.i(u.dest), ": ", u.what,
        " parallelism is not implemented "
        "yet in dsv3's distributed runtime; data, expert and pipeline parallelism are (start the ranks with "
        "mpirun and leave the other parallel sizes at 1)");
  // Expert tensor parallelism (Megatron's default: TP). ETP = TP splits every routed expert's FFN over the TP
  // ranks as the dense FFN is split; ETP 1 keeps experts whole and folds the TP ranks into the expert grid's EP
  // and expert-DP dimensions (what DeepSeek-V3's recipes set). Other sizes would give expert-TP groups that are
  // not the TP group, which dsv3's MoE layer does not implement.
  const int tp = c.parallel.tp;
  const int etp = c.parallel.etp < 0 ? tp : c.parallel.etp;
  DSV3_CHECK(
      etp == 1 || etp == tp, "--expert-tensor-parallel-size ", etp,
      ": dsv3 splits routed experts over the tensor-parallel ranks (--expert-tensor-parallel-size equal to "
      "--tensor-model-parallel-size ",
      tp, ", Megatron's default) or keeps them whole (1); other sizes are not implemented");
  // With ETP 1 a TP rank's peers in the expert grid are other TP ranks: each must bring its own tokens, which
  // only sequence parallelism gives (without it the experts would see every token TP times). Megatron refuses
  // MoE training with TP > 1 and without sequence parallelism altogether.
  DSV3_CHECK(
      etp > 1 || tp == 1 || c.model.n_routed_experts == 0 || a.b("sequence_parallel"),
      "--expert-tensor-parallel-size 1 with --tensor-model-parallel-size ", tp,
      " needs --sequence-parallel: with ETP 1 the TP ranks are folded into expert parallelism and expert "
      "data parallelism, so each must route tokens of its own (or leave --expert-tensor-parallel-size "
      "at TP, which splits the experts instead)");
  c.parallel.etp = etp;
  a.set("expert_tensor_parallel_size",
        std::to_string(etp));  // the arguments block shows it, as Megatron's does
  c.model_options.expert_tensor_parallel = etp > 1;
  if (c.parallel.tp > 1) read_tensor_parallel(a, c);
}

// Megatron's default global batch is one micro-batch per data-parallel rank; it is written back into the
// flags so that the arguments block and checkpoints show the batch the run used.
void read_batch(TrainArgs& a, TrainConfig& c) {
  c.seq_length = a.i("seq_length"), c.micro_batch_size = a.i("micro_batch_size"),
  c.train_iters = a.i("train_iters");
  c.global_batch_size = a.given("global_batch_size") ? a.i("global_batch_size") : c.micro_batch_size * c.dp;
  a.set("global_batch_size", std::to_string(c.global_batch_size));
  DSV3_CHECK(c.seq_length >= 1 && c.micro_batch_size >= 1 && c.train_iters >= 1,
             "--seq-length, --micro-batch-size and --train-iters must be >= 1");
  DSV3_CHECK(c.global_batch_size % (c.micro_batch_size * c.dp) == 0, "--global-batch-size (",
             c.global_batch_size, ") is not divisible by micro-batch-size (", c.micro_batch_size,
             ") times data-parallel size (", c.dp, ")");
  c.num_micro_batches = c.global_batch_size / (c.micro_batch_size * c.dp);
  DSV3_CHECK(c.tokenizer_size == 0 || c.tokenizer_size <= c.model.vocab_size, "the tokenizer has ",
             c.tokenizer_size, " ids but the model's vocab_size is ", c.model.vocab_size);
  DSV3_CHECK(c.seq_length <= c.model.max_position_embeddings, "--seq-length ", c.seq_length,
             " exceeds max_position_embeddings ", c.model.max_position_embeddings);
}

// How the model runs: precision, dispatcher, pipeline stages, recompute, the balance loss and token dropping.
void read_model_options(const TrainArgs& a, TrainConfig& c) {
  ModelOptions& mo = c.model_options;
  mo.precision = a.b("bf16") ? Precision::kBF16 : Precision::kF32;
  mo.tp.sequence_parallel = a.b("sequence_parallel") && c.parallel.tp > 1;  // TP 1 ignores it, as Megatron
  mo.ep.type = parse_dispatcher_type(a.s("moe_token_dispatcher_type"));
  c.shared_embedding = c.parallel.pp > 1 && c.model.num_nextn_predict_layers > 0;
  auto end_stage_layers = [&](const char* dest, const char* flag) -> int64_t {
    if (!a.given(dest)) return 0;
    DSV3_CHECK(a.i(dest) >= 1, flag, " must be >= 1, got ", a.i(dest));
    return a.i(dest);
  };
  c.stages = plan_pipeline_stages(
      c.model.num_hidden_layers, c.parallel.pp,
      end_stage_layers("decoder_first_pipeline_num_layers", "--decoder-first-pipeline-num-layers"),
      end_stage_layers("decoder_last_pipeline_num_layers", "--decoder-last-pipeline-num-layers"),
      c.shared_embedding);
  if (a.given("recompute_granularity")) {
    const std::string g = a.s("recompute_granularity");  // selective is listed as having no effect
    DSV3_CHECK(g == "full" || g == "selective", "--recompute-granularity ", g,
               " is not supported (dsv3 implements full)");
    mo.recompute = g == "full";
  }
  const std::string lb = a.s("moe_router_load_balancing_type");
  DSV3_CHECK(lb == "seq_aux_loss" || lb == "none" || lb == "aux_loss", "--moe-router-load-balancing-type ",
             lb, " is not supported (seq_aux_loss, none)");
  c.aux_loss_coeff = lb == "seq_aux_loss" ? a.f("moe_aux_loss_coeff") : 0.0;
  DSV3_CHECK(lb != "aux_loss" || a.f("moe_aux_loss_coeff") == 0.0,
             "--moe-router-load-balancing-type aux_loss (Switch/GShard) is not implemented; DeepSeek-V3 uses "
             "seq_aux_loss");
  mo.seq_aux_coeff = static_cast<float>(c.aux_loss_coeff);
  if (a.given("moe_expert_capacity_factor") && a.f("moe_expert_capacity_factor") >= 0) {
    DSV3_CHECK(
        a.s("moe_token_dispatcher_type") != "allgather",
        "token dropping (--moe-expert-capacity-factor) needs --moe-token-dispatcher-type alltoall, as in "
        "Megatron-Core");
    mo.capacity_factor = a.f("moe_expert_capacity_factor");
    const std::string pol = a.s("moe_token_drop_policy");
    DSV3_CHECK(pol == "probs" || pol == "position", "--moe-token-drop-policy must be probs or position, not ",
               pol);
    mo.drop_policy = pol == "probs" ? DropPolicy::kProbs : DropPolicy::kPosition;
    mo.pad_to_capacity = a.b("moe_pad_expert_input_to_capacity");
  } else {
    DSV3_CHECK(!a.b("moe_pad_expert_input_to_capacity"),
               "--moe-pad-expert-input-to-capacity requires --moe-expert-capacity-factor");
  }
}

// AdamW and the sample-based LR schedule (the scheduler counts samples, so iterations are scaled by the
// batch).
void read_optimizer(const TrainArgs& a, TrainConfig& c) {
  c.adam = AdamWConfig{a.f("adam_beta1"), a.f("adam_beta2"), a.f("adam_eps")};
  c.distributed_optimizer = a.b("use_distributed_optimizer");
  c.weight_decay = a.f("weight_decay"), c.clip_grad = a.f("clip_grad");
  LrScheduleConfig& lc = c.lr_schedule;
  lc.max_lr = a.f("lr"), lc.min_lr = a.f("min_lr"), lc.init_lr = 0;
  lc.warmup_steps = a.i("lr_warmup_iters") * c.global_batch_size;
  lc.decay_steps = (a.given("lr_decay_iters") ? a.i("lr_decay_iters") : c.train_iters) * c.global_batch_size;
  lc.decay_style = a.s("lr_decay_style");
  LrScheduler check(lc);  // refuses an impossible schedule with Megatron's rule
  c.expert_bias_update = a.b("moe_router_enable_expert_bias");
  c.expert_bias_rate = a.f("moe_router_bias_update_rate");
  c.check_nan = a.b("check_for_nan_in_loss_and_grad");
}

void read_data(const TrainArgs& a, TrainConfig& c) {
  c.data = parse_data_path(a.list("data_path"));
  c.dataset.random_seed = a.i("seed");
  c.dataset.sequence_length = c.seq_length;
  c.dataset.split = a.s("split");
  if (a.given("tokenizer_model")) c.dataset.tokenizer_path = a.s("tokenizer_model");
  c.dataset.path_to_cache = string_if_given(a, "data_cache_path");
  c.eval_iters = a.i("eval_iters"), c.eval_interval = a.i("eval_interval");
  // Megatron sizes the validation split by train_iters / eval_interval (and divides by zero on 0).
  DSV3_CHECK(c.eval_interval >= 1, "--eval-interval must be >= 1, got ", c.eval_interval);
}

void read_run_controls(const TrainArgs& a, TrainConfig& c) {
  c.save = string_if_given(a, "save"), c.load = string_if_given(a, "load");
  c.tensorboard_dir = string_if_given(a, "tensorboard_dir");
  c.kill_switch_file = string_if_given(a, "kill_switch_file");
  c.save_interval = a.given("save_interval") ? a.i("save_interval") : 0;
  c.load_optim = !a.b("no_load_optim");
  c.log_interval = a.i("log_interval");
  DSV3_CHECK(c.log_interval >= 1, "--log-interval must be >= 1, got ", c.log_interval);
  c.timing_log_level = a.i("timing_log_level");
  c.exit_interval = a.given("exit_interval") ? a.i("exit_interval") : 0;
  if (a.given("exit_duration_in_mins")) c.exit_duration_in_mins = a.i("exit_duration_in_mins");
  c.exit_signal_handler = a.b("exit_signal_handler");
  c.distributed_timeout_s = a.given("distributed_timeout_seconds")
                                ? a.f("distributed_timeout_seconds")
                                : a.f("distributed_timeout_minutes") * 60.0;
  DSV3_CHECK(
      c.distributed_timeout_s >= 0 && std::isfinite(c.distributed_timeout_s),
      "--distributed-timeout-minutes / --distributed-timeout-seconds must be >= 0 (0: no timeout), got ",
      c.distributed_timeout_s, " s");
}

}  // namespace

TrainConfig TrainConfig::from_args(TrainArgs args, int world_size) {
  TrainConfig c;
  read_required(args);
  read_model(args, c);
  read_layout(args, world_size, c);
  read_batch(args, c);
  read_model_options(args, c);
  read_optimizer(args, c);
  read_data(args, c);
  read_run_controls(args, c);
  read_device(args, world_size, c);
  auto no_effect = args.no_effect();
  if (args.b("sequence_parallel") && c.parallel.tp == 1)
    no_effect.emplace_back("--sequence-parallel",
                           "tensor model parallel size 1: no TP group to shard the "
                           "sequence over; Megatron turns it off too");
  c.no_effect_line = format_no_effect_line(no_effect);
  c.args = std::move(args);
  return c;
}

}  // namespace dsv3
