// Megatron's distributed optimizer (--use-distributed-optimizer, ZeRO-1; spec §8): each gradient bucket is
// reduce-scattered over its group instead of all-reduced, so every rank holds the global gradient of one
// contiguous 1/G shard of it (G = DP×CP for dense buckets, expert-DP for expert buckets; blocks of ceil(n/G),
// the last ones shorter, so nothing is padded or staged); the rank keeps Adam moments for its shards only and
// updates only them; the updated shards are then all-gathered so every rank again holds the whole
// (local-experts) parameter buffer. The arithmetic per element is the replicated optimizer's, so runs agree
// with it to summation order (the reduce and the norm).
//
// What is sharded here is the Adam state (exp_avg, exp_avg_sq): 2/3 of the fp32 optimizer memory of
// Megatron's bf16 setup. The fp32 parameters stay whole on every rank, because they are what dsv3's layers
// read (Megatron instead keeps bf16 model weights whole and shards fp32 master copies).
#pragma once
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "model/param_store.h"
#include "model/param_table.h"
#include "optim/adamw.h"
#include "parallel/data_parallel.h"

namespace dsv3 {

class DistributedOptimizer {
 public:
  DistributedOptimizer(const ParamTable& table, const ParamStore& store, const DataParallelGrads& ddp,
                       AdamWConfig cfg);

  // grads: the whole buffer after the backward. Scales each bucket (1/DP) and reduce-scatters it: afterwards
  // this rank's shards hold the global batch's gradient; the rest of the buffer is stale.
  void reduce_scatter(float* grads);
  // Σ g² over this rank's shards (sum it over the world for the global norm), leaving out elements [skip_begin,
  // skip_end) of the buffer (a copy of a tensor another rank counts).
  double shard_sum_of_squares(const float* grads, int64_t skip_begin = 0, int64_t skip_end = 0) const;
  // The same, leaving out every range [begin, end) of `skip` (sorted by begin, disjoint): tensor parallelism
  // counts a parameter replicated over TP on one TP rank only.
  double shard_sum_of_squares(const float* grads, const std::vector<std::pair<int64_t, int64_t>>& skip) const;
  void scale_shards(float* grads, float s) const;
  // One AdamW step on this rank's shards (weight decay wd, 0 for 1-D parameters), then the all-gather.
  void step(float* params, const float* grads, double lr, double wd);

  // Checkpoints: the moments in the ParamStore layout (collective: every rank of each bucket's group takes
  // part; elements outside the buckets, e.g. the expert bias, are 0) and back (local: keeps this rank's
  // shards).
  void gather_moments(std::vector<float>& exp_avg, std::vector<float>& exp_avg_sq);
  void scatter_moments(const float* exp_avg, const float* exp_avg_sq);

  AdamW& adam() { return *adam_; }

 private:
  struct Shard {
    const GradBucket* bucket;
    std::vector<int64_t> counts;  // every group rank's block: ceil(numel / G) elements, the last ones fewer
    int64_t lo, n;                // this rank's elements: [lo, lo + n) of the buffer
    int64_t moment;               // first moment element of this shard
  };
  struct Segment {  // a shard ∩ a parameter: one weight-decay setting
    int64_t offset, n, moment;
    bool decay;
  };
  // full[bucket] ← the bucket's shards from every rank of its group, this rank's taken from `mine` (n
  // elements).
  void gather_bucket(const Shard& s, const float* mine, float* full);

  const DataParallelGrads& ddp_;
  int64_t store_numel_ = 0;
  std::vector<Shard> shards_;
  std::vector<Segment> segments_;
  std::unique_ptr<AdamW> adam_;
  std::vector<float> part_;  // one shard: reduce-scatter's receive buffer
};

}  // namespace dsv3
