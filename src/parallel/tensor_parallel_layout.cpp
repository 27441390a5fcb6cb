// Gather and scatter between TP shards and whole tensors (see tensor_parallel_layout.h).
#include "parallel/tensor_parallel_layout.h"

#include <algorithm>
#include <vector>

namespace dsv3 {
namespace {

// Copies block `s` of a whole tensor with `cols` columns from/to its packed [rows, cols] form.
void copy_block(const TpShard& s, int64_t cols, float* whole, float* packed, bool to_whole) {
  for (int64_t i = 0; i < s.rows; ++i) {
    float* w = whole + (s.row0 + i) * cols + s.col0;
    float* p = packed + i * s.cols;
    to_whole ? std::copy_n(p, s.cols, w) : std::copy_n(w, s.cols, p);
  }
}

int64_t columns(const ParamInfo& p) { return p.numel / (p.shape.size() == 2 ? p.shape[0] : 1); }

}  // namespace

void tp_gather(const ParamTable& table, const ParamStore& local, const ParamStore& whole, const float* local_buf,
               float* whole_buf, Comm& tp) {
  std::vector<float> all;
  for (const auto& p : table.params()) {
    if (!p.tied_to.empty() || !local.contains(p.name)) continue;
    const float* src = local_buf + local.offset(p.name);
    float* dst = whole_buf + whole.offset(p.name);
    const int64_t n = local.numel(p);
    if (n == p.numel) {
      std::copy_n(src, n, dst);
      continue;
    }
    all.resize(static_cast<size_t>(n * tp.size()));
    tp.allgather(src, n, all.data());
    for (int r = 0; r < tp.size(); ++r)
      copy_block(tp_shard(p, tp.size(), r), columns(p), dst, all.data() + r * n, true);
  }
}

void tp_scatter(const ParamTable& table, const ParamStore& local, const ParamStore& whole, const float* whole_buf,
                float* local_buf) {
  for (const auto& p : table.params()) {
    if (!p.tied_to.empty() || !local.contains(p.name)) continue;
    copy_block(tp_shard(p, local.tp(), local.tp_rank()), columns(p),
               const_cast<float*>(whole_buf + whole.offset(p.name)), local_buf + local.offset(p.name), false);
  }
}

}  // namespace dsv3
