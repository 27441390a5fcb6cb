// Causal flash attention on tensor cores for Precision::kBF16 (kernels.cuh; semantics: cpu/attention.cpp, the
// bf16 rounding contract: the header of attention.cu). Same FlashAttention-2 split as attention.cu, but every tile
// product is WMMA 16×16×16 with bf16 operands and fp32 accumulation. Shapes this path cannot take (head sizes not
// multiples of 16, or a tile set that does not fit in shared memory) stay on attention.cu's fp32-core kernels.
//
// What is rounded to bf16 (round to nearest even, bit for bit core/bf16.h) is exactly what attention.cu's bf16
// mode rounds: q, k, v, dO as they are staged into shared memory, and P (forward: the unnormalised p = exp(s − m);
// backward: P before Pᵀ dO) and dS (before dSᵀ Q and dS K). The softmax statistics (m, l, lse), the scale, D and
// dS = P ⊙ (dP − D) are fp32 from the unrounded values. The products of bf16 values are exact in fp32, so only
// the tensor cores' fp32 accumulation order differs from the fp32-core kernel.
//
// Layout: 128 threads = 4 warps per block; each warp owns 16 rows of the block's 64-row tile (forward and dq:
// query rows; dkdv: key rows), so the softmax and the elementwise dS stage are warp-local (__syncwarp), and only
// the shared K/V (or Q/dO) tile loads need __syncthreads. WMMA does not document which lane holds which
// accumulator element, so fragments go through shared memory (fp32) whenever a row-wise operation (softmax,
// masking, the online rescale of O) touches them; the running accumulators (O, dK, dV, dQ) live in shared
// memory as fp32 and are loaded into a fragment, advanced by a few mma_sync and stored back per 16-column slice.
// That costs shared-memory traffic, not registers, and needs no compile-time head size.
//
//  forward  grid (B·H, ceil(S/64)), one block per 64-query tile, heaviest (last) tiles first. Walks 64-key tiles
//           0 … diagonal: S = Q Kᵀ (per warp 16×64), online softmax on S (two lanes per row, 32 columns each),
//           O = O·alpha + P V. Finally o = O·(1/l), lse = m + log l.
//  backward 1. rowdot: D = rowsum(dO ⊙ O) in fp32 from the unrounded values (one warp per (token, head)).
//           2. dkdv: one block per 64-key tile; walks 32-query tiles from the diagonal to the end; per warp
//              Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (16 keys × 32 queries), P = exp(scale·s − lse), dS = P ⊙ (dP − D),
//              dV += Pᵀ dO, dK += dSᵀ Q; dK·scale at the end.
//           3. dq: one block per 64-query tile; walks 32-key tiles 0 … diagonal; S, dP the same way, dQ += dS K;
//              dQ·scale at the end.
//           Every gradient row is written by exactly one block, the per-element accumulation order is fixed by
//           the loops: no atomics, two runs are bit-identical.
//
// Shared memory (bytes; each piece rounded up to 128 B; bf16 tiles have row stride d+8, fp32 ones n+4, so WMMA's
// leading dimensions are multiples of 8 (bf16) / 4 (fp32), every fragment pointer is 32-byte aligned, and
// consecutive rows move 16 bytes across the banks):
//   forward  Q, K 64×(dqk+8)·2 each, V 64×(dv+8)·2, S 64×68·4, P 64×72·2, O 64×(dv+4)·4, 1/l 64·4
//            MLA 192/128: 126.25 KiB; 128/128: 110.25 KiB; 256/256: 190.25 KiB
//   dkdv     K 64×(dqk+8)·2, V 64×(dv+8)·2, Q 32×(dqk+8)·2, dO 32×(dv+8)·2, Sᵀ, dPᵀ 64×36·4 each, Pᵀ, dSᵀ 64×40·2
//            each, dK 64×(dqk+4)·4, dV 64×(dv+4)·4, lse, D 32·4 each
//            MLA: 173.25 KiB; 128/128: 145.25 KiB; 256/256: 257.25 KiB (too much: such shapes use attention.cu)
//   dq       Q 64×(dqk+8)·2, dO 64×(dv+8)·2, K 32×(dqk+8)·2, V 32×(dv+8)·2, S, dP 64×36·4 each, dS 64×40·2,
//            dQ 64×(dqk+4)·4, lse, D 64·4 each
//            MLA: 135.5 KiB; 128/128: 107.5 KiB; 256/256: 187.5 KiB
// One block per SM at MLA sizes; the 4 warps keep the tensor cores far busier than the fp32-core kernel does.
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "kernels/cuda/cuda_check.cuh"
#include "kernels/cuda/kernels.cuh"

