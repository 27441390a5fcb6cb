// Multi-head Latent Attention (DeepSeek-V3 self_attn), forward and backward, computing exactly what HF
// transformers 4.57 `DeepseekV3Attention` computes (spec §2.4–2.5): low-rank q and kv projections with RMSNorm'd
// latents, a decoupled RoPE part shared by all heads for k, causal attention, o_proj.
//
// Legend: T = B·S tokens (t = b·S + s, RoPE position = s), D hidden, H heads, Lq q_lora_rank, Lkv kv_lora_rank,
// dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, Q = dn + dr (the q/k head size), U = dn + dv (kv_b rows
// per head: k_nope | v), A = Lkv + dr (kv_a_proj_with_mqa rows). Each letter means one thing across the model's
// files (the MoE's K is top-k, E experts, L local experts; the cross-entropy's C a vocabulary chunk).
// Per-head layouts are HF's: q_b_proj rows h·Q + [0,dn) are q_nope, + [dn,Q) q_pe; kv_b_proj rows h·U + [0,dn) are
// k_nope, + [dn,U) v. The rope part is rotated HF-style (de-interleave, then rotate_half), so rotated q_pe/k_pe
// are stored in HF's permuted order; scores are identical to the official interleaved form.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/linear.h"
#include "kernels/cpu/rope.h"
#include "parallel/tensor_parallel.h"

