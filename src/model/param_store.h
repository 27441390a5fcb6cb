// Storage for one rank's parameters (and, with the same layout, their gradients): one fp32 buffer, each HF name
// mapped to its slice. Routed experts of one layer are stacked ([E,F,D] per projection) so the MoE layer sees each
// projection as one contiguous block; tied names (the MTP layer's embed_tokens / shared_head.head) map onto the
// tensor they copy. Under expert parallelism (ep > 1) the store holds only this EP rank's experts
// [ep_rank·E/ep, (ep_rank+1)·E/ep) of every MoE layer, and under pipeline parallelism only its stage's
// parameters; the other names are not in it. Under tensor parallelism (tp > 1) a parameter split over TP
// (ParamInfo::tp_split) holds only this TP rank's block: rows [tp_rank·R/tp, +R/tp) or columns likewise (routed
// experts under expert tensor parallelism too: [E, F/tp, D] blocks).
#pragma once
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "model/param_table.h"

namespace dsv3 {

// The part of the model one pipeline stage holds (Megatron --pipeline-model-parallel-size): decoder layers
// [first_layer, last_layer) (-1: to the end), the embedding on the first stage (pre_process), the final norm,
// lm_head and MTP layers on the last (post_process).
// With MTP on several stages, the last stage also holds a copy of the embedding (shared_embedding; its gradient
// is summed with the first stage's, so the copies stay equal), as Megatron-Core shares it.
struct PipelineStage {
  int64_t first_layer = 0, last_layer = -1;
  bool pre_process = true, post_process = true;
  bool shared_embedding = false;
  int64_t end(int64_t num_layers) const { return last_layer < 0 ? num_layers : last_layer; }
  bool whole(int64_t num_layers) const {
    return first_layer == 0 && end(num_layers) == num_layers && pre_process && post_process;
  }
  bool holds(const ParamInfo& p, int64_t num_layers) const;
};

// The stages of a pipeline of `pp` over num_layers decoder layers (spec §1.3). first_layers / last_layers (> 0)
// fix the first and last stage's counts (Megatron's --decoder-first/last-pipeline-num-layers) and the other stages
// share the rest evenly, which must divide (throws with Megatron's rule). Without them any count is accepted: the
// first num_layers % pp stages take one layer more (never the last stage, which also runs the head and MTP).
// shared_embedding marks the last stage's embedding copy (MTP on several stages).
std::vector<PipelineStage> plan_pipeline_stages(int64_t num_layers, int pp, int64_t first_layers = 0,
                                                int64_t last_layers = 0, bool shared_embedding = false);

// The block of a parameter's global [rows, cols] tensor (1-D: one row) that one TP rank holds.
struct TpShard {
  int64_t row0 = 0, rows = 1, col0 = 0, cols = 1;
  int64_t numel() const { return rows * cols; }
};
// Throws naming the rule (Megatron's: the split dimension divisible by the TP size) when it does not divide.
TpShard tp_shard(const ParamInfo& p, int tp, int tp_rank);

class ParamStore {
 public:
  explicit ParamStore(const ParamTable& table, int ep = 1, int ep_rank = 0, PipelineStage stage = {},
                      int tp = 1, int tp_rank = 0);
  int tp() const { return tp_; }
  int tp_rank() const { return tp_rank_; }
  // The elements this rank holds of a parameter (its TP shard; numel without TP).
  int64_t numel(const ParamInfo& p) const { return tp_shard(p, tp_, tp_rank_).numel(); }

  int64_t size() const { return size_; }
  int ep() const { return ep_; }
  // The local routed experts: [first_expert(), first_expert() + local_experts()).
  int64_t first_expert() const { return first_expert_; }
  int64_t local_experts() const { return local_experts_; }
  // Offset of a parameter's first element; throws naming an unknown parameter.
  int64_t offset(const std::string& name) const;
  bool contains(const std::string& name) const { return offsets_.count(name) != 0; }
  // Offset of the first local expert of `layer.mlp.experts.*.<proj>.weight` (the stacked block).
  int64_t expert_block(int64_t layer, const std::string& proj) const;

 private:
  std::unordered_map<std::string, int64_t> offsets_;
  std::unordered_map<std::string, int64_t> expert_blocks_;  // "layer:proj" -> offset of expert 0
  int64_t size_ = 0;
  int ep_ = 1, tp_ = 1, tp_rank_ = 0;
  int64_t first_expert_ = 0, local_experts_ = 0;
};

}  // namespace dsv3
