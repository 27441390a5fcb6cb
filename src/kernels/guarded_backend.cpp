// A test backend: the CPU kernels on memory the host may not touch outside an op. Every allocation is its own
// mapping, kept PROT_NONE except while an op (or a copy) runs, so host code that reads or writes backend memory
// directly, which would be wrong on a GPU, crashes here instead of passing silently. It lets the CPU test suite
// run the device code paths (host staging of the router, checkpoints, the optimizer over device buffers) that a
// real GPU would, with the CPU's numbers.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>

#include "core/error.h"
#include "kernels/backend.h"

namespace dsv3 {
namespace {

class GuardedHostBackend final : public Backend {
 public:
  // One reserved range holds every allocation (bump-allocated, page-aligned, never reused), so opening and closing
  // the memory around an op is one mprotect over the used part, not one per allocation.
  GuardedHostBackend() {
    void* m = mmap(nullptr, kReserve + kHuge, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    DSV3_CHECK(m != MAP_FAILED, "host-guarded backend: cannot reserve address space");
    map_ = static_cast<char*>(m);
    base_ = map_ + (kHuge - reinterpret_cast<uintptr_t>(map_) % kHuge) % kHuge;  // 2 MiB aligned
    // Huge pages where the kernel gives them: mprotect then changes one entry per 2 MiB instead of 512.
    madvise(base_, kReserve, MADV_HUGEPAGE);
  }
  ~GuardedHostBackend() override { munmap(map_, kReserve + kHuge); }
  DeviceKind kind() const override { return DeviceKind::kHostGuarded; }
  std::string name() const override { return "host-guarded"; }

  void* alloc(size_t bytes) override {
    ++allocations_;
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t n = std::max<size_t>(1, (bytes + page - 1) / page) * page;
    DSV3_CHECK(used_ + n <= kReserve, "host-guarded backend: out of its ", kReserve >> 30, " GiB reserve");
    char* p = base_ + used_;
    used_ += n;
    sizes_[p] = n;
    if (depth_)
      DSV3_CHECK(mprotect(p, n, PROT_READ | PROT_WRITE) == 0, "host-guarded backend: mprotect failed");
    return p;  // zero: fresh anonymous pages
  }
  void free(void* p) override {
    auto it = sizes_.find(static_cast<char*>(p));
    DSV3_CHECK(it != sizes_.end(), "host-guarded backend: freeing memory it did not allocate");
    madvise(it->first, it->second, MADV_DONTNEED);  // the pages go back; the addresses are not reused
    sizes_.erase(it);
  }
  void copy_to_device(void* dst, const void* src, size_t bytes) override { copy(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    ++host_reads_;  // what would be a wait for the device on a GPU
    copy(dst, src, bytes);
  }
  int64_t host_reads() const override { return host_reads_.load(); }
  void copy(void* dst, const void* src, size_t bytes) override {
    const Open open(*this);
    if (bytes && dst != src) std::memmove(dst, src, bytes);
  }
  void fill_zero(void* p, size_t bytes) override {
    const Open open(*this);
    if (bytes) std::memset(p, 0, bytes);
  }
  void synchronize() override {}
  int64_t allocations() const override { return allocations_.load(); }

  void to_bf16(const float* x_N, bf16* y_N, int64_t n) override {
    const Open open(*this);
    cpu_backend().to_bf16(x_N, y_N, n);
  }
  void scale(float* x_N, int64_t n, float s) override {
    const Open open(*this);
    cpu_backend().scale(x_N, n, s);
  }
  double sum_of_squares(const float* x, const std::vector<std::pair<int64_t, int64_t>>& segments) override {
    const Open open(*this);
    return cpu_backend().sum_of_squares(x, segments);
  }
  void sum(const float* x_N, int64_t n, double* out_1, bool accumulate) override {
    const Open open(*this);
    cpu_backend().sum(x_N, n, out_1, accumulate);
  }
  void add(float* y_N, const float* a_N, const float* b_N, int64_t n) override {
    const Open open(*this);
    cpu_backend().add(y_N, a_N, b_N, n);
  }
  void copy_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                 int64_t cols) override {
    const Open open(*this);
    cpu_backend().copy_rows(dst, ld_dst, src, ld_src, rows, cols);
  }
  void sum_heads(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t t, int64_t heads,
                 int64_t n) override {
    const Open open(*this);
    cpu_backend().sum_heads(x, ld_x, hs_x, y, ld_y, t, heads, n);
  }
  void permute_rows(const float* x_TD, const int32_t* token_R, int64_t r, int64_t d, float* x_RD) override {
    const Open open(*this);
    cpu_backend().permute_rows(x_TD, token_R, r, d, x_RD);
  }
  void unpermute_sum(const float* y_RD, const int32_t* row_TK, int64_t t, int64_t k, int64_t d, float* out_TD,
                     float beta) override {
    const Open open(*this);
    cpu_backend().unpermute_sum(y_RD, row_TK, t, k, d, out_TD, beta);
  }
  void gather_or_zero(const float* v, const int32_t* index_N, int64_t n, float* out_N) override {
    const Open open(*this);
    cpu_backend().gather_or_zero(v, index_N, n, out_N);
  }
  void route_forward(const RouteForwardArgs& a) override {
    const Open open(*this);
    cpu_backend().route_forward(a);
  }
  void route_backward(const RouteBackwardArgs& a) override {
    const Open open(*this);
    cpu_backend().route_backward(a);
  }

  void gemm(const GemmArgs& g) override {
    const Open open(*this);
    cpu_backend().gemm(g);
  }
  bool grouped_gemm(const GroupedGemmArgs& g) override {
    const Open open(*this);
    ++grouped_gemms_;
    return cpu_backend().grouped_gemm(g);
  }
  int64_t grouped_gemms() const override { return grouped_gemms_; }
  void rmsnorm_forward(const float* x, int64_t ld_x, const float* w_D, float* y, int64_t ld_y, float* rstd_T,
                       int64_t t, int64_t d, float eps) override {
    const Open open(*this);
    cpu_backend().rmsnorm_forward(x, ld_x, w_D, y, ld_y, rstd_T, t, d, eps);
  }
  void rmsnorm_backward(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, const float* w_D,
                        const float* rstd_T, float* dx, int64_t ld_dx, float* dw_D, int64_t t, int64_t d,
                        float beta) override {
    const Open open(*this);
    cpu_backend().rmsnorm_backward(dy, ld_dy, x, ld_x, w_D, rstd_T, dx, ld_dx, dw_D, t, d, beta);
  }
  void swiglu_forward(const float* a, const float* b, int64_t ld_ab, const float* p_T, float* h_TF, int64_t t,
                      int64_t f) override {
    const Open open(*this);
    cpu_backend().swiglu_forward(a, b, ld_ab, p_T, h_TF, t, f);
  }
  void swiglu_backward(const float* dh_TF, const float* a, const float* b, int64_t ld_ab, const float* p_T,
                       float* da, float* db, int64_t ld_dab, float* dp_T, int64_t t, int64_t f) override {
    const Open open(*this);
    cpu_backend().swiglu_backward(dh_TF, a, b, ld_ab, p_T, da, db, ld_dab, dp_T, t, f);
  }
  void embedding_forward(const int32_t* ids_T, const float* table_VD, float* out_TD, int64_t t, int64_t vocab,
                         int64_t d) override {
    const Open open(*this);
    cpu_backend().embedding_forward(ids_T, table_VD, out_TD, t, vocab, d);
  }
  void embedding_backward(const float* dout_TD, const int32_t* ids_T, float* dtable_VD, int64_t t,
                          int64_t vocab, int64_t d) override {
    const Open open(*this);
    cpu_backend().embedding_backward(dout_TD, ids_T, dtable_VD, t, vocab, d);
  }
  void rope_forward(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y,
                    int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& table,
                    bool interleave) override {
    const Open open(*this);
    cpu_backend().rope_forward(x, ld_x, hs_x, y, ld_y, hs_y, t, heads, seq_len, table, interleave);
  }
  void rope_backward(const float* dy, int64_t ld_dy, int64_t hs_dy, float* dx, int64_t ld_dx, int64_t hs_dx,
                     int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& table,
                     bool interleave) override {
    const Open open(*this);
    cpu_backend().rope_backward(dy, ld_dy, hs_dy, dx, ld_dx, hs_dx, t, heads, seq_len, table, interleave);
  }
  void attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsViewMut o,
                         float* lse_BHS, Precision p) override {
    const Open open(*this);
    cpu_backend().attention_forward(s, q, k, v, o, lse_BHS, p);
  }
  void attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                          const float* lse_BHS, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk,
                          HeadsViewMut dv, Precision p) override {
    const Open open(*this);
    cpu_backend().attention_backward(s, q, k, v, o, lse_BHS, do_, dq, dk, dv, p);
  }
  void head_cross_entropy_forward(const float* h_TD, const float* w_VD, const bf16* w_bf_VD,
                                  const int32_t* labels_T, float* loss_T, float* lse_T, int64_t t, int64_t d,
                                  int64_t v, Precision p) override {
    const Open open(*this);
    cpu_backend().head_cross_entropy_forward(h_TD, w_VD, w_bf_VD, labels_T, loss_T, lse_T, t, d, v, p);
  }
  void head_cross_entropy_backward(const float* h_TD, const float* w_VD, const bf16* w_bf_VD,
                                   const int32_t* labels_T, const float* lse_T, float dloss,
                                   const float* dloss_T, float* dh_TD, float* dw_VD, int64_t t, int64_t d,
                                   int64_t v, Precision p) override {
    const Open open(*this);
    cpu_backend().head_cross_entropy_backward(h_TD, w_VD, w_bf_VD, labels_T, lse_T, dloss, dloss_T, dh_TD,
                                              dw_VD, t, d, v, p);
  }
  void adamw(float* params, const float* grads, float* exp_avg, float* exp_avg_sq,
             const std::vector<AdamWSegment>& segments) override {
    const Open open(*this);
    cpu_backend().adamw(params, grads, exp_avg, exp_avg_sq, segments);
  }