namespace dsv3 {

struct MlaDims {
  int64_t D = 0, H = 0;
  int64_t q_lora = 0;  // 0: no query compression (HF q_lora_rank = null) → q_proj
  int64_t kv_lora = 0;
  int64_t dn = 0, dr = 0, dv = 0;
  float norm_eps = 1e-6f;     // q_a_layernorm / kv_a_layernorm eps (HF: always 1e-6)
  float softmax_scale = 0.f;  // qk_head_dim^-0.5 · mscale(factor, mscale_all_dim)²
  RopeFreqs rope;             // inv_freq [dr/2] (YaRN-adjusted) and cos/sin amplitude, from rope_inv_freq
  // Tensor parallelism: H is then this rank's heads (q_b/q_proj and kv_b hold their rows, o_proj their
  // columns). y and dx are then partial sums over the TP ranks (the latents reach only these heads): the caller
  // (the decoder block) reduces them at the edges of its TP region, all-reduced or, with sequence parallelism,
  // reduce-scattered; the replicated latent path's gradient is summed by the trainer (ParamInfo::tp_grad_sum).
  // With sequence parallelism (tp.sp()) x and dx hold this rank's Tl = T/TP positions, as Megatron's MLA takes
  // them: the down-projections (and q_a_layernorm) run on those, and what the heads need of all positions is
  // gathered — the normed q latent (Lq wide) and the kv latent with k_pe (A wide; kv_a_layernorm then runs on
  // all positions), or x itself for q_proj without q_lora — instead of the D-wide input. Their gradients are
  // reduce-scattered back, so dx is then whole for this rank's positions (no reduction left to the caller);
  // y stays partial over the heads of all T positions.
  TensorParallel tp;
  int64_t qk_dim() const { return dn + dr; }
  int64_t kv_b_dim() const { return dn + dv; }
  int64_t kv_a_dim() const { return kv_lora + dr; }
  void validate() const;  // throws dsv3::Error naming the bad field
};

struct MlaParams {
  const float* q_a_proj_w = nullptr;   // [Lq, D]        self_attn.q_a_proj.weight        (q_lora > 0)
  const float* q_a_norm_w = nullptr;   // [Lq]           self_attn.q_a_layernorm.weight   (q_lora > 0)
  const float* q_b_proj_w = nullptr;   // [H·Q, Lq]      self_attn.q_b_proj.weight        (q_lora > 0)
  const float* q_proj_w = nullptr;     // [H·Q, D]       self_attn.q_proj.weight          (q_lora == 0)
  const float* kv_a_proj_w = nullptr;  // [A, D]         self_attn.kv_a_proj_with_mqa.weight
  const float* kv_a_norm_w = nullptr;  // [Lkv]          self_attn.kv_a_layernorm.weight
  const float* kv_b_proj_w = nullptr;  // [H·U, Lkv]     self_attn.kv_b_proj.weight
  const float* o_proj_w = nullptr;     // [D, H·dv]      self_attn.o_proj.weight
  const Bf16Weights* bf16_weights = nullptr;  // bf16 copies of the projections (nullable: convert per GEMM)
};

// Parameter gradients, same shapes as MlaParams; accumulated (+=). Unused ones (by q_lora) may be null.
struct MlaGrads {
  float* q_a_proj_w = nullptr;
  float* q_a_norm_w = nullptr;
  float* q_b_proj_w = nullptr;
  float* q_proj_w = nullptr;
  float* kv_a_proj_w = nullptr;
  float* kv_a_norm_w = nullptr;
  float* kv_b_proj_w = nullptr;
  float* o_proj_w = nullptr;
};

// What forward saves for backward. x_TD is NOT copied: the caller keeps the layer input alive until backward
// (the decoder block holds the normed input anyway).
struct MlaActs {
  int64_t B = 0, S = 0;
  const float* x_TD = nullptr;
  DeviceArray<float> cq_TLq;     // q_a_proj output (pre-norm)
  DeviceArray<float> rstd_q_T;   // q_a_layernorm 1/rms
  DeviceArray<float> cqn_TLq;    // q_a_layernorm output (q_b_proj input)
  DeviceArray<float> q_THQ;      // queries with the rope part rotated (attention input)
  DeviceArray<float> ckv_TA;     // kv_a_proj_with_mqa output: [ckv (Lkv) | k_pe raw (dr)]
  DeviceArray<float> rstd_kv_T;  // kv_a_layernorm 1/rms
  DeviceArray<float> ckvn_TLkv;  // kv_a_layernorm output (kv_b_proj input)
  DeviceArray<float> kv_THU;     // kv_b_proj output: per head [k_nope (dn) | v (dv)]
  DeviceArray<float> k_THQ;      // keys: [k_nope_h | rotated k_pe] (k_pe broadcast over heads)
  DeviceArray<float> o_THV;      // attention output (o_proj input)
  DeviceArray<float> lse_BHS;    // attention logsumexp per row
  // SP: x gathered (q_proj's input without q_lora), and its GEMM operand in bf16 mode. With SP x_TD, cq_TLq and
  // rstd_q_T hold Tl rows; everything else T.
  DeviceArray<float> x_full_TD;
  DeviceArray<bf16> x_full_bf;
  // bf16 mode: the projection inputs as GEMM operands, made once in forward and reused by the weight
  // gradients.
  DeviceArray<bf16> x_bf, cqn_bf, ckvn_bf, o_bf;
};

// Backward temporaries and kernel scratch; grown on first use, reused afterwards.
struct MlaScratch {
  LinearScratch lin;  // (the attention kernel's scratch is the backend's)
  DeviceArray<float> do_THV, dq_THQ, dk_THQ, dkv_THU, dckvn_TLkv, dckv_TA, dcqn_TLq, dcq_TLq;
  // SP: this rank's latents before their gather, and their gradients after the reduce-scatter ([Tl, ·]).
  DeviceArray<float> cqn_local_TLq, ckv_local_TA, dcqn_local_TLq, dckv_local_TA, dx_full_TD, dx_local_TD;
  RopeTable rope_table;  // cos/sin for positions [0, max_pos); rebuilt when S outgrows it or freqs change
  RopeFreqs rope_table_freqs;
  DeviceArray<float> rope_cos_PH, rope_sin_PH;  // the table in the backend's memory (what the kernels read)
};

// y_TD = MLA(x_TD) for B packed sequences of length S. Every kernel runs on `be` (kernels/backend.h), and every
// pointer is memory of `be`.
void mla_forward(Backend& be, const MlaDims& d, const MlaParams& p, const float* x_TD, int64_t B, int64_t S,
                 float* y_TD, MlaActs& acts, MlaScratch& scratch, Precision prec);

// dx_TD is assigned; parameter gradients accumulate into g.
void mla_backward(Backend& be, const MlaDims& d, const MlaParams& p, const MlaActs& acts, const float* dy_TD,
                  float* dx_TD, MlaGrads& g, MlaScratch& scratch, Precision prec);

}  // namespace dsv3
