// Linear layers on the backend's gemm(): bf16 mode converts both operands into scratch, then runs a bf16 GEMM with
// fp32 accumulation and fp32 output (what torch.autocast does for matmuls on CPU).
#include "kernels/cpu/linear.h"

#include <algorithm>

#include "core/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/gemm.h"

namespace dsv3 {

const void* linear_operand(Backend& be, const float* x, int64_t n, Precision p, DeviceArray<bf16>& buf) {
  if (p == Precision::kF32) return x;
  be.to_bf16(x, grow(be, buf, n), n);
  return buf.data();
}

void Bf16Weights::clear() {
  ranges_.clear();
  data_ = {};
  be_ = nullptr;
}

void Bf16Weights::add(Backend& be, const float* w, int64_t n) {
  Range r{w, n, 0};
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), w,
                             [](const float* a, const Range& b) { return a < b.w; });
  DSV3_CHECK(it == ranges_.end() || w + n <= it->w, "Bf16Weights: overlapping tensors");
  DSV3_CHECK(it == ranges_.begin() || std::prev(it)->w + std::prev(it)->n <= w,
             "Bf16Weights: overlapping tensors");
  ranges_.insert(it, r);
  int64_t o = 0;
  for (Range& x : ranges_) x.off = o, o += x.n;
  be_ = &be;  // the copies are made (sized exactly, once) by the first refresh()
}

void Bf16Weights::refresh() {
  if (ranges_.empty()) return;
  Backend& be = *be_;
  grow(be, data_, ranges_.back().off + ranges_.back().n);
  if (be.kind() != DeviceKind::kCpu) {  // one launch per tensor
    for (const Range& r : ranges_) be.to_bf16(r.w, data_.data() + r.off, r.n);
    return;
  }
  // Fixed-size pieces over all tensors, so that threads share big and small tensors evenly.
  constexpr int64_t kPiece = int64_t{1} << 16;
  const int64_t total = static_cast<int64_t>(data_.size()), pieces = (total + kPiece - 1) / kPiece;
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t q = 0; q < pieces; ++q) {
    const int64_t b = q * kPiece, e = std::min(total, b + kPiece);
    // The ranges overlapping bf16 offsets [b, e).
    auto it = std::upper_bound(ranges_.begin(), ranges_.end(), b,
                               [](int64_t o, const Range& r) { return o < r.off; });
    for (--it; it != ranges_.end() && it->off < e; ++it) {
      const int64_t lo = std::max(b, it->off), hi = std::min(e, it->off + it->n);
      if (hi > lo) to_bf16(it->w + (lo - it->off), data_.data() + lo, hi - lo);
    }
  }
}

const bf16* Bf16Weights::find(const float* w, int64_t n) const {
  if (data_.empty()) return nullptr;  // not refreshed yet: no copies to hand out
  auto it = std::upper_bound(ranges_.begin(), ranges_.end(), w,
                             [](const float* a, const Range& b) { return a < b.w; });
  if (it == ranges_.begin()) return nullptr;
  --it;
  if (w >= it->w + it->n) return nullptr;
  // Adjacent tensors (gate_proj then up_proj) have adjacent copies: one operand may span them.
  for (auto r = it; r->w + r->n < w + n; ++r)
    if (r + 1 == ranges_.end() || (r + 1)->w != r->w + r->n) return nullptr;
  return data_.data() + it->off + (w - it->w);
}

const void* weight_operand(Backend& be, const float* w, int64_t n, Precision p, const Bf16Weights* cache,
                           DeviceArray<bf16>& buf) {
  if (p == Precision::kF32) return w;
  if (cache)
    if (const bf16* c = cache->find(w, n)) return c;
  return linear_operand(be, w, n, p, buf);
}

namespace {

GemmType ab_type(Precision p) {
  return p == Precision::kF32 ? GemmType::kF32 : GemmType::kBF16;
}

}  // namespace

void linear_forward(Backend& be, const float* x, const float* w, float* y, int64_t t, int64_t in, int64_t out,
                    Precision p, LinearScratch& s, float beta) {
  GemmArgs g;
  g.m = t, g.n = out, g.k = in;
  g.a = linear_operand(be, x, t * in, p, s.a), g.lda = in;
  g.b = linear_operand(be, w, out * in, p, s.b), g.ldb = in, g.trans_b = true;
  g.c = y, g.ldc = out, g.ab_type = ab_type(p), g.beta = beta;
  be.gemm(g);
}

void linear_backward_input(Backend& be, const float* dy, const float* w, float* dx, int64_t t, int64_t in,
                           int64_t out, Precision p, LinearScratch& s, float beta) {
  GemmArgs g;
  g.m = t, g.n = in, g.k = out;
  g.a = linear_operand(be, dy, t * out, p, s.a), g.lda = out;
  g.b = linear_operand(be, w, out * in, p, s.b), g.ldb = in;
  g.c = dx, g.ldc = in, g.ab_type = ab_type(p), g.beta = beta;
  be.gemm(g);
}

void linear_backward_weight(Backend& be, const float* dy, const float* x, float* dw, int64_t t, int64_t in,
                            int64_t out, Precision p, LinearScratch& s) {
  GemmArgs g;
  g.m = out, g.n = in, g.k = t;
  g.a = linear_operand(be, dy, t * out, p, s.a), g.lda = out, g.trans_a = true;
  g.b = linear_operand(be, x, t * in, p, s.b), g.ldb = in;
  g.c = dw, g.ldc = in, g.ab_type = ab_type(p), g.beta = 1.f;
  be.gemm(g);
}

void linear_forward_op(Backend& be, const void* x, const void* w, float* y, int64_t t, int64_t in,
                       int64_t out, Precision p, float beta, int64_t ld_x, int64_t ld_y) {
  GemmArgs g;
  g.m = t, g.n = out, g.k = in;
  g.a = x, g.lda = ld_x ? ld_x : in;
  g.b = w, g.ldb = in, g.trans_b = true;
  g.c = y, g.ldc = ld_y ? ld_y : out, g.ab_type = ab_type(p), g.beta = beta;
  be.gemm(g);
}

void linear_backward_input_op(Backend& be, const void* dy, const void* w, float* dx, int64_t t, int64_t in,
                              int64_t out, Precision p, float beta, int64_t ld_dy) {
  GemmArgs g;
  g.m = t, g.n = in, g.k = out;
  g.a = dy, g.lda = ld_dy ? ld_dy : out;
  g.b = w, g.ldb = in;
  g.c = dx, g.ldc = in, g.ab_type = ab_type(p), g.beta = beta;
  be.gemm(g);
}

void linear_backward_weight_op(Backend& be, const void* dy, const void* x, float* dw, int64_t t, int64_t in,
                               int64_t out, Precision p, int64_t ld_dy) {
  GemmArgs g;
  g.m = out, g.n = in, g.k = t;
  g.a = dy, g.lda = ld_dy ? ld_dy : out, g.trans_a = true;
  g.b = x, g.ldb = in;
  g.c = dw, g.ldc = in, g.ab_type = ab_type(p), g.beta = 1.f;
  be.gemm(g);
}

}  // namespace dsv3
