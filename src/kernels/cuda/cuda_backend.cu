// The CUDA backend: one GPU, one stream, cuBLASLt for every GEMM, our kernels (kernels.cuh) for the rest.
// Scratch is grow-only (sized by the first step, then reused), so a steady-state training step allocates nothing.
// Errors that kernels detect (bad ids, bad labels) are reported at the next synchronisation point.
#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "core/error.h"
#include "kernels/backend.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/cudnn_attention.h"
#include "kernels/cuda/grouped_gemm.cuh"
#include "kernels/cuda/kernels.cuh"

namespace dsv3 {
namespace cuda {
namespace {

// cuBLASLt wants its workspace and operands aligned; its heuristic assumes 256-byte alignment unless told
// otherwise, so every call states the alignment its pointers really have (strided views into wider buffers
// have less) and the cache key includes it.
int alignment_of(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  int al = 256;
  while (al > 1 && a % al) al /= 2;
  return al;
}

cudaDataType_t dtype(GemmType t) {
  return t == GemmType::kF32 ? CUDA_R_32F : CUDA_R_16BF;
}

struct GemmKey {
  int64_t m, n, k, lda, ldb, ldc;
  bool ta, tb;
  GemmType ab, c;
  float beta;
  int align_a, align_b, align_c;
  auto tie() const {
    return std::tie(m, n, k, lda, ldb, ldc, ta, tb, ab, c, beta, align_a, align_b, align_c);
  }
  bool operator<(const GemmKey& o) const { return tie() < o.tie(); }
};

// One cached plan per shape (llm.c's matmul_cublaslt caches likewise): descriptors and the heuristic's choice.
struct GemmPlan {
  cublasLtMatmulDesc_t op = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
  cublasLtMatmulAlgo_t algo{};
};

constexpr size_t kWorkspaceBytes = 32u << 20;  // cuBLASLt on Hopper wants 32 MiB

// The head's fused loss in vocab chunks: chunk logits come from cuBLASLt into scratch ([T, C] fp32), the kernels
// fold them into per-token running (max, sum-exp, label logit), and the [T, V] logits never exist.
struct CeBuffers {
  float *logits_TC, *max_T, *sum_T, *label_T;
  bf16 *h_bf, *w_bf, *d_bf;
  int64_t chunk;
};

int64_t ce_chunk(int64_t t, int64_t v) {
  // ~256 MiB of fp32 chunk logits; whole multiples of 128 rows keep the GEMMs' shapes regular.
  const int64_t c = std::max<int64_t>(128, (int64_t{64} << 20) / std::max<int64_t>(t, 1) / 128 * 128);
  return std::min(c, v);
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(int device, std::string name) : device_(device), name_(std::move(name)) {
    check(cudaSetDevice(device_), "cudaSetDevice");
    check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate");
    check_lt(cublasLtCreate(&lt_), "cublasLtCreate");
    check(cudaMalloc(&workspace_, kWorkspaceBytes), "cudaMalloc(cuBLASLt workspace)");
    check(cudaMalloc(&errors_.word, 4 * sizeof(int)), "cudaMalloc(error word)");
    // On stream_, not the legacy default stream: stream_ is non-blocking, so a plain cudaMemset would not be
    // ordered before the kernels that report into the word.
    check(cudaMemsetAsync(errors_.word, 0, 4 * sizeof(int), stream_), "cudaMemsetAsync(error word)");
    int major = 0, minor = 0;
    check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device_), "compute capability");
    check(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device_), "compute capability");
    check(cudaDeviceGetAttribute(&sm_count_, cudaDevAttrMultiProcessorCount, device_), "SM count");
    cc_ = major * 10 + minor;
  }
  ~CudaBackend() override {
    cudaStreamSynchronize(stream_);
    for (Lane& l : lanes_) {
      cudaStreamSynchronize(l.stream);
      cudaFree(l.workspace), cudaEventDestroy(l.done), cudaStreamDestroy(l.stream);
    }
    if (fork_) cudaEventDestroy(fork_);
    clear_plans();
    // ce_scratch_ too: it was left out, so every backend that ran the head loss leaked its chunk buffer.
    cudnn_.reset();
    for (void* s : {scratch_, ce_scratch_, cudnn_buf_, workspace_, static_cast<void*>(errors_.word),
                    static_cast<void*>(segments_)})
      if (s) cudaFree(s);
    cublasLtDestroy(lt_);
    cudaStreamDestroy(stream_);
  }

  DeviceKind kind() const override { return DeviceKind::kCuda; }
  std::string name() const override { return name_; }

