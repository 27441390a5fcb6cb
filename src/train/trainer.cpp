// The training loop. Per iteration (Megatron's train_step): num_micro = GBS / (mbs · DP) micro-batches on each
// data-parallel rank (its slice of the global sample order, spec §4.8), each forward + backward with the loss
// scaled as Megatron scales it (Σ(loss·mask)/Σmask / num_micro, aux and MTP gradients / num_micro), then the
// data-parallel gradient reduction (parallel/data_parallel.h: all-reduce, so every rank holds the global batch's
// gradient; or, with --use-distributed-optimizer, reduce-scatter to shards: parallel/distributed_optimizer.h), the
// loss sums and expert counts all-reduced, NaN checks, the global grad-norm (before clipping) and clipping, AdamW at
// the scheduler's current lr (replicated state, or sharded and then all-gathered), the expert-bias update from the
// global expert counts, and the scheduler stepped by GBS samples. Under expert parallelism each rank holds and
// updates only its experts (model/param_store.h, parallel/ep_dispatcher.h). Every decision that ends or changes the
// loop (NaN, SIGTERM, duration, kill switch) is agreed by an all-reduce, so no rank is left waiting in a collective.
#include "train/trainer.h"

#include <omp.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>

#include "core/error.h"
#include "data/blended_dataset.h"
#include "data/indexed_dataset.h"
#include "data/tokenizer/tokenizer.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "optim/expert_bias.h"
#include "optim/grad_clip.h"
#include "optim/lr_schedule.h"
#include "train/args.h"
#include "train/checkpoint.h"
#include "train/log_format.h"
#include "train/model_from_args.h"
#include "parallel/comm.h"
#include "parallel/data_parallel.h"
#include "parallel/distributed_optimizer.h"
#include "parallel/ep_dispatcher.h"
#include "parallel/pipeline.h"
#include "parallel/process_groups.h"
#include "train/tensorboard.h"

