// Memory-bound kernels of the CUDA backend: bf16 rounding, scaling, deterministic reductions (the grad norm in the
// CPU's exact accumulation order), RMSNorm, SwiGLU, YaRN RoPE and AdamW (bit-identical to the CPU update: every
// operation written with an explicit IEEE rounding, so nvcc cannot contract them into other FMAs).
#include <cuda_bf16.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/kernels.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;

unsigned blocks_for(int64_t n, int per_thread = 1) {
  const int64_t b = (n + int64_t{kThreads} * per_thread - 1) / (int64_t{kThreads} * per_thread);
  return static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(b, 1), 1 << 20));
}

// Block-wide sum of one float per thread (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// The order is fixed by the thread layout, so the result is deterministic.
__device__ float block_sum(float v) {
  __shared__ float part[32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // part may still be read by a previous call
  if (lane == 0) part[warp] = v;
  __syncthreads();
  const int warps = blockDim.x >> 5;
  float s = lane < warps ? part[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  return s;
}

__global__ void to_bf16_kernel(const float* x, __nv_bfloat16* y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    y[i] = __float2bfloat16_rn(x[i]);
}

// Strided fp32 heads [T, H, D] (row stride ld_token, head stride ld_head) <-> packed bf16 [T, H, D].
__global__ void heads_to_bf16_kernel(const float* x, int64_t ld_token, int64_t ld_head, int64_t heads,
                                     int64_t d, int64_t n, __nv_bfloat16* y) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = i % d, h = i / d % heads, t = i / d / heads;
    y[i] = __float2bfloat16_rn(x[t * ld_token + h * ld_head + c]);
  }
}
__global__ void heads_from_bf16_kernel(const __nv_bfloat16* y, int64_t heads, int64_t d, int64_t n, float* x,
                                       int64_t ld_token, int64_t ld_head) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t c = i % d, h = i / d % heads, t = i / d / heads;
    x[t * ld_token + h * ld_head + c] = __bfloat162float(y[i]);
  }
}

__global__ void scale_kernel(float* x, int64_t n, float s) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    x[i] = __fmul_rn(x[i], s);
}

__global__ void add_kernel(float* y, const float* a, const float* b, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    y[i] = __fadd_rn(a[i], b[i]);
}

// One thread per (token, column); the heads are added in order from 0.f, as the CPU does.
__global__ void sum_heads_kernel(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y,
                                 int64_t t, int64_t heads, int64_t n) {
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < t * n;
       j += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = j / n, i = j % n;
    float acc = 0.f;
    for (int64_t h = 0; h < heads; ++h) acc = __fadd_rn(acc, x[r * ld_x + h * hs_x + i]);
    y[r * ld_y + i] = acc;
  }
}

__global__ void permute_rows_kernel(const float* x, const int32_t* token, int64_t r_n, int64_t d, float* y) {
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < r_n * d;
       j += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = j / d, c = j % d;
    const int32_t src = token[r];
    y[j] = src < 0 ? 0.f : x[static_cast<int64_t>(src) * d + c];
  }
}

// One thread per (token, column); the token's k rows added in ascending k, from 0 or from out (beta 1), as the
// CPU does: no atomics, so the result is deterministic and equal to the CPU's.
__global__ void unpermute_sum_kernel(const float* y, const int32_t* row_TK, int64_t t_n, int64_t k_n,
                                     int64_t d, float* out, float beta) {
  for (int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; j < t_n * d;
       j += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = j / d, c = j % d;
    float acc = beta == 0.f ? 0.f : out[j];
    for (int64_t k = 0; k < k_n; ++k) {
      const int32_t r = row_TK[t * k_n + k];
      if (r >= 0) acc = __fadd_rn(acc, y[static_cast<int64_t>(r) * d + c]);
    }
    out[j] = acc;
  }
}

__global__ void gather_or_zero_kernel(const float* v, const int32_t* index, int64_t n, float* out) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x)
    out[i] = index[i] < 0 ? 0.f : v[index[i]];
}