  // ---- memory
  void* alloc(size_t bytes) override {
    ++allocations_;
    void* p = nullptr;
    if (bytes == 0) return nullptr;
    const cudaError_t e = cudaMallocAsync(&p, bytes, stream_);
    DSV3_CHECK(e == cudaSuccess, "cuda backend: cannot allocate ", bytes, " bytes on ", name_, ": ",
               cudaGetErrorString(e));
    check(cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemsetAsync");
    {
      std::lock_guard<std::mutex> lock(sizes_mutex_);  // allocations happen outside the step: no contention
      sizes_[p] = bytes;
      in_use_ += static_cast<int64_t>(bytes);
      peak_ = std::max(peak_, in_use_);
    }
    return p;
  }
  void free(void* p) override {
    if (!p) return;
    {
      std::lock_guard<std::mutex> lock(sizes_mutex_);
      if (auto it = sizes_.find(p); it != sizes_.end())
        in_use_ -= static_cast<int64_t>(it->second), sizes_.erase(it);
    }
    check(cudaFreeAsync(p, stream_), "cudaFreeAsync");
  }
  int64_t bytes_in_use() const override {
    std::lock_guard<std::mutex> lock(sizes_mutex_);
    return in_use_;
  }
  int64_t peak_bytes() const override {
    std::lock_guard<std::mutex> lock(sizes_mutex_);
    return peak_;
  }
  int64_t host_reads() const override { return host_reads_.load(); }
  void copy_to_device(void* dst, const void* src, size_t bytes) override {
    // From pageable memory the call returns once the source has been staged (CUDA's documented behaviour), so
    // the caller may reuse its host buffer at once.
    if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_), "copy to device");
  }
  void copy_to_host(void* dst, const void* src, size_t bytes) override {
    ++host_reads_;
    if (bytes) check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_), "copy to host");
    synchronize();
  }
  void copy(void* dst, const void* src, size_t bytes) override {
    if (bytes && dst != src)
      check(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "copy");
  }
  void fill_zero(void* p, size_t bytes) override {
    if (bytes) check(cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemsetAsync");
  }
  void synchronize() override {
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    int word[4];
    check(cudaMemcpy(word, errors_.word, sizeof word, cudaMemcpyDeviceToHost), "read error word");
    if (word[0] == kNoError) return;
    // Cleared in stream order (see the constructor): a legacy-stream memset could land after later kernels
    // on the non-blocking stream_ have reported, and erase their report.
    check(cudaMemsetAsync(errors_.word, 0, sizeof word, stream_), "cudaMemsetAsync(error word)");
    if (word[0] == kBadEmbeddingId)
      fail("embedding: token id ", word[2], " at token index ", word[1], " is outside the vocabulary");
    if (word[0] == kBadRouterLogit)
      fail("router: logit of token ", word[1], ", expert ", word[2],
           " is not finite (the MoE input or the gate weight holds NaN/Inf)");
    if (word[0] == kBadLabel)
      fail("cross-entropy: label ", word[2], " at token index ", word[1],
           " is outside [0, vocab) and not -100");
    fail("cuda backend: kernel error code ", word[0]);
  }
  int64_t allocations() const override { return allocations_.load(); }

  // ---- elementwise
  void to_bf16(const float* x, bf16* y, int64_t n) override { launch_to_bf16(x, y, n, stream_); }
  void scale(float* x, int64_t n, float s) override { launch_scale(x, n, s, stream_); }
  double sum_of_squares(const float* x, const std::vector<std::pair<int64_t, int64_t>>& segments) override {
    int64_t blocks = 0;
    for (const auto& [b, n] : segments) blocks = std::max(blocks, sum_of_squares_blocks(n));
    double* partial = scratch_as<double>(static_cast<size_t>(blocks + 1) * sizeof(double));
    double* total = partial + blocks;
    bool first = true;
    for (const auto& [b, n] : segments) {
      if (n == 0) continue;
      launch_sum_of_squares(x + b, n, partial, stream_);
      launch_sum_partials(partial, sum_of_squares_blocks(n), total, !first, stream_);
      first = false;
    }
    if (first) return 0.0;
    double out = 0;
    copy_to_host(&out, total, sizeof out);
    return out;
  }
  void sum(const float* x, int64_t n, double* out, bool accumulate) override {
    launch_sum(x, n, out, accumulate, stream_);
  }
  void add(float* y, const float* a, const float* b, int64_t n) override { launch_add(y, a, b, n, stream_); }
  void copy_rows(float* dst, int64_t ld_dst, const float* src, int64_t ld_src, int64_t rows,
                 int64_t cols) override {
    if (rows <= 0 || cols <= 0) return;
    check(cudaMemcpy2DAsync(dst, ld_dst * sizeof(float), src, ld_src * sizeof(float), cols * sizeof(float),
                            rows, cudaMemcpyDeviceToDevice, stream_),
          "cudaMemcpy2DAsync(copy_rows)");
  }
  void sum_heads(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t t, int64_t heads,
                 int64_t n) override {
    launch_sum_heads(x, ld_x, hs_x, y, ld_y, t, heads, n, stream_);
  }
  void permute_rows(const float* x, const int32_t* token_R, int64_t r, int64_t d, float* y) override {
    launch_permute_rows(x, token_R, r, d, y, stream_);
  }
  void unpermute_sum(const float* y, const int32_t* row_TK, int64_t t, int64_t k, int64_t d, float* out,
                     float beta) override {
    launch_unpermute_sum(y, row_TK, t, k, d, out, beta, stream_);
  }
  void gather_or_zero(const float* v, const int32_t* index, int64_t n, float* out) override {
    launch_gather_or_zero(v, index, n, out, stream_);
  }
  void route_forward(const RouteForwardArgs& a) override {
    DSV3_CHECK(a.t >= 0 && a.batch > 0 && a.t % a.batch == 0, "route_forward: T=", a.t,
               " tokens is not a multiple of batch=", a.batch);
    DSV3_CHECK(
        a.token_R && (a.capacity < 0 || (a.kept_TK && a.routed_E1)),
        "route_forward: the device router needs the permutation (and with capacity the kept map and the "
        "routed offsets)");
    launch_route_forward(a, scratch_as<char>(route_forward_scratch_bytes(a)), errors_, stream_);
  }
  void route_backward(const RouteBackwardArgs& a) override { launch_route_backward(a, stream_); }

  // ---- GEMM
  void gemm(const GemmArgs& g) override;
  bool grouped_gemm(const GroupedGemmArgs& g) override;
  void lanes_begin() override;
  void lane(int64_t i) override;
  void lanes_end() override;

  // ---- layer ops
  void rmsnorm_forward(const float* x, int64_t ld_x, const float* w, float* y, int64_t ld_y, float* rstd,
                       int64_t t, int64_t d, float eps) override {
    DSV3_CHECK(t >= 0 && d > 0 && ld_x >= d && ld_y >= d, "rmsnorm_forward: bad shape t=", t, " d=", d);
    launch_rmsnorm_forward(x, ld_x, w, y, ld_y, rstd, t, d, eps, stream_);
  }
  void rmsnorm_backward(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, const float* w,
                        const float* rstd, float* dx, int64_t ld_dx, float* dw, int64_t t, int64_t d,
                        float beta) override {
    DSV3_CHECK(t >= 0 && d > 0 && ld_x >= d && ld_dy >= d && ld_dx >= d, "rmsnorm_backward: bad shape t=", t,
               " d=", d);
    float* s = scratch_as<float>(static_cast<size_t>(rmsnorm_dw_scratch_floats(t, d)) * sizeof(float));
    launch_rmsnorm_backward(dy, ld_dy, x, ld_x, w, rstd, dx, ld_dx, dw, t, d, beta, s, stream_);
  }
  void swiglu_forward(const float* a, const float* b, int64_t ld_ab, const float* p, float* h, int64_t t,
                      int64_t f) override {
    DSV3_CHECK(t >= 0 && f >= 0 && ld_ab >= f, "swiglu_forward: bad shape t=", t, " f=", f, " ld=", ld_ab);
    launch_swiglu_forward(a, b, ld_ab, p, h, t, f, stream_);
  }
  void swiglu_backward(const float* dh, const float* a, const float* b, int64_t ld_ab, const float* p,
                       float* da, float* db, int64_t ld_dab, float* dp, int64_t t, int64_t f) override {
    DSV3_CHECK(t >= 0 && f >= 0 && ld_ab >= f && ld_dab >= f, "swiglu_backward: bad shape t=", t, " f=", f);
    DSV3_CHECK(!p || dp, "swiglu_backward: a scaled SwiGLU needs dp_T");
    launch_swiglu_backward(dh, a, b, ld_ab, p, da, db, ld_dab, dp, t, f, stream_);
  }
  void embedding_forward(const int32_t* ids, const float* table, float* out, int64_t t, int64_t vocab,
                         int64_t d) override {
    launch_embedding_forward(ids, table, out, t, vocab, d, errors_, stream_);
  }
  void embedding_backward(const float* dout, const int32_t* ids, float* dtable, int64_t t, int64_t vocab,
                          int64_t d) override {
    const size_t bytes = embedding_backward_scratch_bytes(t);
    launch_embedding_backward(dout, ids, dtable, t, vocab, d, scratch_as<char>(bytes), bytes, errors_,
                              stream_);
  }
  void rope_forward(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y,
                    int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& tab,
                    bool interleave) override {
    check_rope(t, heads, seq_len, tab, "rope_forward");
    launch_rope(x, ld_x, hs_x, y, ld_y, hs_y, t, heads, seq_len, tab, interleave, true, stream_);
  }
  void rope_backward(const float* dy, int64_t ld_dy, int64_t hs_dy, float* dx, int64_t ld_dx, int64_t hs_dx,
                     int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& tab,
                     bool interleave) override {
    check_rope(t, heads, seq_len, tab, "rope_backward");
    launch_rope(dy, ld_dy, hs_dy, dx, ld_dx, hs_dx, t, heads, seq_len, tab, interleave, false, stream_);
  }
  void attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsViewMut o,
                         float* lse, Precision p) override {
    check_attention(s);
    if (use_cudnn(s, p))
      cudnn_attention_forward(s, q, k, v, o, lse);
    else if (use_tensor_cores(s, p))
      launch_attention_tc_forward(s, q, k, v, o, lse, stream_);
    else
      launch_attention_forward(s, q, k, v, o, lse, p == Precision::kBF16, stream_);
  }
  void attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                          const float* lse, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk, HeadsViewMut dv,
                          Precision p) override {
    check_attention(s);
    if (use_cudnn(s, p)) return cudnn_attention_backward(s, q, k, v, o, lse, do_, dq, dk, dv);
    float* scratch =
        scratch_as<float>(static_cast<size_t>(attention_backward_scratch_floats(s)) * sizeof(float));
    if (use_tensor_cores(s, p))
      launch_attention_tc_backward(s, q, k, v, o, lse, do_, dq, dk, dv, scratch, stream_);
    else
      launch_attention_backward(s, q, k, v, o, lse, do_, dq, dk, dv, p == Precision::kBF16, scratch, stream_);
  }
  void head_cross_entropy_forward(const float* h, const float* w, const bf16* w_bf, const int32_t* labels,
                                  float* loss, float* lse, int64_t t, int64_t d, int64_t v,
                                  Precision p) override;
  void head_cross_entropy_backward(const float* h, const float* w, const bf16* w_bf, const int32_t* labels,
                                   const float* lse, float dloss, const float* dloss_T, float* dh, float* dw,
                                   int64_t t, int64_t d, int64_t v, Precision p) override;

  void adamw(float* params, const float* grads, float* m, float* v,
             const std::vector<AdamWSegment>& segments) override {
    if (segments.empty()) return;
    // The segment table goes up with the step (one small copy); the update is one launch over all of them.
    const size_t bytes = segments.size() * sizeof(AdamWSegment);
    if (bytes > segments_bytes_) {
      if (segments_) check(cudaFree(segments_), "cudaFree");
      check(cudaMalloc(&segments_, bytes), "cudaMalloc(adamw segments)");
      segments_bytes_ = bytes, ++allocations_;
    }
    // From pageable memory the copy is staged before the call returns, so `segments` may go away after it.
    check(cudaMemcpyAsync(segments_, segments.data(), bytes, cudaMemcpyHostToDevice, stream_),
          "adamw segments");
    int64_t max_n = 0;
    for (const auto& s : segments) max_n = std::max(max_n, s.n);
    launch_adamw(params, grads, m, v, static_cast<const AdamWSegment*>(segments_),
                 static_cast<int64_t>(segments.size()), max_n, stream_);
  }

 private:
  // One grow-only scratch region shared by every op (ops run one after another on the stream, so they never
  // need it at the same time). Callers that need two pieces carve them from one request.
  template <typename T>
  T* scratch_as(size_t bytes) {
    return static_cast<T*>(grow_region(scratch_, scratch_bytes_, bytes, "cudaMallocAsync(scratch)"));
  }
  // A grow-only region of at least `bytes` (contents not kept when it grows; counted as an allocation).
  void* grow_region(void*& p, size_t& have, size_t bytes, const char* what) {
    if (bytes > have) {
      if (p) check(cudaFreeAsync(p, stream_), "cudaFreeAsync");
      check(cudaMallocAsync(&p, bytes, stream_), what);
      have = bytes, ++allocations_;
    }
    return p;
  }
  void check_rope(int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& tab, const char* what) {
    DSV3_CHECK(tab.half > 0 && tab.half <= 128, what, ": empty or oversized table (half=", tab.half, ")");
    DSV3_CHECK(t >= 0 && heads > 0 && seq_len > 0 && t % seq_len == 0, what, ": bad shape t=", t,
               " heads=", heads, " seq_len=", seq_len);
    DSV3_CHECK(seq_len <= tab.max_pos, what, ": seq_len ", seq_len, " exceeds the cos/sin table (",
               tab.max_pos, " positions)");
  }
  // DSV3_ATTENTION=cudnn: bf16 attention through cuDNN's fused attention (cudnn_attention.h), its operands
  // converted to packed bf16 and its outputs back into dsv3's fp32 views; a shape cuDNN refuses runs on dsv3's
  // kernels (the decision is cached per shape, so forward and backward agree).
  bool use_cudnn(const AttentionShape& s, Precision p) {
    if (p != Precision::kBF16 || !attention_cudnn_requested()) return false;
    std::string why;
    if (cudnn().supports(s, &why)) return true;
    if (!why.empty())  // said once per shape (the refusal is cached, and reported only when first found)
      std::fprintf(stderr,
                   "note: cuDNN attention refused batch %lld seq %lld heads %lld %lld/%lld: %s; dsv3's "
                   "kernel runs it\n",
                   (long long)s.batch, (long long)s.seq, (long long)s.heads, (long long)s.d_qk,
                   (long long)s.d_v, why.c_str());
    return false;
  }
  void cudnn_attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsViewMut o,
                               float* lse);
  void cudnn_attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                                const float* lse, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk,
                                HeadsViewMut dv);
  CudnnAttention& cudnn();
  char* cudnn_scratch(size_t bytes) {
    return static_cast<char*>(
        grow_region(cudnn_buf_, cudnn_bytes_, bytes, "cudaMallocAsync(cuDNN attention)"));
  }
  std::unique_ptr<CudnnAttention> cudnn_;
  void* cudnn_buf_ = nullptr;
  size_t cudnn_bytes_ = 0;
  // bf16 attention runs on tensor cores (attention_tc.cu) unless DSV3_ATTENTION=cuda-cores or the shape does not
  // fit that kernel; fp32 stays on the fp32-core kernel, which matches the CPU to 1e-5.
  static bool use_tensor_cores(const AttentionShape& s, Precision p) {
    return p == Precision::kBF16 && attention_tc_enabled() && attention_tc_supported(s);
  }
  void check_attention(const AttentionShape& s) {
    DSV3_CHECK(attention_supported(s), "attention on ", name_, ": head sizes d_qk=", s.d_qk, " d_v=", s.d_v,
               " (batch ", s.batch, ", seq ", s.seq, ", heads ", s.heads,
               ") are not supported by the CUDA attention kernel (at most 256 each)");
  }
  const GemmPlan& plan(const GemmKey& key);
  void clear_plans() {
    for (auto& [k, p] : plans_) {
      cublasLtMatmulDescDestroy(p.op);
      cublasLtMatrixLayoutDestroy(p.a), cublasLtMatrixLayoutDestroy(p.b), cublasLtMatrixLayoutDestroy(p.c);
    }
    plans_.clear();
  }
  // The loss's scratch and, in bf16 mode, the operand copies (w_bf is set to the head's bf16 weights).
  CeBuffers ce_prepare(const float* h, const float* w, const bf16*& w_bf, int64_t t, int64_t d, int64_t v,
                       bool bf);
  // logits_TC = h_TD · W[c0 : c0 + c]^T into the chunk buffer.
  void ce_chunk_logits(const CeBuffers& b, const float* h, const float* w, const bf16* w_bf, int64_t c0,
                       int64_t c, int64_t t, int64_t d, bool bf);

  // Expert lanes (Backend::lanes_begin): side streams, each with its own cuBLASLt workspace (a workspace is in
  // use until its GEMM ends), joined into stream_ by events. Made on first use; DSV3_EXPERT_STREAMS sets their
  // number (default 4, TransformerEngine's; 1: every GEMM on stream_).
  struct Lane {
    cudaStream_t stream = nullptr;
    void* workspace = nullptr;
    cudaEvent_t done = nullptr;
    bool used = false;  // waited for the fork in this round
  };
  std::vector<Lane> lanes_;
  cudaEvent_t fork_ = nullptr;
  int lane_ = -1;  // the lane GEMMs go to; -1: stream_
  bool in_lanes_ = false;

  int device_;
  int cc_ = 0, sm_count_ = 0;  // compute capability (major·10 + minor), streaming multiprocessors
  std::string name_;
  cudaStream_t stream_ = nullptr;
  cublasLtHandle_t lt_ = nullptr;
  void* workspace_ = nullptr;
  void* scratch_ = nullptr;
  size_t scratch_bytes_ = 0;
  void* segments_ = nullptr;
  size_t segments_bytes_ = 0;
  DeviceErrors errors_;
  std::map<GemmKey, GemmPlan> plans_;
  std::atomic<int64_t> allocations_{0}, host_reads_{0};
  mutable std::mutex sizes_mutex_;
  std::unordered_map<void*, size_t> sizes_;  // what alloc() handed out, for the byte counters
  int64_t in_use_ = 0, peak_ = 0;
  // Head loss scratch (chunk logits, bf16 copies, per-token stats), separate from scratch_ because the
  // GEMMs between the loss kernels use none of it but the loss keeps it across chunks.
  void* ce_scratch_ = nullptr;
  size_t ce_bytes_ = 0;
  void* ce_scratch(size_t bytes) {
    if (bytes > ce_bytes_) {
      if (ce_scratch_) check(cudaFreeAsync(ce_scratch_, stream_), "cudaFreeAsync");
      check(cudaMallocAsync(&ce_scratch_, bytes, stream_), "cudaMallocAsync(loss scratch)");
      ce_bytes_ = bytes, ++allocations_;
    }
    return ce_scratch_;
  }
};

