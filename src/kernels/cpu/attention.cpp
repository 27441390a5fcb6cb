// Tiled causal attention on the CPU. Each tile product is a register-blocked micro-kernel (6 rows × 16 columns,
// GCC vector extensions, so the compiler emits FMAs for whatever -march gives). Small oneDNN calls per tile were
// avoided on purpose: gemm() takes a global lock per call, which serialises the OpenMP threads on 64×64 tiles.
//
// Tile legend: Bq query rows × Bk key columns (both kBlock), Dp = Dqk and Dvp = Dv rounded up to 16 with zero
// padding, so every micro-kernel column count is a multiple of 16 and padded entries contribute exact zeros.
#include "kernels/cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "core/bf16.h"
#include "core/error.h"
#include "kernels/cpu/simd_exp.h"

namespace dsv3 {
namespace {

constexpr int64_t kBlock = 64;
constexpr int kRows = 6;  // micro-kernel rows

using simd::exp8;
using simd::ld;
using simd::st;
using simd::v8;

int64_t round16(int64_t n) { return (n + 15) / 16 * 16; }

// C[R,16] (+)= A[R,k]·B[k,16] with A(i,p) = a[i*ars + p*acs] and B(p,j) = b[p*ldb + j].
template <int R>
inline void panel(const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb, float* c, int64_t ldc,
                  int64_t k, bool accumulate) {
  v8 c0[R], c1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) c0[r] = c1[r] = v8{};
  for (int64_t p = 0; p < k; ++p) {
    const v8 b0 = ld(b + p * ldb), b1 = ld(b + p * ldb + 8);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float av = a[r * ars + p * acs];
      c0[r] += av * b0;
      c1[r] += av * b1;
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    float* cr = c + r * ldc;
    if (accumulate) {
      c0[r] += ld(cr);
      c1[r] += ld(cr + 8);
    }
    st(cr, c0[r]);
    st(cr + 8, c1[r]);
  }
}

// C[m,n] (+)= A[m,k]·B[k,n], n a multiple of 16. A strided (transposed access is acs = lda, ars = 1).
void tile_mm(int64_t m, int64_t n, int64_t k, const float* a, int64_t ars, int64_t acs, const float* b, int64_t ldb,
             float* c, int64_t ldc, bool accumulate) {
  for (int64_t i = 0; i < m; i += kRows) {
    const int64_t r = std::min<int64_t>(kRows, m - i);
    for (int64_t j = 0; j < n; j += 16) {
      const float* ai = a + i * ars;
      float* ci = c + i * ldc + j;
      switch (r) {
        case 6: panel<6>(ai, ars, acs, b + j, ldb, ci, ldc, k, accumulate); break;
        case 5: panel<5>(ai, ars, acs, b + j, ldb, ci, ldc, k, accumulate); break;
        case 4: panel<4>(ai, ars, acs, b + j, ldb, ci, ldc, k, accumulate); break;
        case 3: panel<3>(ai, ars, acs, b + j, ldb, ci, ldc, k, accumulate); break;
        case 2: panel<2>(ai, ars, acs, b + j, ldb, ci, ldc, k, accumulate); break;
        default: panel<1>(ai, ars, acs, b + j, ldb, ci, ldc, k, accumulate); break;
      }
    }
  }
}

// Copies rows [r0, r0+n) of one head into a zero-padded row-major [rows_out, ld] buffer (optionally bf16-rounded).
void pack_rows(const float* src, int64_t ld_token, int64_t n, int64_t d, int64_t rows_out, int64_t ld, bool bf,
               float* dst) {
  for (int64_t r = 0; r < rows_out; ++r) {
    float* o = dst + r * ld;
    if (r < n) {
      const float* s = src + r * ld_token;
      for (int64_t c = 0; c < d; ++c) o[c] = bf ? round_bf16(s[c]) : s[c];
      std::fill(o + d, o + ld, 0.f);
    } else {
      std::fill(o, o + ld, 0.f);
    }
  }
}

// Transposed copy: dst[c, r] for r < n of rows, padded to [dpad, cols_out].
void pack_cols(const float* src, int64_t ld_token, int64_t n, int64_t d, int64_t dpad, int64_t cols_out, bool bf,
               float* dst) {
  std::fill(dst, dst + dpad * cols_out, 0.f);
  for (int64_t r = 0; r < n; ++r) {
    const float* s = src + r * ld_token;
    for (int64_t c = 0; c < d; ++c) dst[c * cols_out + r] = bf ? round_bf16(s[c]) : s[c];
  }
}

void round_inplace(float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = round_bf16(x[i]);
}

void check_shape(const AttentionShape& s) {
  DSV3_CHECK(s.batch > 0 && s.seq > 0 && s.heads > 0 && s.d_qk > 0 && s.d_v > 0,
             "attention: sizes must be positive (B=", s.batch, " S=", s.seq, " H=", s.heads, " Dqk=", s.d_qk,
             " Dv=", s.d_v, ")");
}

template <typename V>
void check_view(const V& v, const AttentionShape& s, int64_t d, const char* name) {
  DSV3_CHECK(v.p != nullptr, "attention: ", name, " is null");
  DSV3_CHECK(v.ld_head >= 0 && v.ld_token >= (s.heads - 1) * v.ld_head + d, "attention: ", name,
             " strides too small (ld_token=", v.ld_token, " ld_head=", v.ld_head, " d=", d, ")");
}

// Below ~1 MFLOP a thread team costs more than it saves (and, on a loaded machine, far more).
bool parallel_worth_it(const AttentionShape& s) {
  return s.batch * s.heads * s.seq * std::min<int64_t>(s.seq, kBlock) * (s.d_qk + s.d_v) >= (int64_t{1} << 20);
}

float* thread_buffer(AttentionScratch& sc, int64_t n) {
  auto& b = sc.thread[omp_get_thread_num()];
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return b.data();
}

}  // namespace

void attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsViewMut o,
                       float* lse_BHS, Precision prec, AttentionScratch& scratch) {
  check_shape(s);
  check_view(q, s, s.d_qk, "q");
  check_view(k, s, s.d_qk, "k");
  check_view(v, s, s.d_v, "v");
  check_view(o, s, s.d_v, "o");
  DSV3_CHECK(lse_BHS != nullptr, "attention: lse is null");
  const int64_t S = s.seq, H = s.heads, Dqk = s.d_qk, Dv = s.d_v;
  const int64_t Dp = round16(Dqk), Dvp = round16(Dv), nb = (S + kBlock - 1) / kBlock;
  const bool bf = prec == Precision::kBF16;
  const int64_t per_thread = kBlock * Dp + Dp * kBlock + kBlock * Dvp + kBlock * kBlock + kBlock * Dvp + 2 * kBlock;
  scratch.thread.resize(std::max<size_t>(scratch.thread.size(), omp_get_max_threads()));
  const float ninf = -std::numeric_limits<float>::infinity();

  // Tasks ordered with the longest (last query blocks) first so dynamic scheduling balances the causal triangle.
  const int64_t ntask = s.batch * H * nb;
#pragma omp parallel for schedule(dynamic, 1) if (parallel_worth_it(s))
  for (int64_t task = 0; task < ntask; ++task) {
    const int64_t qi = nb - 1 - task % nb, bh = task / nb, b = bh / H, h = bh % H;
    float* buf = thread_buffer(scratch, per_thread);
    float *Qt = buf, *Kt = Qt + kBlock * Dp, *Vt = Kt + Dp * kBlock, *Sb = Vt + kBlock * Dvp;
    float *Ob = Sb + kBlock * kBlock, *mrow = Ob + kBlock * Dvp, *lrow = mrow + kBlock;
    const int64_t i0 = qi * kBlock, m = std::min(kBlock, S - i0), tok0 = b * S;
    pack_rows(q.p + (tok0 + i0) * q.ld_token + h * q.ld_head, q.ld_token, m, Dqk, m, Dp, bf, Qt);
    std::fill(Ob, Ob + m * Dvp, 0.f);
    std::fill(mrow, mrow + m, ninf);
    std::fill(lrow, lrow + m, 0.f);
    for (int64_t kj = 0; kj <= qi; ++kj) {
      const int64_t j0 = kj * kBlock, nk = std::min(kBlock, S - j0);
      pack_cols(k.p + (tok0 + j0) * k.ld_token + h * k.ld_head, k.ld_token, nk, Dqk, Dp, kBlock, bf, Kt);
      pack_rows(v.p + (tok0 + j0) * v.ld_token + h * v.ld_head, v.ld_token, nk, Dv, kBlock, Dvp, bf, Vt);
      tile_mm(m, kBlock, Dp, Qt, Dp, 1, Kt, kBlock, Sb, kBlock, false);
      for (int64_t r = 0; r < m; ++r) {
        float* sr = Sb + r * kBlock;
        // Valid keys: j < nk and, on the diagonal block, j0 + j <= i0 + r.
        const int64_t nvalid = kj == qi ? r + 1 : nk;
        float mx = mrow[r];
        for (int64_t j = 0; j < nvalid; ++j) {
          sr[j] *= s.scale;
          mx = std::max(mx, sr[j]);
        }
        for (int64_t j = nvalid; j < kBlock; ++j) sr[j] = ninf;
        const v8 mv = v8{} + mx;
        v8 sum = v8{};
        for (int64_t j = 0; j < kBlock; j += 8) {
          const v8 x = ld(sr + j);
          v8 e = exp8(x - mv);
          e = x == v8{} + ninf ? v8{} : e;
          st(sr + j, e);
          sum += e;
        }
        float l = 0.f;
        for (int c = 0; c < 8; ++c) l += sum[c];
        const float alpha = mrow[r] == ninf ? 0.f : std::exp(mrow[r] - mx);
        lrow[r] = lrow[r] * alpha + l;
        mrow[r] = mx;
        if (alpha != 1.f) {
          float* orow = Ob + r * Dvp;
          for (int64_t c = 0; c < Dvp; ++c) orow[c] *= alpha;
        }
      }
      if (bf) round_inplace(Sb, m * kBlock);
      tile_mm(m, Dvp, kBlock, Sb, kBlock, 1, Vt, Dvp, Ob, Dvp, true);
    }
    for (int64_t r = 0; r < m; ++r) {
      const float inv = 1.f / lrow[r];
      float* orow = o.p + (tok0 + i0 + r) * o.ld_token + h * o.ld_head;
      for (int64_t c = 0; c < Dv; ++c) orow[c] = Ob[r * Dvp + c] * inv;
      lse_BHS[(b * H + h) * S + i0 + r] = mrow[r] + std::log(lrow[r]);
    }
  }
}

void attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                        const float* lse_BHS, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk, HeadsViewMut dv,
                        Precision prec, AttentionScratch& scratch) {
  check_shape(s);
  check_view(q, s, s.d_qk, "q");
  check_view(k, s, s.d_qk, "k");
  check_view(v, s, s.d_v, "v");
  check_view(o, s, s.d_v, "o");
  check_view(do_, s, s.d_v, "do");
  check_view(dq, s, s.d_qk, "dq");
  check_view(dk, s, s.d_qk, "dk");
  check_view(dv, s, s.d_v, "dv");
  DSV3_CHECK(lse_BHS != nullptr, "attention: lse is null");
  const int64_t S = s.seq, H = s.heads, Dqk = s.d_qk, Dv = s.d_v;
  const int64_t Dp = round16(Dqk), Dvp = round16(Dv), nb = (S + kBlock - 1) / kBlock, Sp = nb * kBlock;
  const bool bf = prec == Precision::kBF16;
  // Whole-head packed q, k, dO and the dq accumulator (linear in S), plus per-key-block tiles.
  const int64_t per_thread = 3 * Sp * Dp + Sp * Dvp + Sp + Dp * kBlock + Dvp * kBlock + kBlock * Dp +
                             kBlock * Dvp + 2 * kBlock * kBlock;
  scratch.thread.resize(std::max<size_t>(scratch.thread.size(), omp_get_max_threads()));

  // One task per (batch, head): the key-block loop accumulates dk/dv in registers-sized tiles and dq in a
  // per-head buffer, so no two threads write the same gradient row. Parallelism is B·H (128 heads per sequence
  // for DeepSeek-V3), which is enough for CPU thread counts.
  const int64_t ntask = s.batch * H;
#pragma omp parallel for schedule(dynamic, 1) if (parallel_worth_it(s))
  for (int64_t bh = 0; bh < ntask; ++bh) {
    const int64_t b = bh / H, h = bh % H, tok0 = b * S;
    float* buf = thread_buffer(scratch, per_thread);
    float *Qh = buf, *Kh = Qh + Sp * Dp, *dQh = Kh + Sp * Dp, *dOh = dQh + Sp * Dp, *Drow = dOh + Sp * Dvp;
    float *Kt = Drow + Sp, *Vt = Kt + Dp * kBlock, *dKb = Vt + Dvp * kBlock, *dVb = dKb + kBlock * Dp;
    float *P = dVb + kBlock * Dvp, *dP = P + kBlock * kBlock;
    pack_rows(q.p + tok0 * q.ld_token + h * q.ld_head, q.ld_token, S, Dqk, Sp, Dp, bf, Qh);
    pack_rows(k.p + tok0 * k.ld_token + h * k.ld_head, k.ld_token, S, Dqk, Sp, Dp, bf, Kh);
    // D_i = rowsum(dO ⊙ O) uses the unrounded dO: it is a softmax-backward term, not a matmul operand.
    for (int64_t i = 0; i < S; ++i) {
      const float* dor = do_.p + (tok0 + i) * do_.ld_token + h * do_.ld_head;
      const float* orow = o.p + (tok0 + i) * o.ld_token + h * o.ld_head;
      float acc = 0.f;
      for (int64_t c = 0; c < Dv; ++c) acc += dor[c] * orow[c];
      Drow[i] = acc;
    }
    pack_rows(do_.p + tok0 * do_.ld_token + h * do_.ld_head, do_.ld_token, S, Dv, Sp, Dvp, bf, dOh);
    std::fill(dQh, dQh + Sp * Dp, 0.f);
    const float* lse = lse_BHS + (b * H + h) * S;

    for (int64_t kj = 0; kj < nb; ++kj) {
      const int64_t j0 = kj * kBlock, nk = std::min(kBlock, S - j0);
      pack_cols(Kh + j0 * Dp, Dp, nk, Dp, Dp, kBlock, false, Kt);  // already rounded in Kh
      pack_cols(v.p + (tok0 + j0) * v.ld_token + h * v.ld_head, v.ld_token, nk, Dv, Dvp, kBlock, bf, Vt);
      std::fill(dKb, dKb + kBlock * Dp, 0.f);
      std::fill(dVb, dVb + kBlock * Dvp, 0.f);
      for (int64_t qi = kj; qi < nb; ++qi) {
        const int64_t i0 = qi * kBlock, m = std::min(kBlock, S - i0);
        const float* Qi = Qh + i0 * Dp;
        const float* dOi = dOh + i0 * Dvp;
        tile_mm(m, kBlock, Dp, Qi, Dp, 1, Kt, kBlock, P, kBlock, false);
        tile_mm(m, kBlock, Dvp, dOi, Dvp, 1, Vt, kBlock, dP, kBlock, false);
        for (int64_t r = 0; r < m; ++r) {
          float* pr = P + r * kBlock;
          float* dpr = dP + r * kBlock;
          const int64_t nvalid = kj == qi ? r + 1 : nk;
          const v8 lv = v8{} + lse[i0 + r], dv8 = v8{} + Drow[i0 + r];
          for (int64_t j = 0; j < kBlock; j += 8) {
            const v8 pe = exp8(ld(pr + j) * s.scale - lv);
            st(pr + j, pe);
            st(dpr + j, pe * (ld(dpr + j) - dv8));  // dS / scale
          }
          for (int64_t j = nvalid; j < kBlock; ++j) pr[j] = dpr[j] = 0.f;
        }
        for (int64_t r = m; r < kBlock; ++r) {  // rows past the sequence end contribute nothing
          std::fill(P + r * kBlock, P + (r + 1) * kBlock, 0.f);
          std::fill(dP + r * kBlock, dP + (r + 1) * kBlock, 0.f);
        }
        if (bf) {
          round_inplace(P, m * kBlock);
          round_inplace(dP, m * kBlock);
        }
        tile_mm(kBlock, Dvp, m, P, 1, kBlock, dOi, Dvp, dVb, Dvp, true);      // dV += Pᵀ dO
        tile_mm(kBlock, Dp, m, dP, 1, kBlock, Qi, Dp, dKb, Dp, true);         // dK += dSᵀ Q
        tile_mm(m, Dp, kBlock, dP, kBlock, 1, Kh + j0 * Dp, Dp, dQh + i0 * Dp, Dp, true);  // dQ += dS K
      }
      for (int64_t r = 0; r < nk; ++r) {
        float* dkr = dk.p + (tok0 + j0 + r) * dk.ld_token + h * dk.ld_head;
        float* dvr = dv.p + (tok0 + j0 + r) * dv.ld_token + h * dv.ld_head;
        for (int64_t c = 0; c < Dqk; ++c) dkr[c] = dKb[r * Dp + c] * s.scale;
        for (int64_t c = 0; c < Dv; ++c) dvr[c] = dVb[r * Dvp + c];
      }
    }
    for (int64_t i = 0; i < S; ++i) {
      float* dqr = dq.p + (tok0 + i) * dq.ld_token + h * dq.ld_head;
      for (int64_t c = 0; c < Dqk; ++c) dqr[c] = dQh[i * Dp + c] * s.scale;
    }
  }
}

