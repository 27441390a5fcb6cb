// Chunked head + cross-entropy: GEMMs through gemm() (bf16 copies of h made once per call, of W per chunk),
// the softmax bookkeeping in parallel over tokens.
#include "kernels/cpu/cross_entropy.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/grow.h"
#include "kernels/cpu/gemm.h"
#include "kernels/cpu/simd_exp.h"

namespace dsv3 {
namespace {

constexpr int64_t kAutoChunkElems = int64_t{1} << 23;  // 32 MiB of fp32 logits per chunk
constexpr int64_t kParallelMin = 1 << 14;

void check_args(const int32_t* labels, int64_t t, int64_t d, int64_t v, const char* what) {
  DSV3_CHECK(t >= 0 && d > 0 && v > 0, what, ": bad shape t=", t, " d=", d, " v=", v);
  for (int64_t i = 0; i < t; ++i)
    DSV3_CHECK(labels[i] == kIgnoreLabel || (labels[i] >= 0 && labels[i] < v), what, ": label ", labels[i],
               " at token ", i, " is outside the vocabulary [0, ", v, ") and is not the ignore index -100");
}

int64_t pick_chunk(int64_t chunk_v, int64_t t, int64_t v) {
  if (chunk_v <= 0) chunk_v = std::max<int64_t>(256, kAutoChunkElems / std::max<int64_t>(t, 1));
  return std::min(chunk_v, v);
}

// Operand for gemm: the fp32 data itself, or its bf16 copy in buf.
const void* operand(const float* x, int64_t n, Precision p, std::vector<bf16>& buf) {
  if (p == Precision::kF32) return x;
  to_bf16(x, grow(buf, n), n);
  return buf.data();
}

GemmType gemm_type(Precision p) {
  return p == Precision::kF32 ? GemmType::kF32 : GemmType::kBF16;
}

// logits[T, c] (row stride ldc) = h · W[j0 : j0 + c]^T.
// W rows [j0, j0 + c) as a GEMM operand: fp32 W, the caller's bf16 copy, or converted into s.w_bf.
const void* w_chunk(const float* w_VD, const bf16* w_bf_VD, int64_t j0, int64_t c, int64_t d, Precision p,
                    HeadLossScratch& s) {
  if (p == Precision::kBF16 && w_bf_VD) return w_bf_VD + j0 * d;
  return operand(w_VD + j0 * d, c * d, p, s.w_bf);
}

void chunk_logits(const void* h_op, const void* w_op, int64_t c, float* logits, int64_t ldc, int64_t t,
                  int64_t d, Precision p) {
  GemmArgs g;
  g.m = t, g.n = c, g.k = d;
  g.a = h_op, g.lda = d;
  g.b = w_op, g.ldb = d, g.trans_b = true;
  g.c = logits, g.ldc = ldc, g.ab_type = gemm_type(p);
  gemm(g);
}

}  // namespace

HeadLossResult head_cross_entropy_forward(const float* h, const float* w, const int32_t* labels, float* loss,
                                          float* lse, int64_t t, int64_t d, int64_t v, Precision p,
                                          HeadLossScratch& s, int64_t chunk_v, float* logits_TV,
                                          const bf16* w_bf) {
  check_args(labels, t, d, v, "head_cross_entropy_forward");
  HeadLossResult res;
  if (t == 0) return res;
  const int64_t cv = pick_chunk(chunk_v, t, v);
  const void* h_op = operand(h, t * d, p, s.h_bf);
  float* mx = grow(s.max_T, t);
  float* sm = grow(s.sum_T, t);
  float* lab = grow(s.label_logit_T, t);
  std::fill(mx, mx + t, -std::numeric_limits<float>::infinity());
  std::fill(sm, sm + t, 0.f);
  std::fill(lab, lab + t, 0.f);
  float* buf = logits_TV ? nullptr : grow(s.logits_TC, t * cv);
  for (int64_t j0 = 0; j0 < v; j0 += cv) {
    const int64_t c = std::min(cv, v - j0);
    // With logits_TV the GEMM writes straight into the requested output; it doubles as the chunk buffer.
    float* lg = logits_TV ? logits_TV + j0 : buf;
    const int64_t ld = logits_TV ? v : c;
    chunk_logits(h_op, w_chunk(w, w_bf, j0, c, d, p, s), c, lg, ld, t, d, p);
#pragma omp parallel for schedule(static) if (t * c >= kParallelMin)
    for (int64_t i = 0; i < t; ++i) {
      using simd::v8;
      const float* row = lg + i * ld;
      const int64_t c8 = c / 8 * 8;
      float cm = row[0];
      if (c8 > 0) {
        v8 vm = simd::ld(row);
        for (int64_t j = 8; j < c8; j += 8) {
          const v8 x = simd::ld(row + j);
          vm = x > vm ? x : vm;
        }
        cm = simd::hmax(vm);
      }
      for (int64_t j = c8; j < c; ++j) cm = std::max(cm, row[j]);
      const float m = std::max(mx[i], cm);
      v8 vacc = v8{};
      for (int64_t j = 0; j < c8; j += 8) vacc += simd::exp8(simd::ld(row + j) - m);
      float acc = simd::hsum(vacc);
      for (int64_t j = c8; j < c; ++j) acc += std::exp(row[j] - m);
      sm[i] = sm[i] * std::exp(mx[i] - m) + acc;  // exp(-inf) = 0 on the first chunk
      mx[i] = m;
      const int32_t y = labels[i];
      if (y >= j0 && y < j0 + c) lab[i] = row[y - j0];
    }
  }
  for (int64_t i = 0; i < t; ++i) {
    lse[i] = mx[i] + std::log(sm[i]);
    if (labels[i] == kIgnoreLabel) {
      loss[i] = 0.f;
    } else {
      loss[i] = lse[i] - lab[i];
      res.loss_sum += loss[i];
      ++res.n_valid;
    }
  }
  return res;
}

void head_cross_entropy_backward(const float* h, const float* w, const int32_t* labels, const float* lse,
                                 float dloss, const float* dloss_T, float* dh, float* dw, int64_t t,
                                 int64_t d, int64_t v, Precision p, HeadLossScratch& s, int64_t chunk_v,
                                 const bf16* w_bf) {
  check_args(labels, t, d, v, "head_cross_entropy_backward");
  if (t == 0) return;
  const int64_t cv = pick_chunk(chunk_v, t, v);
  const void* h_op = operand(h, t * d, p, s.h_bf);
  float* buf = grow(s.logits_TC, t * cv);
  for (int64_t j0 = 0; j0 < v; j0 += cv) {
    const int64_t c = std::min(cv, v - j0);
    const void* w_op = w_chunk(w, w_bf, j0, c, d, p, s);  // also the dh GEMM's operand below
    chunk_logits(h_op, w_op, c, buf, c, t, d, p);
    // bf16 mode: each dlogits row is rounded to bf16 while it is still in cache (the GEMM operand below).
    bf16* d_bf = p == Precision::kBF16 ? grow(s.d_bf, t * c) : nullptr;
#pragma omp parallel for schedule(static) if (t * c >= kParallelMin)
    for (int64_t i = 0; i < t; ++i) {
      float* row = buf + i * c;
      const int32_t y = labels[i];
      if (y == kIgnoreLabel) {
        std::fill(row, row + c, 0.f);
        if (d_bf) std::fill(d_bf + i * c, d_bf + (i + 1) * c, bf16{0});
        continue;
      }
      const float g = dloss * (dloss_T ? dloss_T[i] : 1.f), l = lse[i];
      const int64_t c8 = c / 8 * 8;
      for (int64_t j = 0; j < c8; j += 8) simd::st(row + j, g * simd::exp8(simd::ld(row + j) - l));
      for (int64_t j = c8; j < c; ++j) row[j] = g * std::exp(row[j] - l);
      if (y >= j0 && y < j0 + c) row[y - j0] -= g;
      if (d_bf) to_bf16(row, d_bf + i * c, c);
    }
    const void* d_op = d_bf ? static_cast<const void*>(d_bf) : buf;
    GemmArgs gh;  // dh[T, D] (+)= dlogits[T, c] · W_chunk[c, D]
    gh.m = t, gh.n = d, gh.k = c;
    gh.a = d_op, gh.lda = c;
    gh.b = w_op, gh.ldb = d;
    gh.c = dh, gh.ldc = d, gh.ab_type = gemm_type(p), gh.beta = j0 == 0 ? 0.f : 1.f;
    gemm(gh);
    GemmArgs gw;  // dW_chunk[c, D] += dlogits^T · h
    gw.m = c, gw.n = d, gw.k = t;
    gw.a = d_op, gw.lda = c, gw.trans_a = true;
    gw.b = h_op, gw.ldb = d;
    gw.c = dw + j0 * d, gw.ldc = d, gw.ab_type = gemm_type(p), gw.beta = 1.f;
    gemm(gw);
  }
}

HeadLossResult head_cross_entropy_reference(const float* h, const float* w, const int32_t* labels,
                                            float* loss, float* logits_TV, float dloss, const float* dloss_T,
                                            float* dh, float* dw, int64_t t, int64_t d, int64_t v) {
  check_args(labels, t, d, v, "head_cross_entropy_reference");
  HeadLossResult res;
  std::vector<double> lg(v), dh_acc(d);
  for (int64_t i = 0; i < t; ++i) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t j = 0; j < v; ++j) {
      double acc = 0;
      for (int64_t k = 0; k < d; ++k) acc += static_cast<double>(h[i * d + k]) * w[j * d + k];
      lg[j] = acc;
      m = std::max(m, acc);
      if (logits_TV) logits_TV[i * v + j] = static_cast<float>(acc);
    }
    double se = 0;
    for (int64_t j = 0; j < v; ++j) se += std::exp(lg[j] - m);
    const double lse = m + std::log(se);
    const int32_t y = labels[i];
    std::fill(dh_acc.begin(), dh_acc.end(), 0.0);
    if (y != kIgnoreLabel) {
      loss[i] = static_cast<float>(lse - lg[y]);
      res.loss_sum += lse - lg[y];
      ++res.n_valid;
      const double g = static_cast<double>(dloss) * (dloss_T ? dloss_T[i] : 1.f);
      for (int64_t j = 0; j < v; ++j) {
        const double dl = g * (std::exp(lg[j] - lse) - (j == y ? 1.0 : 0.0));
        for (int64_t k = 0; k < d; ++k) {
          dh_acc[k] += dl * w[j * d + k];
          dw[j * d + k] += static_cast<float>(dl * h[i * d + k]);
        }
      }
    } else {
      loss[i] = 0.f;
    }
    for (int64_t k = 0; k < d; ++k) dh[i * d + k] = static_cast<float>(dh_acc[k]);
  }
  return res;
}

}  // namespace dsv3