const GemmPlan& CudaBackend::plan(const GemmKey& key) {
  auto it = plans_.find(key);
  if (it != plans_.end()) return it->second;
  // MoE expert GEMMs see a new row count almost every step: bound the cache rather than let it grow for the
  // whole run (a cleared cache costs one heuristic query per shape again).
  if (plans_.size() >= 8192) clear_plans();
  // Row-major C[M,N] = op(A) op(B) is column-major C^T[N,M] = op(B)^T op(A)^T: cuBLASLt's "A" is our B and its
  // "B" is our A, each read through its stored (column-major) shape with the transpose flag it already has.
  GemmPlan p;
  const cublasComputeType_t compute = CUBLAS_COMPUTE_32F;  // fp32 accumulation; no TF32 (exact fp32 mode)
  check_lt(cublasLtMatmulDescCreate(&p.op, compute, CUDA_R_32F), "cublasLtMatmulDescCreate");
  const cublasOperation_t opa = key.tb ? CUBLAS_OP_T : CUBLAS_OP_N, opb = key.ta ? CUBLAS_OP_T : CUBLAS_OP_N;
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa), "TRANSA");
  check_lt(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb), "TRANSB");
  const uint64_t a_rows = key.tb ? key.k : key.n, a_cols = key.tb ? key.n : key.k;
  const uint64_t b_rows = key.ta ? key.m : key.k, b_cols = key.ta ? key.k : key.m;
  check_lt(cublasLtMatrixLayoutCreate(&p.a, dtype(key.ab), a_rows, a_cols, key.ldb), "layout A");
  check_lt(cublasLtMatrixLayoutCreate(&p.b, dtype(key.ab), b_rows, b_cols, key.lda), "layout B");
  check_lt(cublasLtMatrixLayoutCreate(&p.c, dtype(key.c), key.n, key.m, key.ldc), "layout C");
  cublasLtMatmulPreference_t pref;
  check_lt(cublasLtMatmulPreferenceCreate(&pref), "preference");
  const uint64_t ws = kWorkspaceBytes;
  check_lt(
      cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws),
      "workspace preference");
  const uint32_t al_a = key.align_b, al_b = key.align_a, al_c = key.align_c;  // swapped roles, see above
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c);
  cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c);
  cublasLtMatmulHeuristicResult_t result{};
  int found = 0;
  const cublasStatus_t st =
      cublasLtMatmulAlgoGetHeuristic(lt_, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  DSV3_CHECK(st == CUBLAS_STATUS_SUCCESS && found > 0, "cuBLASLt has no algorithm for GEMM ", key.m, "x",
             key.n, "x", key.k, " (", key.ab == GemmType::kBF16 ? "bf16" : "fp32", " operands, alignments ",
             key.align_a, "/", key.align_b, "/", key.align_c, " bytes)");
  p.algo = result.algo;
  return plans_.emplace(key, p).first->second;
}

