// Causal flash attention for the CUDA backend (kernels.cuh; semantics: cpu/attention.cpp). First version: fp32
// CUDA-core math, written for correctness and determinism; a tensor-core or cuDNN path comes later.
//
// Algorithm (FlashAttention-2; memory linear in S, only o and lse are kept):
//  forward   one block per (64-query tile, b·h). Q stays in shared memory; the block walks the 64-key tiles from
//            0 to the diagonal: S = scale·Q Kᵀ, online softmax (running row max m and row sum l in fp32
//            registers), O = O·alpha + P V in registers. Finally o = O·(1/l), lse = m + log l.
//  backward  P is recomputed from lse. No two blocks write the same gradient row, so there are no atomics and two
//            runs are bit-identical:
//            1. rowdot: D_i = rowsum(dO ⊙ O) from the unrounded dO, one warp per (token, head), into scratch
//               [B,H,S].
//            2. dkdv: one block per (64-key tile, b·h). K, V stay in shared memory; the block walks the 32-query
//               tiles from the diagonal to the end, forms P = exp(scale·q·k − lse), dS = P ⊙ (dO·v − D), and
//               accumulates dV += Pᵀ dO, dK += dSᵀ Q in registers; dK·scale at the end.
//            3. dq: one block per (64-query tile, b·h). Q, dO stay in shared memory; the block walks the 32-key
//               tiles from 0 to the diagonal in order, forms dS the same way (the same fma chains, so P and dS are
//               bitwise those of dkdv) and accumulates dQ += dS K in registers; dQ·scale at the end.
//
// Thread layout (all kernels): 256 threads as 16×16, ty = tid/16, tx = tid%16. In every tile product a thread
// owns rows ty+16i and columns tx+16j. Hence the 16 owners of a row are one half-warp (row max / row sum are
// 4 xor shuffles), a half-warp reads either 16 consecutive words of one shared row or the same word of 16
// consecutive rows (conflict-free when the row stride is odd: ld = d|1), and the other half-warp reads rows one
// apart. The P/dS tiles use a stride ≡ 16 (mod 32) so the two half-warps' writes land in disjoint banks.
// Accumulator columns come in groups of 16 (NQK, NV = ceil(d/16) rounded up to 4, 8, 12 or 16), so the register
// arrays have compile-time sizes; columns ≥ d are skipped.
//
// Shared memory per block (floats; ldk = d_qk|1, ldv = d_v|1):
//   forward  Q 64·ldk + K 64·ldk + V 64·d_v + P 64·80                     (256/256: 212.5 KiB, MLA 192/128: 148.5)
//   dkdv     K 64·ldk + V 64·ldv + Q 32·ldk + dO 32·ldv + Pᵀ, dSᵀ 2·64·48 + lse, D 2·32   (217 KiB, MLA 145)
//   dq       Q 64·ldk + dO 64·ldv + K 32·ldk + V 32·ldv + dS 64·48                (204.75 KiB, MLA 132.75)
// All fit Hopper's 227 KiB opt-in, which is why the tiles are 64×64 / 64×32 and no larger.
// Grids: x = B·H (up to 2³¹−1), y = tiles of S (at most 65535, so S ≤ 2 097 120); heavy tiles are scheduled
// first (forward and dq: the last query tiles see the most keys; dkdv: the first key tiles see the most queries).
//
// bf16 mode rounds exactly the operands cpu/attention.cpp rounds (round to nearest even, as core/bf16.h):
//   forward  q, k (for S = q·kᵀ) and v, and the unnormalised probabilities p = exp(s − m) before P V. The row sum l
//            adds the unrounded p, the scale multiplies the fp32 dot product, and m, l, lse, alpha stay fp32.
//   backward q, k, v, dO for the products q·k, dO·v, Pᵀ dO, dSᵀ Q, dS K; and P (before Pᵀ dO) and dS (before
//            dSᵀ Q and dS K). dS = P ⊙ (dP − D) is formed from the unrounded fp32 P; D uses the unrounded dO and o.
// The CPU keeps its online-softmax running max per 256-key block, this kernel per 64-key tile, so in bf16 mode the
// rounded p (relative to a different running max) differs in the last bits: results agree within bf16 tolerance,
// not bitwise. fp32 mode differs from the CPU only in rounding order (sums, the online softmax's tile boundaries,
// the exp implementation): about 1e-7 relative.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "core/error.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/kernels.cuh"

