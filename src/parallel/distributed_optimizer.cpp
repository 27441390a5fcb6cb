// The distributed optimizer (see distributed_optimizer.h).
#include "parallel/distributed_optimizer.h"

#include <algorithm>

#include "core/error.h"
#include "optim/grad_clip.h"

namespace dsv3 {

DistributedOptimizer::DistributedOptimizer(const ParamTable& table, const ParamStore& store,
                                           const DataParallelGrads& ddp, AdamWConfig cfg)
    : ddp_(ddp), store_numel_(store.size()) {
  int64_t moments = 0;
  for (const auto& b : ddp.buckets()) {
    const Comm& c = ddp.comm(b);
    const int64_t g = c.size(), chunk = (b.numel + g - 1) / g;
    std::vector<int64_t> counts(g);  // rank r's block: [r·chunk, min(numel, (r+1)·chunk))
    for (int64_t r = 0; r < g; ++r) counts[r] = std::clamp<int64_t>(b.numel - r * chunk, 0, chunk);
    const int64_t lo = std::min(b.numel, c.rank() * chunk), n = counts[c.rank()];
    shards_.push_back({&b, std::move(counts), b.offset + lo, n, moments});
    moments += n;
  }
  for (const auto& p : table.params()) {
    if (!p.tied_to.empty() || !p.trainable || !store.contains(p.name)) continue;
    const int64_t p0 = store.offset(p.name), p1 = p0 + store.numel(p);
    for (const auto& s : shards_) {
      const int64_t a = std::max(p0, s.lo), z = std::min(p1, s.lo + s.n);
      if (a < z) segments_.push_back({a, z - a, s.moment + (a - s.lo), p.weight_decay});
    }
  }
  adam_ = std::make_unique<AdamW>(moments, cfg);
}

void DistributedOptimizer::reduce_scatter(float* grads) {
  for (const auto& s : shards_) {
    const GradBucket& b = *s.bucket;
    Comm& c = ddp_.comm(b);
    if (ddp_.scale(b) != 1.f) scale_inplace(grads + b.offset, b.numel, ddp_.scale(b));
    if (c.size() == 1) continue;
    part_.resize(s.n);
    c.reduce_scatter_v(grads + b.offset, s.counts.data(), part_.data());
    std::copy_n(part_.begin(), s.n, grads + s.lo);
  }
}

double DistributedOptimizer::shard_sum_of_squares(const float* grads, int64_t skip_begin,
                                                  int64_t skip_end) const {
  double sq = 0;
  for (const auto& s : shards_) {
    const int64_t a = s.lo, z = s.lo + s.n;  // [a, z) minus [skip_begin, skip_end)
    const int64_t cut0 = std::clamp(skip_begin, a, z), cut1 = std::clamp(skip_end, cut0, z);
    sq += sum_of_squares(grads + a, cut0 - a) + sum_of_squares(grads + cut1, z - cut1);
  }
  return sq;
}

double DistributedOptimizer::shard_sum_of_squares(
    const float* grads, const std::vector<std::pair<int64_t, int64_t>>& skip) const {
  double sq = 0;
  for (const auto& s : shards_) {
    int64_t a = s.lo;
    const int64_t z = s.lo + s.n;
    for (const auto& [b, e] : skip) {  // the gaps between the skipped ranges inside [a, z)
      if (e <= a) continue;
      if (b >= z) break;
      if (b > a) sq += sum_of_squares(grads + a, b - a);
      a = std::max(a, e);
    }
    if (a < z) sq += sum_of_squares(grads + a, z - a);
  }
  return sq;
}

void DistributedOptimizer::scale_shards(float* grads, float f) const {
  for (const auto& s : shards_) scale_inplace(grads + s.lo, s.n, f);
}

void DistributedOptimizer::gather_bucket(const Shard& s, const float* mine, float* full) {
  const GradBucket& b = *s.bucket;
  if (mine != full + s.lo) std::copy_n(mine, s.n, full + s.lo);
  Comm& c = ddp_.comm(b);
  if (c.size() > 1) c.allgather_v(full + b.offset, s.counts.data());
}

void DistributedOptimizer::step(float* params, const float* grads, double lr, double wd) {
  adam_->begin_step();
  for (const auto& g : segments_)
    adam_->update_range(params + g.offset, grads + g.offset, g.moment, g.n, lr, g.decay ? wd : 0.0);
  for (const auto& s : shards_) gather_bucket(s, params + s.lo, params);
}

void DistributedOptimizer::gather_moments(std::vector<float>& exp_avg, std::vector<float>& exp_avg_sq) {
  exp_avg.assign(store_numel_, 0.f);
  exp_avg_sq.assign(store_numel_, 0.f);
  for (const auto& s : shards_) {
    gather_bucket(s, adam_->exp_avg().data() + s.moment, exp_avg.data());
    gather_bucket(s, adam_->exp_avg_sq().data() + s.moment, exp_avg_sq.data());
  }
}

void DistributedOptimizer::scatter_moments(const float* exp_avg, const float* exp_avg_sq) {
  for (const auto& s : shards_) {
    std::copy_n(exp_avg + s.lo, s.n, adam_->exp_avg().begin() + s.moment);
    std::copy_n(exp_avg_sq + s.lo, s.n, adam_->exp_avg_sq().begin() + s.moment);
  }
}

}  // namespace dsv3