int expert_streams() {
  static const int n = [] {
    const char* v = std::getenv("DSV3_EXPERT_STREAMS");
    return std::clamp(v && *v ? std::atoi(v) : 4, 1, 16);
  }();
  return n;
}

CudnnAttention& CudaBackend::cudnn() {
  if (!cudnn_) {
    std::string why;
    cudnn_ = CudnnAttention::open(&why);
    DSV3_CHECK(cudnn_, "DSV3_ATTENTION=cudnn: ", why);
  }
  return *cudnn_;
}

namespace {
size_t up256(size_t x) {
  return (x + 255) / 256 * 256;
}
}  // namespace

void CudaBackend::cudnn_attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v,
                                          HeadsViewMut o, float* lse) {
  const int64_t t = s.batch * s.seq, h = s.heads;
  CudnnAttention& c = cudnn();
  const size_t qk = up256(t * h * s.d_qk * sizeof(bf16)), vo = up256(t * h * s.d_v * sizeof(bf16));
  const size_t ws = c.forward_workspace(s);
  char* base = cudnn_scratch(2 * qk + 2 * vo + ws);
  auto* qb = reinterpret_cast<bf16*>(base);
  auto* kb = reinterpret_cast<bf16*>(base + qk);
  auto* vb = reinterpret_cast<bf16*>(base + 2 * qk);
  auto* ob = reinterpret_cast<bf16*>(base + 2 * qk + vo);
  launch_heads_to_bf16(q.p, q.ld_token, q.ld_head, t, h, s.d_qk, qb, stream_);
  launch_heads_to_bf16(k.p, k.ld_token, k.ld_head, t, h, s.d_qk, kb, stream_);
  launch_heads_to_bf16(v.p, v.ld_token, v.ld_head, t, h, s.d_v, vb, stream_);
  c.forward(s, qb, kb, vb, ob, lse, base + 2 * qk + 2 * vo, stream_);
  launch_heads_from_bf16(ob, t, h, s.d_v, o.p, o.ld_token, o.ld_head, stream_);
}