namespace dsv3::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHead = 256;
constexpr int kFwdRows = 64, kFwdKeys = 64, kFwdLdP = kFwdKeys + 16;
constexpr int kDkvKeys = 64, kDkvRows = 32, kDkvLdP = kDkvRows + 16;
constexpr int kDqRows = 64, kDqKeys = 32, kDqLdP = kDqKeys + 16;
constexpr int kMaxTilesY = 65535;  // gridDim.y limit; the smallest tile (32 rows) sets the longest sequence

// core/bf16.h's to_bf16 then widening, bit for bit (NaN kept quiet, ties to even).
__device__ __forceinline__ float rne_bf16(float f) {
  uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __uint_as_float((u | 0x00400000u) & 0xffff0000u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return __uint_as_float(u & 0xffff0000u);
}
__device__ __forceinline__ float operand(float x, bool bf) {
  return bf ? rne_bf16(x) : x;
}

// xor shuffles below 16 stay inside a half-warp: the 16 owners of one tile row. The butterfly leaves the same
// bits in every lane (fp add and max are commutative), so all owners agree on m and l.
__device__ __forceinline__ float half_warp_max(float v) {
  for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float half_warp_sum(float v) {
  for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// rows × d of one head into dst (row stride ld_dst), rows ≥ valid zero-filled: masked probabilities are 0, and
// 0 · garbage could be NaN. base points at the tile's first row (a valid row). One warp per row, lanes along d:
// coalesced for any strides.
__device__ void load_rows(float* dst, int ld_dst, const float* base, int64_t ld_token, int rows, int valid,
                          int d, bool bf) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += kWarps) {
    float* drow = dst + r * ld_dst;
    if (r < valid) {
      const float* srow = base + r * ld_token;
      for (int c = lane; c < d; c += 32) drow[c] = operand(srow[c], bf);
    } else {
      for (int c = lane; c < d; c += 32) drow[c] = 0.f;
    }
  }
}

__device__ __forceinline__ const float* head_row(const HeadsView& v, int64_t tok, int h) {
  return v.p + tok * v.ld_token + h * v.ld_head;
}
__device__ __forceinline__ float* head_row(const HeadsViewMut& v, int64_t tok, int h) {
  return v.p + tok * v.ld_token + h * v.ld_head;
}

struct FwdArgs {
  HeadsView q, k, v;
  HeadsViewMut o;
  float* lse;
  int S, H, dqk, dv;
  float scale;
  bool bf;
};

struct BwdArgs {
  HeadsView q, k, v, o, dO;
  HeadsViewMut dQ, dK, dV;
  const float* lse;
  float* D;  // scratch [B,H,S]
  int S, H, dqk, dv;
  float scale;
  bool bf;
};

// Row stride of a d-wide shared tile read down its columns: odd, so 16 consecutive rows hit 16 distinct banks.
int padded(int d) {
  return d | 1;
}

int64_t fwd_smem_floats(int dqk, int dv) {
  return int64_t{2} * kFwdRows * padded(dqk) + int64_t{kFwdKeys} * dv + int64_t{kFwdRows} * kFwdLdP;
}
int64_t dkdv_smem_floats(int dqk, int dv) {
  return int64_t{kDkvKeys + kDkvRows} * (padded(dqk) + padded(dv)) + int64_t{2} * kDkvKeys * kDkvLdP +
         2 * kDkvRows;
}
int64_t dq_smem_floats(int dqk, int dv) {
  return int64_t{kDqRows + kDqKeys} * (padded(dqk) + padded(dv)) + int64_t{kDqRows} * kDqLdP;
}

template <int NV>
__global__ void __launch_bounds__(kThreads, 1) attention_forward_kernel(const FwdArgs a) {
  extern __shared__ float smem[];
  const int S = a.S, dqk = a.dqk, dv = a.dv, ldq = dqk | 1;
  float* Qs = smem;                 // [64][ldq]
  float* Ks = Qs + kFwdRows * ldq;  // [64][ldq]
  float* Vs = Ks + kFwdKeys * ldq;  // [64][dv]: read along rows only
  float* Ps = Vs + kFwdKeys * dv;   // [64][kFwdLdP]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kFwdRows;
  const int64_t tok0 = int64_t{b} * S;
  const float ninf = -INFINITY;

  load_rows(Qs, ldq, head_row(a.q, tok0 + q0, h), a.q.ld_token, kFwdRows, min(kFwdRows, S - q0), dqk, a.bf);

  float m[4], l[4], acc[4][NV];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    m[i] = ninf, l[i] = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) acc[i][j] = 0.f;
  }

  const int key_end = min(q0 + kFwdRows, S);  // keys past the tile's last row are masked for every row
  for (int k0 = 0; k0 < key_end; k0 += kFwdKeys) {
    const int nk = min(kFwdKeys, S - k0);
    __syncthreads();  // the previous tile's P V has finished reading Ks, Vs, Ps
    load_rows(Ks, ldq, head_row(a.k, tok0 + k0, h), a.k.ld_token, kFwdKeys, nk, dqk, a.bf);
    load_rows(Vs, dv, head_row(a.v, tok0 + k0, h), a.v.ld_token, kFwdKeys, nk, dv, a.bf);
    __syncthreads();

    float sc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) sc[i][j] = 0.f;
    for (int d = 0; d < dqk; ++d) {
      float qv[4], kv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) qv[i] = Qs[(ty + 16 * i) * ldq + d];
