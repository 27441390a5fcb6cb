// Offsets for ParamStore: table order, except that expert e of a stacked block sits at block + e·numel.
#include "model/param_store.h"

#include "core/error.h"

namespace dsv3 {
namespace {

// "model.layers.3.mlp.experts.5.gate_proj.weight" -> "gate_proj"
std::string expert_proj(const std::string& name) {
  const auto end = name.rfind(".weight");
  const auto begin = name.rfind('.', end - 1);
  return name.substr(begin + 1, end - begin - 1);
}

std::string block_key(int64_t layer, const std::string& proj) {
  return std::to_string(layer) + ":" + proj;
}

}  // namespace

bool PipelineStage::holds(const ParamInfo& p, int64_t num_layers) const {
  if (p.layer >= num_layers) return post_process;  // MTP layers sit on the last stage
  if (p.layer >= 0) return p.layer >= first_layer && p.layer < end(num_layers);
  if (p.name == "model.embed_tokens.weight") return pre_process || shared_embedding;
  return post_process;  // final norm, lm_head
}

std::vector<PipelineStage> plan_pipeline_stages(int64_t L, int pp, int64_t first_layers, int64_t last_layers,
                                                bool shared_embedding) {
  DSV3_CHECK(pp >= 1, "pipeline: --pipeline-model-parallel-size must be >= 1, got ", pp);
  DSV3_CHECK(L >= pp, "--num-layers (", L, ") is smaller than --pipeline-model-parallel-size (", pp, ")");
  DSV3_CHECK(first_layers >= 0 && last_layers >= 0, "pipeline: negative end-stage layer counts");
  DSV3_CHECK(pp > 1 || (first_layers == 0 && last_layers == 0),
             "--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1");
  std::vector<int64_t> per(pp, -1);
  int64_t fixed = 0, free_stages = pp;
  if (first_layers > 0) per[0] = first_layers, fixed += first_layers, --free_stages;
  if (last_layers > 0) per[pp - 1] = last_layers, fixed += last_layers, --free_stages;
  if (free_stages == pp) {
    for (int q = 0; q < pp; ++q) per[q] = L / pp + (q < L % pp ? 1 : 0);
  } else {
    DSV3_CHECK(
        fixed <= L && (free_stages == 0 ? fixed == L : (L - fixed) % free_stages == 0 && L - fixed > 0),
        "the ", L - fixed,
        " layers left by --decoder-first/last-pipeline-num-layers do not split evenly "
        "over the other ",
        free_stages, " pipeline stages");
    for (auto& n : per)
      if (n < 0) n = (L - fixed) / free_stages;
  }
  std::vector<PipelineStage> stages;
  for (int q = 0, first = 0; q < pp; first += static_cast<int>(per[q++]))
    stages.push_back({first, first + per[q], q == 0, q == pp - 1, q == pp - 1 && pp > 1 && shared_embedding});
  return stages;
}

TpShard tp_shard(const ParamInfo& p, int tp, int tp_rank) {
  TpShard s;
  s.rows = p.shape.size() == 2 ? p.shape[0] : 1;
  s.cols = p.numel / s.rows;
  if (tp == 1 || p.tp_split == TpSplit::kReplicated) return s;
  const bool by_rows = p.tp_split == TpSplit::kRows;
  const int64_t n = by_rows ? s.rows : s.cols;
  DSV3_CHECK(n % tp == 0, p.name, ": its ", by_rows ? "rows" : "columns", " (", n,
             ") must be divisible by the tensor model parallel size (", tp,
             ") — heads, FFN widths and the padded vocabulary are split over TP ranks");
  (by_rows ? s.rows : s.cols) = n / tp;
  (by_rows ? s.row0 : s.col0) = tp_rank * (n / tp);
  return s;
}

ParamStore::ParamStore(const ParamTable& table, int ep, int ep_rank, PipelineStage stage, int tp, int tp_rank)
    : ep_(ep), tp_(tp), tp_rank_(tp_rank) {
  DSV3_CHECK(tp >= 1 && tp_rank >= 0 && tp_rank < tp, "ParamStore: TP rank ", tp_rank, " of ", tp);
  const int64_t L = table.config().num_hidden_layers;
  const int64_t n_experts = table.config().n_routed_experts;
  DSV3_CHECK(ep >= 1 && ep_rank >= 0 && ep_rank < ep, "ParamStore: EP rank ", ep_rank, " of ", ep);
  DSV3_CHECK(n_experts % ep == 0, "num_experts (", n_experts,
             ") must be divisible by the expert parallel size (", ep, ")");
  local_experts_ = n_experts / ep;
  first_expert_ = ep_rank * local_experts_;
  for (const auto& p : table.params()) {
    if (!p.tied_to.empty() || !stage.holds(p, L)) continue;
    if (p.is_expert) {
      if (p.expert < first_expert_ || p.expert >= first_expert_ + local_experts_) continue;
      const std::string key = block_key(p.layer, expert_proj(p.name));
      auto it = expert_blocks_.find(key);
      if (it == expert_blocks_.end()) {
        it = expert_blocks_.emplace(key, size_).first;
        size_ += local_experts_ * numel(p);
      }
      offsets_[p.name] = it->second + (p.expert - first_expert_) * numel(p);
    } else {
      offsets_[p.name] = size_;
      size_ += numel(p);
    }
  }
  for (const auto& p : table.params())
    if (!p.tied_to.empty() && stage.holds(p, L) && contains(p.tied_to)) offsets_[p.name] = offset(p.tied_to);
}

int64_t ParamStore::offset(const std::string& name) const {
  auto it = offsets_.find(name);
  DSV3_CHECK(it != offsets_.end(), "no parameter named ", name);
  return it->second;
}

int64_t ParamStore::expert_block(int64_t layer, const std::string& proj) const {
  auto it = expert_blocks_.find(block_key(layer, proj));
  DSV3_CHECK(it != expert_blocks_.end(), "layer ", layer, " has no routed experts (", proj, ")");
  return it->second;
}

}  // namespace dsv3
