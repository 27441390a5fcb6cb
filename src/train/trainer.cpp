// The training run (Megatron's pretrain): start-up from the typed configuration (train_config.h), then the
// loop — one iteration (train_step.cpp), its log line and TensorBoard scalars, evaluation, saves and the exit
// controls — and the final save, validation and test. Every decision that ends or changes the loop (NaN,
// SIGTERM, duration, kill switch) is agreed by an all-reduce, so no rank is left waiting in a collective.
#include "train/trainer.h"

#include <atomic>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>

#include "core/error.h"
#include "data/indexed_dataset.h"
#include "parallel/tensor_parallel_layout.h"
#include "train/log_format.h"
#include "train/trainer_impl.h"

namespace dsv3 {
namespace train_detail {
namespace {

std::atomic<bool> g_sigterm{false};
void on_sigterm(int) {
  g_sigterm = true;
}

}  // namespace

int Trainer::run() {
  const auto start = Clock::now();
  // Before the first collective: a rank that stops making progress ends the job with its name (comm.h).
  set_collective_timeout(c_.distributed_timeout_s);
  set_collective_iteration(0);
  pg_ = ProcessGroups::build(world_.size(), world_.rank(), c_.parallel);  // first: it decides who prints
  if (any_rank(kill_switch_present())) {
    print_line("Detected kill switch at " + *c_.kill_switch_file + ". Exiting");
    return 0;
  }
  setup();
  print_start();
  if (c_.exit_signal_handler) std::signal(SIGTERM, on_sigterm);
  load();
  build_data();
  open_tensorboard();
  while (prog_.iteration < c_.train_iters) {
    set_collective_iteration(prog_.iteration + 1);  // the number the iteration's log line will carry
    const auto t0 = Clock::now();
    const IterStats stats = train_step();
    const double norm = optimizer_step(stats);
    log_iteration(stats, norm, seconds_since(t0));
    if (validation_due()) evaluate(*valid_ds_, prog_.consumed_valid_samples, "validation", prog_.iteration);
    if (c_.save_interval > 0 && prog_.iteration % c_.save_interval == 0) save(prog_.iteration);
    if (const std::string why = exit_requested(start); !why.empty()) {
      save(prog_.iteration);
      print_line(why);
      return 0;
    }
  }
  finish();
  return 0;
}

void Trainer::print_line(const std::string& s) const {
  if (!pg_.is_last_rank()) return;
  std::fputs(s.c_str(), stdout);
  std::fputc('\n', stdout);
  std::fflush(stdout);
}

bool Trainer::any_rank(bool local) {
  int64_t v = local ? 1 : 0;
  world_.allreduce(&v, 1, ReduceOp::kMax);
  return v != 0;
}

bool Trainer::kill_switch_present() const {
  return c_.kill_switch_file && std::filesystem::exists(*c_.kill_switch_file);
}

// This rank's communicators, the model with this rank's parameters (the same initial weights on every rank,
// principle 4), the gradient reduction, the optimizer and the LR schedule.
void Trainer::setup() {
  runtime_bytes_ = std::max<int64_t>(resident_bytes(), 0) + kRuntimeGrowth;
  comms_ = std::make_unique<GroupComms>(pg_, world_);
  ModelOptions mo = c_.model_options;
  if (pg_.ep > 1) mo.ep.comm = &(*comms_)[Group::kEp];
  mo.tp = {pg_.tp, pg_.tp_rank, &(*comms_)[Group::kTp], c_.model_options.tp.sequence_parallel};
  // Split experts reduce over the TP group (moe.h): the expert-TP group must be it, as it is in Megatron's orders.
  DSV3_CHECK(!mo.expert_tensor_parallel || pg_.members(Group::kEtp) == pg_.members(Group::kTp),
             "expert tensor parallelism: with order ", pg_.order,
             " the expert-TP group differs from the TP group");
  mo.stage = c_.stages[pg_.pp_rank];
  if (c_.shared_embedding) {
    // MTP on the last of several stages embeds tokens too: that stage keeps a copy of the embedding whose
    // gradient is summed with the first stage's over the embedding group (first and last stage of one DP/TP
    // position), one group per (tp, cp, dp) position, from the layout's coordinates rather than an assumed
    // rank order.
    const bool member = pg_.pp_rank == 0 || pg_.pp_rank == pg_.pp - 1;
    const int position = pg_.tp_rank + pg_.tp * (pg_.cp_rank + pg_.cp * pg_.dp_rank);
    embedding_group_ = world_.split(member ? position : pg_.world + pg_.rank, pg_.pp_rank);
    embedding_group_->set_name("embedding");
  }
  const ModelConfig& cfg = c_.model;
  model_ = std::make_unique<Model>(cfg, mo);
  model_->init(c_.seed);
  ddp_ = std::make_unique<DataParallelGrads>(model_->table(), model_->store(), pg_, *comms_,
                                             DataParallelGrads::default_bucket_numel(pg_.dp));
  for (int64_t i = 0; i < cfg.num_hidden_layers + cfg.num_nextn_predict_layers; ++i)
    if (cfg.is_moe_layer(i) &&
        model_->store().contains("model.layers." + std::to_string(i) + ".mlp.gate.weight"))
      moe_layer_ids_.push_back(i);  // this stage's MoE layers, in forward order
  // On a GPU (one process) the distributed optimizer has one shard, the whole buffer: BackendAdamW computes the same.
  if (c_.distributed_optimizer && !c_.backend)
    dopt_ = std::make_unique<DistributedOptimizer>(model_->table(), model_->store(), *ddp_, c_.adam);
  else
    opt_ = std::make_unique<AdamW>(static_cast<int64_t>(model_->params().size()), c_.adam);
  if (c_.backend)
    bopt_ = std::make_unique<BackendAdamW>(*c_.backend, model_->table(), model_->store(), c_.adam);
  sched_ = std::make_unique<LrScheduler>(c_.lr_schedule);
  prog_.seed = c_.seed;
  flops_per_iteration_ = megatron_flops_per_iteration(cfg, c_.global_batch_size, c_.seq_length,
                                                      cfg.vocab_size, cfg.num_nextn_predict_layers);
  memory_plan_ = plan_memory(cfg, memory_layout(), memory_run());
}

MemoryLayout Trainer::memory_layout() const {
  MemoryLayout l;
  l.tp = pg_.tp, l.pp = pg_.pp, l.ep = pg_.ep, l.dp = pg_.dp, l.etp = pg_.etp;
  l.dist_opt = c_.distributed_optimizer && !c_.backend;
  l.stages = c_.stages;
  return l;
}

MemoryRun Trainer::memory_run() const {
  MemoryRun r;
  r.micro_batch = c_.micro_batch_size, r.seq = c_.seq_length, r.micro_batches = c_.num_micro_batches;
  r.precision = c_.model_options.precision, r.recompute = c_.model_options.recompute;
  r.mtp = c_.model_options.mtp, r.capacity_factor = c_.model_options.capacity_factor;
  r.eval = c_.eval_iters > 0 && c_.eval_interval > 0 && c_.eval_interval <= c_.train_iters;
  // Megatron's split sizes: train_iters·gbs, and eval_iters·gbs per evaluation (plus the test split's).
  const int64_t evals = c_.eval_interval > 0 ? c_.train_iters / c_.eval_interval + 1 : 1;
  r.samples = c_.global_batch_size * (c_.train_iters + c_.eval_iters * (evals + 1));
  r.cpu = !c_.backend;
  r.alltoall = c_.model_options.ep.type == DispatcherType::kAllToAll;
  r.sequence_parallel = c_.model_options.tp.sequence_parallel;
  return r;
}

// Megatron prints "(after N iterations) memory (MB)" once, after the first logged iteration, from each rank of the
// first data-parallel replica; dsv3 prints the process's resident memory and the backend's bytes beside the plan's,
// then and at the end of training (the run's peak).
void Trainer::report_memory(const std::string& when) {
  if (pg_.dp_rank != 0 || memory_plan_.empty()) return;
  const StageMemory& m = memory_plan_[static_cast<size_t>(pg_.pp_rank)];
  const double MB = 1024.0 * 1024.0;
  const int64_t predicted = m.total() + runtime_bytes_;
  const Backend& be = model_->backend();
  char line[512];
  std::snprintf(
      line, sizeof line,
      "[Rank %d] %s memory (MB) | resident: %.1f | max resident: %.1f | predicted max resident: %.1f | "
      "backend allocated: %.1f | backend max allocated: %.1f | predicted backend: %.1f",
      pg_.rank, when.c_str(), static_cast<double>(resident_bytes()) / MB,
      static_cast<double>(peak_resident_bytes()) / MB, static_cast<double>(predicted) / MB,
      static_cast<double>(be.bytes_in_use()) / MB, static_cast<double>(be.peak_bytes()) / MB,
      static_cast<double>(m.backend()) / MB);
  std::printf("%s\n", line);
  std::fflush(stdout);
}

// The flags that change nothing (rank 0, once), Megatron's arguments block and the pipeline layout (last
// rank).
void Trainer::print_start() const {
  if (pg_.is_first_rank()) std::printf("%s\n", c_.device_line.c_str()), std::fflush(stdout);
  if (!c_.no_effect_line.empty() && pg_.is_first_rank())
    std::printf("%s\n", c_.no_effect_line.c_str()), std::fflush(stdout);
  print_line(format_arguments_block(c_.args.all()));
  // The plan does not model sequence parallelism yet (its activations are planned as without it): say so.
  print_line("memory plan per rank (train/memory_plan.h; measured after the first logged iteration):\n" +
             format_memory_plan(memory_plan_, runtime_bytes_,
                                "this process before the model was built, + what the first steps add"));
  if (pg_.pp > 1) {
    std::string layout = "pipeline stages (decoder layers):";
    for (const auto& st : c_.stages)
      layout += " [" + std::to_string(st.first_layer) + ", " + std::to_string(st.last_layer) + ")";
    print_line(layout);
  }
}

// --load: weights, and unless --no-load-optim the optimizer moments, its step and the scheduler's.
void Trainer::load() {
  if (!c_.load) return;
  std::string msg;
  const bool optim = c_.load_optim;
  std::vector<float> m, v;  // the distributed optimizer loads whole moments, then keeps its shards
  if (optim && dopt_) m.assign(model_->params().size(), 0.f), v.assign(model_->params().size(), 0.f);
  std::vector<float> staged;  // on a GPU the checkpoint is read into host memory, then copied over
  if (bopt_) staged = model_->params_to_host();
  // Tensor parallelism: the checkpoint's whole tensors are read into the layout without TP (starting from the
  // current values, which absent MTP tensors keep), then each rank keeps its blocks.
  const bool tp = pg_.tp > 1;
  const ParamStore& st = model_->store();
  const ParamStore whole(model_->table(), pg_.ep, pg_.ep_rank, c_.stages[pg_.pp_rank]);
  std::vector<float> wp, wm, wv;
  if (tp) {
    wp.resize(whole.size());
    tp_gather(model_->table(), st, whole, model_->params().data(), wp.data(), (*comms_)[Group::kTp]);
    if (optim) wm.assign(whole.size(), 0.f), wv.assign(whole.size(), 0.f);
  }
  // The moments in this rank's store layout (the distributed optimizer then keeps its shards of them).
  float* const local_m = !optim ? nullptr : dopt_ ? m.data() : opt_->exp_avg().data();
  float* const local_v = !optim ? nullptr : dopt_ ? v.data() : opt_->exp_avg_sq().data();
  LoadTargets lt{&model_->table(), tp ? &whole : &st,
                 tp      ? wp.data()
                 : bopt_ ? staged.data()
                         : model_->params().data(),
                 local_m, local_v};
  // Rank 0 first (it may recover a directory left by an interrupted save), then the others.
  if (!pg_.is_first_rank()) world_.barrier();
  RankInfo r;
  r.rank = pg_.rank, r.world = pg_.world;
  if (tp && optim) lt.exp_avg = wm.data(), lt.exp_avg_sq = wv.data();
  lt.real_vocab = c_.tokenizer_size;
  auto p = load_checkpoint(*c_.load, lt, c_.model, r, nullptr, &msg);
  if (pg_.is_first_rank()) world_.barrier();
  if (!msg.empty()) print_line(msg);
  if (!p) return;
  if (tp) {
    tp_scatter(model_->table(), st, whole, wp.data(), model_->params().data());
    if (optim) {
      tp_scatter(model_->table(), st, whole, wm.data(), local_m);
      tp_scatter(model_->table(), st, whole, wv.data(), local_v);
    }
  }
  prog_ = *p;
  if (bopt_) model_->params_from_host(staged);
  if (optim) {
    if (dopt_) dopt_->scatter_moments(m.data(), v.data());
    if (bopt_) bopt_->moments_from_host(opt_->exp_avg(), opt_->exp_avg_sq());
    adam().set_step(prog_.optimizer_step);
    sched_->set_num_steps(prog_.scheduler_num_steps);
  }
  last_saved_ = prog_.iteration;
  print_line("  successfully loaded checkpoint from " + *c_.load + " at iteration " +
             std::to_string(prog_.iteration));
}

// Rank 0 builds (and caches) the dataset indices first; the others then read its cache (Megatron's order).
void Trainer::build_data() {
  if (!pg_.is_first_rank()) world_.barrier();
  const int64_t gbs = c_.global_batch_size;
  const int64_t n_train = c_.train_iters * gbs;
  const int64_t n_valid = (c_.train_iters / c_.eval_interval + 1) * c_.eval_iters * gbs;
  const int64_t n_test = c_.eval_iters * gbs;
  const auto split = parse_and_normalize_split(c_.dataset.split);
  check_data();
  train_ds_ = build_split_dataset(c_.data, Split::kTrain, n_train, c_.dataset);
  DSV3_CHECK(train_ds_ && train_ds_->size() >= n_train, "the training split has ",
             train_ds_ ? train_ds_->size() : 0, " samples of ", c_.seq_length + 1, " tokens; ", n_train,
             " are needed");
  if (c_.eval_iters > 0 && split[1] > 0)
    valid_ds_ = build_split_dataset(c_.data, Split::kValid, n_valid, c_.dataset);
  if (c_.eval_iters > 0 && split[2] > 0)
    test_ds_ = build_split_dataset(c_.data, Split::kTest, n_test, c_.dataset);
  if (pg_.is_first_rank()) world_.barrier();
}

// Before any index is built: each dataset holds at least one sample, and every token id fits the embedding
// (one pass over every .bin of the blend).
void Trainer::check_data() const {
  const int64_t S = c_.seq_length, vocab = c_.model.vocab_size;
  for (const auto& prefix : c_.data.prefixes) {
    IndexedDataset ds(prefix);
    DSV3_CHECK(ds.token_count() >= S + 1, prefix, " holds ", ds.token_count(),
               " tokens, too few for one sample of --seq-length + 1 = ", S + 1, " tokens");
    int64_t worst = -1, worst_seq = -1;
    for (int64_t s = 0; s < ds.sequence_count(); ++s) {
      for (int64_t id : ds.get(s))
        if (id >= vocab || id < 0) worst = id, worst_seq = s;
      if (worst >= 0) break;
    }
    DSV3_CHECK(worst < 0, prefix, ": token id ", worst, " in sequence ", worst_seq,
               " is outside the model's vocabulary [0, ", vocab,
               ") — was the data tokenized with another tokenizer?");
  }
}

void Trainer::open_tensorboard() {
  if (!c_.tensorboard_dir || !pg_.is_last_rank()) return;
  tb_ = std::make_unique<EventWriter>(*c_.tensorboard_dir);
  for (const auto& [k, v] : c_.args.all()) tb_->add_text(k, v, prog_.iteration);
  tb_->flush();
}

std::vector<std::pair<std::string, double>> Trainer::losses_of(const IterStats& s) const {
  std::vector<std::pair<std::string, double>> out;
  out.emplace_back("lm loss", s.lm_tokens ? s.lm_loss_sum / s.lm_tokens : 0.0);
  if (c_.aux_loss_coeff > 0 && s.moe_layers > 0)
    out.emplace_back("load_balancing_loss",
                     s.aux_sum / c_.aux_loss_coeff / (c_.num_micro_batches * pg_.dp) / s.moe_layers);
  for (size_t k = 0; k < s.mtp_sum.size(); ++k)
    out.emplace_back("mtp_" + std::to_string(k + 1) + " loss",
                     s.mtp_tokens[k] ? s.mtp_sum[k] / s.mtp_tokens[k] : 0.0);
  return out;
}

// TensorBoard every iteration (Megatron's tensorboard_log_interval 1), the iteration line every log_interval
// with the interval's mean losses and time.
void Trainer::log_iteration(const IterStats& st, double norm, double seconds) {
  const auto losses = losses_of(st);
  const double lr = sched_->lr();  // the next iteration's, as Megatron logs it
  const int64_t it = prog_.iteration, smp = prog_.consumed_train_samples, tok = smp * c_.seq_length;
  const int64_t gbs = c_.global_batch_size;
  if (tb_) {
    tb_->add_scalar("learning-rate", lr, it);
    tb_->add_scalar("learning-rate vs samples", lr, smp);
    tb_->add_scalar("batch-size", gbs, it);
    tb_->add_scalar("batch-size vs samples", gbs, smp);
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
  if (interval_.losses.empty())
    interval_.losses = losses;
  else
    for (size_t k = 0; k < losses.size(); ++k) interval_.losses[k].second += losses[k].second;
  interval_.iterations++;
  interval_.seconds += seconds;
  if (it % c_.log_interval != 0) log_moe_health(st, false);
  if (it % c_.log_interval == 0) {
    IterationLogFields f;
    f.timestamp = timestamp_now();
    f.iteration = it, f.train_iters = c_.train_iters, f.seq_length = c_.seq_length;
    f.consumed_samples = smp;
    f.elapsed_ms = interval_.seconds / interval_.iterations * 1000.0;
    f.samples_per_s = gbs / (f.elapsed_ms / 1000.0);
    f.tokens_per_s = f.samples_per_s * c_.seq_length;
    f.tflops_per_gpu = flops_per_iteration_ / (f.elapsed_ms / 1000.0 * 1e12 * pg_.world);
    f.learning_rate = lr;
    f.global_batch_size = gbs;
    for (auto& [k, v] : interval_.losses) f.losses.emplace_back(k, v / interval_.iterations);
    f.grad_norm = norm;
    print_line(format_iteration_line(f));
    log_moe_health(st, true);
    if (!memory_reported_)
      report_memory("(after " + std::to_string(it) + " iterations)"), memory_reported_ = true;
    if (c_.timing_log_level >= 1) print_line(timers_block(interval_.iterations));
    if (tb_) {
      tb_->add_scalar("iteration-time", f.elapsed_ms / 1000.0, it);
      tb_->add_scalar("throughput", f.tflops_per_gpu, it);
    }
    interval_ = LogInterval{};
  }
  if (tb_) tb_->flush();
}

void Trainer::log_moe_health(const IterStats& st, bool log_now) {
  if (moe_layer_ids_.empty() && pg_.pp == 1) return;
  std::vector<MoeLayerHealth> layers;
  const double aux_scale =
      c_.aux_loss_coeff > 0 ? 1.0 / (c_.aux_loss_coeff * static_cast<double>(c_.num_micro_batches * pg_.dp))
                            : 0.0;
  const int64_t experts = c_.model.n_routed_experts;
  std::vector<float> staged;
  for (size_t l = 0; l < st.counts.size() && l < moe_layer_ids_.size(); ++l) {
    const bool has_bias = model_->store().contains(expert_bias_name(moe_layer_ids_[l]));
    layers.push_back(moe_layer_health(
        moe_layer_ids_[l], st.counts[l], st.kept[l], st.routed[l], st.layer_aux[l] * aux_scale,
        has_bias ? expert_bias_on_host(moe_layer_ids_[l], staged) : nullptr, experts));
  }
  moe_health_.add(layers);
  if (!log_now) return;
  std::vector<MoeLayerHealth> all = moe_health_.summary();
  moe_health_.clear();
  if (Comm& pp = (*comms_)[Group::kPp]; pp.size() > 1) {  // every stage's layers, on every rank of the group
    int64_t most = static_cast<int64_t>(all.size());
    pp.allreduce(&most, 1, ReduceOp::kMax);
    const std::vector<double> mine = pack_health(all, most);
    std::vector<double> gathered(mine.size() * static_cast<size_t>(pp.size()));
    pp.allgather(mine.data(), static_cast<int64_t>(mine.size()), gathered.data());
    all = unpack_health(gathered);
  }
  if (all.empty()) return;
  print_line(moe_health_line(all));
  if (!tb_) return;
  for (const auto& h : all) {
    const std::string l = "_layer_" + std::to_string(h.layer);
    tb_->add_scalar("moe/max_over_mean_load" + l, h.max_over_mean, prog_.iteration);
    tb_->add_scalar("moe/experts_without_tokens" + l, static_cast<double>(h.experts_without_tokens),
                    prog_.iteration);
    tb_->add_scalar("moe/dropped_fraction" + l, h.dropped_fraction, prog_.iteration);
    tb_->add_scalar("moe/seq_load_balancing_loss" + l, h.seq_aux_loss, prog_.iteration);
    tb_->add_scalar("moe/expert_bias_spread" + l, h.bias_spread, prog_.iteration);
  }
}

// Megatron's Timers.log with --timing-log-option minmax: each timer's per-iteration mean over the interval,
// its minimum and maximum across ranks.
std::string Trainer::timers_block(int64_t iterations) {
  std::vector<double> mn, mx;
  for (const auto& [k, v] : timers_.t)
    mn.push_back(v * 1000.0 / iterations), mx.push_back(v * 1000.0 / iterations);
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

// Every eval_interval iterations except the last (the final validation follows the loop).
bool Trainer::validation_due() const {
  return valid_ds_ && prog_.iteration % c_.eval_interval == 0 && prog_.iteration < c_.train_iters;
}

double Trainer::evaluate(const SampleDataset& ds, int64_t& consumed, const std::string& label,
                         int64_t iteration) {
  const int64_t mbs = c_.micro_batch_size, S = c_.seq_length;
  double sum = 0;
  int64_t tokens = 0;
  PipelineSteps steps;  // forward only; on one stage, each micro-batch in turn
  steps.forward = [&](int64_t m, const float* input) -> const float* {
    const int64_t first = consumed + m * mbs * pg_.dp + pg_.dp_rank * mbs;
    DSV3_CHECK(first + mbs <= ds.size(), "the ", label, " split ran out of samples");
    fill_batch(ds, first, mbs);
    auto st = model_->forward(ids_.data(), labels_.data(), mbs, S, false, nullptr, input);
    sum += st.lm_loss_sum, tokens += st.lm_tokens;
    return model_->options().stage.post_process ? nullptr : model_->stage_output();
  };
  for (int64_t e = 0; e < c_.eval_iters; ++e) {
    run_forward_only((*comms_)[Group::kPp], c_.num_micro_batches, mbs * S * c_.model.hidden_size, steps,
                     pipeline_buffers_);
    consumed += c_.global_batch_size;
  }
  for (Group g : {Group::kDpCp, Group::kPp})  // the loss lives on the last stage
    if (Comm& c = (*comms_)[g]; c.size() > 1) {
      c.allreduce(&sum, 1, ReduceOp::kSum);
      c.allreduce(&tokens, 1, ReduceOp::kSum);
    }
  const double loss = tokens ? sum / tokens : 0.0;
  const bool test = label == "test";
  // Megatron's evaluate_and_print_results: the test set reuses the validation wording with "on test set".
  const std::string what =
      "validation loss at iteration " + std::to_string(iteration) + (test ? " on test set" : "");
  print_line(format_eval_block(what, {{"lm loss", loss}}));
  if (tb_ && !test) {
    const std::string key = "lm loss validation";
    const double ppl = std::exp(std::min(20.0, loss));
    const int64_t smp = prog_.consumed_train_samples;
    tb_->add_scalar(key, loss, iteration);
    tb_->add_scalar(key + " vs samples", loss, smp);
    tb_->add_scalar(key + " vs tokens", loss, smp * S);
    tb_->add_scalar(key + " ppl", ppl, iteration);
    tb_->add_scalar(key + " ppl vs samples", ppl, smp);
    tb_->add_scalar(key + " ppl vs tokens", ppl, smp * S);
    tb_->flush();
  }
  return loss;
}

void Trainer::save(int64_t iteration) {
  if (!c_.save || last_saved_ == iteration) return;
  // A NaN state never replaces a good checkpoint (it can reach the weights with the NaN check off): every rank
  // looks at its own parameters and all agree, so that none writes (or waits for a writer) alone.
  const std::string bad = first_nonfinite_param();
  int64_t worst = bad.empty() ? 0 : pg_.world - pg_.rank;  // the max names the lowest rank
  world_.allreduce(&worst, 1, ReduceOp::kMax);
  if (worst)
    fail("Rank ", pg_.rank, ", iteration ", iteration, ": not saving: ",
         bad.empty() ? "rank " + std::to_string(pg_.world - worst) + " holds" : "parameter " + bad + " holds",
         " NaN or Inf; the last checkpoint",
         last_saved_ >= 0 ? " (iteration " + std::to_string(last_saved_) + ")" : std::string(),
         " is left as it was");
  prog_.optimizer_step = adam().step();
  prog_.scheduler_num_steps = sched_->num_steps();
  const auto t0 = Clock::now();
  std::vector<float> m, v;  // the distributed optimizer's moments, gathered into the store layout
  if (dopt_) dopt_->gather_moments(m, v);
  std::vector<float> staged;  // on a GPU the state is copied to host memory, then written
  if (bopt_) staged = model_->params_to_host(), bopt_->moments_to_host(opt_->exp_avg(), opt_->exp_avg_sq());
  CheckpointTensors t{&model_->table(), &model_->store(), bopt_ ? staged.data() : model_->params().data(),
                      dopt_ ? m.data() : opt_->exp_avg().data(),
                      dopt_ ? v.data() : opt_->exp_avg_sq().data()};
  // Tensor parallelism: whole tensors (HF layout) gathered over TP, written by TP rank 0.
  const ParamStore whole(model_->table(), pg_.ep, pg_.ep_rank, c_.stages[pg_.pp_rank]);
  std::vector<float> wp, wm, wv;
  if (pg_.tp > 1) {
    Comm& tp = (*comms_)[Group::kTp];
    wp.resize(whole.size()), wm.resize(whole.size()), wv.resize(whole.size());
    tp_gather(model_->table(), model_->store(), whole, t.params, wp.data(), tp);
    tp_gather(model_->table(), model_->store(), whole, t.exp_avg, wm.data(), tp);
    tp_gather(model_->table(), model_->store(), whole, t.exp_avg_sq, wv.data(), tp);
    t = {&model_->table(), &whole, wp.data(), wm.data(), wv.data()};
  }
  RankInfo r;
  r.rank = pg_.rank, r.world = pg_.world;
  try {
    if (pg_.ep == 1 && pg_.pp == 1) {
      // Replicated state: rank 0 writes it; the others wait (below) so that no rank runs ahead (or exits)
      // before the checkpoint is complete.
      r.replicated = true;
      if (pg_.is_first_rank()) save_checkpoint(*c_.save, prog_, t, c_.args.all_map(), c_.model, r);
    } else {
      // One shard per (stage, EP rank), written by its expert-DP rank 0 of expert-TP rank 0 (the other
      // replicas hold the same state, gathered over TP above).
      r.comm = &world_, r.shards = pg_.pp * pg_.ep, r.stages = c_.stages;
      r.shard = pg_.edp_rank == 0 && pg_.etp_rank == 0 ? pg_.pp_rank * pg_.ep + pg_.ep_rank : -1;
      save_checkpoint(*c_.save, prog_, t, c_.args.all_map(), c_.model, r);
    }
  } catch (const Error& e) {
    // save_checkpoint leaves the previous checkpoint (and the tracker) as they were; say so, and which one.
    fail("saving the checkpoint of iteration ", iteration, " failed: ", e.what(), "; the last checkpoint",
         last_saved_ >= 0 ? " (iteration " + std::to_string(last_saved_) + ")" : std::string(),
         " is left as it was");
  }
  world_.barrier();
  last_saved_ = iteration;
  print_line("  successfully saved checkpoint from iteration " + std::to_string(iteration) + " to " +
             *c_.save + " [ t " + std::to_string(pg_.tp) + "/" + std::to_string(pg_.tp) + ", p " +
             std::to_string(pg_.pp) + "/" + std::to_string(pg_.pp) + " ] (" +
             std::to_string(seconds_since(t0)).substr(0, 5) + " s)");
}

std::string Trainer::first_nonfinite_param() {
  std::vector<float> staged;
  const float* w = model_->params().data();
  if (model_->backend().kind() != DeviceKind::kCpu) staged = model_->params_to_host(), w = staged.data();
  const auto& store = model_->store();
  for (const auto& p : model_->table().params()) {
    if (!p.tied_to.empty() || !store.contains(p.name)) continue;
    const float* x = w + store.offset(p.name);
    for (int64_t i = 0, n = store.numel(p); i < n; ++i)
      if (!std::isfinite(x[i])) return p.name;
  }
  return "";
}

// The exit controls after each iteration's save, in Megatron's order: SIGTERM, duration, exit interval, kill
// switch. What any rank saw (a signal, the clock, the kill switch file), every rank acts on. Returns the exit
// message, or "" to go on.
std::string Trainer::exit_requested(Clock::time_point start) {
  const double mins = seconds_since(start) / 60.0;
  int64_t stop[3] = {g_sigterm ? 1 : 0,
                     c_.exit_duration_in_mins && mins > static_cast<double>(*c_.exit_duration_in_mins),
                     kill_switch_present()};
  world_.allreduce(stop, 3, ReduceOp::kMax);
  if (stop[0]) return "exiting program after receiving SIGTERM.";
  if (stop[1]) return "exiting program after " + python_float_str(mins) + " minutes";
  if (c_.exit_interval > 0 && prog_.iteration % c_.exit_interval == 0)
    return "exiting program at iteration " + std::to_string(prog_.iteration);
  if (stop[2])
    return "Detected kill switch at " + *c_.kill_switch_file +
           ", iteration=" + std::to_string(prog_.iteration) + ". Exiting";
  return "";
}

// After the last iteration: a save, the final validation, and the test split from its start.
void Trainer::finish() {
  save(prog_.iteration);
  if (valid_ds_) evaluate(*valid_ds_, prog_.consumed_valid_samples, "validation", prog_.iteration);
  if (test_ds_) {
    int64_t consumed_test = 0;
    evaluate(*test_ds_, consumed_test, "test", prog_.iteration);
  }
  report_memory("(end of training)");
}

}  // namespace train_detail

int run_training(int argc, char** argv, Comm& world) {
  train_detail::Trainer t(TrainConfig::from_args(TrainArgs::parse(argc, argv), world.size()), world);
  return t.run();
}

int run_training(int argc, char** argv) {
  SingleComm world;
  return run_training(argc, argv, world);
}

}  // namespace dsv3