namespace dsv3 {
namespace {

using Clock = std::chrono::steady_clock;

std::atomic<bool> g_sigterm{false};
void on_sigterm(int) { g_sigterm = true; }

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

void print_line(const ProcessGroups& pg, const std::string& s) {
  if (!pg.is_last_rank()) return;
  std::fputs(s.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

// Sums of one iteration's micro-batches.
struct IterStats {
  double lm_loss_sum = 0;
  int64_t lm_tokens = 0;
  double aux_sum = 0;  // Σ layers Σ micro-batches of seq aux loss (already × coeff)
  int64_t moe_layers = 0;
  std::vector<double> mtp_sum;
  std::vector<int64_t> mtp_tokens;
  std::vector<std::vector<int64_t>> counts;  // per MoE layer, summed over micro-batches
  void add(const ForwardStats& st) {
    lm_loss_sum += st.lm_loss_sum, lm_tokens += st.lm_tokens, aux_sum += st.aux_loss_sum;
    moe_layers = st.moe_layers;
    mtp_sum.resize(st.mtp_loss_sum.size()), mtp_tokens.resize(st.mtp_tokens.size());
    for (size_t k = 0; k < st.mtp_loss_sum.size(); ++k) mtp_sum[k] += st.mtp_loss_sum[k], mtp_tokens[k] += st.mtp_tokens[k];
    counts.resize(st.tokens_per_expert.size());
    for (size_t l = 0; l < st.tokens_per_expert.size(); ++l) {
      counts[l].resize(st.tokens_per_expert[l].size());
      for (size_t e = 0; e < counts[l].size(); ++e) counts[l][e] += st.tokens_per_expert[l][e];
    }
  }
};

// Megatron's timers (--timing-log-level >= 1): seconds per name accumulated over the log interval.
struct Timers {
  std::vector<std::pair<std::string, double>> t;
  void add(const std::string& name, double s) {
    for (auto& [k, v] : t)
      if (k == name) {
        v += s;
        return;
      }
    t.emplace_back(name, s);
  }
};

class Trainer {
 public:
  Trainer(TrainArgs a, Comm& world) : args_(std::move(a)), world_(world) {}
  int run();

 private:
  void setup();
  void build_data();
  void check_data();
  IterStats train_step();
  void fill_batch(const SampleDataset& ds, int64_t first, int64_t count);
  double evaluate(const SampleDataset& ds, int64_t& consumed, const std::string& label, int64_t iteration);
  void save(int64_t iteration);
  std::vector<std::pair<std::string, double>> losses_of(const IterStats& s) const;
  void reduce_stats(IterStats& s);
  std::string timers_block(int64_t iterations);
  double grad_norm();
  // An exit condition seen by any rank, as every rank's decision.
  bool any_rank(bool local) {
    int64_t v = local ? 1 : 0;
    world_.allreduce(&v, 1, ReduceOp::kMax);
    return v != 0;
  }

  TrainArgs args_;
  Comm& world_;
  ProcessGroups pg_;
  std::unique_ptr<GroupComms> comms_;
  std::unique_ptr<DataParallelGrads> ddp_;
  Timers timers_;
  ModelConfig cfg_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<AdamW> opt_;                  // replicated optimizer state, or
  std::unique_ptr<DistributedOptimizer> dopt_;  // --use-distributed-optimizer: sharded over DP
  AdamW& adam() { return dopt_ ? dopt_->adam() : *opt_; }
  std::unique_ptr<LrScheduler> sched_;
  std::unique_ptr<EventWriter> tb_;
  std::unique_ptr<SampleDataset> train_ds_, valid_ds_, test_ds_;
  TrainProgress prog_;
  int64_t S_ = 0, mbs_ = 0, gbs_ = 0, num_micro_ = 0, train_iters_ = 0, padded_vocab_ = 0;
  double coeff_ = 0;
  std::vector<int32_t> ids_, labels_;
  std::vector<int64_t> moe_layer_ids_;
  std::vector<PipelineStage> stages_;              // every pipeline stage's layers
  std::unique_ptr<Comm> embedding_group_;          // MTP under PP: the first and last stage's embedding copies
  PipelineBuffers pipeline_buffers_;
  struct InFlight {  // pipeline: micro-batch m's saved forward state and token counts, in slot m % PP
    Model::Activations acts;
    int64_t lm_tokens = 0;
    std::vector<int64_t> mtp_tokens;
  };
  std::vector<InFlight> in_flight_;
  std::vector<float> mtp_scales_;  // backward_micro's scratch
  void pipeline_step(IterStats& it, bool& nan_here, double& nan_value);
  void backward_micro(int64_t lm_tokens, const std::vector<int64_t>& mtp_tokens, const float* output_grad);
  int64_t last_saved_ = -1;
};

void Trainer::setup() {
  DSV3_CHECK(args_.given("seq_length"), "--seq-length is required");
  DSV3_CHECK(args_.given("train_iters"), "--train-iters is required");
  DSV3_CHECK(args_.given("lr"), "--lr is required");
  DSV3_CHECK(!args_.list("data_path").empty(), "--data-path is required");

  const std::string opt = args_.s("optimizer");
  DSV3_CHECK(opt == "adam" || opt == "adamw" || opt == "fusedadamw", "--optimizer ", opt,
             " is not supported: dsv3 trains with AdamW (adam, adamw, fusedadamw)");
  const std::string device = args_.s("device");
  DSV3_CHECK(device == "auto" || device == "cpu" || device == "cuda", "--device ", device,
             ": expected auto, cpu or cuda");
  DSV3_CHECK(device != "cuda", "--device cuda: this build has no CUDA backend");

  int64_t tok_size = 0;
  if (args_.given("tokenizer_model")) tok_size = Tokenizer::from_directory(args_.s("tokenizer_model")).size();
  cfg_ = model_config_from_args(args_, tok_size);
  padded_vocab_ = cfg_.vocab_size;

  // The layout (spec §8): impossible sizes are refused with the rule they break; then the parts of the layout
  // that are not implemented yet are refused by flag.
  ParallelSizes ps;
  ps.tp = static_cast<int>(args_.i("tensor_model_parallel_size"));
  ps.cp = static_cast<int>(args_.i("context_parallel_size"));
  ps.ep = static_cast<int>(args_.i("expert_model_parallel_size"));
  ps.pp = static_cast<int>(args_.i("pipeline_model_parallel_size"));
  if (cfg_.n_routed_experts > 0) ps.num_experts = cfg_.n_routed_experts;
  pg_ = ProcessGroups::build(world_.size(), world_.rank(), ps);
  const struct {
    const char *dest, *flag, *what;
  } unimplemented[] = {{"tensor_model_parallel_size", "--tensor-model-parallel-size", "tensor"},
                       {"context_parallel_size", "--context-parallel-size", "context"}};
  for (const auto& u : unimplemented)
    DSV3_CHECK(args_.i(u.dest) == 1, u.flag, " ", args_.i(u.dest), ": ", u.what, " parallelism is not implemented "
               "yet in dsv3's distributed runtime; data, expert and pipeline parallelism are (start the ranks with "
               "mpirun and leave the other parallel sizes at 1)");
  comms_ = std::make_unique<GroupComms>(pg_, world_);

  S_ = args_.i("seq_length"), mbs_ = args_.i("micro_batch_size"), train_iters_ = args_.i("train_iters");
  gbs_ = args_.given("global_batch_size") ? args_.i("global_batch_size") : mbs_ * pg_.dp;
  args_.set("global_batch_size", std::to_string(gbs_));
  DSV3_CHECK(S_ >= 1 && mbs_ >= 1 && train_iters_ >= 1, "--seq-length, --micro-batch-size and --train-iters must be >= 1");
  DSV3_CHECK(gbs_ % (mbs_ * pg_.dp) == 0, "--global-batch-size (", gbs_, ") is not divisible by micro-batch-size (",
             mbs_, ") times data-parallel size (", pg_.dp, ")");
  num_micro_ = gbs_ / (mbs_ * pg_.dp);

  DSV3_CHECK(tok_size == 0 || tok_size <= padded_vocab_, "the tokenizer has ", tok_size,
             " ids but the model's vocab_size is ", padded_vocab_);
  DSV3_CHECK(S_ <= cfg_.max_position_embeddings, "--seq-length ", S_, " exceeds max_position_embeddings ",
             cfg_.max_position_embeddings);

  ModelOptions mo;
  mo.precision = args_.b("bf16") ? Precision::kBF16 : Precision::kF32;
  mo.ep.type = parse_dispatcher_type(args_.s("moe_token_dispatcher_type"));
  if (pg_.ep > 1) mo.ep.comm = &(*comms_)[Group::kEp];
  // Pipeline stages (model/param_store.h). MTP on the last of several stages embeds tokens too: that stage keeps
  // a copy of the embedding whose gradient is summed with the first stage's over the embedding group (first and
  // last stage of one DP/TP position).
  const bool shared_embedding = pg_.pp > 1 && cfg_.num_nextn_predict_layers > 0;
  auto end_stage_layers = [&](const char* dest, const char* flag) -> int64_t {
    if (!args_.given(dest)) return 0;
    DSV3_CHECK(args_.i(dest) >= 1, flag, " must be >= 1, got ", args_.i(dest));
    return args_.i(dest);
  };
  stages_ = plan_pipeline_stages(
      cfg_.num_hidden_layers, pg_.pp,
      end_stage_layers("decoder_first_pipeline_num_layers", "--decoder-first-pipeline-num-layers"),
      end_stage_layers("decoder_last_pipeline_num_layers", "--decoder-last-pipeline-num-layers"), shared_embedding);
  mo.stage = stages_[pg_.pp_rank];
  if (shared_embedding) {
    const bool member = pg_.pp_rank == 0 || pg_.pp_rank == pg_.pp - 1;
    // One group per (tp, cp, dp) position, from the layout's coordinates rather than an assumed rank order.
    const int position = pg_.tp_rank + pg_.tp * (pg_.cp_rank + pg_.cp * pg_.dp_rank);
    embedding_group_ = world_.split(member ? position : pg_.world + pg_.rank, pg_.pp_rank);
  }
  if (args_.given("recompute_granularity")) {
    const std::string g = args_.s("recompute_granularity");  // selective is listed as having no effect
    DSV3_CHECK(g == "full" || g == "selective", "--recompute-granularity ", g,
               " is not supported (dsv3 implements full)");
    mo.recompute = g == "full";
  }
  const std::string lb = args_.s("moe_router_load_balancing_type");
  DSV3_CHECK(lb == "seq_aux_loss" || lb == "none" || lb == "aux_loss", "--moe-router-load-balancing-type ", lb,
             " is not supported (seq_aux_loss, none)");
  coeff_ = lb == "seq_aux_loss" ? args_.f("moe_aux_loss_coeff") : 0.0;
  DSV3_CHECK(lb != "aux_loss" || args_.f("moe_aux_loss_coeff") == 0.0,
             "--moe-router-load-balancing-type aux_loss (Switch/GShard) is not implemented; DeepSeek-V3 uses "
             "seq_aux_loss");
  mo.seq_aux_coeff = static_cast<float>(coeff_);
  if (args_.given("moe_expert_capacity_factor") && args_.f("moe_expert_capacity_factor") >= 0) {
    DSV3_CHECK(args_.s("moe_token_dispatcher_type") != "allgather",
               "token dropping (--moe-expert-capacity-factor) needs --moe-token-dispatcher-type alltoall, as in "
               "Megatron-Core");
    mo.capacity_factor = args_.f("moe_expert_capacity_factor");
    const std::string pol = args_.s("moe_token_drop_policy");
    DSV3_CHECK(pol == "probs" || pol == "position", "--moe-token-drop-policy must be probs or position, not ", pol);
    mo.drop_policy = pol == "probs" ? DropPolicy::kProbs : DropPolicy::kPosition;
    mo.pad_to_capacity = args_.b("moe_pad_expert_input_to_capacity");
  } else {
    DSV3_CHECK(!args_.b("moe_pad_expert_input_to_capacity"),
               "--moe-pad-expert-input-to-capacity requires --moe-expert-capacity-factor");
  }
  model_ = std::make_unique<Model>(cfg_, mo);
  model_->init(static_cast<uint64_t>(args_.i("seed")));  // the same weights on every rank (principle 4)
  ddp_ = std::make_unique<DataParallelGrads>(model_->table(), model_->store(), pg_, *comms_,
                                             DataParallelGrads::default_bucket_numel(pg_.dp));
  for (int64_t i = 0; i < cfg_.num_hidden_layers + cfg_.num_nextn_predict_layers; ++i)
    if (cfg_.is_moe_layer(i) && model_->store().contains("model.layers." + std::to_string(i) + ".mlp.gate.weight"))
      moe_layer_ids_.push_back(i);  // this stage's MoE layers, in forward order

  const AdamWConfig ac{args_.f("adam_beta1"), args_.f("adam_beta2"), args_.f("adam_eps")};
  if (args_.b("use_distributed_optimizer"))
    dopt_ = std::make_unique<DistributedOptimizer>(model_->table(), model_->store(), *ddp_, ac);
  else
    opt_ = std::make_unique<AdamW>(static_cast<int64_t>(model_->params().size()), ac);
  LrScheduleConfig lc;
  lc.max_lr = args_.f("lr"), lc.min_lr = args_.f("min_lr"), lc.init_lr = 0;
  lc.warmup_steps = args_.i("lr_warmup_iters") * gbs_;
  lc.decay_steps = (args_.given("lr_decay_iters") ? args_.i("lr_decay_iters") : train_iters_) * gbs_;
  lc.decay_style = args_.s("lr_decay_style");
  sched_ = std::make_unique<LrScheduler>(lc);
  prog_.seed = static_cast<uint64_t>(args_.i("seed"));
}

// Rank 0 builds (and caches) the dataset indices first; the others then read its cache (Megatron's order).
void Trainer::build_data() {
  if (!pg_.is_first_rank()) world_.barrier();
  GptDatasetConfig dc;
  dc.random_seed = args_.i("seed");
  dc.sequence_length = S_;
  dc.split = args_.s("split");
  if (args_.given("tokenizer_model")) dc.tokenizer_path = args_.s("tokenizer_model");
  if (args_.given("data_cache_path")) dc.path_to_cache = args_.s("data_cache_path");
  const DataBlend blend = parse_data_path(args_.list("data_path"));
  const int64_t eval_iters = args_.i("eval_iters"), eval_interval = args_.i("eval_interval");
  const int64_t n_train = train_iters_ * gbs_;
  const int64_t n_valid = (train_iters_ / eval_interval + 1) * eval_iters * gbs_;
  const int64_t n_test = eval_iters * gbs_;
  const auto split = parse_and_normalize_split(dc.split);
  check_data();
  train_ds_ = build_split_dataset(blend, Split::kTrain, n_train, dc);
  DSV3_CHECK(train_ds_ && train_ds_->size() >= n_train, "the training split has ",
             train_ds_ ? train_ds_->size() : 0, " samples of ", S_ + 1, " tokens; ", n_train, " are needed");
  if (eval_iters > 0 && split[1] > 0) valid_ds_ = build_split_dataset(blend, Split::kValid, n_valid, dc);
  if (eval_iters > 0 && split[2] > 0) test_ds_ = build_split_dataset(blend, Split::kTest, n_test, dc);
  if (pg_.is_first_rank()) world_.barrier();
}

// Before any index is built: each dataset holds at least one sample, and every token id fits the embedding (one
// pass over every .bin of the blend).
void Trainer::check_data() {
  const DataBlend blend = parse_data_path(args_.list("data_path"));
  for (const auto& prefix : blend.prefixes) {
    IndexedDataset ds(prefix);
    DSV3_CHECK(ds.token_count() >= S_ + 1, prefix, " holds ", ds.token_count(),
               " tokens, too few for one sample of --seq-length + 1 = ", S_ + 1, " tokens");
    int64_t worst = -1, worst_seq = -1;
    for (int64_t s = 0; s < ds.sequence_count(); ++s) {
      for (int64_t id : ds.get(s))
        if (id >= padded_vocab_ || id < 0) worst = id, worst_seq = s;
      if (worst >= 0) break;
    }
    DSV3_CHECK(worst < 0, prefix, ": token id ", worst, " in sequence ", worst_seq,
               " is outside the model's vocabulary [0, ", padded_vocab_,
               ") — was the data tokenized with another tokenizer?");
  }
}

void Trainer::fill_batch(const SampleDataset& ds, int64_t first, int64_t count) {
  ids_.resize(count * S_), labels_.resize(count * S_);
  for (int64_t b = 0; b < count; ++b) {
    const auto x = ds.sample(first + b);
    DSV3_CHECK(static_cast<int64_t>(x.size()) == S_ + 1, "sample ", first + b, " has ", x.size(), " tokens");
    for (int64_t s = 0; s < S_; ++s) {
      ids_[b * S_ + s] = static_cast<int32_t>(x[s]);
      labels_[b * S_ + s] = static_cast<int32_t>(x[s + 1]);
    }
  }
}

// One micro-batch's backward with Megatron's loss scaling: lm loss 1/(tokens·num_micro), aux losses 1/num_micro,
// MTP depth k mtp_loss_scaling_factor / D / tokens_k / num_micro.
void Trainer::backward_micro(int64_t lm_tokens, const std::vector<int64_t>& mtp_tokens, const float* output_grad) {
  const int64_t depths = static_cast<int64_t>(mtp_tokens.size());
  mtp_scales_.resize(depths);
  for (int64_t k = 0; k < depths; ++k)
    mtp_scales_[k] =
        mtp_tokens[k] ? static_cast<float>(args_.f("mtp_loss_scaling_factor") / depths / mtp_tokens[k] / num_micro_)
                      : 0.f;
  const float lm_scale = lm_tokens ? 1.f / static_cast<float>(lm_tokens * num_micro_) : 0.f;
  model_->backward(lm_scale, 1.f / static_cast<float>(num_micro_), mtp_scales_, output_grad);
}

// One iteration's micro-batches through the pipeline (parallel/pipeline.h: 1F1B). Each micro-batch's forward
// state waits in its own slot until its backward; the loss scaling is the single-stage loop's.
void Trainer::pipeline_step(IterStats& it, bool& nan_here, double& nan_value) {
  const bool check_nan = args_.b("check_for_nan_in_loss_and_grad");
  in_flight_.resize(pg_.pp);
  PipelineSteps steps;
  steps.forward = [&](int64_t m, const float* input) -> const float* {
    fill_batch(*train_ds_, prog_.consumed_train_samples + m * mbs_ * pg_.dp + pg_.dp_rank * mbs_, mbs_);
    InFlight& slot = in_flight_[m % pg_.pp];
    model_->swap_activations(slot.acts);
    const ForwardStats st = model_->forward(ids_.data(), labels_.data(), mbs_, S_, true, nullptr, input);
    const float* out = model_->options().stage.post_process ? nullptr : model_->stage_output();
    model_->swap_activations(slot.acts);  // `out` stays valid: the slot now owns that buffer
    if (check_nan && !nan_here && !std::isfinite(st.lm_loss_sum)) nan_here = true, nan_value = st.lm_loss_sum;
    slot.lm_tokens = st.lm_tokens;
    slot.mtp_tokens = st.mtp_tokens;
    it.add(st);
    return out;
  };
  steps.backward = [&](int64_t m, const float* output_grad) -> const float* {
    InFlight& slot = in_flight_[m % pg_.pp];
    model_->swap_activations(slot.acts);
    backward_micro(slot.lm_tokens, slot.mtp_tokens, output_grad);
    model_->swap_activations(slot.acts);
    return model_->stage_input_grad();
  };
  run_1f1b((*comms_)[Group::kPp], num_micro_, mbs_ * S_ * cfg_.hidden_size, steps, pipeline_buffers_);
}

IterStats Trainer::train_step() {
  IterStats it;
  model_->zero_grads();
  const bool check_nan = args_.b("check_for_nan_in_loss_and_grad");
  bool nan_here = false;
  double nan_value = 0;
  const auto t0 = Clock::now();
  ep_dispatch_seconds_reset();
  if (pg_.pp > 1) pipeline_step(it, nan_here, nan_value);
  for (int64_t m = 0; m < num_micro_ && pg_.pp == 1; ++m) {
    // MegatronPretrainingSampler: this rank's slice of the chunk of mbs·DP samples.
    const int64_t first = prog_.consumed_train_samples + m * mbs_ * pg_.dp + pg_.dp_rank * mbs_;
    fill_batch(*train_ds_, first, mbs_);
    ForwardStats st = model_->forward(ids_.data(), labels_.data(), mbs_, S_, true);
    // No early exit: under expert parallelism the other ranks wait for this one in the backward's collectives.
    if (check_nan && !nan_here && !std::isfinite(st.lm_loss_sum)) nan_here = true, nan_value = st.lm_loss_sum;
    backward_micro(st.lm_tokens, st.mtp_tokens, nullptr);
    it.add(st);
  }
  const double fb = seconds_since(t0);
  timers_.add("forward-backward", fb);
  if (pg_.ep > 1) {  // forward-backward split into the MoE token exchange (with its waits) and the rest, per rank
    timers_.add("moe-dispatch-combine", ep_dispatch_seconds());
    timers_.add("forward-backward-compute", fb - ep_dispatch_seconds());
  }
  if (check_nan) {
    int64_t worst = nan_here ? pg_.world - pg_.rank : 0;  // the max names the lowest rank that saw NaN
    world_.allreduce(&worst, 1, ReduceOp::kMax);
    if (nan_here)
      fail("Rank ", pg_.rank, ", iteration ", prog_.iteration + 1, ": Unexpected result ", nan_value,
           " (message='found NaN in local forward loss calculation')");
    if (worst)
      fail("Rank ", pg_.rank, ", iteration ", prog_.iteration + 1, ": stopping: rank ", pg_.world - worst,
           " found NaN in its local forward loss");
  }
  const auto t1 = Clock::now();
  if (embedding_group_ && embedding_group_->size() > 1)
    embedding_group_->allreduce(model_->grad("model.embed_tokens.weight"), cfg_.vocab_size * cfg_.hidden_size);
  if (dopt_) dopt_->reduce_scatter(model_->grads().data());
  else ddp_->reduce(model_->grads().data());
  reduce_stats(it);
  timers_.add("all-grads-sync", seconds_since(t1));
  return it;
}

// The iteration's sums over the data-parallel ranks (losses and token counts over DP×CP; the router's expert
// counts over TP×DP×CP, as Megatron sums them for the bias update), so every rank logs and updates from the
// global batch.
void Trainer::reduce_stats(IterStats& s) {
  Comm& dp = (*comms_)[Group::kDpCp];
  if (dp.size() > 1) {
    std::vector<double> d{s.lm_loss_sum, s.aux_sum};
    d.insert(d.end(), s.mtp_sum.begin(), s.mtp_sum.end());
    dp.allreduce(d.data(), static_cast<int64_t>(d.size()), ReduceOp::kSum);
    s.lm_loss_sum = d[0], s.aux_sum = d[1];
    std::copy(d.begin() + 2, d.end(), s.mtp_sum.begin());
    std::vector<int64_t> n{s.lm_tokens};
    n.insert(n.end(), s.mtp_tokens.begin(), s.mtp_tokens.end());
    dp.allreduce(n.data(), static_cast<int64_t>(n.size()), ReduceOp::kSum);
    s.lm_tokens = n[0];
    std::copy(n.begin() + 1, n.end(), s.mtp_tokens.begin());
  }
  // Pipeline stages: the loss lives on the last stage, aux losses and MoE layer counts on every stage.
  if (Comm& pp = (*comms_)[Group::kPp]; pp.size() > 1) {
    const size_t depths = model_->options().mtp ? cfg_.num_nextn_predict_layers : 0;
    s.mtp_sum.resize(depths), s.mtp_tokens.resize(depths);  // only the last stage ran them
    std::vector<double> d{s.lm_loss_sum, s.aux_sum};
    d.insert(d.end(), s.mtp_sum.begin(), s.mtp_sum.end());
    pp.allreduce(d.data(), static_cast<int64_t>(d.size()), ReduceOp::kSum);
    s.lm_loss_sum = d[0], s.aux_sum = d[1];
    std::copy(d.begin() + 2, d.end(), s.mtp_sum.begin());
    std::vector<int64_t> n{s.lm_tokens, s.moe_layers};
    n.insert(n.end(), s.mtp_tokens.begin(), s.mtp_tokens.end());
    pp.allreduce(n.data(), static_cast<int64_t>(n.size()), ReduceOp::kSum);
    s.lm_tokens = n[0], s.moe_layers = n[1];
    std::copy(n.begin() + 2, n.end(), s.mtp_tokens.begin());
  }
  Comm& cnt = (*comms_)[Group::kTpDpCp];
  if (cnt.size() > 1 && !s.counts.empty()) {
    std::vector<int64_t> flat;
    for (const auto& c : s.counts) flat.insert(flat.end(), c.begin(), c.end());
    cnt.allreduce(flat.data(), static_cast<int64_t>(flat.size()), ReduceOp::kSum);
    size_t k = 0;
    for (auto& c : s.counts)
      for (auto& v : c) v = flat[k++];
  }
}

// The global L2 norm of the gradient. After the data-parallel reduce the dense gradients are the same on every
// rank of a stage and each EP rank holds its own experts' (identical across expert-DP): dense squares summed over
// the stages, expert squares over the stages and EP ranks.
double Trainer::grad_norm() {
  const auto& g = model_->grads();
  // The last stage's copy of a shared embedding is not counted (the first stage's is the same gradient).
  const auto& store = model_->store();
  const bool skip_embedding = !model_->options().stage.pre_process && store.contains("model.embed_tokens.weight");
  const int64_t skip0 = skip_embedding ? store.offset("model.embed_tokens.weight") : 0;
  const int64_t skip1 = skip_embedding ? skip0 + cfg_.vocab_size * cfg_.hidden_size : 0;
  if (dopt_) {  // each rank holds the reduced gradient of its shards only; together they cover every element once
    double sq = dopt_->shard_sum_of_squares(g.data(), skip0, skip1);
    world_.allreduce(&sq, 1, ReduceOp::kSum);
    return std::sqrt(sq);
  }
  if (pg_.ep == 1 && pg_.pp == 1) return l2_norm(g.data(), static_cast<int64_t>(g.size()));
  double sq[2] = {0, 0};  // dense, expert
  for (const auto& p : model_->table().params())
    if (p.tied_to.empty() && p.trainable && store.contains(p.name) && !(skip_embedding && store.offset(p.name) == skip0))
      sq[p.is_expert] += sum_of_squares(g.data() + store.offset(p.name), p.numel);
  (*comms_)[Group::kPp].allreduce(&sq[0], 1, ReduceOp::kSum);        // each stage's dense parameters
  (*comms_)[Group::kEtpEpPp].allreduce(&sq[1], 1, ReduceOp::kSum);   // each (stage, EP rank)'s experts
  return std::sqrt(sq[0] + sq[1]);
}

// Megatron's Timers.log with --timing-log-option minmax: each timer's per-iteration mean over the interval, its
// minimum and maximum across ranks.
std::string Trainer::timers_block(int64_t iterations) {
  std::vector<double> mn, mx;
  for (const auto& [k, v] : timers_.t) mn.push_back(v * 1000.0 / iterations), mx.push_back(v * 1000.0 / iterations);
  world_.allreduce(mn.data(), static_cast<int64_t>(mn.size()), ReduceOp::kMin);
  world_.allreduce(mx.data(), static_cast<int64_t>(mx.size()), ReduceOp::kMax);
  std::string out = "(min, max) time across ranks (ms):";
  for (size_t i = 0; i < timers_.t.size(); ++i) {
    std::string name = timers_.t[i].first + " ";
    if (name.size() < 48) name.append(48 - name.size(), '.');
    char buf[160];
    std::snprintf(buf, sizeof buf, "\n    %s: (%.2f, %.2f)", name.c_str(), mn[i], mx[i]);
    out += buf;
  }
  timers_.t.clear();
  return out;
}

std::vector<std::pair<std::string, double>> Trainer::losses_of(const IterStats& s) const {
  std::vector<std::pair<std::string, double>> out;
  out.emplace_back("lm loss", s.lm_tokens ? s.lm_loss_sum / s.lm_tokens : 0.0);
  if (coeff_ > 0 && s.moe_layers > 0)
    out.emplace_back("load_balancing_loss", s.aux_sum / coeff_ / (num_micro_ * pg_.dp) / s.moe_layers);
  for (size_t k = 0; k < s.mtp_sum.size(); ++k)
    out.emplace_back("mtp_" + std::to_string(k + 1) + " loss", s.mtp_tokens[k] ? s.mtp_sum[k] / s.mtp_tokens[k] : 0.0);
  return out;
}

double Trainer::evaluate(const SampleDataset& ds, int64_t& consumed, const std::string& label, int64_t iteration) {
  double sum = 0;
  int64_t tokens = 0;
  PipelineSteps steps;  // forward only; on one stage, each micro-batch in turn
  steps.forward = [&](int64_t m, const float* input) -> const float* {
    const int64_t first = consumed + m * mbs_ * pg_.dp + pg_.dp_rank * mbs_;
    DSV3_CHECK(first + mbs_ <= ds.size(), "the ", label, " split ran out of samples");
    fill_batch(ds, first, mbs_);
    auto st = model_->forward(ids_.data(), labels_.data(), mbs_, S_, false, nullptr, input);
    sum += st.lm_loss_sum, tokens += st.lm_tokens;
    return model_->options().stage.post_process ? nullptr : model_->stage_output();
  };
  for (int64_t e = 0; e < args_.i("eval_iters"); ++e) {
    run_forward_only((*comms_)[Group::kPp], num_micro_, mbs_ * S_ * cfg_.hidden_size, steps, pipeline_buffers_);
    consumed += gbs_;
  }
  for (Group g : {Group::kDpCp, Group::kPp})  // the loss lives on the last stage
    if (Comm& c = (*comms_)[g]; c.size() > 1) {
      c.allreduce(&sum, 1, ReduceOp::kSum);
      c.allreduce(&tokens, 1, ReduceOp::kSum);
    }
  const double loss = tokens ? sum / tokens : 0.0;
  const bool test = label == "test";
  // Megatron's evaluate_and_print_results: the test set reuses the validation wording with "on test set".
  const std::string what = "validation loss at iteration " + std::to_string(iteration) + (test ? " on test set" : "");
  print_line(pg_, format_eval_block(what, {{"lm loss", loss}}));
  if (tb_ && !test) {
    const std::string key = "lm loss validation";
    const double ppl = std::exp(std::min(20.0, loss));
    tb_->add_scalar(key, loss, iteration);
    tb_->add_scalar(key + " vs samples", loss, prog_.consumed_train_samples);
    tb_->add_scalar(key + " vs tokens", loss, prog_.consumed_train_samples * S_);
    tb_->add_scalar(key + " ppl", ppl, iteration);
    tb_->add_scalar(key + " ppl vs samples", ppl, prog_.consumed_train_samples);
    tb_->add_scalar(key + " ppl vs tokens", ppl, prog_.consumed_train_samples * S_);
    tb_->flush();
  }
  return loss;
}

void Trainer::save(int64_t iteration) {
  if (!args_.given("save") || last_saved_ == iteration) return;
  prog_.optimizer_step = adam().step();
  prog_.scheduler_num_steps = sched_->num_steps();
  const auto t0 = Clock::now();
  std::vector<float> m, v;  // the distributed optimizer's moments, gathered into the store layout
  if (dopt_) dopt_->gather_moments(m, v);
  const CheckpointTensors t{&model_->table(), &model_->store(), model_->params().data(),
                            dopt_ ? m.data() : opt_->exp_avg().data(), dopt_ ? v.data() : opt_->exp_avg_sq().data()};
  if (pg_.ep == 1 && pg_.pp == 1) {
    // Replicated state: rank 0 writes it; the others wait (below) so that no rank runs ahead (or exits) before
    // the checkpoint is complete.
    RankInfo r;
    r.rank = pg_.rank, r.world = pg_.world, r.replicated = true;
    if (pg_.is_first_rank()) save_checkpoint(args_.s("save"), prog_, t, args_.all_map(), cfg_, r);
  } else {
    // One shard per (stage, EP rank), written by its expert-DP rank 0 (the other replicas hold the same state).
    RankInfo r;
    r.rank = pg_.rank, r.world = pg_.world, r.comm = &world_, r.shards = pg_.pp * pg_.ep, r.stages = stages_;
    r.shard = pg_.edp_rank == 0 ? pg_.pp_rank * pg_.ep + pg_.ep_rank : -1;
    save_checkpoint(args_.s("save"), prog_, t, args_.all_map(), cfg_, r);
  }
  world_.barrier();
  last_saved_ = iteration;
  print_line(pg_, "  successfully saved checkpoint from iteration " + std::to_string(iteration) + " to " +
                      args_.s("save") + " [ t " + std::to_string(pg_.tp) + "/" + std::to_string(pg_.tp) + ", p " +
                      std::to_string(pg_.pp) + "/" + std::to_string(pg_.pp) + " ] (" +
                      std::to_string(seconds_since(t0)).substr(0, 5) + " s)");
}

int Trainer::run() {
  const auto start = Clock::now();
  if (any_rank(args_.given("kill_switch_file") && std::filesystem::exists(args_.s("kill_switch_file")))) {
    print_line(pg_, "Detected kill switch at " + args_.s("kill_switch_file") + ". Exiting");
    return 0;
  }
  setup();
  if (const std::string line = format_no_effect_line(args_.no_effect()); !line.empty() && pg_.is_first_rank())
    std::printf("%s\n", line.c_str()), std::fflush(stdout);
  print_line(pg_, format_arguments_block(args_.all()));
  if (pg_.pp > 1) {
    std::string layout = "pipeline stages (decoder layers):";
    for (const auto& st : stages_)
      layout += " [" + std::to_string(st.first_layer) + ", " + std::to_string(st.last_layer) + ")";
    print_line(pg_, layout);
  }
  if (args_.b("exit_signal_handler")) std::signal(SIGTERM, on_sigterm);

  if (args_.given("load")) {
    std::string msg;
    const bool optim = !args_.b("no_load_optim");
    std::vector<float> m, v;  // the distributed optimizer loads whole moments, then keeps its shards
    if (optim && dopt_) m.assign(model_->params().size(), 0.f), v.assign(model_->params().size(), 0.f);
    LoadTargets lt{&model_->table(), &model_->store(), model_->params().data(),
                   !optim ? nullptr : dopt_ ? m.data() : opt_->exp_avg().data(),
                   !optim ? nullptr : dopt_ ? v.data() : opt_->exp_avg_sq().data()};
    // Rank 0 first (it may recover a directory left by an interrupted save), then the others.
    if (!pg_.is_first_rank()) world_.barrier();
    RankInfo r;
    r.rank = pg_.rank, r.world = pg_.world;
    auto p = load_checkpoint(args_.s("load"), lt, cfg_, r,
                             nullptr, &msg);
    if (pg_.is_first_rank()) world_.barrier();
    if (!msg.empty()) print_line(pg_, msg);
    if (p) {
      prog_ = *p;
      if (optim) {
        if (dopt_) dopt_->scatter_moments(m.data(), v.data());
        adam().set_step(prog_.optimizer_step);
        sched_->set_num_steps(prog_.scheduler_num_steps);
      }
      last_saved_ = prog_.iteration;
      print_line(pg_, "  successfully loaded checkpoint from " + args_.s("load") + " at iteration " +
                          std::to_string(prog_.iteration));
    }
  }
  build_data();
  if (args_.given("tensorboard_dir") && pg_.is_last_rank()) {
    tb_ = std::make_unique<EventWriter>(args_.s("tensorboard_dir"));
    for (const auto& [k, v] : args_.all()) tb_->add_text(k, v, prog_.iteration);
    tb_->flush();
  }

  const int64_t log_interval = args_.i("log_interval"), eval_interval = args_.i("eval_interval");
  const int64_t save_interval = args_.given("save_interval") ? args_.i("save_interval") : 0;
  const double max_norm = args_.f("clip_grad");
  const bool bias_update = args_.b("moe_router_enable_expert_bias");
  const double bias_rate = args_.f("moe_router_bias_update_rate");
  const double flops_per_iter = megatron_flops_per_iteration(cfg_, gbs_, S_, padded_vocab_, cfg_.num_nextn_predict_layers);
  const auto& table = model_->table();
  const auto& store = model_->store();

  // Interval accumulators for the log line.
  std::vector<std::pair<std::string, double>> interval_losses;
  int64_t interval_iters = 0;
  double interval_seconds = 0;
  std::string exit_message;

  while (prog_.iteration < train_iters_) {
    const auto t0 = Clock::now();
    IterStats st;
    try {
      st = train_step();
    } catch (const Error& e) {
      const std::string what = e.what();
      if (what.rfind("Rank ", 0) == 0) throw;  // already names rank and iteration
      fail("Rank ", pg_.rank, ", iteration ", prog_.iteration + 1, ": ", what,
           "; the last checkpoint is left as it was");
    }
    const auto t_opt = Clock::now();
    // The global norm, the same on every rank (so is the NaN check on it).
    auto& grads = model_->grads();
    const double norm = grad_norm();
    if (args_.b("check_for_nan_in_loss_and_grad") && !std::isfinite(norm))
      fail("Rank ", pg_.rank, ", iteration ", prog_.iteration + 1, ": found NaN/Inf in the gradient (grad norm ",
           norm, ") before the optimizer step; the last checkpoint is left as it was");
    const double coeff = max_norm > 0 ? clip_coefficient(norm, max_norm) : 1.0;
    const double lr = sched_->lr();
    const double wd = args_.f("weight_decay");
    float* params = model_->params().data();
    if (dopt_) {
      if (coeff < 1.0) dopt_->scale_shards(grads.data(), static_cast<float>(coeff));
      dopt_->step(params, grads.data(), lr, wd);
    } else {
      if (coeff < 1.0) scale_inplace(grads.data(), static_cast<int64_t>(grads.size()), static_cast<float>(coeff));
      opt_->begin_step();
      for (const auto& p : table.params()) {
        if (!p.tied_to.empty() || !p.trainable || !store.contains(p.name)) continue;  // other EP ranks' experts
        opt_->update(params, grads.data(), store.offset(p.name), p.numel, lr, p.weight_decay ? wd : 0.0);
      }
    }
    if (bias_update)
      for (size_t l = 0; l < st.counts.size() && l < moe_layer_ids_.size(); ++l)
        update_expert_bias(model_->param("model.layers." + std::to_string(moe_layer_ids_[l]) +
                                         ".mlp.gate.e_score_correction_bias"),
                           st.counts[l].data(), static_cast<int64_t>(st.counts[l].size()), bias_rate);
    timers_.add("optimizer", seconds_since(t_opt));
    sched_->step(gbs_);
    prog_.iteration++;
    prog_.consumed_train_samples += gbs_;
    prog_.flops_so_far += flops_per_iter;
    const double iter_seconds = seconds_since(t0);

    // TensorBoard every iteration (Megatron's tensorboard_log_interval 1), the line every log_interval.
    const auto losses = losses_of(st);
    const double next_lr = sched_->lr();
    if (tb_) {
      const int64_t it = prog_.iteration, smp = prog_.consumed_train_samples, tok = smp * S_;
      tb_->add_scalar("learning-rate", next_lr, it);
      tb_->add_scalar("learning-rate vs samples", next_lr, smp);
      tb_->add_scalar("batch-size", gbs_, it);
      tb_->add_scalar("batch-size vs samples", gbs_, smp);
      for (const auto& [k, v] : losses) {
        tb_->add_scalar(k, v, it);
        tb_->add_scalar(k + " vs samples", v, smp);
        tb_->add_scalar(k + " vs tokens", v, tok);
      }
      tb_->add_scalar("lm-loss-training/lm loss vs tokens", losses[0].second, tok);
      tb_->add_scalar("loss-scale", 1.0, it);
      tb_->add_scalar("loss-scale vs samples", 1.0, smp);
      tb_->add_scalar("grad-norm", norm, it);
      tb_->add_scalar("grad-norm vs samples", norm, smp);
      tb_->add_scalar("grad-norm vs tokens", norm, tok);
      tb_->add_scalar("grad-norm/grad-norm vs tokens", norm, tok);
    }
    if (interval_losses.empty()) interval_losses = losses;
    else
      for (size_t k = 0; k < losses.size(); ++k) interval_losses[k].second += losses[k].second;
    interval_iters++;
    interval_seconds += iter_seconds;
    if (prog_.iteration % log_interval == 0) {
      IterationLogFields f;
      f.timestamp = timestamp_now();
      f.iteration = prog_.iteration, f.train_iters = train_iters_, f.seq_length = S_;
      f.consumed_samples = prog_.consumed_train_samples;
      f.elapsed_ms = interval_seconds / interval_iters * 1000.0;
      f.samples_per_s = gbs_ / (f.elapsed_ms / 1000.0);
      f.tokens_per_s = f.samples_per_s * S_;
      f.tflops_per_gpu = flops_per_iter / (f.elapsed_ms / 1000.0 * 1e12 * pg_.world);
      f.learning_rate = next_lr;
      f.global_batch_size = gbs_;
      for (auto& [k, v] : interval_losses) f.losses.emplace_back(k, v / interval_iters);
      f.grad_norm = norm;
      print_line(pg_, format_iteration_line(f));
      if (args_.i("timing_log_level") >= 1) print_line(pg_, timers_block(interval_iters));
      if (tb_) {
        tb_->add_scalar("iteration-time", f.elapsed_ms / 1000.0, prog_.iteration);
        tb_->add_scalar("throughput", f.tflops_per_gpu, prog_.iteration);
      }
      interval_losses.clear(), interval_iters = 0, interval_seconds = 0;
    }
    if (tb_) tb_->flush();
    if (valid_ds_ && eval_interval > 0 && prog_.iteration % eval_interval == 0 && prog_.iteration < train_iters_)
      evaluate(*valid_ds_, prog_.consumed_valid_samples, "validation", prog_.iteration);
    // Exit controls, in Megatron's order: save interval, SIGTERM, duration, exit interval, kill switch.
    if (save_interval > 0 && prog_.iteration % save_interval == 0) save(prog_.iteration);
    // What any rank saw (a signal, the clock, the kill switch file), every rank acts on.
    const double mins = seconds_since(start) / 60.0;
    int64_t stop[3] = {g_sigterm ? 1 : 0,
                       args_.given("exit_duration_in_mins") && mins > static_cast<double>(args_.i("exit_duration_in_mins")),
                       args_.given("kill_switch_file") && std::filesystem::exists(args_.s("kill_switch_file"))};
    world_.allreduce(stop, 3, ReduceOp::kMax);
    if (stop[0]) {
      save(prog_.iteration);
      exit_message = "exiting program after receiving SIGTERM.";
      break;
    }
    if (stop[1]) {
      save(prog_.iteration);
      exit_message = "exiting program after " + python_float_str(mins) + " minutes";
      break;
    }
    if (args_.given("exit_interval") && args_.i("exit_interval") > 0 && prog_.iteration % args_.i("exit_interval") == 0) {
      save(prog_.iteration);
      exit_message = "exiting program at iteration " + std::to_string(prog_.iteration);
      break;
    }
    if (stop[2]) {
      save(prog_.iteration);
      exit_message = "Detected kill switch at " + args_.s("kill_switch_file") + ", iteration=" +
                     std::to_string(prog_.iteration) + ". Exiting";
      break;
    }
  }
  if (!exit_message.empty()) {
    print_line(pg_, exit_message);
    return 0;
  }
  save(prog_.iteration);
  if (valid_ds_) evaluate(*valid_ds_, prog_.consumed_valid_samples, "validation", prog_.iteration);
  if (test_ds_) {
    int64_t consumed_test = 0;
    evaluate(*test_ds_, consumed_test, "test", prog_.iteration);
  }
  return 0;
}

}  // namespace

int run_training(int argc, char** argv, Comm& world) {
  Trainer t(TrainArgs::parse(argc, argv), world);
  return t.run();
}

int run_training(int argc, char** argv) {
  SingleComm world;
  return run_training(argc, argv, world);
}

}  // namespace dsv3
