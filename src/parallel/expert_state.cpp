// Gathering the expert-parallel shards into one whole state (see expert_state.h).
#include "parallel/expert_state.h"

#include <algorithm>
#include <vector>

#include "core/error.h"

namespace dsv3 {

void gather_experts(const ParamTable& table, const ParamStore& local_store, const ParamStore& full_store, Comm& ep,
                    const float* local, float* full) {
  DSV3_CHECK(full_store.ep() == 1 && local_store.ep() == ep.size(), "gather_experts: stores for EP ",
             local_store.ep(), " and ", full_store.ep(), " over a group of ", ep.size());
  const int64_t L = local_store.local_experts();
  std::vector<float> gathered;
  for (const auto& p : table.params()) {
    if (!p.tied_to.empty()) continue;
    if (!p.is_expert) {
      std::copy_n(local + local_store.offset(p.name), p.numel, full + full_store.offset(p.name));
    } else if (p.expert == 0) {
      // The stacked block of this (layer, projection): expert 0's name locates it in the full store, the first
      // local expert's name in the local one.
      const std::string marker = ".experts.0.";
      std::string first = p.name;
      first.replace(first.find(marker), marker.size(), ".experts." + std::to_string(local_store.first_expert()) + ".");
      gathered.resize(ep.size() * L * p.numel);
      ep.allgather(local + local_store.offset(first), L * p.numel, gathered.data());
      std::copy(gathered.begin(), gathered.end(), full + full_store.offset(p.name));
    }
  }
}

}  // namespace dsv3
