// RoPE/YaRN: frequencies as HF computes them in fp32, a per-position cos/sin table, and the rotation applied
// per (token, head) through a small stack copy so that in-place use and the de-interleave permutation are
// both safe.
#include "kernels/cpu/rope.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace dsv3 {
namespace {

constexpr int64_t kMaxRopeDim = 1024;
constexpr int64_t kParallelMin = 1 << 14;

}  // namespace

double yarn_mscale(double scale, double mscale) {
  return scale <= 1 ? 1.0 : 0.1 * mscale * std::log(scale) + 1.0;
}

RopeFreqs rope_inv_freq(int64_t dim, double theta, const YarnParams* yarn, int64_t max_position_embeddings) {
  DSV3_CHECK(dim > 0 && dim % 2 == 0 && dim <= kMaxRopeDim, "rope: rotary dim must be even and in (0, ",
             kMaxRopeDim, "], got ", dim);
  DSV3_CHECK(theta > 1, "rope: rope_theta must be > 1, got ", theta);
  const int64_t half = dim / 2;
  RopeFreqs out;
  out.inv_freq.resize(half);
  // pos_freqs = base ** (arange(0, dim, 2).float() / dim): exponent rounded to fp32, power rounded to fp32.
  std::vector<float> pos(half);
  for (int64_t i = 0; i < half; ++i) {
    const float e = static_cast<float>(2 * i) / static_cast<float>(dim);
    pos[i] =
        static_cast<float>(std::pow(static_cast<double>(static_cast<float>(theta)), static_cast<double>(e)));
  }
  if (!yarn) {
    for (int64_t i = 0; i < half; ++i) out.inv_freq[i] = 1.f / pos[i];
    return out;
  }
  const YarnParams& y = *yarn;
  DSV3_CHECK(y.factor > 0, "rope: yarn factor must be > 0, got ", y.factor);
  const double factor = y.factor;
  if (y.attention_factor != 0.0)
    out.attention_factor = static_cast<float>(y.attention_factor);
  else if (y.mscale != 0.0 && y.mscale_all_dim != 0.0)
    out.attention_factor =
        static_cast<float>(yarn_mscale(factor, y.mscale) / yarn_mscale(factor, y.mscale_all_dim));
  else
    out.attention_factor = static_cast<float>(yarn_mscale(factor));
  const double beta_fast = y.beta_fast != 0.0 ? y.beta_fast : 32.0;
  const double beta_slow = y.beta_slow != 0.0 ? y.beta_slow : 1.0;
  const int64_t orig =
      y.original_max_position_embeddings ? y.original_max_position_embeddings : max_position_embeddings;
  DSV3_CHECK(orig > 0, "rope: yarn needs original_max_position_embeddings or max_position_embeddings");
  const double pi = 3.14159265358979323846;
  auto corr_dim = [&](double rot) { return dim * std::log(orig / (rot * 2 * pi)) / (2 * std::log(theta)); };
  double low = corr_dim(beta_fast), high = corr_dim(beta_slow);
  if (y.truncate) low = std::floor(low), high = std::ceil(high);
  low = std::max(low, 0.0);
  high = std::min(high, static_cast<double>(dim - 1));
  if (low == high) high += 0.001;  // HF: prevent singularity
  // fp32 from here, as torch does it: (arange(half).float() - low) / (high - low), the scalars cast to fp32.
  const float lowf = static_cast<float>(low), spanf = static_cast<float>(high - low),
              ff = static_cast<float>(factor);
  for (int64_t i = 0; i < half; ++i) {
    const float ramp = std::clamp((static_cast<float>(i) - lowf) / spanf, 0.f, 1.f);
    const float extra = 1.f - ramp;  // inv_freq_extrapolation_factor
    const float inv_extra = 1.f / pos[i];
    const float inv_inter = 1.f / (ff * pos[i]);
    // Two products then a sum, each rounded (volatile stops the compiler contracting them into an FMA).
    volatile float a = inv_inter * (1.f - extra);
    volatile float b = inv_extra * extra;
    out.inv_freq[i] = a + b;
  }
  return out;
}

void rope_build_table(const RopeFreqs& f, int64_t max_pos, RopeTable& out) {
  DSV3_CHECK(max_pos >= 0, "rope: negative table size");
  const int64_t half = static_cast<int64_t>(f.inv_freq.size());
  out.max_pos = max_pos;
  out.half = half;
  out.cos_PH.resize(max_pos * half);
  out.sin_PH.resize(max_pos * half);
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < half; ++i) {
      volatile float angle =
          static_cast<float>(p) * f.inv_freq[i];  // fp32 product, as HF's matmul with K = 1
      const double a = angle;
      out.cos_PH[p * half + i] = static_cast<float>(std::cos(a)) * f.attention_factor;
      out.sin_PH[p * half + i] = static_cast<float>(std::sin(a)) * f.attention_factor;
    }
}

