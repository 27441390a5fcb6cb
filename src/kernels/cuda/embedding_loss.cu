// The two ends of the model on the GPU: token embedding (forward gather, deterministic backward) and the
// cross-entropy kernels around the head's chunked GEMMs (cuda_backend.cu drives the chunks).
#include <cuda_bf16.h>

#include <cub/cub.cuh>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/kernels.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int32_t kIgnore = -100;

// First error wins; code, token index, value.
__device__ void report(DeviceErrors err, int code, int64_t index, int64_t value) {
  if (atomicCAS(err.word, kNoError, code) == kNoError) {
    err.word[1] = static_cast<int>(index);
    err.word[2] = static_cast<int>(value);
  }
}

// One block per token; an out-of-range id gives a zero row and an error reported at the next sync.
__global__ void embedding_forward_kernel(const int32_t* ids, const float* table, float* out, int64_t vocab,
                                         int64_t d, DeviceErrors err) {
  const int64_t t = blockIdx.x;
  const int32_t id = ids[t];
  const bool ok = id >= 0 && id < vocab;
  if (!ok && threadIdx.x == 0) report(err, kBadEmbeddingId, t, id);
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) out[t * d + j] = ok ? table[id * d + j] : 0.f;
}

__global__ void iota_kernel(int32_t* v, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    v[i] = static_cast<int32_t>(i);
}

// After a stable sort of (id, token) by id, the first token of each run of one id owns that row of dtable:
// per column, the row's gradient is added token by token in token order, as the CPU kernel adds them.
__global__ void embedding_backward_kernel(const float* dout, const int32_t* ids_sorted,
                                          const int32_t* tok_sorted, float* dtable, int64_t t, int64_t vocab,
                                          int64_t d, DeviceErrors err) {
  const int64_t r = blockIdx.x;
  const int32_t id = ids_sorted[r];
  if (r > 0 && ids_sorted[r - 1] == id) return;  // not the first of its run
  if (id < 0 || id >= vocab) {
    if (threadIdx.x == 0) report(err, kBadEmbeddingId, tok_sorted[r], id);
    return;
  }
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    float acc = dtable[id * d + j];
    for (int64_t q = r; q < t && ids_sorted[q] == id; ++q) acc += dout[int64_t{tok_sorted[q]} * d + j];
    dtable[id * d + j] = acc;
  }
}

// Online softmax statistics over one vocab chunk, one block per token: running max, Σ exp(logit − max) rescaled
// as the max grows, and the label's logit when the label falls in this chunk.
__global__ void ce_chunk_stats_kernel(const float* logits, int64_t c, int64_t c0, const int32_t* labels,
                                      float* max_T, float* sum_T, float* label_T, bool first) {
  const int64_t i = blockIdx.x;
  const float* row = logits + i * c;
  __shared__ float red[32];
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) m = fmaxf(m, row[j]);
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  m = -INFINITY;
  for (int w = 0; w < blockDim.x / 32; ++w) m = fmaxf(m, red[w]);
  __syncthreads();
  const float m_old = first ? -INFINITY : max_T[i];
  const float m_new = fmaxf(m_old, m);
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < c; j += blockDim.x) s += expf(row[j] - m_new);
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    float tot = 0.f;
    for (int w = 0; w < blockDim.x / 32; ++w) tot += red[w];
    const float prev = first ? 0.f : sum_T[i] * expf(m_old - m_new);
    sum_T[i] = prev + tot;
    max_T[i] = m_new;
    const int32_t lab = labels[i];
    if (first) label_T[i] = 0.f;
    if (lab >= c0 && lab < c0 + c) label_T[i] = row[lab - c0];
  }
}

__global__ void ce_finish_kernel(const float* max_T, const float* sum_T, const float* label_T,
                                 const int32_t* labels, int64_t t, int64_t v, float* loss_T, float* lse_T,
                                 DeviceErrors err) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < t;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int32_t lab = labels[i];
    const float lse = max_T[i] + logf(sum_T[i]);
    lse_T[i] = lse;
    if (lab == kIgnore) {
      loss_T[i] = 0.f;
    } else if (lab < 0 || lab >= v) {
      loss_T[i] = 0.f;
      report(err, kBadLabel, i, lab);
    } else {
      loss_T[i] = lse - label_T[i];
    }
  }
}