#pragma unroll
      for (int j = 0; j < 4; ++j) kv[j] = Ks[(tx + 16 * j) * ldq + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) sc[i][j] = fmaf(qv[i], kv[j], sc[i][j]);
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = q0 + ty + 16 * i;
      float x[4], mt = ninf;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int col = k0 + tx + 16 * j;
        // The CPU scales the finished fp32 dot product (a separate rounding, hence no fma with the subtraction).
        x[j] = (col <= row && col < S) ? __fmul_rn(sc[i][j], a.scale) : ninf;
        mt = fmaxf(mt, x[j]);
      }
      mt = half_warp_max(mt);
      const float mn = fmaxf(m[i], mt);
      float p[4], lt = 0.f, alpha = 1.f;
      if (mn == ninf) {  // nothing visible yet (cannot happen for a real row: key 0 is in the first tile)
#pragma unroll
        for (int j = 0; j < 4; ++j) p[j] = 0.f;
      } else {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          p[j] = x[j] == ninf ? 0.f : expf(x[j] - mn);
          lt += p[j];
        }
        alpha = m[i] == ninf ? 0.f : expf(m[i] - mn);
      }
      lt = half_warp_sum(lt);  // l sums the unrounded p; only the P V operand is rounded (as the CPU)
      l[i] =
          fmaf(l[i], alpha, lt);  // explicit, so the rounding does not depend on the compiler's contraction
      m[i] = mn;
#pragma unroll
      for (int j = 0; j < 4; ++j) Ps[(ty + 16 * i) * kFwdLdP + tx + 16 * j] = operand(p[j], a.bf);
#pragma unroll
      for (int j = 0; j < NV; ++j) acc[i][j] *= alpha;
    }
    __syncthreads();

    for (int kk = 0; kk < nk; ++kk) {
      float pv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) pv[i] = Ps[(ty + 16 * i) * kFwdLdP + kk];
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int col = tx + 16 * j;
        if (col < dv) {
          const float vv = Vs[kk * dv + col];
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i][j] = fmaf(pv[i], vv, acc[i][j]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int row = q0 + ty + 16 * i;
    if (row >= S) continue;
    const float inv = 1.f / l[i];  // as the CPU: one reciprocal, then products
    float* orow = head_row(a.o, tok0 + row, h);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = tx + 16 * j;
      if (col < dv) orow[col] = acc[i][j] * inv;
    }
    if (tx == 0) a.lse[int64_t{bh} * S + row] = m[i] + logf(l[i]);
  }
}

// D_i = rowsum(dO ⊙ O) with the unrounded dO: a softmax-backward term, not a matmul operand (as the CPU).
__global__ void __launch_bounds__(kThreads) attention_rowdot_kernel(const BwdArgs a, int64_t rows) {
  const int lane = threadIdx.x % 32;
  // r = token·H + head; r is warp-uniform, so whole warps stay in the loop together and the shuffles are full.
  for (int64_t r = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32; r < rows;
       r += int64_t{gridDim.x} * kWarps) {
    const int64_t tok = r / a.H;
    const int h = static_cast<int>(r % a.H);
    const float* o = head_row(a.o, tok, h);
    const float* dO = head_row(a.dO, tok, h);
    float acc = 0.f;
    for (int c = lane; c < a.dv; c += 32) acc = fmaf(dO[c], o[c], acc);
    for (int w = 16; w > 0; w >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, w);
    if (lane == 0) {
      const int64_t b = tok / a.S, s = tok % a.S;
      a.D[(b * a.H + h) * a.S + s] = acc;
    }
  }
}