// cpu/reduce.cpp's block_sum exactly: per 16Ki block, lane l (0..15) of a 16-wide group accumulates x² by
// double FMA over the block's full groups; lanes combine as the AVX2 code does ((a0+a1)+(a2+a3) per 4-lane
// register, then (L0+L1)+(L2+L3)); the ragged tail is added element by element. One 16-thread block per 16Ki
// block: slow-ish, but once per step and memory-bound either way.
constexpr int64_t kSsqBlock = int64_t{1} << 14;
__global__ void sum_of_squares_kernel(const float* x, int64_t n, double* partial) {
  const int64_t lo = blockIdx.x * kSsqBlock, len = min(kSsqBlock, n - lo);
  const int lane = threadIdx.x;  // 0..15
  const int64_t full = len / 16 * 16;
  double acc = 0.0;
  for (int64_t i = lane; i < full; i += 16) {
    const double v = x[lo + i];
    acc = __fma_rn(v, v, acc);
  }
  __shared__ double a[16];
  a[lane] = acc;
  __syncthreads();
  if (lane == 0) {
    // a0 = lanes 0..3, a1 = 4..7, a2 = 8..11, a3 = 12..15; lanes[k] = (a0[k]+a1[k]) + (a2[k]+a3[k]).
    double L[4];
    for (int k = 0; k < 4; ++k) L[k] = __dadd_rn(__dadd_rn(a[k], a[4 + k]), __dadd_rn(a[8 + k], a[12 + k]));
    double s = __dadd_rn(__dadd_rn(L[0], L[1]), __dadd_rn(L[2], L[3]));
    for (int64_t i = full; i < len; ++i) {
      const double v = x[lo + i];
      s = __fma_rn(v, v, s);
    }
    partial[blockIdx.x] = s;
  }
}

// Blocks added in order by one thread (as the CPU adds its per-block partials).
__global__ void sum_partials_kernel(const double* partial, int64_t blocks, double* out, bool accumulate) {
  double s = 0.0;
  for (int64_t b = 0; b < blocks; ++b) s = __dadd_rn(s, partial[b]);
  *out = accumulate ? __dadd_rn(*out, s) : s;
}

// Σ x in double by one block with a fixed layout (deterministic); for per-token loss vectors, small.
__global__ void sum_kernel(const float* x, int64_t n, double* out, bool accumulate) {
  __shared__ double part[kThreads];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
  part[threadIdx.x] = s;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) part[threadIdx.x] += part[threadIdx.x + w];
    __syncthreads();
  }
  if (threadIdx.x == 0) *out = accumulate ? *out + part[0] : part[0];
}

// One block per row: rstd = 1/sqrt(mean(x²) + eps), y = w ⊙ (x · rstd) (HF's operation order).
__global__ void rmsnorm_forward_kernel(const float* x, int64_t ld_x, const float* w, float* y, int64_t ld_y,
                                       float* rstd, int64_t d, float eps, float inv_d) {
  const float* xr = x + blockIdx.x * ld_x;
  float* yr = y + blockIdx.x * ld_y;
  float ss = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) ss += xr[j] * xr[j];
  ss = block_sum(ss);
  const float r = 1.f / sqrtf(ss * inv_d + eps);
  if (threadIdx.x == 0) rstd[blockIdx.x] = r;
  // y may alias x: every thread reads its own x elements before writing them, and ss is already reduced.
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) yr[j] = w[j] * (xr[j] * r);
}

// dx per row (one block per row); the row's dw contribution is written to its 32-row block's partial by the
// second kernel, which owns columns.
constexpr int64_t kRowBlock = 32;
__global__ void rmsnorm_dx_kernel(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x,
                                  const float* w, const float* rstd, float* dx, int64_t ld_dx, int64_t d,
                                  float beta, float inv_d) {
  const int64_t i = blockIdx.x;
  const float* dyr = dy + i * ld_dy;
  const float* xr = x + i * ld_x;
  float* dxr = dx + i * ld_dx;
  const float r = rstd[i];
  float s = 0.f;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) s += w[j] * dyr[j] * xr[j];
  s = block_sum(s);
  const float c = r * r * r * s * inv_d;
  for (int64_t j = threadIdx.x; j < d; j += blockDim.x) {
    const float g = r * (w[j] * dyr[j]) - xr[j] * c;
    dxr[j] = beta == 0.f ? g : dxr[j] + g;
  }
}

// partial[blk, j] = Σ_{rows of blk in order} dy·(x·rstd): runs before dx is written (dx may alias dy).
__global__ void rmsnorm_dw_partial_kernel(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x,
                                          const float* rstd, float* partial, int64_t t, int64_t d) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x, blk = blockIdx.y;
  if (j >= d) return;
  float acc = 0.f;
  for (int64_t i = blk * kRowBlock; i < min(t, (blk + 1) * kRowBlock); ++i)
    acc += dy[i * ld_dy + j] * (x[i * ld_x + j] * rstd[i]);
  partial[blk * d + j] = acc;
}

