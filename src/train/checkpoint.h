// Training checkpoints (spec §6): Megatron's directory layout and tracker, HuggingFace's tensor format, and
// a crash-safe write protocol. Resume restores weights, Adam moments and the training progress bit for bit.
//
// On-disk layout (format "dsv3-checkpoint", version kCheckpointFormatVersion; checked on load):
//
//   DIR/latest_checkpointed_iteration.txt  the iteration as decimal digits, no newline (Megatron's tracker;
//                                          "release" selects DIR/release/). Written last.
//   DIR/iter_{iteration:07d}/
//     model.safetensors      F32 weights (= the fp32 master weights) under HF names, metadata
//                            {"format": "pt"}, including every layer's mlp.gate.e_score_correction_bias and
//                            the MTP layer's model.layers.{L}.embed_tokens.weight / shared_head.head.weight
//                            (physical copies of the tied tensors, as the hub stores them). transformers'
//                            DeepseekV3ForCausalLM loads the directory (it ignores the MTP layer's tensors).
//     config.json            ModelConfig::to_hf_json("float32").
//     optimizer.safetensors  F32 exp_avg.<name> and exp_avg_sq.<name> for every trainable, untied parameter
//                            (absent when the run had no optimizer state).
//     state.json             written last inside the directory:
//       { "format": "dsv3-checkpoint", "version": 1, "megatron_checkpoint_version": 3.1,
//         "rank": r, "world": w, "shards": n,
//         "progress": { "iteration", "consumed_train_samples", "consumed_valid_samples",
//                       "skipped_train_samples", "optimizer_step", "scheduler_num_steps",
//                       "flops_so_far" (double, round-trip exact), "seed" (uint64) },
//         "args": { Megatron argument name: value as given, strings },
//         "has_optimizer": bool,
//         "files": { file name: { "bytes": n, "sha256": hex } }     (every other file in the directory)
//         "tensors": { tensor name: { "file": f, "global_shape": [..],
//                                     "slice": { "offsets": [..], "lengths": [..] },   this rank's block
//                                     "tied_to": name (copies only) } } }
//     Sharded (expert or pipeline parallelism, N = PP·EP > 1): model-0000k-of-0000N.safetensors and
//     optimizer-0000k-of-0000N.safetensors, file k = stage·EP + EP rank + 1 holding that stage's routed experts of
//     that EP rank (and, for EP rank 0, the stage's other tensors), written by those ranks themselves, plus transformers' model.safetensors.index.json ("weight_map":
//     tensor name -> file), so transformers loads the directory as any sharded checkpoint. Every tensor is whole
//     in one file ("slice" is the whole tensor), so any layout loads any checkpoint: each rank reads only the
//     tensors its ParamStore holds, from the files state.json names, and checks those files' digests.
//
// Crash safety: everything is written into DIR/iter_XXXXXXX.tmp.<pid>/, each file fsynced, the directory
// fsynced; then it takes the final name (an existing directory of the same iteration is swapped out
// atomically with renameat2(RENAME_EXCHANGE) and deleted only afterwards), DIR is fsynced, and the tracker
// is replaced through temp + fsync + rename (+ fsync DIR). A crash at any point leaves the tracker naming a
// complete directory. Leftover *.tmp.<pid> / *.old.<pid> entries of dead processes are removed by the next
// save; the loader ignores them (except to recover the one window of the non-atomic fallback, see
// replace_dir in checkpoint.cpp).
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>

#include "model/config.h"
#include "model/param_store.h"
#include "model/param_table.h"
#include "parallel/comm.h"