 private:
  // Opens every mapping for the duration of one op (ops do not nest across backends, but an op may call
  // another through this object: depth counts).
  struct Open {
    explicit Open(GuardedHostBackend& b) : b(b) {
      if (b.depth_++ == 0) b.protect(PROT_READ | PROT_WRITE);
    }
    ~Open() {
      if (--b.depth_ == 0) b.protect(PROT_NONE);
    }
    GuardedHostBackend& b;
  };
  void protect(int prot) {
    const size_t n = (used_ + kHuge - 1) / kHuge * kHuge;  // whole huge pages (never split)
    if (n) DSV3_CHECK(mprotect(base_, n, prot) == 0, "host-guarded backend: mprotect failed");
  }
  static constexpr size_t kReserve = size_t{64} << 30, kHuge = size_t{2} << 20;
  char* map_ = nullptr;   // the reservation
  char* base_ = nullptr;  // its first 2 MiB boundary
  size_t used_ = 0;
  std::map<char*, size_t> sizes_;
  int depth_ = 0;
  std::atomic<int64_t> allocations_{0}, host_reads_{0}, grouped_gemms_{0};
};

}  // namespace

std::unique_ptr<Backend> make_host_guarded_backend() {
  return std::make_unique<GuardedHostBackend>();
}

}  // namespace dsv3
