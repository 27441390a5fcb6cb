// Data parallelism's gradient reduction (spec §8): after the last micro-batch's backward, the gradient buffer (the
// model's ParamStore layout) is all-reduced in a few large contiguous buckets — dense parameters over the DP×CP
// group, routed-expert parameters over the expert-DP group (one group and one set of buckets when they span the
// same ranks, e.g. ep = 1) — each scaled by 1/(DP·CP) first, as Megatron's DDP does (gradient_scaling_factor,
// average_in_collective off: expert gradients too are averaged over the full dense DP size). With the micro-batch
// losses already divided by the local micro-batch count, the result is the single-process gradient of the global
// batch. Replicated parameters (no distributed optimizer yet) then see identical gradients on every rank.
#pragma once
#include <cstdint>
#include <vector>

#include "model/param_store.h"
#include "model/param_table.h"
#include "parallel/comm.h"
#include "parallel/process_groups.h"

namespace dsv3 {

struct GradBucket {
  int64_t offset = 0, numel = 0;  // a contiguous range of the gradient buffer
  bool expert = false;            // reduced over the expert-DP group
};

// The buckets of a layout: the trainable, untied parameters' ranges sorted by offset, adjacent ranges of the same
// kind merged (of any kind when merge_kinds), then cut into pieces of at most bucket_numel elements. Ranges that
// hold no trainable parameter (the expert bias) are left out.
std::vector<GradBucket> plan_grad_buckets(const ParamTable& table, const ParamStore& store,
                                          int64_t bucket_numel, bool merge_kinds);

class DataParallelGrads {
 public:
  // Megatron's default bucket: max(40M, 1M·DP) elements.
  static int64_t default_bucket_numel(int dp) { return std::max<int64_t>(40'000'000, 1'000'000LL * dp); }

  DataParallelGrads(const ParamTable& table, const ParamStore& store, const ProcessGroups& pg,
                    GroupComms& comms, int64_t bucket_numel);
  // Scales and all-reduces grads (the whole ParamStore-layout buffer) in place. A no-op on one rank.
  void reduce(float* grads);
  const std::vector<GradBucket>& buckets() const { return buckets_; }
  bool active() const { return active_; }
  // The group a bucket is reduced over, and the factor it is scaled by first.
  Comm& comm(const GradBucket& b) const { return b.expert ? *expert_ : *dense_; }
  float scale(const GradBucket& b) const { return b.expert ? expert_scale_ : dense_scale_; }

 private:
  std::vector<GradBucket> buckets_;
  Comm* dense_;
  Comm* expert_;
  float dense_scale_ = 1.f, expert_scale_ = 1.f;
  bool active_ = false;
};

}  // namespace dsv3