__global__ void rmsnorm_dw_sum_kernel(const float* partial, int64_t blocks, float* dw, int64_t d) {
  const int64_t j = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (j >= d) return;
  float acc = 0.f;
  for (int64_t b = 0; b < blocks; ++b) acc += partial[b * d + j];
  dw[j] += acc;
}

__device__ __forceinline__ float sigmoidf(float a) {
  return 1.f / (1.f + expf(-a));
}

__global__ void swiglu_forward_kernel(const float* a, const float* b, int64_t ld_ab, const float* p, float* h,
                                      int64_t t, int64_t f) {
  const int64_t n = t * f;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e / f, j = e % f;
    const float av = a[i * ld_ab + j];
    h[e] = (av * sigmoidf(av) * b[i * ld_ab + j]) * (p ? p[i] : 1.f);
  }
}

// One block per row (dp needs the row's sum); da/db may alias a/b: each element is read before it is written.
__global__ void swiglu_backward_kernel(const float* dh, const float* a, const float* b, int64_t ld_ab,
                                       const float* p, float* da, float* db, int64_t ld_dab, float* dp,
                                       int64_t f) {
  const int64_t i = blockIdx.x;
  const float pi = p ? p[i] : 1.f;
  float dpi = 0.f;
  for (int64_t j = threadIdx.x; j < f; j += blockDim.x) {
    const float av = a[i * ld_ab + j], bv = b[i * ld_ab + j], g = dh[i * f + j];
    const float s = sigmoidf(av), silu = av * s;
    dpi += g * silu * bv;
    const float gp = g * pi;
    da[i * ld_dab + j] = gp * bv * s * (1.f + av * (1.f - s));
    db[i * ld_dab + j] = gp * silu;
  }
  if (p) {
    dpi = block_sum(dpi);
    if (threadIdx.x == 0) dp[i] = dpi;
  }
}

// Each block owns whole rope vectors (rows = (token, head)), rows_per_block of them, one thread per rotated pair:
// every thread reads its pair, the block synchronises, then writes. So y may alias x (in place): no thread can
// read a value another has already overwritten, whatever the warp schedule.
__global__ void rope_kernel(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y,
                            int64_t rows, int64_t heads, int64_t seq_len, const float* cos_PH,
                            const float* sin_PH, int64_t half, bool interleave, bool forward) {
  const int64_t row = blockIdx.x * int64_t{blockDim.x / half} + threadIdx.x / half, k = threadIdx.x % half;
  const bool live = threadIdx.x < blockDim.x / half * half && row < rows;
  float out_a = 0.f, out_b = 0.f;
  float* yr = nullptr;
  int64_t out_lo = 0, out_hi = 0;
  if (live) {
    const int64_t h = row % heads, i = row / heads, pos = i % seq_len;
    const float c = cos_PH[pos * half + k], s = sin_PH[pos * half + k];
    const float* xr = x + i * ld_x + h * hs_x;
    yr = y + i * ld_y + h * hs_y;
    const int64_t in_lo = interleave ? 2 * k : k, in_hi = interleave ? 2 * k + 1 : half + k;
    if (forward) {
      const float lo = xr[in_lo], hi = xr[in_hi];
      // The CPU kernel rounds each product before the sum (no FMA): do the same.
      out_a = __fadd_rn(__fmul_rn(lo, c), __fmul_rn(-hi, s));
      out_b = __fadd_rn(__fmul_rn(hi, c), __fmul_rn(lo, s));
      out_lo = k, out_hi = half + k;
    } else {
      const float a = xr[k], b = xr[half + k];
      out_a = __fadd_rn(__fmul_rn(a, c), __fmul_rn(b, s));
      out_b = __fsub_rn(__fmul_rn(b, c), __fmul_rn(a, s));
      out_lo = in_lo, out_hi = in_hi;
    }
  }
  __syncthreads();
  if (live) yr[out_lo] = out_a, yr[out_hi] = out_b;
}

// AdamW: the CPU's sequence of fp32 operations (kernels/cpu/adamw.cpp adamw8), one rounding each.
__global__ void adamw_kernel(float* params, const float* grads, float* m, float* v, const AdamWSegment* segs,
                             int64_t num_segments) {
  const AdamWSegment sg = segs[blockIdx.y];
  const AdamWStepConsts k = sg.k;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < sg.n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = sg.begin + e;
    const float g = grads[i], m0 = m[i];
    const float pi = __fmul_rn(params[i], k.decay);
    const float mi = __fmaf_rn(k.w1, __fsub_rn(g, m0), m0);
    const float vi = __fmaf_rn(__fmul_rn(k.w2, g), g, __fmul_rn(v[i], k.b2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), k.bc2_sqrt), k.eps);
    const float upd = __fdiv_rn(__fmul_rn(k.step_size, mi), denom);
    m[i] = mi, v[i] = vi;
    params[i] = __fsub_rn(pi, upd);
  }
}

}  // namespace