template <int NQK, int NV>
__global__ void __launch_bounds__(kThreads, 1) attention_dkdv_kernel(const BwdArgs a) {
  extern __shared__ float smem[];
  const int S = a.S, dqk = a.dqk, dv = a.dv, ldk = dqk | 1, ldv = dv | 1;
  float* Ks = smem;                  // [64][ldk]
  float* Vs = Ks + kDkvKeys * ldk;   // [64][ldv]
  float* Qs = Vs + kDkvKeys * ldv;   // [32][ldk]
  float* dOs = Qs + kDkvRows * ldk;  // [32][ldv]
  float* Pt = dOs + kDkvRows * ldv;  // [64 keys][kDkvLdP]: Pᵀ
  float* dSt = Pt + kDkvKeys * kDkvLdP;
  float* lse_s = dSt + kDkvKeys * kDkvLdP;  // [32]
  float* D_s = lse_s + kDkvRows;            // [32]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H;
  const int k0 = blockIdx.y * kDkvKeys;
  const int64_t tok0 = int64_t{b} * S;
  const float* lse = a.lse + int64_t{bh} * S;
  const float* D = a.D + int64_t{bh} * S;

  load_rows(Ks, ldk, head_row(a.k, tok0 + k0, h), a.k.ld_token, kDkvKeys, min(kDkvKeys, S - k0), dqk, a.bf);
  load_rows(Vs, ldv, head_row(a.v, tok0 + k0, h), a.v.ld_token, kDkvKeys, min(kDkvKeys, S - k0), dv, a.bf);

  float adk[4][NQK], adv[4][NV];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
#pragma unroll
    for (int j = 0; j < NQK; ++j) adk[i][j] = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) adv[i][j] = 0.f;
  }

  // k0 is a multiple of the query tile, and queries before k0 see none of these keys.
  for (int q0 = k0; q0 < S; q0 += kDkvRows) {
    const int nq = min(kDkvRows, S - q0);
    __syncthreads();  // the previous query tile's products have finished reading Qs, dOs, Pt, dSt
    load_rows(Qs, ldk, head_row(a.q, tok0 + q0, h), a.q.ld_token, kDkvRows, nq, dqk, a.bf);
    load_rows(dOs, ldv, head_row(a.dO, tok0 + q0, h), a.dO.ld_token, kDkvRows, nq, dv, a.bf);
    if (threadIdx.x < kDkvRows) {
      const int r = threadIdx.x;
      lse_s[r] = r < nq ? lse[q0 + r] : 0.f;
      D_s[r] = r < nq ? D[q0 + r] : 0.f;
    }
    __syncthreads();

    // Sᵀ and dPᵀ: keys ty+16i × queries tx+16j.
    float sc[4][2], dp[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) sc[i][j] = 0.f, dp[i][j] = 0.f;
    for (int d = 0; d < dqk; ++d) {
      float kv[4], qv[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) kv[i] = Ks[(ty + 16 * i) * ldk + d];
#pragma unroll
      for (int j = 0; j < 2; ++j) qv[j] = Qs[(tx + 16 * j) * ldk + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) sc[i][j] = fmaf(qv[j], kv[i], sc[i][j]);
    }
    for (int d = 0; d < dv; ++d) {
      float vv[4], ov[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) vv[i] = Vs[(ty + 16 * i) * ldv + d];
#pragma unroll
      for (int j = 0; j < 2; ++j) ov[j] = dOs[(tx + 16 * j) * ldv + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) dp[i][j] = fmaf(ov[j], vv[i], dp[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int key = k0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int r = tx + 16 * j, q = q0 + r;
        float p = 0.f, ds = 0.f;
        if (q < S && key <= q) {  // key <= q < S also excludes the zero-filled keys past S
          p = expf(__fmul_rn(sc[i][j], a.scale) - lse_s[r]);
          ds = p * (dp[i][j] - D_s[r]);  // from the unrounded P, as the CPU
        }
        Pt[(ty + 16 * i) * kDkvLdP + r] = operand(p, a.bf);
        dSt[(ty + 16 * i) * kDkvLdP + r] = operand(ds, a.bf);
      }
    }
    __syncthreads();

    for (int qq = 0; qq < nq; ++qq) {
      float pv[4], sv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        pv[i] = Pt[(ty + 16 * i) * kDkvLdP + qq];
        sv[i] = dSt[(ty + 16 * i) * kDkvLdP + qq];
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int col = tx + 16 * j;
        if (col < dv) {
          const float ov = dOs[qq * ldv + col];
#pragma unroll
          for (int i = 0; i < 4; ++i) adv[i][j] = fmaf(pv[i], ov, adv[i][j]);
        }
      }
#pragma unroll
      for (int j = 0; j < NQK; ++j) {
        const int col = tx + 16 * j;
        if (col < dqk) {
          const float qv = Qs[qq * ldk + col];
#pragma unroll
          for (int i = 0; i < 4; ++i) adk[i][j] = fmaf(sv[i], qv, adk[i][j]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int key = k0 + ty + 16 * i;
    if (key >= S) continue;
    float* dkrow = head_row(a.dK, tok0 + key, h);
    float* dvrow = head_row(a.dV, tok0 + key, h);
#pragma unroll
    for (int j = 0; j < NQK; ++j) {
      const int col = tx + 16 * j;
      if (col < dqk) dkrow[col] = adk[i][j] * a.scale;
    }
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const int col = tx + 16 * j;
      if (col < dv) dvrow[col] = adv[i][j];
    }
  }
}

template <int NQK>
__global__ void __launch_bounds__(kThreads, 1) attention_dq_kernel(const BwdArgs a) {
  extern __shared__ float smem[];
  const int S = a.S, dqk = a.dqk, dv = a.dv, ldk = dqk | 1, ldv = dv | 1;
  float* Qs = smem;                 // [64][ldk]
  float* dOs = Qs + kDqRows * ldk;  // [64][ldv]
  float* Ks = dOs + kDqRows * ldv;  // [32][ldk]
  float* Vs = Ks + kDqKeys * ldk;   // [32][ldv]
  float* dSs = Vs + kDqKeys * ldv;  // [64][kDqLdP]
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kDqRows;
  const int nq = min(kDqRows, S - q0);
  const int64_t tok0 = int64_t{b} * S;

  load_rows(Qs, ldk, head_row(a.q, tok0 + q0, h), a.q.ld_token, kDqRows, nq, dqk, a.bf);
  load_rows(dOs, ldv, head_row(a.dO, tok0 + q0, h), a.dO.ld_token, kDqRows, nq, dv, a.bf);
  float lse_r[4], D_r[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    lse_r[i] = r < nq ? a.lse[int64_t{bh} * S + q0 + r] : 0.f;
    D_r[i] = r < nq ? a.D[int64_t{bh} * S + q0 + r] : 0.f;
  }

  float acc[4][NQK];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < NQK; ++j) acc[i][j] = 0.f;

  const int key_end = q0 + nq;  // the tile's last row sees keys up to itself
  for (int k0 = 0; k0 < key_end; k0 += kDqKeys) {
    const int nk = min(kDqKeys, S - k0);
    __syncthreads();  // the previous key tile's dS K has finished reading Ks, dSs
    load_rows(Ks, ldk, head_row(a.k, tok0 + k0, h), a.k.ld_token, kDqKeys, nk, dqk, a.bf);
    load_rows(Vs, ldv, head_row(a.v, tok0 + k0, h), a.v.ld_token, kDqKeys, nk, dv, a.bf);
    __syncthreads();

    // S and dP: queries ty+16i × keys tx+16j, the same fma chains (in d order) as dkdv's.
    float sc[4][2], dp[4][2];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) sc[i][j] = 0.f, dp[i][j] = 0.f;
    for (int d = 0; d < dqk; ++d) {
      float qv[4], kv[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) qv[i] = Qs[(ty + 16 * i) * ldk + d];
#pragma unroll
      for (int j = 0; j < 2; ++j) kv[j] = Ks[(tx + 16 * j) * ldk + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) sc[i][j] = fmaf(qv[i], kv[j], sc[i][j]);
    }
    for (int d = 0; d < dv; ++d) {
      float ov[4], vv[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) ov[i] = dOs[(ty + 16 * i) * ldv + d];
#pragma unroll
      for (int j = 0; j < 2; ++j) vv[j] = Vs[(tx + 16 * j) * ldv + d];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) dp[i][j] = fmaf(ov[i], vv[j], dp[i][j]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int q = q0 + ty + 16 * i;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int key = k0 + tx + 16 * j;
        float ds = 0.f;
        if (q < S && key <= q) {
          const float p = expf(__fmul_rn(sc[i][j], a.scale) - lse_r[i]);
          ds = p * (dp[i][j] - D_r[i]);
        }
        dSs[(ty + 16 * i) * kDqLdP + tx + 16 * j] = operand(ds, a.bf);
      }
    }
    __syncthreads();

    for (int kk = 0; kk < nk; ++kk) {
      float sv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) sv[i] = dSs[(ty + 16 * i) * kDqLdP + kk];
#pragma unroll
      for (int j = 0; j < NQK; ++j) {
        const int col = tx + 16 * j;
        if (col < dqk) {
          const float kv = Ks[kk * ldk + col];
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i][j] = fmaf(sv[i], kv, acc[i][j]);
        }
      }
    }
  }