__global__ void ce_chunk_grad_kernel(float* logits, int64_t t, int64_t c, int64_t c0, const int32_t* labels,
                                     const float* lse_T, float dloss, const float* dloss_T,
                                     __nv_bfloat16* d_bf) {
  const int64_t n = t * c;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / c, j = e % c;
    const int32_t lab = labels[i];
    float g = 0.f;
    if (lab != kIgnore) {
      const float scale = dloss_T ? dloss * dloss_T[i] : dloss;
      const float p = expf(logits[e] - lse_T[i]);
      g = scale * (p - (c0 + j == lab ? 1.f : 0.f));
    }
    logits[e] = g;
    if (d_bf) d_bf[e] = __float2bfloat16_rn(g);
  }
}

unsigned grid_for(int64_t n) {
  return static_cast<unsigned>(
      std::min<int64_t>(std::max<int64_t>((n + kThreads - 1) / kThreads, 1), 1 << 20));
}

}  // namespace

void launch_embedding_forward(const int32_t* ids, const float* table, float* out, int64_t t, int64_t vocab,
                              int64_t d, DeviceErrors err, cudaStream_t st) {
  if (t == 0) return;
  embedding_forward_kernel<<<static_cast<unsigned>(t), 128, 0, st>>>(ids, table, out, vocab, d, err);
  check_launch("embedding_forward");
}

// Scratch: sorted ids, the token permutation in and out, and CUB's temporary storage.
size_t embedding_backward_scratch_bytes(int64_t t) {
  size_t cub_bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, cub_bytes, static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<const int32_t*>(nullptr),
                                  static_cast<int32_t*>(nullptr), static_cast<int>(t));
  return 3 * ((t * sizeof(int32_t) + 255) / 256 * 256) + cub_bytes;
}

void launch_embedding_backward(const float* dout, const int32_t* ids, float* dtable, int64_t t, int64_t vocab,
                               int64_t d, void* scratch, size_t scratch_bytes, DeviceErrors err,
                               cudaStream_t st) {
  if (t == 0) return;
  DSV3_CHECK(t < (int64_t{1} << 31), "embedding_backward: ", t, " tokens (at most 2^31 - 1)");
  const size_t arr = (t * sizeof(int32_t) + 255) / 256 * 256;
  char* base = static_cast<char*>(scratch);
  int32_t* ids_sorted = reinterpret_cast<int32_t*>(base);
  int32_t* tok_in = reinterpret_cast<int32_t*>(base + arr);
  int32_t* tok_sorted = reinterpret_cast<int32_t*>(base + 2 * arr);
  void* tmp = base + 3 * arr;
  size_t tmp_bytes = scratch_bytes - 3 * arr;
  iota_kernel<<<grid_for(t), kThreads, 0, st>>>(tok_in, t);
  check_launch("embedding_backward (iota)");
  // LSD radix sort is stable: equal ids keep token order, which fixes the summation order.
  check(cub::DeviceRadixSort::SortPairs(tmp, tmp_bytes, ids, ids_sorted, tok_in, tok_sorted,
                                        static_cast<int>(t), 0, 32, st),
        "embedding_backward (sort)");
  embedding_backward_kernel<<<static_cast<unsigned>(t), 128, 0, st>>>(dout, ids_sorted, tok_sorted, dtable, t,
                                                                      vocab, d, err);
  check_launch("embedding_backward");
}

void launch_ce_chunk_stats(const float* logits_TC, int64_t t, int64_t c, int64_t chunk_begin,
                           const int32_t* labels, float* max_T, float* sum_T, float* label_logit_T,
                           bool first, cudaStream_t st) {
  ce_chunk_stats_kernel<<<static_cast<unsigned>(t), kThreads, 0, st>>>(logits_TC, c, chunk_begin, labels,
                                                                       max_T, sum_T, label_logit_T, first);
  check_launch("cross_entropy (chunk statistics)");
}

void launch_ce_finish(const float* max_T, const float* sum_T, const float* label_logit_T,
                      const int32_t* labels, int64_t t, int64_t v, float* loss_T, float* lse_T,
                      DeviceErrors err, cudaStream_t st) {
  ce_finish_kernel<<<grid_for(t), kThreads, 0, st>>>(max_T, sum_T, label_logit_T, labels, t, v, loss_T, lse_T,
                                                     err);
  check_launch("cross_entropy (finish)");
}

void launch_ce_chunk_grad(float* logits_TC, int64_t t, int64_t c, int64_t chunk_begin, const int32_t* labels,
                          const float* lse_T, float dloss, const float* dloss_T, bf16* dlogits_bf,
                          cudaStream_t st) {
  ce_chunk_grad_kernel<<<grid_for(t * c), kThreads, 0, st>>>(logits_TC, t, c, chunk_begin, labels, lse_T,
                                                             dloss, dloss_T,
                                                             reinterpret_cast<__nv_bfloat16*>(dlogits_bf));
  check_launch("cross_entropy (chunk gradient)");
}

}  // namespace dsv3::cuda
