// The CPU backend: the op table over host memory, each op the CPU kernel as it is (the exact reference the CUDA
// backend is tested against). Scratch that the kernels keep between calls is per thread and grow-only.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/cross_entropy.h"
#include "kernels/cpu/embedding.h"
#include "kernels/cpu/reduce.h"
#include "kernels/cpu/rmsnorm.h"
#include "kernels/cpu/route.h"
#include "kernels/cpu/swiglu.h"
#include "moe/permute.h"

namespace dsv3 {
namespace {

class CpuBackend final : public Backend {
 public:
  DeviceKind kind() const override { return DeviceKind::kCpu; }
  std::string name() const override { return "cpu"; }

  void* alloc(size_t bytes) override {
    ++allocations_;
    // 64-byte aligned (AVX-512 loads, oneDNN), zeroed as the interface promises; a 64-byte header in front
    // keeps the size for the byte counters, 64 bytes behind allow a vector load past the end.
    char* base = static_cast<char*>(std::aligned_alloc(64, kHeader + (bytes + 63) / 64 * 64 + 64));
    DSV3_CHECK(base, "cpu backend: out of memory allocating ", bytes, " bytes");
    *reinterpret_cast<size_t*>(base) = bytes;
    const int64_t now = in_use_ += static_cast<int64_t>(bytes);
    for (int64_t peak = peak_.load(); now > peak && !peak_.compare_exchange_weak(peak, now);) {
    }
    std::memset(base + kHeader, 0, bytes);
    return base + kHeader;
  }
  void free(void* p) override {
    if (!p) return;
    char* base = static_cast<char*>(p) - kHeader;
    in_use_ -= static_cast<int64_t>(*reinterpret_cast<size_t*>(base));
    std::free(base);
  }
  int64_t bytes_in_use() const override { return in_use_.load(); }
  int64_t peak_bytes() const override { return peak_.load(); }
  void copy_to_device(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    ++host_reads_;
    copy(dst, src, bytes);
  }
  int64_t host_reads() const override { return host_reads_.load(); }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes && dst != src) std::memmove(dst, src, bytes);
  }
  void fill_zero(void* p, size_t bytes) override {
    if (bytes) std::memset(p, 0, bytes);
  }
  void synchronize() override {}
  int64_t allocations() const override { return allocations_.load(); }