#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= nq) continue;
    float* dqrow = head_row(a.dQ, tok0 + q0 + r, h);
#pragma unroll
    for (int j = 0; j < NQK; ++j) {
      const int col = tx + 16 * j;
      if (col < dqk) dqrow[col] = acc[i][j] * a.scale;
    }
  }
}

// Column groups of 16 a thread's accumulators cover: 4, 8, 12 or 16 (d ≤ 64, 128, 192, 256). MLA's 192/128 fits
// exactly; the test-sized heads waste registers, not time (guarded columns are skipped).
int groups(int64_t d) {
  return d <= 64 ? 4 : d <= 128 ? 8 : d <= 192 ? 12 : 16;
}
template <typename F>
void with_groups(int64_t d, F&& f) {
  switch (groups(d)) {
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    case 12:
      f(std::integral_constant<int, 12>{});
      break;
    default:
      f(std::integral_constant<int, 16>{});
      break;
  }
}

int device_smem_optin() {
  int dev = 0, optin = 0;
  check(cudaGetDevice(&dev), "cudaGetDevice (attention)");
  check(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
        "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin) (attention)");
  return optin;
}

// Raises the kernel's dynamic shared memory limit to the most any shape it serves can need (a value fixed per
// instantiation and device, so concurrent callers never lower each other's limit).
template <typename Kernel>
void allow_smem(Kernel* kernel, int64_t need_bytes, int64_t instance_max_bytes, const char* what) {
  if (need_bytes <= 48 * 1024) return;
  const int optin = device_smem_optin();
  if (need_bytes > optin)
    fail("attention ", what, ": needs ", need_bytes, " bytes of shared memory per block, the device allows ",
         optin);
  const int64_t limit = instance_max_bytes < optin ? instance_max_bytes : optin;
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(limit)),
        what);
}

