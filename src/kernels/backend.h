// The op table: every operation the model and the optimizer run on tensor data, device-neutral. One binary holds
// the CPU backend (the kernels in cpu/, the exact reference) and, where built, the CUDA backend (cuda/); the
// backend is chosen at run time (`dsv3 train --device`), so every CUDA op is tested in-process against the CPU op.
//
// Every pointer argument is memory of this backend (alloc()), except where a parameter says "host". Ops are
// ordered on one stream: a later op sees an earlier op's results; the host sees them after synchronize() or a
// copy_to_host(). Semantics (shapes, what is assigned and what accumulates, what may alias) are the CPU kernels'
// (named beside each op); the CPU backend is those kernels called as they are.
//
// Legend: T tokens, D features, F ffn width, V vocab rows, H heads, P rope table positions, N elements.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/rope.h"
#include "kernels/precision.h"
#include "kernels/route.h"

namespace dsv3 {

// kHostGuarded: a test backend (CPU kernels on memory the host may not touch outside ops, make_host_guarded_backend)
// that takes the device code paths on a machine without a GPU.
enum class DeviceKind : uint8_t { kCpu, kCuda, kHostGuarded };

// AdamW's per-step fp32 constants, formed in double as torch forms them (optim/adamw.h adamw_step_consts).
struct AdamWStepConsts {
  float decay = 1, w1 = 0, b2 = 0, w2 = 0, step_size = 0, bc2_sqrt = 1, eps = 0;
};
// One AdamW range of the flat parameter buffer (its own lr and weight decay, hence its own constants): the whole
// update of a step is one call over all segments.
struct AdamWSegment {
  int64_t begin = 0, n = 0;  // elements [begin, begin + n) of params, grads and moments
  AdamWStepConsts k;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual DeviceKind kind() const = 0;
  virtual std::string name() const = 0;  // "cpu", or "cuda:0 NVIDIA H200"

  // ---- memory
  virtual void* alloc(size_t bytes) = 0;  // zero-filled; bytes may be 0
  virtual void free(void* p) = 0;
  virtual void copy_to_device(void* dst, const void* host_src, size_t bytes) = 0;
  virtual void copy_to_host(void* host_dst, const void* src, size_t bytes) = 0;  // waits for the stream
  virtual void copy(void* dst, const void* src, size_t bytes) = 0;               // within this backend
  virtual void fill_zero(void* p, size_t bytes) = 0;
  virtual void synchronize() = 0;
  // Allocations made so far (tests count them around a training step: 0 expected).
  virtual int64_t allocations() const = 0;
  // Bytes allocated and not yet freed, and the most there ever were (what the memory plan, train/memory_plan.h,
  // predicts); -1 where the backend does not count.
  virtual int64_t bytes_in_use() const { return -1; }
  // copy_to_host calls so far: each is a wait for the device on a GPU (tests count them around a step); -1 where
  // the backend does not count.
  virtual int64_t host_reads() const { return -1; }
  virtual int64_t peak_bytes() const { return -1; }
  // grouped_gemm calls that ran (tests check which path the MoE took); -1 where the backend does not count.
  virtual int64_t grouped_gemms() const { return -1; }

  // ---- elementwise helpers
  virtual void to_bf16(const float* x_N, bf16* y_N, int64_t n) = 0;  // round to nearest even (core/bf16.h)
  virtual void scale(float* x_N, int64_t n, float s) = 0;            // x *= s (grad_clip.h scale_inplace)
  // Σ x² over the segments (begin, n) of x, in double, deterministic: the result does not depend on launch
  // sizes or thread counts. Reads the result back (one sync).
  virtual double sum_of_squares(const float* x, const std::vector<std::pair<int64_t, int64_t>>& segments) = 0;
  // Σ x over n elements in double; with accumulate, added to *out_1 (backend memory, one double).
  virtual void sum(const float* x_N, int64_t n, double* out_1, bool accumulate) = 0;
  // y = a + b elementwise (y may alias a or b): the residual adds.
  virtual void add(float* y_N, const float* a_N, const float* b_N, int64_t n) = 0;
  // Strided copy of `rows` rows of `cols` elements: dst[r·ld_dst + c] = src[r·ld_src + c] (no overlap).
  virtual void copy_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                         int64_t cols) = 0;
  // y[t·ld_y + i] = Σ_h x[t·ld_x + h·hs_x + i] for i < n, the heads added in order h = 0, 1, ... (MLA's k_pe
  // gradient: k_pe is shared by all heads).
  virtual void sum_heads(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t t,
                         int64_t heads, int64_t n) = 0;

