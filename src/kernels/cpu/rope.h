// Rotary position embedding with YaRN for the decoupled rope part of MLA (q_pe per head, the shared k_pe),
// following HF transformers 4.57 (modeling_rope_utils._compute_yarn_parameters, DeepseekV3RotaryEmbedding,
// apply_rotary_pos_emb_interleave) step by step in fp32, so the outputs match HF to an ulp or two:
//   inv_freq[i]  = θ^{-2i/dr} blended with θ^{-2i/dr}/factor by the YaRN ramp (fp32, HF's operation order)
//   angle(p, i)  = float(p) · inv_freq[i]                 (fp32 product, as HF's inv_freq @ positions)
//   cos/sin      = cos(angle)·attention_factor, sin(angle)·attention_factor
//   interleave   : x' = [x0, x2, …, x_{dr-2}, x1, x3, …, x_{dr-1}]   (HF rope_interleave=True, the default)
//   y            = x'·cos + rotate_half(x')·sin,  rotate_half(z) = [−z_{dr/2:}, z_{:dr/2}]
// The output is in the de-interleaved layout, as HF leaves it (attention scores do not depend on the layout
// since q and k get the same permutation). The backward is the inverse rotation: dx =
// Perm^{-1}(R(−angle)·dy), i.e. the gradient lands back in the interleaved input layout. Positions are p = t
// mod seq_len (t = b·S + s), the same for every sequence of the batch. Legend: T tokens, H heads, dr rope
// dim, P table positions.
#pragma once
#include <cstdint>
#include <vector>

namespace dsv3 {

// The HF `rope_scaling` block for type "yarn", as the kernel takes it (model/config.h's YarnScaling maps onto
// it field by field). Zero means "key absent" where HF tests truthiness (`x or default`, `if mscale and
// mscale_all_dim`), which treats 0 and absence alike. A non-zero attention_factor overrides the derived
// amplitude (ModelConfig::yarn_attention_factor, which also covers Megatron's rule).
struct YarnParams {
  double factor = 1.0;
  int64_t original_max_position_embeddings = 0;  // 0: use max_position_embeddings
  double beta_fast = 0.0;                        // 0: 32
  double beta_slow = 0.0;                        // 0: 1
  double mscale = 0.0;
  double mscale_all_dim = 0.0;
  double attention_factor = 0.0;  // 0: derived from factor/mscale/mscale_all_dim as HF does
  bool truncate = true;           // floor/ceil the correction range (HF default True)
};

struct RopeFreqs {
  std::vector<float> inv_freq;   // [dr/2]
  float attention_factor = 1.f;  // cos/sin amplitude (HF attention_scaling)
};

// HF's get_mscale / yarn_get_mscale: 0.1·m·ln(scale) + 1 for scale > 1, else 1. MLA's softmax scale is
// qk_head_dim^{-1/2} · yarn_mscale(factor, mscale_all_dim)² when mscale_all_dim is non-zero.
double yarn_mscale(double scale, double mscale = 1.0);

// yarn == nullptr: plain RoPE (HF "default": inv_freq = 1/θ^{2i/dr}, attention_factor 1).
RopeFreqs rope_inv_freq(int64_t dim, double theta, const YarnParams* yarn = nullptr,
                        int64_t max_position_embeddings = 0);

// cos/sin for positions [0, max_pos), half = dr/2 entries per position, amplitude included.
struct RopeTable {
  int64_t max_pos = 0, half = 0;
  std::vector<float> cos_PH, sin_PH;
};
void rope_build_table(const RopeFreqs& f, int64_t max_pos, RopeTable& out);

// The table's arrays wherever they live (host here; a backend's memory once uploaded).
struct RopeTableView {
  const float* cos_PH = nullptr;
  const float* sin_PH = nullptr;
  int64_t max_pos = 0, half = 0;
};
inline RopeTableView view_of(const RopeTable& t) {
  return {t.cos_PH.data(), t.sin_PH.data(), t.max_pos, t.half};
}

// Element (t, h, i) of x lives at x[t*ld_x + h*hs_x + i], i < dr = 2*table.half; likewise y. y may alias x
// (in place, same strides): e.g. q_pe inside q[T, H*192] is (q + 128, ld 192H, hs 192), k_pe is (kv_a + 512,
// ld 576, H = 1).
void rope_forward(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y, int64_t t,
                  int64_t heads, int64_t seq_len, const RopeTable& table, bool interleave = true);
// dx from dy (same addressing); dx may alias dy.
void rope_backward(const float* dy, int64_t ld_dy, int64_t hs_dy, float* dx, int64_t ld_dx, int64_t hs_dx,
                   int64_t t, int64_t heads, int64_t seq_len, const RopeTable& table, bool interleave = true);
void rope_forward(const float* x, int64_t ld_x, int64_t hs_x, float* y, int64_t ld_y, int64_t hs_y, int64_t t,
                  int64_t heads, int64_t seq_len, const RopeTableView& table, bool interleave);
void rope_backward(const float* dy, int64_t ld_dy, int64_t hs_dy, float* dx, int64_t ld_dx, int64_t hs_dx,
                   int64_t t, int64_t heads, int64_t seq_len, const RopeTableView& table, bool interleave);

// Test oracle: contiguous [T, H, dr], angles and trig in double from the fp32 inv_freq; backward = true
// applies the inverse (transposed) map.
void rope_reference(const float* x_THR, float* y_THR, int64_t t, int64_t heads, int64_t seq_len,
                    const RopeFreqs& f, bool interleave, bool backward);

}  // namespace dsv3