bool shape_ok(const AttentionShape& s) {
  if (s.batch <= 0 || s.seq <= 0 || s.heads <= 0 || s.d_qk <= 0 || s.d_v <= 0) return false;
  if (s.d_qk > kMaxHead || s.d_v > kMaxHead) return false;
  if ((s.seq + kDkvRows - 1) / kDkvRows > kMaxTilesY) return false;  // the smallest tile sets the longest S
  if (s.batch > INT_MAX / s.heads) return false;                     // gridDim.x = B·H
  return true;
}

void require_supported(const AttentionShape& s, const char* what) {
  if (!attention_supported(s))
    fail("attention ", what, ": shape not supported by the CUDA kernels (B=", s.batch, " S=", s.seq,
         " H=", s.heads, " Dqk=", s.d_qk, " Dv=", s.d_v, "; need positive sizes, head sizes <= ", kMaxHead,
         ", S <= ", int64_t{kMaxTilesY} * kDkvRows, ")");
}

void check_launched(const AttentionShape& s, const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    fail("attention ", what, " kernel launch failed: ", cudaGetErrorName(e), " (", cudaGetErrorString(e),
         ") for B=", s.batch, " S=", s.seq, " H=", s.heads, " Dqk=", s.d_qk, " Dv=", s.d_v);
}

}  // namespace