  // ---- MoE token permutation (cpu/moe_permute.h): rows grouped by expert and the deterministic combine back.
  // x_RD[r] = x_TD[token_R[r]] (token -1: a zero row).
  virtual void permute_rows(const float* x_TD, const int32_t* token_R, int64_t r, int64_t d, float* x_RD) = 0;
  // out_TD[t] = beta·out_TD[t] + Σ_k y_RD[row_TK[t,k]] (k ascending, rows -1 skipped; beta 0 or 1).
  virtual void unpermute_sum(const float* y_RD, const int32_t* row_TK, int64_t t, int64_t k, int64_t d,
                             float* out_TD, float beta) = 0;
  // out[i] = index[i] < 0 ? 0 : v[index[i]] (a pair's gate weight into its row, and back).
  virtual void gather_or_zero(const float* v, const int32_t* index_N, int64_t n, float* out_N) = 0;
  // The router from its logits on the backend (kernels/route.h; one rank, dropless): selection, gate weights,
  // the permutation by expert and the sequence aux loss, reading nothing back; and the logits' gradient.
  virtual void route_forward(const RouteForwardArgs& a) = 0;
  virtual void route_backward(const RouteBackwardArgs& a) = 0;

  // ---- GEMM (cpu/gemm.h)
  virtual void gemm(const GemmArgs& g) = 0;
  // Independent GEMMs in lanes (the MoE's experts, moe.cpp): GEMMs issued after lane(i) may run concurrently
  // with other lanes' and stay in order with their own lane's; lanes_end() orders every lane before whatever
  // follows. Only GEMMs may be issued between lanes_begin() and lanes_end(). The CUDA backend runs lanes on
  // several streams (as TransformerEngine issues per-expert GEMMs on Hopper); a backend without concurrency
  // ignores the calls (the CPU runs experts over its threads instead).
  // cpu/gemm.h grouped_gemm (offsets_G1 in this backend's memory). false: not run, because this backend has no
  // grouped kernel for these arguments (shape, alignment, GPU); the caller then issues the groups' GEMMs itself.
  virtual bool grouped_gemm(const GroupedGemmArgs& g) {
    (void)g;
    return false;
  }
  virtual void lanes_begin() {}
  virtual void lane(int64_t i) { (void)i; }
  virtual void lanes_end() {}

