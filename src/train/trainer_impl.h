// The Trainer behind run_training (trainer.h), shared by its two files: trainer.cpp (start-up, the loop,
// logging, evaluation, checkpoints, exits) and train_step.cpp (one iteration: micro-batches forward and
// backward, the reductions, the optimizer update). Internal to src/train.
#pragma once
#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "data/gpt_dataset.h"
#include "model/model.h"
#include "optim/adamw.h"
#include "optim/backend_adamw.h"
#include "optim/lr_schedule.h"
#include "parallel/comm.h"
#include "parallel/data_parallel.h"
#include "parallel/distributed_optimizer.h"
#include "parallel/pipeline.h"
#include "parallel/process_groups.h"
#include "train/checkpoint.h"
#include "train/memory_plan.h"
#include "train/moe_health.h"
#include "train/tensorboard.h"
#include "train/train_config.h"

namespace dsv3::train_detail {

using Clock = std::chrono::steady_clock;
inline double seconds_since(Clock::time_point t) {
  return std::chrono::duration<double>(Clock::now() - t).count();
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
  std::vector<double> layer_aux;             // per MoE layer: Σ micro-batches of its seq aux loss (× coeff)
  std::vector<int64_t> routed, kept;         // per MoE layer: routed pairs, and those the capacity rule kept
  void add(const ForwardStats& st);
};

// Megatron's timers (--timing-log-level >= 1): seconds per name accumulated over the log interval.
struct Timers {
  std::vector<std::pair<std::string, double>> t;
  void add(const std::string& name, double s);
};

// The log line's averages over the iterations since the last one.
struct LogInterval {
  std::vector<std::pair<std::string, double>> losses;  // summed
  int64_t iterations = 0;
  double seconds = 0;
};

class Trainer {
 public:
  Trainer(TrainConfig c, Comm& world) : c_(std::move(c)), world_(world) {}
  int run();

 private:
  // start-up (trainer.cpp)
  void setup();
  void print_start() const;
  void load();
  void build_data();
  void check_data() const;
  void open_tensorboard();
  // one iteration (train_step.cpp)
  IterStats train_step();
  IterStats micro_batches();
  void pipeline_step(std::vector<ForwardStats>& stats);
  void fill_batch(const SampleDataset& ds, int64_t first, int64_t count);
  void backward_micro(int64_t m, int64_t lm_tokens, const std::vector<int64_t>& mtp_tokens,
                      const float* output_grad);
  // NaN/Inf diagnosis, on the failure path only. The first parameter (the model's order) of this rank whose
  // gradient holds a NaN or Inf ("" if none); gradients on a GPU are copied to the host for it.
  std::string first_nonfinite_grad();
  // Every rank's (micro-batch, parameter) gathered over the world (collective); the lowest rank that has one
  // names it: "rank R, micro-batch M, parameter P" ("" when no rank has one).
  std::string nonfinite_culprit(int64_t micro, const std::string& param);
  // A non-finite grad norm with finite losses: the iteration's micro-batches again (the parameters have not moved),
  // each backward followed by a scan, to find the micro-batch and parameter where the first NaN/Inf appears.
  // Collective like the step itself: every rank gets here together (the norm is the same on all).
  std::string replay_for_nonfinite();
  struct NonFinite {
    bool scan = false;  // set during the replay: scan the gradient after each backward
    int64_t micro = -1;
    std::string param;
  } nonfinite_;
  int64_t current_micro_ = -1;  // the micro-batch being run (-1: none), for an error's message
  void reduce_stats(IterStats& s);
  void tp_grad_sum();
  std::vector<float> tp_grad_staging_;  // tp_grad_sum's gradients packed for one all-reduce
  double grad_norm();
  static std::string expert_bias_name(int64_t layer);
  // A MoE layer's expert bias where the host can read and write it: the parameter itself on the CPU, else a copy
  // in `staged` (the caller copies it back after changing it).
  float* expert_bias_on_host(int64_t layer, std::vector<float>& staged);
  double optimizer_step(const IterStats& st);
  // after the step (trainer.cpp)
  std::vector<std::pair<std::string, double>> losses_of(const IterStats& s) const;
  void log_iteration(const IterStats& st, double grad_norm, double seconds);
  // This stage's MoE layers' health for the iteration, added to the interval; at a log iteration the stages'
  // summaries meet on the last rank, which prints the line and writes TensorBoard.
  void log_moe_health(const IterStats& st, bool log_now);
  std::string timers_block(int64_t iterations);
  bool validation_due() const;
  double evaluate(const SampleDataset& ds, int64_t& consumed, const std::string& label, int64_t iteration);
  void save(int64_t iteration);
  // The first parameter of this rank whose value is NaN or Inf ("" if none): a save refuses such a state.
  std::string first_nonfinite_param();
  std::string exit_requested(Clock::time_point start);
  void finish();
  bool kill_switch_present() const;
  void print_line(const std::string& s) const;  // the last rank prints, as Megatron's print_rank_last
  // An exit condition seen by any rank, as every rank's decision.
  bool any_rank(bool local);

  const TrainConfig c_;
  Comm& world_;
  ProcessGroups pg_;
  std::unique_ptr<GroupComms> comms_;
  std::unique_ptr<DataParallelGrads> ddp_;
  Timers timers_;
  LogInterval interval_;
  MoeHealthInterval moe_health_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<AdamW> opt_;                  // replicated optimizer state, or
  std::unique_ptr<DistributedOptimizer> dopt_;  // --use-distributed-optimizer: sharded over DP
  // On a GPU: the optimizer over device buffers (opt_ then keeps the step count and is the checkpoint's host
  // copy of the moments).
  std::unique_ptr<BackendAdamW> bopt_;
  AdamW& adam() { return dopt_ ? dopt_->adam() : *opt_; }
  std::unique_ptr<LrScheduler> sched_;
  std::unique_ptr<EventWriter> tb_;
  std::unique_ptr<SampleDataset> train_ds_, valid_ds_, test_ds_;
  TrainProgress prog_;
  double flops_per_iteration_ = 0;
  // The memory plan (train/memory_plan.h) for this run's layout, the runtime part of its prediction (the process's
  // resident memory before the model existed, plus what the first steps add), and whether the measured figures
  // were printed yet.
  std::vector<StageMemory> memory_plan_;
  int64_t runtime_bytes_ = 0;
  bool memory_reported_ = false;
  void report_memory(const std::string& when);
  MemoryLayout memory_layout() const;
  MemoryRun memory_run() const;
  std::vector<int32_t> ids_, labels_;
  std::vector<int64_t> moe_layer_ids_;
  std::unique_ptr<Comm> embedding_group_;  // MTP under PP: the first and last stage's embedding copies
  PipelineBuffers pipeline_buffers_;
  struct InFlight {  // pipeline: micro-batch m's saved forward state and token counts, in slot m % PP
    Model::Activations acts;
    int64_t lm_tokens = 0;
    std::vector<int64_t> mtp_tokens;
  };
  std::vector<InFlight> in_flight_;
  std::vector<float> mtp_scales_;  // backward_micro's scratch
  int64_t last_saved_ = -1;
};

}  // namespace dsv3::train_detail