void CudaBackend::cudnn_attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v,
                                           HeadsView o, const float* lse, HeadsView do_, HeadsViewMut dq,
                                           HeadsViewMut dk, HeadsViewMut dv) {
  const int64_t t = s.batch * s.seq, h = s.heads;
  CudnnAttention& c = cudnn();
  const size_t qk = up256(t * h * s.d_qk * sizeof(bf16)), vo = up256(t * h * s.d_v * sizeof(bf16));
  const size_t ws = c.backward_workspace(s);
  char* base = cudnn_scratch(4 * qk + 4 * vo + ws);
  bf16* b[8];  // q, k, dq, dk ([T, H, d_qk]); v, o, do, dv ([T, H, d_v])
  for (int i = 0; i < 8; ++i) b[i] = reinterpret_cast<bf16*>(base + (i < 4 ? i * qk : 4 * qk + (i - 4) * vo));
  launch_heads_to_bf16(q.p, q.ld_token, q.ld_head, t, h, s.d_qk, b[0], stream_);
  launch_heads_to_bf16(k.p, k.ld_token, k.ld_head, t, h, s.d_qk, b[1], stream_);
  launch_heads_to_bf16(v.p, v.ld_token, v.ld_head, t, h, s.d_v, b[4], stream_);
  launch_heads_to_bf16(o.p, o.ld_token, o.ld_head, t, h, s.d_v, b[5], stream_);
  launch_heads_to_bf16(do_.p, do_.ld_token, do_.ld_head, t, h, s.d_v, b[6], stream_);
  c.backward(s, b[0], b[1], b[4], b[5], b[6], lse, b[2], b[3], b[7], base + 4 * qk + 4 * vo, stream_);
  launch_heads_from_bf16(b[2], t, h, s.d_qk, dq.p, dq.ld_token, dq.ld_head, stream_);
  launch_heads_from_bf16(b[3], t, h, s.d_qk, dk.p, dk.ld_token, dk.ld_head, stream_);
  launch_heads_from_bf16(b[7], t, h, s.d_v, dv.p, dv.ld_token, dv.ld_head, stream_);
}