namespace dsv3 {

inline constexpr int kCheckpointFormatVersion = 1;

struct RankInfo {
  int rank = 0, world = 1;
  // Every rank holds the whole model and optimizer state (data parallelism alone): rank 0 alone calls
  // save_checkpoint and writes the one file set of a world-size-1 checkpoint.
  bool replicated = false;
  // Sharded save (expert parallelism): every rank of `comm` (the job's world) calls save_checkpoint; the ranks
  // with shard >= 0 (one per EP rank) write shard `shard` of `shards` — the experts their store holds, shard 0
  // also every other tensor — and rank 0 commits the directory.
  Comm* comm = nullptr;
  int shard = -1, shards = 1;
  // Pipeline parallelism: every stage's part of the model; shard = stage · (shards / stages) + EP rank, each
  // stage's shard of EP rank 0 also holding that stage's other tensors. Empty: one stage.
  std::vector<PipelineStage> stages;
};

struct TrainProgress {
  int64_t iteration = 0, consumed_train_samples = 0, consumed_valid_samples = 0, skipped_train_samples = 0;
  int64_t optimizer_step = 0;       // AdamW step count
  int64_t scheduler_num_steps = 0;  // LrScheduler num_steps (samples)
  double flops_so_far = 0;
  uint64_t seed = 0;
  bool operator==(const TrainProgress&) const = default;
};

struct CheckpointTensors {  // non-owning; all in the model's ParamStore layout
  const ParamTable* table;
  const ParamStore* store;
  const float* params;
  const float* exp_avg;     // may be null (no optimizer state)
  const float* exp_avg_sq;  // null together with exp_avg
};

// Writes DIR/iter_{iteration:07d}/, then DIR/latest_checkpointed_iteration.txt (see the top of this file).
// Throws dsv3::Error naming the path on any I/O failure; the previous checkpoint stays intact.
void save_checkpoint(const std::string& dir, const TrainProgress& p, const CheckpointTensors& t,
                     const std::map<std::string, std::string>& args, const ModelConfig& cfg,
                     const RankInfo& r);

struct LoadTargets {
  const ParamTable* table;
  const ParamStore* store;
  float* params;
  float* exp_avg;     // null: do not load optimizer state (Megatron's --no-load-optim / --finetune)
  float* exp_avg_sq;  // null together with exp_avg
  // The vocabulary rows that carry tokens (the tokenizer's size; 0: unknown). When > 0, a checkpoint whose padded
  // vocabulary differs (Megatron pads to a multiple of --make-vocab-size-divisible-by × TP, so a layout change can
  // change it) loads with its embedding and output rows cut or extended: rows this run adds keep their current
  // values (a fresh model's) and zero moments; only padding rows (>= real_vocab) may be dropped.
  int64_t real_vocab = 0;
};

// Reads DIR/latest_checkpointed_iteration.txt. When it is missing: nullopt, and *message (if given) is
// Megatron's two lines
//   "WARNING: could not find the metadata file <path> \n    will not load any checkpoints and will start
//   from random"
// Otherwise loads weights (and moments when the targets are given) and returns the saved progress; *message
// is then empty, or a "NOTE: ..." line when the directory was recovered from an interrupted save (the caller
// prints Megatron's "  successfully loaded checkpoint from DIR [ t 0, p 0 ] at iteration N" itself).
// Throws dsv3::Error: for a checkpoint of another model (the first differing config.json math field, or the
// first tensor whose shape differs), and for a missing, truncated or corrupt file (naming the file).
// A 'release' tracker loads DIR/release/ without optimizer state and returns a zero progress (Megatron).
std::optional<TrainProgress> load_checkpoint(const std::string& dir, const LoadTargets& t,
                                             const ModelConfig& cfg, const RankInfo& r,
                                             std::map<std::string, std::string>* saved_args = nullptr,
                                             std::string* message = nullptr);

// DIR/iter_{iteration:07d}
std::string checkpoint_iter_dir(const std::string& dir, int64_t iteration);
// DIR/latest_checkpointed_iteration.txt
std::string checkpoint_tracker_path(const std::string& dir);

// Megatron's log lines around a save (printed by rank 0 of the trainer):
//   "saving checkpoint at iteration {iteration:7d} to {dir} in safetensors format"  (Megatron: torch_dist)
//   "  successfully saved checkpoint from iteration {iteration:7d} to {dir}"
std::string checkpoint_saving_line(int64_t iteration, const std::string& dir);
std::string checkpoint_saved_line(int64_t iteration, const std::string& dir);

// The first difference between two configs in a field that changes the model's math or shapes, as
// "hidden_size: 32 in the checkpoint, 48 in this run"; empty when they agree.
std::string first_config_math_difference(const ModelConfig& saved, const ModelConfig& current);

// Test hooks (not for production use): `at_stage` is called with the name of each step of save_checkpoint
// as it completes ("model_written", "optimizer_written", "config_written", "tmp_dir_written", "dir_synced",
// "old_moved_aside" (fallback only), "dir_renamed", "old_removed", "dir_parent_synced",
// "tracker_tmp_written", "tracker_renamed"), so a test can kill the process there; `no_rename_exchange`
// forces the non-atomic fallback used where renameat2(RENAME_EXCHANGE) is unsupported; `no_fsync` skips the
// fsyncs (they matter for power loss, not for a killed process) so a test can afford many saves.
struct CheckpointTestHooks {
  std::function<void(const char* stage)> at_stage;
  bool no_rename_exchange = false;
  bool no_fsync = false;
};
void set_checkpoint_test_hooks(CheckpointTestHooks hooks);

}  // namespace dsv3