  // ---- layer ops
  // cpu/rmsnorm.h rmsnorm_forward_strided / rmsnorm_backward_strided (dw_D accumulates, deterministic).
  virtual void rmsnorm_forward(const float* x, int64_t ld_x, const float* w_D, float* y, int64_t ld_y,
                               float* rstd_T, int64_t t, int64_t d, float eps) = 0;
  virtual void rmsnorm_backward(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x,
                                const float* w_D, const float* rstd_T, float* dx, int64_t ld_dx, float* dw_D,
                                int64_t t, int64_t d, float beta) = 0;
  // cpu/swiglu.h swiglu_forward_general / swiglu_backward_general.
  virtual void swiglu_forward(const float* a, const float* b, int64_t ld_ab, const float* p_T, float* h_TF,
                              int64_t t, int64_t f) = 0;
  virtual void swiglu_backward(const float* dh_TF, const float* a, const float* b, int64_t ld_ab,
                               const float* p_T, float* da, float* db, int64_t ld_dab, float* dp_T, int64_t t,
                               int64_t f) = 0;
  // cpu/embedding.h (ids are checked: an id outside [0, vocab) is an error naming it; dtable accumulates,
  // deterministically).
  virtual void embedding_forward(const int32_t* ids_T, const float* table_VD, float* out_TD, int64_t t,
                                 int64_t vocab, int64_t d) = 0;
  virtual void embedding_backward(const float* dout_TD, const int32_t* ids_T, float* dtable_VD, int64_t t,
                                  int64_t vocab, int64_t d) = 0;
  // cpu/rope.h rope_forward / rope_backward over a cos/sin table in this backend's memory.
  virtual void rope_forward(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y,
                            int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& table,
                            bool interleave) = 0;
  virtual void rope_backward(const float* dy, int64_t ld_dy, int64_t hs_dy, float* dx, int64_t ld_dx,
                             int64_t hs_dx, int64_t t, int64_t heads, int64_t seq_len,
                             const RopeTableView& table, bool interleave) = 0;
  // cpu/attention.h (causal; lse_BHS saved for the backward; dq, dk, dv assigned). A shape the backend cannot
  // run is refused by name (an error), never computed wrongly.
  virtual void attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v,
                                 HeadsViewMut o, float* lse_BHS, Precision p) = 0;
  virtual void attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                                  const float* lse_BHS, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk,
                                  HeadsViewMut dv, Precision p) = 0;
  // cpu/cross_entropy.h: output head fused with cross-entropy, in vocab chunks (the [T, V] probabilities never
  // exist). loss_T (0 for ignored labels) and lse_T are written; the loss sum is sum(loss_T). w_bf_VD: the
  // head's bf16 copy in bf16 mode (nullable). Backward: dh assigned, dw accumulated.
  virtual void head_cross_entropy_forward(const float* h_TD, const float* w_VD, const bf16* w_bf_VD,
                                          const int32_t* labels_T, float* loss_T, float* lse_T, int64_t t,
                                          int64_t d, int64_t v, Precision p) = 0;
  virtual void head_cross_entropy_backward(const float* h_TD, const float* w_VD, const bf16* w_bf_VD,
                                           const int32_t* labels_T, const float* lse_T, float dloss,
                                           const float* dloss_T, float* dh_TD, float* dw_VD, int64_t t,
                                           int64_t d, int64_t v, Precision p) = 0;

  // ---- optimizer (optim/adamw.h arithmetic, bit-identical to the CPU update for the same inputs)
  virtual void adamw(float* params, const float* grads, float* exp_avg, float* exp_avg_sq,
                     const std::vector<AdamWSegment>& segments) = 0;
};

// The CPU backend (process-wide; stateless apart from per-thread scratch).
Backend& cpu_backend();

// The CUDA backend on GPU `device`, or nullptr with *why_not set ("this build has no CUDA backend", "no CUDA GPU
// visible: <driver's message>"). It lives in libdsv3_cuda.so, opened on first use (kernels/cuda_loader.cpp).
std::unique_ptr<Backend> make_cuda_backend(int device, std::string* why_not);
// Whether the NVIDIA driver sees GPU `device` (its name in *name), asked without loading the CUDA backend (or
// cuBLASLt) and without making a context: what a run that may stay on the CPU asks first.
bool cuda_gpu_visible(int device, std::string* name, std::string* why_not);
// The path of the CUDA backend library, loading it; "" with *why_not set when it cannot be loaded.
std::string cuda_library(std::string* why_not);

// The test backend above (kernels/guarded_backend.cpp): every op runs the CPU kernel; outside ops the memory is
// PROT_NONE, so a host access to backend memory crashes.
std::unique_ptr<Backend> make_host_guarded_backend();

// Owning handle for backend memory (grow-only when reused through ensure()).
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend& be, size_t bytes) : be_(&be), p_(be.alloc(bytes)), bytes_(bytes) {}
  ~DeviceBuffer() { reset(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) reset(), be_ = o.be_, p_ = o.p_, bytes_ = o.bytes_, o.p_ = nullptr, o.bytes_ = 0;
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  // At least `bytes` (contents not kept when it grows).
  void ensure(Backend& be, size_t bytes) {
    if (be_ == &be && bytes <= bytes_) return;
    reset();
    be_ = &be, p_ = be.alloc(bytes), bytes_ = bytes;
  }
  void reset() {
    if (p_) be_->free(p_);
    p_ = nullptr, bytes_ = 0;
  }
  template <typename T>
  T* as() const {
    return static_cast<T*>(p_);
  }
  void* data() const { return p_; }
  size_t bytes() const { return bytes_; }

 private:
  Backend* be_ = nullptr;
  void* p_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace dsv3