bool CudaBackend::grouped_gemm(const GroupedGemmArgs& g) {
  DSV3_CHECK(!in_lanes_, "grouped_gemm: inside lanes");
  if (!cuda::grouped_gemm_supported(g, cc_)) return false;
  // The setup kernel reads the offsets on the stream; no host read. The scratch is the shared one.
  const size_t bytes = cuda::grouped_gemm_scratch_bytes(g, sm_count_);
  cuda::grouped_gemm_launch(g, scratch_as<char>(bytes), bytes, sm_count_, device_, stream_);
  check(cudaGetLastError(), "grouped GEMM launch");
  return true;
}

void CudaBackend::lanes_begin() {
  DSV3_CHECK(!in_lanes_, "lanes_begin: lanes already open");
  in_lanes_ = true;
  if (expert_streams() == 1) return;
  if (lanes_.empty()) {
    lanes_.resize(static_cast<size_t>(expert_streams()));
    for (Lane& l : lanes_) {
      check(cudaStreamCreateWithFlags(&l.stream, cudaStreamNonBlocking), "cudaStreamCreate(lane)");
      check(cudaMalloc(&l.workspace, kWorkspaceBytes), "cudaMalloc(lane workspace)");
      check(cudaEventCreateWithFlags(&l.done, cudaEventDisableTiming), "cudaEventCreate(lane)");
    }
    check(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming), "cudaEventCreate(fork)");
  }
  check(cudaEventRecord(fork_, stream_), "cudaEventRecord(fork)");  // the lanes start after stream_'s work
  for (Lane& l : lanes_) l.used = false;
}