  void to_bf16(const float* x, bf16* y, int64_t n) override { dsv3::to_bf16(x, y, n); }
  void scale(float* x, int64_t n, float s) override { scale_inplace(x, n, s); }
  double sum_of_squares(const float* x, const std::vector<std::pair<int64_t, int64_t>>& segments) override {
    double total = 0;
    for (const auto& [begin, n] : segments) total += dsv3::sum_of_squares(x + begin, n);
    return total;
  }
  void sum(const float* x, int64_t n, double* out, bool accumulate) override {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += x[i];
    *out = accumulate ? *out + s : s;
  }
  void add(float* y, const float* a, const float* b, int64_t n) override {
#pragma omp parallel for simd schedule(static)
    for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
  }
  void copy_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                 int64_t cols) override {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; ++r) std::memcpy(dst + r * ld_dst, src + r * ld_src, cols * sizeof(float));
  }
  void sum_heads(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t t, int64_t heads,
                 int64_t n) override {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < t; ++r) {
      float* yr = y + r * ld_y;
      std::fill(yr, yr + n, 0.f);
      for (int64_t h = 0; h < heads; ++h)
        for (int64_t i = 0; i < n; ++i) yr[i] += x[r * ld_x + h * hs_x + i];
    }
  }

  void permute_rows(const float* x, const int32_t* token_R, int64_t r, int64_t d, float* y) override {
    dsv3::permute_rows(x, token_R, r, d, y);
  }
  void unpermute_sum(const float* y, const int32_t* row_TK, int64_t t, int64_t k, int64_t d, float* out,
                     float beta) override {
    dsv3::unpermute_sum(y, row_TK, t, k, d, out, beta);
  }
  void gather_or_zero(const float* v, const int32_t* index, int64_t n, float* out) override {
    dsv3::gather_or_zero(v, index, n, out);
  }
  void route_forward(const RouteForwardArgs& a) override {
    route_forward_host(a);
  }
  void route_backward(const RouteBackwardArgs& a) override {
    route_backward_host(a);
  }

  void gemm(const GemmArgs& g) override {
    dsv3::gemm(g);
  }
  bool grouped_gemm(const GroupedGemmArgs& g) override {
    dsv3::grouped_gemm(g);
    return true;
  }

  void rmsnorm_forward(const float* x, int64_t ld_x, const float* w, float* y, int64_t ld_y, float* rstd,
                       int64_t t, int64_t d, float eps) override {
    rmsnorm_forward_strided(x, ld_x, w, y, ld_y, rstd, t, d, eps);
  }
  void rmsnorm_backward(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, const float* w,
                        const float* rstd, float* dx, int64_t ld_dx, float* dw, int64_t t, int64_t d,
                        float beta) override {
    rmsnorm_backward_strided(dy, ld_dy, x, ld_x, w, rstd, dx, ld_dx, dw, t, d, beta);
  }
  void swiglu_forward(const float* a, const float* b, int64_t ld_ab, const float* p, float* h, int64_t t,
                      int64_t f) override {
    swiglu_forward_general(a, b, ld_ab, p, h, t, f);
  }
  void swiglu_backward(const float* dh, const float* a, const float* b, int64_t ld_ab, const float* p,
                       float* da, float* db, int64_t ld_dab, float* dp, int64_t t, int64_t f) override {
    swiglu_backward_general(dh, a, b, ld_ab, p, da, db, ld_dab, dp, t, f);
  }
  void embedding_forward(const int32_t* ids, const float* table, float* out, int64_t t, int64_t vocab,
                         int64_t d) override {
    dsv3::embedding_forward(ids, table, out, t, vocab, d);
  }
  void embedding_backward(const float* dout, const int32_t* ids, float* dtable, int64_t t, int64_t vocab,
                          int64_t d) override {
    dsv3::embedding_backward(dout, ids, dtable, t, vocab, d);
  }
  void rope_forward(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y,
                    int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& table,
                    bool interleave) override {
    dsv3::rope_forward(x, ld_x, hs_x, y, ld_y, hs_y, t, heads, seq_len, table, interleave);
  }
  void rope_backward(const float* dy, int64_t ld_dy, int64_t hs_dy, float* dx, int64_t ld_dx, int64_t hs_dx,
                     int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& table,
                     bool interleave) override {
    dsv3::rope_backward(dy, ld_dy, hs_dy, dx, ld_dx, hs_dx, t, heads, seq_len, table, interleave);
  }
  void attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsViewMut o,
                         float* lse, Precision p) override {
    thread_local AttentionScratch scratch;
    dsv3::attention_forward(s, q, k, v, o, lse, p, scratch);
  }
  void attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                          const float* lse, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk, HeadsViewMut dv,
                          Precision p) override {
    thread_local AttentionScratch scratch;
    dsv3::attention_backward(s, q, k, v, o, lse, do_, dq, dk, dv, p, scratch);
  }
  void head_cross_entropy_forward(const float* h, const float* w, const bf16* w_bf, const int32_t* labels,
                                  float* loss, float* lse, int64_t t, int64_t d, int64_t v,
                                  Precision p) override {
    dsv3::head_cross_entropy_forward(h, w, labels, loss, lse, t, d, v, p, head_scratch(), 0, nullptr, w_bf);
  }
  void head_cross_entropy_backward(const float* h, const float* w, const bf16* w_bf, const int32_t* labels,
                                   const float* lse, float dloss, const float* dloss_T, float* dh, float* dw,
                                   int64_t t, int64_t d, int64_t v, Precision p) override {
    dsv3::head_cross_entropy_backward(h, w, labels, lse, dloss, dloss_T, dh, dw, t, d, v, p, head_scratch(),
                                      0, w_bf);
  }

  void adamw(float* params, const float* grads, float* m, float* v,
             const std::vector<AdamWSegment>& segments) override {
    adamw_segments_cpu(params, grads, m, v, segments);
  }

 private:
  static HeadLossScratch& head_scratch() {
    thread_local HeadLossScratch s;
    return s;
  }
  static constexpr size_t kHeader = 64;
  std::atomic<int64_t> allocations_{0}, in_use_{0}, peak_{0}, host_reads_{0};
};

}  // namespace

Backend& cpu_backend() {
  static CpuBackend b;
  return b;
}

}  // namespace dsv3