namespace dsv3::cuda {
namespace {

namespace wmma = nvcuda::wmma;
using bf16_t = __nv_bfloat16;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16_t, wmma::row_major>;
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16_t, wmma::row_major>;
// A row-major [n][d] tile read as col_major matrix_b is its transpose [d][n]: Kᵀ, Qᵀ, Vᵀ, dOᵀ without copies.
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16_t, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTile = 64;   // rows per block (forward/dq: queries, dkdv: keys); forward key tile
constexpr int kInner = 32;  // dkdv query tile, dq key tile
constexpr int kMaxHead = 256;
constexpr int kMaxTilesY = 65535;  // gridDim.y limit
constexpr int kLdS = kTile + 4;    // fp32 score tile, 64 columns
constexpr int kLdP = kTile + 8;    // bf16 probability tile, 64 columns
constexpr int kLdSi = kInner + 4;  // fp32 score tile, 32 columns
constexpr int kLdPi = kInner + 8;  // bf16 P/dS tile, 32 columns
static_assert(kTile == kWarps * 16, "each warp owns 16 rows of the block's tile");

// core/bf16.h's to_bf16 bit for bit (NaN kept quiet, ties to even); __float2bfloat16_rn may differ on NaNs.
__device__ __forceinline__ bf16_t to_bf16_rne(float f) {
  const uint32_t u = __float_as_uint(f);
  uint32_t r;
  if ((u & 0x7fffffffu) > 0x7f800000u)
    r = (u | 0x00400000u) >> 16;
  else
    r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return __ushort_as_bfloat16(static_cast<unsigned short>(r));
}

__device__ __forceinline__ const float* head_row(const HeadsView& v, int64_t tok, int h) {
  return v.p + tok * v.ld_token + h * v.ld_head;
}
__device__ __forceinline__ float* head_row(const HeadsViewMut& v, int64_t tok, int h) {
  return v.p + tok * v.ld_token + h * v.ld_head;
}

// rows × d of one head, rounded to bf16, into dst (row stride ld); rows ≥ valid are zero-filled so that masked
// (zero) probabilities never meet garbage (0 · NaN). base is the tile's first row, always a valid one. One warp
// per row, lanes along d: coalesced for any strides.
__device__ void load_tile(bf16_t* dst, int ld, const float* base, int64_t ld_token, int rows, int valid,
                          int d) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int r = warp; r < rows; r += kWarps) {
    bf16_t* drow = dst + r * ld;
    if (r < valid) {
      const float* srow = base + r * ld_token;
      for (int c = lane; c < d; c += 32) drow[c] = to_bf16_rne(srow[c]);
    } else {
      for (int c = lane; c < d; c += 32) drow[c] = __ushort_as_bfloat16(0);
    }
  }
}

__device__ void zero_floats(float* p, int n) {
  for (int i = threadIdx.x; i < n; i += kThreads) p[i] = 0.f;
}

struct FwdArgs {
  HeadsView q, k, v;
  HeadsViewMut o;
  float* lse;
  int S, H, dqk, dv;
  float scale;
};

struct BwdArgs {
  HeadsView q, k, v, o, dO;
  HeadsViewMut dQ, dK, dV;
  const float* lse;
  float* D;  // scratch [B,H,S]
  int S, H, dqk, dv;
  float scale;
};

// Byte offsets of the shared pieces, computed the same way on the host (launch size) and in the kernel.
struct Carver {
  int bytes = 0;
  __host__ __device__ int take(int n) {
    const int at = bytes;
    bytes += (n + 127) / 128 * 128;
    return at;
  }
};

struct FwdLayout {
  int q, k, v, s, p, o, rinv, bytes;
};
__host__ __device__ inline FwdLayout fwd_layout(int dqk, int dv) {
  Carver c;
  FwdLayout L;
  L.q = c.take(kTile * (dqk + 8) * 2);
  L.k = c.take(kTile * (dqk + 8) * 2);
  L.v = c.take(kTile * (dv + 8) * 2);
  L.s = c.take(kTile * kLdS * 4);
  L.p = c.take(kTile * kLdP * 2);
  L.o = c.take(kTile * (dv + 4) * 4);
  L.rinv = c.take(kTile * 4);
  L.bytes = c.bytes;
  return L;
}

struct DkdvLayout {
  int k, v, q, dO, st, dpt, pt, dst, dk, dv, lse, D, bytes;
};
__host__ __device__ inline DkdvLayout dkdv_layout(int dqk, int dv) {
  Carver c;
  DkdvLayout L;
  L.k = c.take(kTile * (dqk + 8) * 2);
  L.v = c.take(kTile * (dv + 8) * 2);
  L.q = c.take(kInner * (dqk + 8) * 2);
  L.dO = c.take(kInner * (dv + 8) * 2);
  L.st = c.take(kTile * kLdSi * 4);
  L.dpt = c.take(kTile * kLdSi * 4);
  L.pt = c.take(kTile * kLdPi * 2);
  L.dst = c.take(kTile * kLdPi * 2);
  L.dk = c.take(kTile * (dqk + 4) * 4);
  L.dv = c.take(kTile * (dv + 4) * 4);
  L.lse = c.take(kInner * 4);
  L.D = c.take(kInner * 4);
  L.bytes = c.bytes;
  return L;
}