void attention_forward_reference(const AttentionShape& s, const double* q, const double* k, const double* v,
                                 double* o, double* lse_BHS) {
  const int64_t S = s.seq, H = s.heads, Dqk = s.d_qk, Dv = s.d_v;
  std::vector<double> row(S);
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < S; ++i) {
        const double* qi = q + ((b * S + i) * H + h) * Dqk;
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j <= i; ++j) {
          const double* kj = k + ((b * S + j) * H + h) * Dqk;
          double acc = 0;
          for (int64_t c = 0; c < Dqk; ++c) acc += qi[c] * kj[c];
          row[j] = acc * static_cast<double>(s.scale);
          mx = std::max(mx, row[j]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) sum += (row[j] = std::exp(row[j] - mx));
        double* oi = o + ((b * S + i) * H + h) * Dv;
        for (int64_t c = 0; c < Dv; ++c) oi[c] = 0;
        for (int64_t j = 0; j <= i; ++j) {
          const double* vj = v + ((b * S + j) * H + h) * Dv;
          for (int64_t c = 0; c < Dv; ++c) oi[c] += row[j] / sum * vj[c];
        }
        lse_BHS[(b * H + h) * S + i] = mx + std::log(sum);
      }
}

void attention_backward_reference(const AttentionShape& s, const double* q, const double* k, const double* v,
                                  const double* do_, double* dq, double* dk, double* dv) {
  const int64_t S = s.seq, H = s.heads, Dqk = s.d_qk, Dv = s.d_v;
  const double scale = s.scale;
  std::vector<double> P(S * S), dS(S * S);
  std::fill(dq, dq + s.batch * S * H * Dqk, 0.0);
  std::fill(dk, dk + s.batch * S * H * Dqk, 0.0);
  std::fill(dv, dv + s.batch * S * H * Dv, 0.0);
  auto at = [&](auto* x, int64_t b, int64_t t, int64_t h, int64_t d) { return x + ((b * S + t) * H + h) * d; };
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t i = 0; i < S; ++i) {  // full probability matrix (causal zeros above the diagonal)
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j <= i; ++j) {
          double acc = 0;
          for (int64_t c = 0; c < Dqk; ++c) acc += at(q, b, i, h, Dqk)[c] * at(k, b, j, h, Dqk)[c];
          P[i * S + j] = acc * scale;
          mx = std::max(mx, P[i * S + j]);
        }
        double sum = 0;
        for (int64_t j = 0; j <= i; ++j) sum += (P[i * S + j] = std::exp(P[i * S + j] - mx));
        for (int64_t j = 0; j < S; ++j) P[i * S + j] = j <= i ? P[i * S + j] / sum : 0.0;
      }
      for (int64_t i = 0; i < S; ++i) {
        // dP_ij = dO_i·v_j ; dS_ij = P_ij (dP_ij − Σ_l P_il dP_il)
        double dot = 0;
        for (int64_t j = 0; j <= i; ++j) {
          double acc = 0;
          for (int64_t c = 0; c < Dv; ++c) acc += at(do_, b, i, h, Dv)[c] * at(v, b, j, h, Dv)[c];
          dS[i * S + j] = acc;
          dot += P[i * S + j] * acc;
        }
        for (int64_t j = 0; j <= i; ++j) dS[i * S + j] = P[i * S + j] * (dS[i * S + j] - dot);
      }
      for (int64_t i = 0; i < S; ++i)
        for (int64_t j = 0; j <= i; ++j) {
          for (int64_t c = 0; c < Dv; ++c) at(dv, b, j, h, Dv)[c] += P[i * S + j] * at(do_, b, i, h, Dv)[c];
          for (int64_t c = 0; c < Dqk; ++c) {
            at(dq, b, i, h, Dqk)[c] += scale * dS[i * S + j] * at(k, b, j, h, Dqk)[c];
            at(dk, b, j, h, Dqk)[c] += scale * dS[i * S + j] * at(q, b, i, h, Dqk)[c];
          }
        }
    }
}

}  // namespace dsv3