void CudaBackend::lane(int64_t i) {
  DSV3_CHECK(in_lanes_, "lane: outside lanes_begin/lanes_end");
  if (lanes_.empty()) return;
  lane_ = static_cast<int>(i % static_cast<int64_t>(lanes_.size()));
  Lane& l = lanes_[static_cast<size_t>(lane_)];
  if (!l.used) check(cudaStreamWaitEvent(l.stream, fork_, 0), "cudaStreamWaitEvent(fork)"), l.used = true;
}

void CudaBackend::lanes_end() {
  DSV3_CHECK(in_lanes_, "lanes_end: no lanes open");
  for (Lane& l : lanes_)
    if (l.used) {  // stream_ goes on once every lane's GEMMs are done
      check(cudaEventRecord(l.done, l.stream), "cudaEventRecord(lane)");
      check(cudaStreamWaitEvent(stream_, l.done, 0), "cudaStreamWaitEvent(lane)");
    }
  lane_ = -1, in_lanes_ = false;
}

void CudaBackend::gemm(const GemmArgs& g) {
  DSV3_CHECK(g.m >= 0 && g.n >= 0 && g.k >= 0, "gemm: negative size");
  DSV3_CHECK(g.beta == 0.f || g.beta == 1.f, "gemm: beta must be 0 or 1, got ", g.beta);
  const bool on_lane = lane_ >= 0;
  cudaStream_t stream = on_lane ? lanes_[static_cast<size_t>(lane_)].stream : stream_;
  void* workspace = on_lane ? lanes_[static_cast<size_t>(lane_)].workspace : workspace_;
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {  // an empty product: C = beta·C
    if (g.beta == 0.f) {
      const size_t el = g.c_type == GemmType::kF32 ? 4 : 2;
      check(cudaMemset2DAsync(g.c, g.ldc * el, 0, g.n * el, g.m, stream), "gemm: zero C");
    }
    return;
  }
  const GemmKey key{g.m,
                    g.n,
                    g.k,
                    g.lda,
                    g.ldb,
                    g.ldc,
                    g.trans_a,
                    g.trans_b,
                    g.ab_type,
                    g.c_type,
                    g.beta,
                    alignment_of(g.a),
                    alignment_of(g.b),
                    alignment_of(g.c)};
  const GemmPlan& p = plan(key);
  const float alpha = g.alpha, beta = g.beta;
  check_lt(cublasLtMatmul(lt_, p.op, &alpha, g.b, p.a, g.a, p.b, &beta, g.c, p.c, g.c, p.c, &p.algo,
                          workspace, kWorkspaceBytes, stream),
           "cublasLtMatmul");
}

CeBuffers CudaBackend::ce_prepare(const float* h, const float* w, const bf16*& w_bf, int64_t t, int64_t d,
                                  int64_t v, bool bf) {
  CeBuffers b{};
  b.chunk = ce_chunk(t, v);
  const bool need_w_bf = bf && !w_bf;
  auto up = [](size_t x) { return (x + 255) / 256 * 256; };
  const size_t f_logits = up(t * b.chunk * 4), f_stats = up(t * 4);
  const size_t h_bf = bf ? up(t * d * 2) : 0, wb = need_w_bf ? up(v * d * 2) : 0;
  const size_t d_bf = bf ? up(t * b.chunk * 2) : 0;
  char* base = static_cast<char*>(ce_scratch(f_logits + 3 * f_stats + h_bf + wb + d_bf));
  b.logits_TC = reinterpret_cast<float*>(base), base += f_logits;
  b.max_T = reinterpret_cast<float*>(base), base += f_stats;
  b.sum_T = reinterpret_cast<float*>(base), base += f_stats;
  b.label_T = reinterpret_cast<float*>(base), base += f_stats;
  b.h_bf = bf ? reinterpret_cast<bf16*>(base) : nullptr, base += h_bf;
  b.w_bf = wb ? reinterpret_cast<bf16*>(base) : nullptr, base += wb;
  b.d_bf = bf ? reinterpret_cast<bf16*>(base) : nullptr;
  if (bf) {
    launch_to_bf16(h, b.h_bf, t * d, stream_);
    if (need_w_bf) launch_to_bf16(w, b.w_bf, v * d, stream_), w_bf = b.w_bf;
  }
  return b;
}

