// Tiled causal attention on the CPU, flash-attention style: every tile product is one oneDNN GEMM (bf16
// operands with fp32 accumulation on AMX/AVX-512 BF16 in bf16 mode, fp32 otherwise) over blocks of up to 256
// query × 256 key rows, with the online softmax in fp32 between them. One (batch, head) per task, each GEMM
// single-threaded inside the parallel loop (as the MoE experts run); B·H tasks keep the threads busy.
//
// bf16 mode: q, k, v (and dO) are rounded to bf16 once per head, and so are the probabilities (and dS) before
// their products — the same roundings an autocast eager attention makes; softmax statistics stay fp32.
#include "kernels/cpu/attention.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "core/bf16.h"
#include "core/error.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/simd_exp.h"

namespace dsv3 {
namespace {

constexpr int64_t kBlock = 256;

using simd::exp8;
using simd::ld;
using simd::st;
using simd::v8;

int64_t round8(int64_t n) {
  return (n + 7) / 8 * 8;
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
  return s.batch * s.heads * s.seq * std::min<int64_t>(s.seq, kBlock) * (s.d_qk + s.d_v) >=
         (int64_t{1} << 20);
}

// A thread's scratch, carved from its float vector: fp32 pieces first, then bf16 ones. A Carver without base
// pointers only counts: each kernel runs its carving once that way to size the buffers, so the sizes cannot
// drift from the carving.
struct Carver {
  float* f = nullptr;
  bf16* h = nullptr;
  int64_t floats = 0, halves = 0;
  float* take(int64_t n) {
    float* p = f ? f + floats : nullptr;
    floats += round8(n);
    return p;
  }
  bf16* take_bf16(int64_t n) {
    bf16* p = h ? h + halves : nullptr;
    halves += round8(n);
    return p;
  }
};
Carver thread_scratch(AttentionScratch& sc, const Carver& sizes) {
  auto& b = sc.thread[omp_get_thread_num()];
  const int64_t n = sizes.floats + (sizes.halves + 1) / 2 + 16;
  if (static_cast<int64_t>(b.size()) < n) b.resize(n);
  return {b.data(), reinterpret_cast<bf16*>(b.data() + sizes.floats)};
}

// One operand of the tile products: a head's rows either in place (fp32: the strided view itself) or copied
// to a packed bf16 [S, d] buffer (bf16 mode).
struct Operand {
  const void* p;
  int64_t ld;
  const void* row(int64_t r, bool bf) const {
    return bf ? static_cast<const void*>(static_cast<const bf16*>(p) + r * ld)
              : static_cast<const void*>(static_cast<const float*>(p) + r * ld);
  }
};
Operand head_operand(const float* src, int64_t ld_token, int64_t n, int64_t d, bool bf, bf16* buf) {
  if (!bf) return {src, ld_token};
  for (int64_t r = 0; r < n; ++r) to_bf16(src + r * ld_token, buf + r * d, d);
  return {buf, d};
}

// Head h of sequence b (its first token tok0) of a view as an operand (bf16 mode: copied into buf).
Operand head_of(const HeadsView& v, int64_t tok0, int64_t h, int64_t n, int64_t d, bool bf, bf16* buf) {
  return head_operand(v.p + tok0 * v.ld_token + h * v.ld_head, v.ld_token, n, d, bf, buf);
}

// q, k, v and o views and the lse pointer, as both kernels take them.
void check_qkvo(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, const float* o_p,
                int64_t o_ld_token, int64_t o_ld_head, const void* lse) {
  check_shape(s);
  check_view(q, s, s.d_qk, "q");
  check_view(k, s, s.d_qk, "k");
  check_view(v, s, s.d_v, "v");
  check_view(HeadsView{o_p, o_ld_token, o_ld_head}, s, s.d_v, "o");
  DSV3_CHECK(lse != nullptr, "attention: lse is null");
}

// C[m,n] (beta 0: =, 1: +=) op(A)[m,k]·op(B)[k,n] on one thread's operands.
void mm(int64_t m, int64_t n, int64_t k, const void* a, int64_t lda, bool ta, const void* b, int64_t ldb,
        bool tb, float* c, int64_t ldc, float beta, bool bf) {
  GemmArgs g;
  g.m = m, g.n = n, g.k = k, g.a = a, g.lda = lda, g.trans_a = ta, g.b = b, g.ldb = ldb, g.trans_b = tb;
  g.c = c, g.ldc = ldc, g.beta = beta;
  g.ab_type = bf ? GemmType::kBF16 : GemmType::kF32;
  gemm(g);
}

// The probabilities (or dS) as the next product's operand: fp32 in place, or rounded into a bf16 copy.
const void* tile_operand(const float* x, int64_t n, bool bf, bf16* buf) {
  if (!bf) return x;
  to_bf16(x, buf, n);
  return buf;
}

}  // namespace

void attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsViewMut o,
                       float* lse_BHS, Precision prec, AttentionScratch& scratch) {
  check_qkvo(s, q, k, v, o.p, o.ld_token, o.ld_head, lse_BHS);
  const int64_t S = s.seq, H = s.heads, Dqk = s.d_qk, Dv = s.d_v, Bq = std::min(S, kBlock);
  const bool bf = prec == Precision::kBF16;
  const int64_t nkp = round8(Bq);  // score rows padded to whole 8-lane vectors
  struct Buffers {
    float *Sb, *Ob, *mrow, *lrow;
    bf16 *qb, *kb, *vb, *pb;  // bf16 mode only
  };
  auto carve = [&](Carver& c) {
    Buffers b{c.take(Bq * nkp), c.take(Bq * Dv), c.take(Bq), c.take(Bq), nullptr, nullptr, nullptr, nullptr};
    if (bf)
      b.qb = c.take_bf16(S * Dqk), b.kb = c.take_bf16(S * Dqk), b.vb = c.take_bf16(S * Dv),
      b.pb = c.take_bf16(Bq * nkp);
    return b;
  };
  Carver sizes;
  carve(sizes);
  scratch.thread.resize(std::max<size_t>(scratch.thread.size(), omp_get_max_threads()));
  const float ninf = -std::numeric_limits<float>::infinity();

  const int64_t nb = (S + Bq - 1) / Bq, ntask = s.batch * H;
#pragma omp parallel for schedule(dynamic, 1) if (parallel_worth_it(s))
  for (int64_t bh = 0; bh < ntask; ++bh) {
    const int64_t b = bh / H, h = bh % H, tok0 = b * S;
    Carver c = thread_scratch(scratch, sizes);
    const Buffers buf = carve(c);
    float *Sb = buf.Sb, *Ob = buf.Ob, *mrow = buf.mrow, *lrow = buf.lrow;
    const Operand Q = head_of(q, tok0, h, S, Dqk, bf, buf.qb), K = head_of(k, tok0, h, S, Dqk, bf, buf.kb);
    const Operand V = head_of(v, tok0, h, S, Dv, bf, buf.vb);
    bf16* pb = buf.pb;
    for (int64_t qi = 0; qi < nb; ++qi) {
      const int64_t i0 = qi * Bq, m = std::min(Bq, S - i0);
      std::fill(Ob, Ob + m * Dv, 0.f);
      std::fill(mrow, mrow + m, ninf);
      std::fill(lrow, lrow + m, 0.f);
      for (int64_t j0 = 0; j0 < i0 + m; j0 += Bq) {  // key blocks up to the causal diagonal
        const int64_t nk = std::min(Bq, S - j0);
        mm(m, nk, Dqk, Q.row(i0, bf), Q.ld, false, K.row(j0, bf), K.ld, true, Sb, nkp, 0.f, bf);
        for (int64_t r = 0; r < m; ++r) {
          float* sr = Sb + r * nkp;
          // Valid keys of row i0 + r: j0 + j <= i0 + r.
          const int64_t nvalid = std::clamp<int64_t>(i0 + r - j0 + 1, 0, nk);
          v8 mxv = v8{} + mrow[r];
          int64_t j = 0;
          for (; j + 8 <= nvalid; j += 8) {
            const v8 x = ld(sr + j) * s.scale;
            st(sr + j, x);
            mxv = x > mxv ? x : mxv;
          }
          float mx = simd::hmax(mxv);
          for (; j < nvalid; ++j) {
            sr[j] *= s.scale;
            mx = std::max(mx, sr[j]);
          }
          for (j = nvalid; j < nkp; ++j) sr[j] = ninf;
          if (mx == ninf) continue;  // nothing visible yet: the row stays empty
          const v8 mv = v8{} + mx;
          v8 sum = v8{};
          for (int64_t j = 0; j < nkp; j += 8) {
            const v8 x = ld(sr + j);
            v8 e = exp8(x - mv);
            e = x == v8{} + ninf ? v8{} : e;
            st(sr + j, e);
            sum += e;
          }
          const float alpha = mrow[r] == ninf ? 0.f : std::exp(mrow[r] - mx);
          lrow[r] = lrow[r] * alpha + simd::hsum(sum);
          mrow[r] = mx;
          if (alpha != 1.f)
            for (int64_t d = 0; d < Dv; ++d) Ob[r * Dv + d] *= alpha;
        }
        for (int64_t r = 0; r < m; ++r)  // rows with no visible key in this block contribute nothing
          if (i0 + r < j0) std::fill(Sb + r * nkp, Sb + (r + 1) * nkp, 0.f);
        mm(m, Dv, nk, tile_operand(Sb, m * nkp, bf, pb), nkp, false, V.row(j0, bf), V.ld, false, Ob, Dv, 1.f,
           bf);
      }
      for (int64_t r = 0; r < m; ++r) {
        const float inv = 1.f / lrow[r];
        float* orow = o.p + (tok0 + i0 + r) * o.ld_token + h * o.ld_head;
        for (int64_t d = 0; d < Dv; ++d) orow[d] = Ob[r * Dv + d] * inv;
        lse_BHS[(b * H + h) * S + i0 + r] = mrow[r] + std::log(lrow[r]);
      }
    }
  }
}

void attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                        const float* lse_BHS, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk,
                        HeadsViewMut dv, Precision prec, AttentionScratch& scratch) {
  check_qkvo(s, q, k, v, o.p, o.ld_token, o.ld_head, lse_BHS);
  check_view(do_, s, s.d_v, "do");
  check_view(dq, s, s.d_qk, "dq");
  check_view(dk, s, s.d_qk, "dk");
  check_view(dv, s, s.d_v, "dv");
  const int64_t S = s.seq, H = s.heads, Dqk = s.d_qk, Dv = s.d_v, Bq = std::min(S, kBlock);
  const bool bf = prec == Precision::kBF16;
  const int64_t nkp = round8(Bq);
  // fp32: P and dS tiles, the dQ accumulator (linear in S), dK/dV block accumulators, D_i. bf16: the head's
  // q, k, v, dO copies and the P/dS operands.
  struct Buffers {
    float *P, *dS, *dQh, *dKb, *dVb, *Drow;
    bf16 *qb, *kb, *vb, *dob, *pb, *dsb;  // bf16 mode only
  };
  auto carve = [&](Carver& c) {
    Buffers b{c.take(Bq * nkp), c.take(Bq * nkp), c.take(S * Dqk), c.take(Bq * Dqk),
              c.take(Bq * Dv),  c.take(S),        nullptr,         nullptr,
              nullptr,          nullptr,          nullptr,         nullptr};
    if (bf) {
      b.qb = c.take_bf16(S * Dqk), b.kb = c.take_bf16(S * Dqk), b.vb = c.take_bf16(S * Dv);
      b.dob = c.take_bf16(S * Dv), b.pb = c.take_bf16(Bq * nkp), b.dsb = c.take_bf16(Bq * nkp);
    }
    return b;
  };
  Carver sizes;
  carve(sizes);
  scratch.thread.resize(std::max<size_t>(scratch.thread.size(), omp_get_max_threads()));

  // One task per (batch, head): dK/dV accumulate per key block and dQ per head, so no two threads write the
  // same gradient row.
  const int64_t nb = (S + Bq - 1) / Bq, ntask = s.batch * H;
#pragma omp parallel for schedule(dynamic, 1) if (parallel_worth_it(s))
  for (int64_t bh = 0; bh < ntask; ++bh) {
    const int64_t b = bh / H, h = bh % H, tok0 = b * S;
    Carver c = thread_scratch(scratch, sizes);
    const Buffers buf = carve(c);
    float *P = buf.P, *dS = buf.dS, *dQh = buf.dQh, *dKb = buf.dKb, *dVb = buf.dVb, *Drow = buf.Drow;
    const Operand Q = head_of(q, tok0, h, S, Dqk, bf, buf.qb), K = head_of(k, tok0, h, S, Dqk, bf, buf.kb);
    const Operand V = head_of(v, tok0, h, S, Dv, bf, buf.vb), dO = head_of(do_, tok0, h, S, Dv, bf, buf.dob);
    bf16 *pb = buf.pb, *dsb = buf.dsb;
    // D_i = rowsum(dO ⊙ O) uses the unrounded dO: it is a softmax-backward term, not a matmul operand.
    for (int64_t i = 0; i < S; ++i) {
      const float* dor = do_.p + (tok0 + i) * do_.ld_token + h * do_.ld_head;
      const float* orow = o.p + (tok0 + i) * o.ld_token + h * o.ld_head;
      float acc = 0.f;
      for (int64_t d = 0; d < Dv; ++d) acc += dor[d] * orow[d];
      Drow[i] = acc;
    }
    std::fill(dQh, dQh + S * Dqk, 0.f);
    const float* lse = lse_BHS + (b * H + h) * S;

    for (int64_t kj = 0; kj < nb; ++kj) {
      const int64_t j0 = kj * Bq, nk = std::min(Bq, S - j0);
      std::fill(dKb, dKb + nk * Dqk, 0.f);
      std::fill(dVb, dVb + nk * Dv, 0.f);
      for (int64_t i0 = j0; i0 < S; i0 += Bq) {  // query blocks from the diagonal on (blocks are aligned)
        const int64_t m = std::min(Bq, S - i0);
        mm(m, nk, Dqk, Q.row(i0, bf), Q.ld, false, K.row(j0, bf), K.ld, true, P, nkp, 0.f, bf);
        mm(m, nk, Dv, dO.row(i0, bf), dO.ld, false, V.row(j0, bf), V.ld, true, dS, nkp, 0.f, bf);
        for (int64_t r = 0; r < m; ++r) {
          float* pr = P + r * nkp;
          float* dsr = dS + r * nkp;
          const int64_t nvalid = std::clamp<int64_t>(i0 + r - j0 + 1, 0, nk);
          const v8 lv = v8{} + lse[i0 + r], dv8 = v8{} + Drow[i0 + r];
          for (int64_t j = 0; j + 8 <= nvalid; j += 8) {
            const v8 pe = exp8(ld(pr + j) * s.scale - lv);
            st(pr + j, pe);
            st(dsr + j, pe * (ld(dsr + j) - dv8));  // dS / scale
          }
          for (int64_t j = nvalid / 8 * 8; j < nvalid; ++j) {
            const float pe = std::exp(pr[j] * s.scale - lse[i0 + r]);
            pr[j] = pe;
            dsr[j] = pe * (dsr[j] - Drow[i0 + r]);
          }
          std::fill(pr + nvalid, pr + nkp, 0.f);
          std::fill(dsr + nvalid, dsr + nkp, 0.f);
        }
        const void* Pop = tile_operand(P, m * nkp, bf, pb);
        const void* dSop = tile_operand(dS, m * nkp, bf, dsb);
        mm(nk, Dv, m, Pop, nkp, true, dO.row(i0, bf), dO.ld, false, dVb, Dv, 1.f, bf);   // dV += Pᵀ dO
        mm(nk, Dqk, m, dSop, nkp, true, Q.row(i0, bf), Q.ld, false, dKb, Dqk, 1.f, bf);  // dK += dSᵀ Q
        mm(m, Dqk, nk, dSop, nkp, false, K.row(j0, bf), K.ld, false, dQh + i0 * Dqk, Dqk, 1.f,
           bf);  // dQ += dS K
      }
      for (int64_t r = 0; r < nk; ++r) {
        float* dkr = dk.p + (tok0 + j0 + r) * dk.ld_token + h * dk.ld_head;
        float* dvr = dv.p + (tok0 + j0 + r) * dv.ld_token + h * dv.ld_head;
        for (int64_t d = 0; d < Dqk; ++d) dkr[d] = dKb[r * Dqk + d] * s.scale;
        for (int64_t d = 0; d < Dv; ++d) dvr[d] = dVb[r * Dv + d];
      }
    }
    for (int64_t i = 0; i < S; ++i) {
      float* dqr = dq.p + (tok0 + i) * dq.ld_token + h * dq.ld_head;
      for (int64_t d = 0; d < Dqk; ++d) dqr[d] = dQh[i * Dqk + d] * s.scale;
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
  auto at = [&](auto* x, int64_t b, int64_t t, int64_t h, int64_t d) {
    return x + ((b * S + t) * H + h) * d;
  };
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
