// The configuration of a training run, read from the flags once and checked at start-up: every refusal of a
// bad, contradictory or unsupported flag value comes from TrainConfig::from_args, before any model or data is
// built, and the trainer reads typed fields instead of looking flags up by name.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/blended_dataset.h"
#include "data/gpt_dataset.h"
#include "model/config.h"
#include "model/model.h"
#include "model/param_store.h"
#include "optim/adamw.h"
#include "optim/lr_schedule.h"
#include "parallel/process_groups.h"
#include "train/args.h"

namespace dsv3 {

struct TrainConfig {
  // The flags as given, with the derived --global-batch-size filled in: the arguments block, the TensorBoard
  // text and the checkpoint's args print these.
  TrainArgs args;
  std::string no_effect_line;        // the flags that change nothing in dsv3, with the reasons ("" when none)
  std::string device = "auto";       // auto | cpu | cuda
  std::string device_line;           // the choice and why, printed at start-up (train/device_select.h)
  std::shared_ptr<Backend> backend;  // the GPU's backend when the run trains there (null: the CPU)

  // Model. model_options lacks what depends on the rank (the EP communicator, the pipeline stage).
  ModelConfig model;
  ModelOptions model_options;
  int64_t tokenizer_size = 0;  // len(tokenizer); 0 without --tokenizer-model
  uint64_t seed = 1234;
  double mtp_loss_scaling_factor = 0.1;
  double aux_loss_coeff = 0;  // the sequence aux loss coefficient in effect (0 unless seq_aux_loss)

  // Layout: the sizes every rank builds its ProcessGroups from, the data-parallel size they give, and every
  // pipeline stage's layers.
  ParallelSizes parallel;
  int dp = 1;
  std::vector<PipelineStage> stages;
  bool shared_embedding =
      false;  // MTP on the last of several stages: that stage keeps a copy of the embedding

  // Batches: num_micro_batches = global_batch_size / (micro_batch_size · dp) per rank and iteration.
  int64_t seq_length = 0, micro_batch_size = 1, global_batch_size = 0, num_micro_batches = 0, train_iters = 0;

  // Optimizer.
  AdamWConfig adam;
  bool distributed_optimizer = false;
  double weight_decay = 0.01, clip_grad = 1.0;  // clip_grad <= 0: no clipping
  LrScheduleConfig lr_schedule;
  bool expert_bias_update = false;
  double expert_bias_rate = 0.001;
  bool check_nan = true;

  // Data.
  DataBlend data;
  GptDatasetConfig dataset;
  int64_t eval_iters = 100, eval_interval = 1000;

  // Checkpoints, logging and exits (0 or empty: off).
  std::optional<std::string> save, load, tensorboard_dir, kill_switch_file;
  int64_t save_interval = 0;
  bool load_optim = true;
  int64_t log_interval = 100;
  int64_t timing_log_level = 0;
  int64_t exit_interval = 0;
  std::optional<int64_t> exit_duration_in_mins;
  bool exit_signal_handler = false;
  // --distributed-timeout-minutes (or dsv3's --distributed-timeout-seconds) in seconds; 0: no watchdog.
  double distributed_timeout_s = 600;

  // Throws dsv3::Error naming the flag (and the rule it breaks) for the first problem found. world_size: the
  // number of ranks the run has (the data-parallel size and the default global batch follow from it).
  static TrainConfig from_args(TrainArgs args, int world_size);
};

}  // namespace dsv3
