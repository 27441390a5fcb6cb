// Bucketed data-parallel gradient all-reduce (see data_parallel.h).
#include "parallel/data_parallel.h"

#include <algorithm>

#include "core/error.h"
#include "optim/grad_clip.h"

namespace dsv3 {

std::vector<GradBucket> plan_grad_buckets(const ParamTable& table, const ParamStore& store,
                                          int64_t bucket_numel, bool merge_kinds) {
  DSV3_CHECK(bucket_numel >= 1, "gradient bucket size must be >= 1, got ", bucket_numel);
  std::vector<GradBucket> ranges;
  for (const auto& p : table.params()) {
    if (!p.tied_to.empty() || !p.trainable || !store.contains(p.name)) continue;  // other EP ranks' experts
    ranges.push_back({store.offset(p.name), store.numel(p), p.is_expert});
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const GradBucket& a, const GradBucket& b) { return a.offset < b.offset; });
  std::vector<GradBucket> merged;
  for (const auto& r : ranges) {
    if (!merged.empty()) {
      auto& m = merged.back();
      DSV3_CHECK(m.offset + m.numel <= r.offset, "gradient buckets: overlapping parameters at offset ",
                 r.offset);
      if (m.offset + m.numel == r.offset && (merge_kinds || m.expert == r.expert)) {
        m.numel += r.numel;
        continue;
      }
    }
    merged.push_back(r);
  }
  std::vector<GradBucket> out;
  for (const auto& m : merged)
    for (int64_t o = 0; o < m.numel; o += bucket_numel)
      out.push_back({m.offset + o, std::min(bucket_numel, m.numel - o), merge_kinds ? false : m.expert});
  return out;
}

DataParallelGrads::DataParallelGrads(const ParamTable& table, const ParamStore& store,
                                     const ProcessGroups& pg, GroupComms& comms, int64_t bucket_numel)
    : dense_(&comms[Group::kDpCp]), expert_(&comms[Group::kEdp]) {
  const bool same = comms.same(Group::kDpCp, Group::kEdp);
  buckets_ = plan_grad_buckets(table, store, bucket_numel, same);
  dense_scale_ = expert_scale_ = 1.f / static_cast<float>(pg.dp * pg.cp);
  active_ = dense_->size() > 1 || expert_->size() > 1;
}

void DataParallelGrads::reduce(float* grads) {
  if (!active_) return;
  for (const auto& b : buckets_) {
    Comm& c = comm(b);
    const float s = scale(b);
    if (s != 1.f) scale_inplace(grads + b.offset, b.numel, s);
    if (c.size() > 1) c.allreduce(grads + b.offset, b.numel, ReduceOp::kSum);
  }
}

}  // namespace dsv3
