// Gather and scatter between TP shards and whole tensors (see tensor_parallel_layout.h).
#include "parallel/tensor_parallel_layout.h"

#include <algorithm>
#include <vector>

namespace dsv3 {
namespace {

// Block `s` of a whole tensor with `cols` columns, to and from its packed [s.rows, s.cols] form.
void unpack_block(const TpShard& s, int64_t cols, const float* packed, float* whole) {
  for (int64_t i = 0; i < s.rows; ++i)
    std::copy_n(packed + i * s.cols, s.cols, whole + (s.row0 + i) * cols + s.col0);
}
void pack_block(const TpShard& s, int64_t cols, const float* whole, float* packed) {
  for (int64_t i = 0; i < s.rows; ++i)
    std::copy_n(whole + (s.row0 + i) * cols + s.col0, s.cols, packed + i * s.cols);
}

int64_t columns(const ParamInfo& p) {
  return p.numel / (p.shape.size() == 2 ? p.shape[0] : 1);
}

}  // namespace

void tp_gather(const ParamTable& table, const ParamStore& local, const ParamStore& whole,
               const float* local_buf, float* whole_buf, Comm& tp) {
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
      unpack_block(tp_shard(p, tp.size(), r), columns(p), all.data() + r * n, dst);
  }
}

void tp_scatter(const ParamTable& table, const ParamStore& local, const ParamStore& whole,
                const float* whole_buf, float* local_buf) {
  for (const auto& p : table.params()) {
    if (!p.tied_to.empty() || !local.contains(p.name)) continue;
    pack_block(tp_shard(p, local.tp(), local.tp_rank()), columns(p), whole_buf + whole.offset(p.name),
               local_buf + local.offset(p.name));
  }
}

}  // namespace dsv3