namespace {

// kForward: the rotation; otherwise its transpose (the backward).
template <bool kForward>
void rope_apply(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y, int64_t t,
                int64_t heads, int64_t seq_len, const RopeTableView& tab, bool interleave) {
  const char* what = kForward ? "rope_forward" : "rope_backward";
  const int64_t half = tab.half, dim = 2 * half;
  DSV3_CHECK(half > 0 && dim <= kMaxRopeDim, what, ": empty or oversized table (half=", half, ")");
  DSV3_CHECK(t >= 0 && heads > 0 && seq_len > 0, what, ": bad shape t=", t, " heads=", heads,
             " seq_len=", seq_len);
  DSV3_CHECK(t % seq_len == 0, what, ": token count ", t, " is not a multiple of seq_len ", seq_len);
  DSV3_CHECK(seq_len <= tab.max_pos, what, ": seq_len ", seq_len, " exceeds the cos/sin table (", tab.max_pos,
             " positions)");
#pragma omp parallel for schedule(static) if (t * heads * dim >= kParallelMin)
  for (int64_t i = 0; i < t; ++i) {
    const int64_t p = i % seq_len;
    const float* c = tab.cos_PH + p * half;
    const float* s = tab.sin_PH + p * half;
    float lo[kMaxRopeDim / 2], hi[kMaxRopeDim / 2];
    for (int64_t h = 0; h < heads; ++h) {
      const float* xr = x + i * ld_x + h * hs_x;
      float* yr = y + i * ld_y + h * hs_y;
      if constexpr (kForward) {
        if (interleave) {
          for (int64_t k = 0; k < half; ++k) lo[k] = xr[2 * k], hi[k] = xr[2 * k + 1];
        } else {
          for (int64_t k = 0; k < half; ++k) lo[k] = xr[k], hi[k] = xr[half + k];
        }
        for (int64_t k = 0; k < half; ++k) {
          yr[k] = lo[k] * c[k] + (-hi[k]) * s[k];
          yr[half + k] = hi[k] * c[k] + lo[k] * s[k];
        }
      } else {
        // Transpose of the forward map: R(−angle) on the rotated halves, then undo the permutation.
        for (int64_t k = 0; k < half; ++k) {
          const float a = xr[k], b = xr[half + k];
          lo[k] = a * c[k] + b * s[k];
          hi[k] = b * c[k] - a * s[k];
        }
        if (interleave) {
          for (int64_t k = 0; k < half; ++k) yr[2 * k] = lo[k], yr[2 * k + 1] = hi[k];
        } else {
          for (int64_t k = 0; k < half; ++k) yr[k] = lo[k], yr[half + k] = hi[k];
        }
      }
    }
  }
}

}  // namespace

void rope_forward(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y, int64_t t,
                  int64_t heads, int64_t seq_len, const RopeTableView& table, bool interleave) {
  rope_apply<true>(x, ld_x, hs_x, y, ld_y, hs_y, t, heads, seq_len, table, interleave);
}

void rope_backward(const float* dy, int64_t ld_dy, int64_t hs_dy, float* dx, int64_t ld_dx, int64_t hs_dx,
                   int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& table, bool interleave) {
  rope_apply<false>(dy, ld_dy, hs_dy, dx, ld_dx, hs_dx, t, heads, seq_len, table, interleave);
}

void rope_forward(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y, int64_t t,
                  int64_t heads, int64_t seq_len, const RopeTable& table, bool interleave) {
  rope_apply<true>(x, ld_x, hs_x, y, ld_y, hs_y, t, heads, seq_len, view_of(table), interleave);
}

void rope_backward(const float* dy, int64_t ld_dy, int64_t hs_dy, float* dx, int64_t ld_dx, int64_t hs_dx,
                   int64_t t, int64_t heads, int64_t seq_len, const RopeTable& table, bool interleave) {
  rope_apply<false>(dy, ld_dy, hs_dy, dx, ld_dx, hs_dx, t, heads, seq_len, view_of(table), interleave);
}

void rope_reference(const float* x, float* y, int64_t t, int64_t heads, int64_t seq_len, const RopeFreqs& f,
                    bool interleave, bool backward) {
  const int64_t half = static_cast<int64_t>(f.inv_freq.size()), dim = 2 * half;
  // perm[k] = index in x of the k-th element of the rotated layout.
  std::vector<int64_t> perm(dim);
  for (int64_t k = 0; k < half; ++k) {
    perm[k] = interleave ? 2 * k : k;
    perm[half + k] = interleave ? 2 * k + 1 : half + k;
  }
  for (int64_t i = 0; i < t; ++i) {
    const int64_t p = i % seq_len;
    for (int64_t h = 0; h < heads; ++h) {
      const float* xr = x + (i * heads + h) * dim;
      float* yr = y + (i * heads + h) * dim;
      for (int64_t k = 0; k < half; ++k) {
        const double ang = static_cast<double>(static_cast<float>(p) * f.inv_freq[k]);
        const double c = std::cos(ang) * f.attention_factor, s = std::sin(ang) * f.attention_factor;
        if (!backward) {
          const double a = xr[perm[k]], b = xr[perm[half + k]];
          yr[k] = static_cast<float>(a * c - b * s);
          yr[half + k] = static_cast<float>(b * c + a * s);
        } else {
          const double a = xr[k], b = xr[half + k];
          yr[perm[k]] = static_cast<float>(a * c + b * s);
          yr[perm[half + k]] = static_cast<float>(b * c - a * s);
        }
      }
    }
  }
}

}  // namespace dsv3