void CudaBackend::ce_chunk_logits(const CeBuffers& b, const float* h, const float* w, const bf16* w_bf,
                                  int64_t c0, int64_t c, int64_t t, int64_t d, bool bf) {
  GemmArgs g;
  g.m = t, g.n = c, g.k = d;
  g.a = bf ? static_cast<const void*>(b.h_bf) : h, g.lda = d;
  g.b = bf ? static_cast<const void*>(w_bf + c0 * d) : w + c0 * d, g.ldb = d, g.trans_b = true;
  g.c = b.logits_TC, g.ldc = c;
  g.ab_type = bf ? GemmType::kBF16 : GemmType::kF32;
  gemm(g);
}

void CudaBackend::head_cross_entropy_forward(const float* h, const float* w, const bf16* w_bf,
                                             const int32_t* labels, float* loss, float* lse, int64_t t,
                                             int64_t d, int64_t v, Precision p) {
  DSV3_CHECK(t >= 0 && d > 0 && v > 0, "head_cross_entropy_forward: bad shape t=", t, " d=", d, " v=", v);
  if (t == 0) return;
  const bool bf = p == Precision::kBF16;
  const CeBuffers b = ce_prepare(h, w, w_bf, t, d, v, bf);
  for (int64_t c0 = 0; c0 < v; c0 += b.chunk) {
    const int64_t c = std::min(b.chunk, v - c0);
    ce_chunk_logits(b, h, w, w_bf, c0, c, t, d, bf);
    launch_ce_chunk_stats(b.logits_TC, t, c, c0, labels, b.max_T, b.sum_T, b.label_T, c0 == 0, stream_);
  }
  launch_ce_finish(b.max_T, b.sum_T, b.label_T, labels, t, v, loss, lse, errors_, stream_);
}

void CudaBackend::head_cross_entropy_backward(const float* h, const float* w, const bf16* w_bf,
                                              const int32_t* labels, const float* lse, float dloss,
                                              const float* dloss_T, float* dh, float* dw, int64_t t,
                                              int64_t d, int64_t v, Precision p) {
  DSV3_CHECK(t >= 0 && d > 0 && v > 0, "head_cross_entropy_backward: bad shape t=", t, " d=", d, " v=", v);
  if (t == 0) return;
  const bool bf = p == Precision::kBF16;
  const CeBuffers b = ce_prepare(h, w, w_bf, t, d, v, bf);
  const GemmType ab = bf ? GemmType::kBF16 : GemmType::kF32;
  for (int64_t c0 = 0; c0 < v; c0 += b.chunk) {
    const int64_t c = std::min(b.chunk, v - c0);
    ce_chunk_logits(b, h, w, w_bf, c0, c, t, d, bf);  // recomputed, as the forward did not keep them
    launch_ce_chunk_grad(b.logits_TC, t, c, c0, labels, lse, dloss, dloss_T, b.d_bf, stream_);
    const void* dl = bf ? static_cast<const void*>(b.d_bf) : b.logits_TC;
    GemmArgs gx;  // dh (+)= dlogits_TC · W_chunk  (assigned on the first chunk)
    gx.m = t, gx.n = d, gx.k = c;
    gx.a = dl, gx.lda = c;
    gx.b = bf ? static_cast<const void*>(w_bf + c0 * d) : w + c0 * d, gx.ldb = d;
    gx.c = dh, gx.ldc = d, gx.ab_type = ab, gx.beta = c0 == 0 ? 0.f : 1.f;
    gemm(gx);
    GemmArgs gw;  // dW_chunk += dlogits_TC^T · h_TD
    gw.m = c, gw.n = d, gw.k = t;
    gw.a = dl, gw.lda = c, gw.trans_a = true;
    gw.b = bf ? static_cast<const void*>(b.h_bf) : h, gw.ldb = d;
    gw.c = dw + c0 * d, gw.ldc = d, gw.ab_type = ab, gw.beta = 1.f;
    gemm(gw);
  }
}

}  // namespace
}  // namespace cuda

}  // namespace dsv3

// The plugin's one entry point (kernels/cuda_loader.cpp looks it up with dlsym): a new backend for GPU `device`,
// or nullptr with *why_not set. Unmangled so the loader need not know the C++ signature's mangling.
extern "C" __attribute__((visibility("default"))) dsv3::Backend* dsv3_cuda_make_backend(
    int device, std::string* why_not) {
  using namespace dsv3;
  int count = 0;
  // Without a driver cudaGetDeviceCount fails (cudaErrorInsufficientDriver / NoDevice) rather than returning 0:
  // any error means "no GPU here".
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    if (why_not)
      *why_not = std::string("no CUDA GPU visible (") +
                 (e != cudaSuccess ? cudaGetErrorString(e) : "0 devices") + ")";
    cudaGetLastError();  // clear the sticky-free error so later queries start clean
    return nullptr;
  }
  if (device < 0 || device >= count) {
    if (why_not)
      *why_not = "GPU " + std::to_string(device) + " does not exist (" + std::to_string(count) + " visible)";
    return nullptr;
  }
  cudaDeviceProp prop{};
  cuda::check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
  return new cuda::CudaBackend(device, "cuda:" + std::to_string(device) + " " + prop.name);
}