bool attention_supported(const AttentionShape& s) {
  if (!shape_ok(s)) return false;
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no stale error for the next launch check; the launch will report it
    return true;
  }
  const int dqk = static_cast<int>(s.d_qk), dv = static_cast<int>(s.d_v);
  const int64_t most =
      4 * std::max({fwd_smem_floats(dqk, dv), dkdv_smem_floats(dqk, dv), dq_smem_floats(dqk, dv)});
  return most <= optin;
}

void launch_attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsViewMut o,
                              float* lse_BHS, bool bf16_operands, cudaStream_t st) {
  require_supported(s, "forward");
  FwdArgs a{q,
            k,
            v,
            o,
            lse_BHS,
            static_cast<int>(s.seq),
            static_cast<int>(s.heads),
            static_cast<int>(s.d_qk),
            static_cast<int>(s.d_v),
            s.scale,
            bf16_operands};
  const dim3 grid(static_cast<unsigned>(s.batch * s.heads),
                  static_cast<unsigned>((s.seq + kFwdRows - 1) / kFwdRows));
  const int64_t bytes = 4 * fwd_smem_floats(a.dqk, a.dv);
  with_groups(s.d_v, [&](auto nv) {
    constexpr int NV = decltype(nv)::value;
    allow_smem(attention_forward_kernel<NV>, bytes, 4 * fwd_smem_floats(kMaxHead, NV * 16), "forward");
    attention_forward_kernel<NV><<<grid, kThreads, bytes, st>>>(a);
  });
  check_launched(s, "forward");
}

int64_t attention_backward_scratch_floats(const AttentionShape& s) {
  return s.batch * s.heads * s.seq;
}

void launch_attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                               const float* lse_BHS, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk,
                               HeadsViewMut dv, bool bf16_operands, float* scratch, cudaStream_t st) {
  require_supported(s, "backward");
  BwdArgs a{q,
            k,
            v,
            o,
            do_,
            dq,
            dk,
            dv,
            lse_BHS,
            scratch,
            static_cast<int>(s.seq),
            static_cast<int>(s.heads),
            static_cast<int>(s.d_qk),
            static_cast<int>(s.d_v),
            s.scale,
            bf16_operands};
  const int64_t rows = s.batch * s.seq * s.heads;
  const int64_t rowdot_blocks = std::min<int64_t>((rows + kWarps - 1) / kWarps, int64_t{1} << 20);
  attention_rowdot_kernel<<<static_cast<unsigned>(rowdot_blocks), kThreads, 0, st>>>(a, rows);
  check_launched(s, "backward (rowdot)");

  const unsigned bh = static_cast<unsigned>(s.batch * s.heads);
  const dim3 grid_kv(bh, static_cast<unsigned>((s.seq + kDkvKeys - 1) / kDkvKeys));
  const int64_t kv_bytes = 4 * dkdv_smem_floats(a.dqk, a.dv);
  with_groups(s.d_qk, [&](auto nqk) {
    with_groups(s.d_v, [&](auto nv) {
      constexpr int NQK = decltype(nqk)::value, NV = decltype(nv)::value;
      allow_smem(attention_dkdv_kernel<NQK, NV>, kv_bytes, 4 * dkdv_smem_floats(NQK * 16, NV * 16),
                 "backward (dk, dv)");
      attention_dkdv_kernel<NQK, NV><<<grid_kv, kThreads, kv_bytes, st>>>(a);
    });
  });
  check_launched(s, "backward (dk, dv)");

  const dim3 grid_q(bh, static_cast<unsigned>((s.seq + kDqRows - 1) / kDqRows));
  const int64_t q_bytes = 4 * dq_smem_floats(a.dqk, a.dv);
  with_groups(s.d_qk, [&](auto nqk) {
    constexpr int NQK = decltype(nqk)::value;
    allow_smem(attention_dq_kernel<NQK>, q_bytes, 4 * dq_smem_floats(NQK * 16, kMaxHead), "backward (dq)");
    attention_dq_kernel<NQK><<<grid_q, kThreads, q_bytes, st>>>(a);
  });
  check_launched(s, "backward (dq)");
}

}  // namespace dsv3::cuda