void launch_to_bf16(const float* x, bf16* y, int64_t n, cudaStream_t st) {
  if (n <= 0) return;
  to_bf16_kernel<<<blocks_for(n, 4), kThreads, 0, st>>>(x, reinterpret_cast<__nv_bfloat16*>(y), n);
  check_launch("to_bf16");
}

void launch_heads_to_bf16(const float* x, int64_t ld_token, int64_t ld_head, int64_t t, int64_t heads,
                          int64_t d, bf16* y, cudaStream_t st) {
  const int64_t n = t * heads * d;
  if (n <= 0) return;
  heads_to_bf16_kernel<<<blocks_for(n, 4), kThreads, 0, st>>>(x, ld_token, ld_head, heads, d, n,
                                                              reinterpret_cast<__nv_bfloat16*>(y));
  check_launch("heads_to_bf16");
}

void launch_heads_from_bf16(const bf16* y, int64_t t, int64_t heads, int64_t d, float* x, int64_t ld_token,
                            int64_t ld_head, cudaStream_t st) {
  const int64_t n = t * heads * d;
  if (n <= 0) return;
  heads_from_bf16_kernel<<<blocks_for(n, 4), kThreads, 0, st>>>(reinterpret_cast<const __nv_bfloat16*>(y),
                                                                heads, d, n, x, ld_token, ld_head);
  check_launch("heads_from_bf16");
}

void launch_scale(float* x, int64_t n, float s, cudaStream_t st) {
  if (n <= 0) return;
  scale_kernel<<<blocks_for(n, 4), kThreads, 0, st>>>(x, n, s);
  check_launch("scale");
}

void launch_add(float* y, const float* a, const float* b, int64_t n, cudaStream_t st) {
  if (n <= 0) return;
  add_kernel<<<blocks_for(n, 4), kThreads, 0, st>>>(y, a, b, n);
  check_launch("add");
}

void launch_sum_heads(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t t,
                      int64_t heads, int64_t n, cudaStream_t st) {
  if (t <= 0 || n <= 0) return;
  sum_heads_kernel<<<blocks_for(t * n), kThreads, 0, st>>>(x, ld_x, hs_x, y, ld_y, t, heads, n);
  check_launch("sum_heads");
}

void launch_permute_rows(const float* x, const int32_t* token_R, int64_t r, int64_t d, float* y,
                         cudaStream_t st) {
  if (r <= 0 || d <= 0) return;
  permute_rows_kernel<<<blocks_for(r * d, 4), kThreads, 0, st>>>(x, token_R, r, d, y);
  check_launch("permute_rows");
}

void launch_unpermute_sum(const float* y, const int32_t* row_TK, int64_t t, int64_t k, int64_t d, float* out,
                          float beta, cudaStream_t st) {
  if (t <= 0 || d <= 0) return;
  unpermute_sum_kernel<<<blocks_for(t * d, 4), kThreads, 0, st>>>(y, row_TK, t, k, d, out, beta);
  check_launch("unpermute_sum");
}

void launch_gather_or_zero(const float* v, const int32_t* index, int64_t n, float* out, cudaStream_t st) {
  if (n <= 0) return;
  gather_or_zero_kernel<<<blocks_for(n), kThreads, 0, st>>>(v, index, n, out);
  check_launch("gather_or_zero");
}

int64_t sum_of_squares_blocks(int64_t n) {
  return (n + kSsqBlock - 1) / kSsqBlock;
}

void launch_sum_of_squares(const float* x, int64_t n, double* partial, cudaStream_t st) {
  if (n <= 0) return;
  sum_of_squares_kernel<<<static_cast<unsigned>(sum_of_squares_blocks(n)), 16, 0, st>>>(x, n, partial);
  check_launch("sum_of_squares");
}

void launch_sum_partials(const double* partial, int64_t blocks, double* out, bool accumulate,
                         cudaStream_t st) {
  sum_partials_kernel<<<1, 1, 0, st>>>(partial, blocks, out, accumulate);
  check_launch("sum_partials");
}

void launch_sum(const float* x, int64_t n, double* out, bool accumulate, cudaStream_t st) {
  sum_kernel<<<1, kThreads, 0, st>>>(x, n, out, accumulate);
  check_launch("sum");
}