struct DqLayout {
  int q, dO, k, v, s, dp, ds, dq, lse, D, bytes;
};
__host__ __device__ inline DqLayout dq_layout(int dqk, int dv) {
  Carver c;
  DqLayout L;
  L.q = c.take(kTile * (dqk + 8) * 2);
  L.dO = c.take(kTile * (dv + 8) * 2);
  L.k = c.take(kInner * (dqk + 8) * 2);
  L.v = c.take(kInner * (dv + 8) * 2);
  L.s = c.take(kTile * kLdSi * 4);
  L.dp = c.take(kTile * kLdSi * 4);
  L.ds = c.take(kTile * kLdPi * 2);
  L.dq = c.take(kTile * (dqk + 4) * 4);
  L.lse = c.take(kTile * 4);
  L.D = c.take(kTile * 4);
  L.bytes = c.bytes;
  return L;
}

__global__ void __launch_bounds__(kThreads) attention_tc_forward_kernel(const FwdArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int S = a.S, dqk = a.dqk, dv = a.dv, ldq = dqk + 8, ldv = dv + 8, ldo = dv + 4;
  const FwdLayout L = fwd_layout(dqk, dv);
  bf16_t* Qs = reinterpret_cast<bf16_t*>(smem + L.q);  // [64][ldq]
  bf16_t* Ks = reinterpret_cast<bf16_t*>(smem + L.k);  // [64][ldq]
  bf16_t* Vs = reinterpret_cast<bf16_t*>(smem + L.v);  // [64][ldv]
  float* Ss = reinterpret_cast<float*>(smem + L.s);    // [64][kLdS]
  bf16_t* Ps = reinterpret_cast<bf16_t*>(smem + L.p);  // [64][kLdP]
  float* Os = reinterpret_cast<float*>(smem + L.o);    // [64][ldo]
  float* rinv = reinterpret_cast<float*>(smem + L.rinv);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kTile;
  const int64_t tok0 = int64_t{b} * S;
  const float ninf = -INFINITY;

  load_tile(Qs, ldq, head_row(a.q, tok0 + q0, h), a.q.ld_token, kTile, min(kTile, S - q0), dqk);
  zero_floats(Os, kTile * ldo);

  // The warp's 16 rows; lanes 2r and 2r+1 own row r of them (columns half, half+2, …), and both keep the same
  // m and l (the pair's max and sum are symmetric, so both lanes get identical bits).
  const bf16_t* Qw = Qs + warp * 16 * ldq;
  float* Sw = Ss + warp * 16 * kLdS;
  bf16_t* Pw = Ps + warp * 16 * kLdP;
  float* Ow = Os + warp * 16 * ldo;
  const int r = lane >> 1, half = lane & 1;
  const int row = q0 + warp * 16 + r;
  float m = ninf, l = 0.f;

  const int key_end = min(q0 + kTile, S);  // keys past the tile's last row are masked for every row
  for (int k0 = 0; k0 < key_end; k0 += kTile) {
    const int nk = min(kTile, S - k0);
    __syncthreads();  // Q and O are initialised; the previous tile's P V has finished reading Ks, Vs
    load_tile(Ks, ldq, head_row(a.k, tok0 + k0, h), a.k.ld_token, kTile, nk, dqk);
    load_tile(Vs, ldv, head_row(a.v, tok0 + k0, h), a.v.ld_token, kTile, nk, dv);
    __syncthreads();

    {  // S = Q Kᵀ for the warp's 16 rows × 64 keys
      FragC acc[kTile / 16];
#pragma unroll
      for (int n = 0; n < kTile / 16; ++n) wmma::fill_fragment(acc[n], 0.f);
      for (int kd = 0; kd < dqk; kd += 16) {
        FragA qa;
        wmma::load_matrix_sync(qa, Qw + kd, ldq);
#pragma unroll
        for (int n = 0; n < kTile / 16; ++n) {
          FragBCol kb;
          wmma::load_matrix_sync(kb, Ks + n * 16 * ldq + kd, ldq);
          wmma::mma_sync(acc[n], qa, kb, acc[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < kTile / 16; ++n)
        wmma::store_matrix_sync(Sw + n * 16, acc[n], kLdS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax of row r over this tile's 64 keys.
    float x[kTile / 2], mt = ninf;
#pragma unroll
    for (int j = 0; j < kTile / 2; ++j) {
      const int c = half + 2 * j, col = k0 + c;
      // The CPU scales the finished fp32 dot product (a separate rounding, no fma with the subtraction).
      x[j] = (col <= row && col < S) ? __fmul_rn(Sw[r * kLdS + c], a.scale) : ninf;
      mt = fmaxf(mt, x[j]);
    }
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    const float mn = fmaxf(m, mt);
    float lt = 0.f, alpha = 1.f;
    // mn = -inf only if nothing is visible yet; a real row always sees key 0 in the first tile, so this only
    // guards against exp(-inf - -inf) = NaN.
    const bool any = mn != ninf;
    if (any) alpha = m == ninf ? 0.f : expf(m - mn);
#pragma unroll
    for (int j = 0; j < kTile / 2; ++j) {
      const float p = (any && x[j] != ninf) ? expf(x[j] - mn) : 0.f;
      lt += p;  // l sums the unrounded p; only the P V operand is rounded (as the CPU)
      Pw[r * kLdP + half + 2 * j] = to_bf16_rne(p);
    }
    lt += __shfl_xor_sync(0xffffffffu, lt, 1);
    l = fmaf(l, alpha, lt);  // explicit, so the rounding does not depend on the compiler's contraction
    m = mn;
    for (int c = half; c < dv; c += 2) Ow[r * ldo + c] *= alpha;
    __syncwarp();  // P and the rescaled O rows are visible to the whole warp before the mma reads them

    // O += P V, one 16-column slice of the warp's O rows at a time.
    for (int n = 0; n < dv; n += 16) {
      FragC acc;
      wmma::load_matrix_sync(acc, Ow + n, ldo, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kTile / 16; ++kk) {
        FragA pa;
        FragBRow vb;
        wmma::load_matrix_sync(pa, Pw + kk * 16, kLdP);
        wmma::load_matrix_sync(vb, Vs + kk * 16 * ldv + n, ldv);
        wmma::mma_sync(acc, pa, vb, acc);
      }
      wmma::store_matrix_sync(Ow + n, acc, ldo, wmma::mem_row_major);
    }
  }

  if (half == 0) {
    rinv[warp * 16 + r] = 1.f / l;  // as the CPU: one reciprocal, then products
    if (row < S) a.lse[int64_t{bh} * S + row] = m + logf(l);
  }
  __syncthreads();  // every warp's O rows and 1/l are complete; the write below crosses warps
  for (int rr = threadIdx.x / 32; rr < kTile; rr += kWarps) {
    if (q0 + rr >= S) break;
    float* orow = head_row(a.o, tok0 + q0 + rr, h);
    const float inv = rinv[rr];
    for (int c = lane; c < dv; c += 32) orow[c] = Os[rr * ldo + c] * inv;
  }
}

// D_i = rowsum(dO ⊙ O) with the unrounded dO: a softmax-backward term, not a matmul operand (as the CPU).
__global__ void __launch_bounds__(256) attention_tc_rowdot_kernel(const BwdArgs a, int64_t rows) {
  const int lane = threadIdx.x % 32;
  // r = token·H + head; r is warp-uniform, so whole warps stay in the loop together and the shuffles are full.
  for (int64_t r = int64_t{blockIdx.x} * 8 + threadIdx.x / 32; r < rows; r += int64_t{gridDim.x} * 8) {
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

// P = exp(scale·s − lse) and dS = P ⊙ (dP − D) for one element; zero where masked (query past S, or key after
// the query; key ≤ query < S also excludes the zero-filled keys past S).
__device__ __forceinline__ void p_ds(float s, float dp, float lse, float D, float scale, bool visible,
                                     float& p, float& ds) {
  p = 0.f, ds = 0.f;
  if (visible) {
    p = expf(__fmul_rn(s, scale) - lse);
    ds = p * (dp - D);  // from the unrounded P, as the CPU
  }
}

__global__ void __launch_bounds__(kThreads) attention_tc_dkdv_kernel(const BwdArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int S = a.S, dqk = a.dqk, dv = a.dv, ldq = dqk + 8, ldv = dv + 8, lddk = dqk + 4, lddv = dv + 4;
  const DkdvLayout L = dkdv_layout(dqk, dv);
  bf16_t* Ks = reinterpret_cast<bf16_t*>(smem + L.k);      // [64 keys][ldq]
  bf16_t* Vs = reinterpret_cast<bf16_t*>(smem + L.v);      // [64 keys][ldv]
  bf16_t* Qs = reinterpret_cast<bf16_t*>(smem + L.q);      // [32 queries][ldq]
  bf16_t* dOs = reinterpret_cast<bf16_t*>(smem + L.dO);    // [32 queries][ldv]
  float* STs = reinterpret_cast<float*>(smem + L.st);      // [64 keys][kLdSi]: Sᵀ
  float* dPTs = reinterpret_cast<float*>(smem + L.dpt);    // [64 keys][kLdSi]: dPᵀ
  bf16_t* PTs = reinterpret_cast<bf16_t*>(smem + L.pt);    // [64 keys][kLdPi]: Pᵀ
  bf16_t* dSTs = reinterpret_cast<bf16_t*>(smem + L.dst);  // [64 keys][kLdPi]: dSᵀ
  float* dKs = reinterpret_cast<float*>(smem + L.dk);      // [64 keys][lddk]
  float* dVs = reinterpret_cast<float*>(smem + L.dv);      // [64 keys][lddv]
  float* lse_s = reinterpret_cast<float*>(smem + L.lse);   // [32]
  float* D_s = reinterpret_cast<float*>(smem + L.D);       // [32]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H;
  const int k0 = blockIdx.y * kTile, nk = min(kTile, S - k0);
  const int64_t tok0 = int64_t{b} * S;
  const float* lse = a.lse + int64_t{bh} * S;
  const float* D = a.D + int64_t{bh} * S;

  load_tile(Ks, ldq, head_row(a.k, tok0 + k0, h), a.k.ld_token, kTile, nk, dqk);
  load_tile(Vs, ldv, head_row(a.v, tok0 + k0, h), a.v.ld_token, kTile, nk, dv);
  zero_floats(dKs, kTile * lddk);
  zero_floats(dVs, kTile * lddv);

  // The warp's 16 keys.
  const bf16_t* Kw = Ks + warp * 16 * ldq;
  const bf16_t* Vw = Vs + warp * 16 * ldv;
  float* STw = STs + warp * 16 * kLdSi;
  float* dPTw = dPTs + warp * 16 * kLdSi;
  bf16_t* PTw = PTs + warp * 16 * kLdPi;
  bf16_t* dSTw = dSTs + warp * 16 * kLdPi;
  float* dKw = dKs + warp * 16 * lddk;
  float* dVw = dVs + warp * 16 * lddv;

  // k0 is a multiple of the query tile, and queries before k0 see none of these keys.
  for (int q0 = k0; q0 < S; q0 += kInner) {
    const int nq = min(kInner, S - q0);
    __syncthreads();  // K, V, dK, dV are initialised; the previous query tile's products are done with Qs, dOs
    load_tile(Qs, ldq, head_row(a.q, tok0 + q0, h), a.q.ld_token, kInner, nq, dqk);
    load_tile(dOs, ldv, head_row(a.dO, tok0 + q0, h), a.dO.ld_token, kInner, nq, dv);
    if (threadIdx.x < kInner) {
      const int i = threadIdx.x;
      lse_s[i] = i < nq ? lse[q0 + i] : 0.f;
      D_s[i] = i < nq ? D[q0 + i] : 0.f;
    }
    __syncthreads();

    {  // Sᵀ = K Qᵀ and dPᵀ = V dOᵀ: the warp's 16 keys × 32 queries
      FragC st[kInner / 16], dpt[kInner / 16];
#pragma unroll
      for (int n = 0; n < kInner / 16; ++n) wmma::fill_fragment(st[n], 0.f), wmma::fill_fragment(dpt[n], 0.f);
      for (int kd = 0; kd < dqk; kd += 16) {
        FragA ka;
        wmma::load_matrix_sync(ka, Kw + kd, ldq);
#pragma unroll
        for (int n = 0; n < kInner / 16; ++n) {
          FragBCol qb;
          wmma::load_matrix_sync(qb, Qs + n * 16 * ldq + kd, ldq);
          wmma::mma_sync(st[n], ka, qb, st[n]);
        }
      }
      for (int kd = 0; kd < dv; kd += 16) {
        FragA va;
        wmma::load_matrix_sync(va, Vw + kd, ldv);
#pragma unroll
        for (int n = 0; n < kInner / 16; ++n) {
          FragBCol ob;
          wmma::load_matrix_sync(ob, dOs + n * 16 * ldv + kd, ldv);
          wmma::mma_sync(dpt[n], va, ob, dpt[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < kInner / 16; ++n) {
        wmma::store_matrix_sync(STw + n * 16, st[n], kLdSi, wmma::mem_row_major);
        wmma::store_matrix_sync(dPTw + n * 16, dpt[n], kLdSi, wmma::mem_row_major);
      }
    }
    __syncwarp();

    // Lane = query column (kInner == 32), one key row per step.
#pragma unroll 4
    for (int r = 0; r < 16; ++r) {
      const int key = k0 + warp * 16 + r, q = q0 + lane;
      float p, ds;
      p_ds(STw[r * kLdSi + lane], dPTw[r * kLdSi + lane], lse_s[lane], D_s[lane], a.scale, q < S && key <= q,
           p, ds);
      PTw[r * kLdPi + lane] = to_bf16_rne(p);
      dSTw[r * kLdPi + lane] = to_bf16_rne(ds);
    }
    __syncwarp();

    // dV += Pᵀ dO and dK += dSᵀ Q, per 16-column slice of the warp's accumulator rows.
    for (int n = 0; n < dv; n += 16) {
      FragC acc;
      wmma::load_matrix_sync(acc, dVw + n, lddv, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kInner / 16; ++kk) {
        FragA pa;
        FragBRow ob;
        wmma::load_matrix_sync(pa, PTw + kk * 16, kLdPi);
        wmma::load_matrix_sync(ob, dOs + kk * 16 * ldv + n, ldv);
        wmma::mma_sync(acc, pa, ob, acc);
      }
      wmma::store_matrix_sync(dVw + n, acc, lddv, wmma::mem_row_major);
    }
    for (int n = 0; n < dqk; n += 16) {
      FragC acc;
      wmma::load_matrix_sync(acc, dKw + n, lddk, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kInner / 16; ++kk) {
        FragA sa;
        FragBRow qb;
        wmma::load_matrix_sync(sa, dSTw + kk * 16, kLdPi);
        wmma::load_matrix_sync(qb, Qs + kk * 16 * ldq + n, ldq);
        wmma::mma_sync(acc, sa, qb, acc);
      }
      wmma::store_matrix_sync(dKw + n, acc, lddk, wmma::mem_row_major);
    }
  }

  __syncthreads();  // all warps' dK, dV rows are complete; the write below crosses warps
  for (int rr = warp; rr < nk; rr += kWarps) {
    float* dkrow = head_row(a.dK, tok0 + k0 + rr, h);
    float* dvrow = head_row(a.dV, tok0 + k0 + rr, h);
    for (int c = lane; c < dqk; c += 32) dkrow[c] = dKs[rr * lddk + c] * a.scale;
    for (int c = lane; c < dv; c += 32) dvrow[c] = dVs[rr * lddv + c];
  }
}

__global__ void __launch_bounds__(kThreads) attention_tc_dq_kernel(const BwdArgs a) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int S = a.S, dqk = a.dqk, dv = a.dv, ldq = dqk + 8, ldv = dv + 8, lddq = dqk + 4;
  const DqLayout L = dq_layout(dqk, dv);
  bf16_t* Qs = reinterpret_cast<bf16_t*>(smem + L.q);     // [64 queries][ldq]
  bf16_t* dOs = reinterpret_cast<bf16_t*>(smem + L.dO);   // [64 queries][ldv]
  bf16_t* Ks = reinterpret_cast<bf16_t*>(smem + L.k);     // [32 keys][ldq]
  bf16_t* Vs = reinterpret_cast<bf16_t*>(smem + L.v);     // [32 keys][ldv]
  float* Ss = reinterpret_cast<float*>(smem + L.s);       // [64][kLdSi]
  float* dPs = reinterpret_cast<float*>(smem + L.dp);     // [64][kLdSi]
  bf16_t* dSs = reinterpret_cast<bf16_t*>(smem + L.ds);   // [64][kLdPi]
  float* dQs = reinterpret_cast<float*>(smem + L.dq);     // [64][lddq]
  float* lse_s = reinterpret_cast<float*>(smem + L.lse);  // [64]
  float* D_s = reinterpret_cast<float*>(smem + L.D);      // [64]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int bh = blockIdx.x, b = bh / a.H, h = bh % a.H;
  const int q0 = (gridDim.y - 1 - blockIdx.y) * kTile;
  const int nq = min(kTile, S - q0);
  const int64_t tok0 = int64_t{b} * S;

  load_tile(Qs, ldq, head_row(a.q, tok0 + q0, h), a.q.ld_token, kTile, nq, dqk);
  load_tile(dOs, ldv, head_row(a.dO, tok0 + q0, h), a.dO.ld_token, kTile, nq, dv);
  if (threadIdx.x < kTile) {
    const int i = threadIdx.x;
    lse_s[i] = i < nq ? a.lse[int64_t{bh} * S + q0 + i] : 0.f;
    D_s[i] = i < nq ? a.D[int64_t{bh} * S + q0 + i] : 0.f;
  }
  zero_floats(dQs, kTile * lddq);

  // The warp's 16 queries.
  const bf16_t* Qw = Qs + warp * 16 * ldq;
  const bf16_t* dOw = dOs + warp * 16 * ldv;
  float* Sw = Ss + warp * 16 * kLdSi;
  float* dPw = dPs + warp * 16 * kLdSi;
  bf16_t* dSw = dSs + warp * 16 * kLdPi;
  float* dQw = dQs + warp * 16 * lddq;

  const int key_end = q0 + nq;  // the tile's last row sees keys up to itself
  for (int k0 = 0; k0 < key_end; k0 += kInner) {
    const int nk = min(kInner, S - k0);
    __syncthreads();  // Q, dO, lse, D, dQ are initialised; the previous key tile's dS K is done with Ks
    load_tile(Ks, ldq, head_row(a.k, tok0 + k0, h), a.k.ld_token, kInner, nk, dqk);
    load_tile(Vs, ldv, head_row(a.v, tok0 + k0, h), a.v.ld_token, kInner, nk, dv);
    __syncthreads();

    {  // S = Q Kᵀ and dP = dO Vᵀ: the warp's 16 queries × 32 keys
      FragC sc[kInner / 16], dp[kInner / 16];
#pragma unroll
      for (int n = 0; n < kInner / 16; ++n) wmma::fill_fragment(sc[n], 0.f), wmma::fill_fragment(dp[n], 0.f);
      for (int kd = 0; kd < dqk; kd += 16) {
        FragA qa;
        wmma::load_matrix_sync(qa, Qw + kd, ldq);
#pragma unroll
        for (int n = 0; n < kInner / 16; ++n) {
          FragBCol kb;
          wmma::load_matrix_sync(kb, Ks + n * 16 * ldq + kd, ldq);
          wmma::mma_sync(sc[n], qa, kb, sc[n]);
        }
      }
      for (int kd = 0; kd < dv; kd += 16) {
        FragA oa;
        wmma::load_matrix_sync(oa, dOw + kd, ldv);
#pragma unroll
        for (int n = 0; n < kInner / 16; ++n) {
          FragBCol vb;
          wmma::load_matrix_sync(vb, Vs + n * 16 * ldv + kd, ldv);
          wmma::mma_sync(dp[n], oa, vb, dp[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < kInner / 16; ++n) {
        wmma::store_matrix_sync(Sw + n * 16, sc[n], kLdSi, wmma::mem_row_major);
        wmma::store_matrix_sync(dPw + n * 16, dp[n], kLdSi, wmma::mem_row_major);
      }
    }
    __syncwarp();

    // Lane = key column (kInner == 32), one query row per step.
#pragma unroll 4
    for (int r = 0; r < 16; ++r) {
      const int qr = warp * 16 + r, q = q0 + qr, key = k0 + lane;
      float p, ds;
      p_ds(Sw[r * kLdSi + lane], dPw[r * kLdSi + lane], lse_s[qr], D_s[qr], a.scale, q < S && key <= q, p,
           ds);
      dSw[r * kLdPi + lane] = to_bf16_rne(ds);
    }
    __syncwarp();

    // dQ += dS K, per 16-column slice of the warp's dQ rows.
    for (int n = 0; n < dqk; n += 16) {
      FragC acc;
      wmma::load_matrix_sync(acc, dQw + n, lddq, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kInner / 16; ++kk) {
        FragA sa;
        FragBRow kb;
        wmma::load_matrix_sync(sa, dSw + kk * 16, kLdPi);
        wmma::load_matrix_sync(kb, Ks + kk * 16 * ldq + n, ldq);
        wmma::mma_sync(acc, sa, kb, acc);
      }
      wmma::store_matrix_sync(dQw + n, acc, lddq, wmma::mem_row_major);
    }
  }

  __syncthreads();  // all warps' dQ rows are complete; the write below crosses warps
  for (int rr = warp; rr < nq; rr += kWarps) {
    float* dqrow = head_row(a.dQ, tok0 + q0 + rr, h);
    for (int c = lane; c < dqk; c += 32) dqrow[c] = dQs[rr * lddq + c] * a.scale;
  }
}

static_assert(kInner == 32, "the elementwise dS stages map one lane to one column of a 32-wide tile");

int device_smem_optin() {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) {
    (void)cudaGetLastError();  // leave no stale error for the next launch check
    return -1;
  }
  return optin;
}

int most_smem(int dqk, int dv) {
  return std::max({fwd_layout(dqk, dv).bytes, dkdv_layout(dqk, dv).bytes, dq_layout(dqk, dv).bytes});
}

// Opts the kernel into the device's whole opt-in shared memory: a value fixed per device, so concurrent callers
// never lower each other's limit (and the launch's own size decides occupancy, not this).
template <typename Kernel>
void allow_smem(Kernel* kernel, int need_bytes, const char* what) {
  if (need_bytes <= 48 * 1024) return;
  const int optin = device_smem_optin();
  if (need_bytes > optin)
    fail("attention (tensor cores) ", what, ": needs ", need_bytes,
         " bytes of shared memory per block, the device allows ", optin);
  check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin), what);
}

void require_supported(const AttentionShape& s, const char* what) {
  if (!attention_tc_supported(s))
    fail("attention (tensor cores) ", what, ": shape not supported (B=", s.batch, " S=", s.seq,
         " H=", s.heads, " Dqk=", s.d_qk, " Dv=", s.d_v, "; need head sizes that are multiples of 16 up to ",
         kMaxHead, ", S <= ", int64_t{kMaxTilesY} * kTile, ", and tiles that fit in shared memory)");
}

void check_launched(const AttentionShape& s, const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess)
    fail("attention (tensor cores) ", what, " kernel launch failed: ", cudaGetErrorName(e), " (",
         cudaGetErrorString(e), ") for B=", s.batch, " S=", s.seq, " H=", s.heads, " Dqk=", s.d_qk,
         " Dv=", s.d_v);
}

}  // namespace

namespace {
// DSV3_ATTENTION, read once: the switch chooses the kernel for the whole process (so forward and backward always
// agree). 0: tensor cores (the default for bf16), 1: CUDA cores, 2: cuDNN.
int attention_choice() {
  static const int choice = [] {
    const char* e = std::getenv("DSV3_ATTENTION");
    if (e == nullptr || *e == '\0' || std::strcmp(e, "tensor-cores") == 0) return 0;
    if (std::strcmp(e, "cuda-cores") == 0) return 1;
    if (std::strcmp(e, "cudnn") == 0) return 2;
    fail("DSV3_ATTENTION=", e, ": expected tensor-cores (the default for bf16), cuda-cores or cudnn");
  }();
  return choice;
}
}  // namespace

bool attention_tc_enabled() {
  return attention_choice() == 0;
}
bool attention_cudnn_requested() {
  return attention_choice() == 2;
}

bool attention_tc_supported(const AttentionShape& s) {
  if (s.batch <= 0 || s.seq <= 0 || s.heads <= 0 || s.d_qk <= 0 || s.d_v <= 0) return false;
  if (s.d_qk % 16 != 0 || s.d_v % 16 != 0 || s.d_qk > kMaxHead || s.d_v > kMaxHead) return false;
  if ((s.seq + kTile - 1) / kTile > kMaxTilesY) return false;
  if (s.batch > INT_MAX / s.heads) return false;  // gridDim.x = B·H
  const int optin = device_smem_optin();
  return optin > 0 && most_smem(static_cast<int>(s.d_qk), static_cast<int>(s.d_v)) <= optin;
}

void launch_attention_tc_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v,
                                 HeadsViewMut o, float* lse_BHS, cudaStream_t st) {
  require_supported(s, "forward");
  const FwdArgs a{q,
                  k,
                  v,
                  o,
                  lse_BHS,
                  static_cast<int>(s.seq),
                  static_cast<int>(s.heads),
                  static_cast<int>(s.d_qk),
                  static_cast<int>(s.d_v),
                  s.scale};
  const dim3 grid(static_cast<unsigned>(s.batch * s.heads),
                  static_cast<unsigned>((s.seq + kTile - 1) / kTile));
  const int bytes = fwd_layout(a.dqk, a.dv).bytes;
  allow_smem(attention_tc_forward_kernel, bytes, "forward");
  attention_tc_forward_kernel<<<grid, kThreads, bytes, st>>>(a);
  check_launched(s, "forward");
}

void launch_attention_tc_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                                  const float* lse_BHS, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk,
                                  HeadsViewMut dv, float* scratch, cudaStream_t st) {
  require_supported(s, "backward");
  const BwdArgs a{q,
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
                  s.scale};
  const int64_t rows = s.batch * s.seq * s.heads;
  const int64_t rowdot_blocks = std::min<int64_t>((rows + 7) / 8, int64_t{1} << 20);
  attention_tc_rowdot_kernel<<<static_cast<unsigned>(rowdot_blocks), 256, 0, st>>>(a, rows);
  check_launched(s, "backward (rowdot)");

  const unsigned bh = static_cast<unsigned>(s.batch * s.heads);
  const dim3 grid(bh, static_cast<unsigned>((s.seq + kTile - 1) / kTile));
  const int kv_bytes = dkdv_layout(a.dqk, a.dv).bytes;
  allow_smem(attention_tc_dkdv_kernel, kv_bytes, "backward (dk, dv)");
  attention_tc_dkdv_kernel<<<grid, kThreads, kv_bytes, st>>>(a);
  check_launched(s, "backward (dk, dv)");

  const int q_bytes = dq_layout(a.dqk, a.dv).bytes;
  allow_smem(attention_tc_dq_kernel, q_bytes, "backward (dq)");
  attention_tc_dq_kernel<<<grid, kThreads, q_bytes, st>>>(a);
  check_launched(s, "backward (dq)");
}

}  // namespace dsv3::cuda