void launch_rmsnorm_forward(const float* x, int64_t ld_x, const float* w, float* y, int64_t ld_y, float* rstd,
                            int64_t t, int64_t d, float eps, cudaStream_t st) {
  if (t == 0) return;
  rmsnorm_forward_kernel<<<static_cast<unsigned>(t), kThreads, 0, st>>>(x, ld_x, w, y, ld_y, rstd, d, eps,
                                                                        1.f / static_cast<float>(d));
  check_launch("rmsnorm_forward");
}

int64_t rmsnorm_dw_scratch_floats(int64_t t, int64_t d) {
  return std::max<int64_t>(1, (t + kRowBlock - 1) / kRowBlock) * d;
}

void launch_rmsnorm_backward(const float* dy, int64_t ld_dy, const float* x, int64_t ld_x, const float* w,
                             const float* rstd, float* dx, int64_t ld_dx, float* dw, int64_t t, int64_t d,
                             float beta, float* scratch, cudaStream_t st) {
  if (t == 0) return;
  const int64_t blocks = (t + kRowBlock - 1) / kRowBlock;
  if (dw) {  // before dx: dx may alias dy
    const dim3 grid(static_cast<unsigned>((d + kThreads - 1) / kThreads), static_cast<unsigned>(blocks));
    rmsnorm_dw_partial_kernel<<<grid, kThreads, 0, st>>>(dy, ld_dy, x, ld_x, rstd, scratch, t, d);
    check_launch("rmsnorm_backward (dw partials)");
    rmsnorm_dw_sum_kernel<<<static_cast<unsigned>((d + kThreads - 1) / kThreads), kThreads, 0, st>>>(
        scratch, blocks, dw, d);
    check_launch("rmsnorm_backward (dw)");
  }
  rmsnorm_dx_kernel<<<static_cast<unsigned>(t), kThreads, 0, st>>>(dy, ld_dy, x, ld_x, w, rstd, dx, ld_dx, d,
                                                                   beta, 1.f / static_cast<float>(d));
  check_launch("rmsnorm_backward (dx)");
}

void launch_swiglu_forward(const float* a, const float* b, int64_t ld_ab, const float* p, float* h, int64_t t,
                           int64_t f, cudaStream_t st) {
  if (t * f == 0) return;
  swiglu_forward_kernel<<<blocks_for(t * f, 2), kThreads, 0, st>>>(a, b, ld_ab, p, h, t, f);
  check_launch("swiglu_forward");
}

void launch_swiglu_backward(const float* dh, const float* a, const float* b, int64_t ld_ab, const float* p,
                            float* da, float* db, int64_t ld_dab, float* dp, int64_t t, int64_t f,
                            cudaStream_t st) {
  if (t == 0) return;
  swiglu_backward_kernel<<<static_cast<unsigned>(t), kThreads, 0, st>>>(dh, a, b, ld_ab, p, da, db, ld_dab,
                                                                        dp, f);
  check_launch("swiglu_backward");
}

void launch_rope(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y, int64_t t,
                 int64_t heads, int64_t seq_len, const RopeTableView& table, bool interleave, bool forward,
                 cudaStream_t st) {
  const int64_t rows = t * heads, half = table.half;
  if (rows == 0 || half == 0) return;
  DSV3_CHECK(half <= 1024, "rope: ", 2 * half, " rotated dims are more than the CUDA kernel's 2048");
  const int64_t per_block = std::max<int64_t>(1, kThreads / half);
  const int64_t blocks = (rows + per_block - 1) / per_block;
  DSV3_CHECK(blocks < (int64_t{1} << 31), "rope: ", rows, " rows are too many for one launch");
  rope_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(per_block * half), 0, st>>>(
      x, ld_x, hs_x, y, ld_y, hs_y, rows, heads, seq_len, table.cos_PH, table.sin_PH, half, interleave,
      forward);
  check_launch(forward ? "rope_forward" : "rope_backward");
}

void launch_adamw(float* params, const float* grads, float* m, float* v, const AdamWSegment* segments,
                  int64_t num_segments, int64_t max_segment_n, cudaStream_t st) {
  if (num_segments == 0 || max_segment_n == 0) return;
  DSV3_CHECK(num_segments < 65536, "adamw: ", num_segments, " segments (at most 65535 per launch)");
  const dim3 grid(std::min(blocks_for(max_segment_n, 4), 4096u), static_cast<unsigned>(num_segments));
  adamw_kernel<<<grid, kThreads, 0, st>>>(params, grads, m, v, segments, num_segments);
  check_launch("adamw");
}

}  // namespace dsv3::cuda
