// SwiGLU activation h = silu(a) ⊙ b (a = gate_proj output, b = up_proj output), forward and backward in fp32,
// with an optional per-token scale p_t: h = silu(a) ⊙ b · p_t. The scaled form is how Megatron applies the
// routing probability inside an MoE expert (act(fc1(x)) * prob, before fc2), so the prob receives its
// gradient here:
//   da = dh·p·b·σ(a)·(1 + a·(1 − σ(a))),   db = dh·p·silu(a),   dp_t = Σ_f dh·silu(a)·b      (spec §3.3)
// All gradients are assigned. Gate and up may live in separate [T,F] buffers or in one fused [T,2F] buffer
// with the gate in columns [0,F) and up in [F,2F) (what a stacked [2F, D] gate+up weight produces in one
// GEMM). da/db may alias a/b (each element is read before it is written).
//
// Legend: T tokens, F intermediate (ffn) width.
#pragma once
#include <cstdint>

namespace dsv3 {

// General form: rows of a and b are ld_ab apart, rows of da and db ld_dab apart; h and dh are contiguous
// [T,F]. p_T == nullptr means no scale (then dp_T is ignored and may be null).
void swiglu_forward_general(const float* a, const float* b, int64_t ld_ab, const float* p_T, float* h_TF,
                            int64_t t, int64_t f);
void swiglu_backward_general(const float* dh_TF, const float* a, const float* b, int64_t ld_ab,
                             const float* p_T, float* da, float* db, int64_t ld_dab, float* dp_T, int64_t t,
                             int64_t f);

// Separate buffers.
inline void swiglu_forward(const float* a_TF, const float* b_TF, float* h_TF, int64_t t, int64_t f) {
  swiglu_forward_general(a_TF, b_TF, f, nullptr, h_TF, t, f);
}
inline void swiglu_backward(const float* dh_TF, const float* a_TF, const float* b_TF, float* da_TF,
                            float* db_TF, int64_t t, int64_t f) {
  swiglu_backward_general(dh_TF, a_TF, b_TF, f, nullptr, da_TF, db_TF, f, nullptr, t, f);
}
// Fused [T,2F] buffer, gate first.
inline void swiglu_forward_fused(const float* ab_T2F, float* h_TF, int64_t t, int64_t f) {
  swiglu_forward_general(ab_T2F, ab_T2F + f, 2 * f, nullptr, h_TF, t, f);
}
inline void swiglu_backward_fused(const float* dh_TF, const float* ab_T2F, float* dab_T2F, int64_t t,
                                  int64_t f) {
  swiglu_backward_general(dh_TF, ab_T2F, ab_T2F + f, 2 * f, nullptr, dab_T2F, dab_T2F + f, 2 * f, nullptr, t,
                          f);
}
// Per-token scaled (MoE expert with the routing prob applied before fc2).
inline void swiglu_scaled_forward(const float* a_TF, const float* b_TF, const float* p_T, float* h_TF,
                                  int64_t t, int64_t f) {
  swiglu_forward_general(a_TF, b_TF, f, p_T, h_TF, t, f);
}
inline void swiglu_scaled_backward(const float* dh_TF, const float* a_TF, const float* b_TF, const float* p_T,
                                   float* da_TF, float* db_TF, float* dp_T, int64_t t, int64_t f) {
  swiglu_backward_general(dh_TF, a_TF, b_TF, f, p_T, da_TF, db_TF, f, dp_T, t, f);
}

// Test oracles: plain double loops over separate contiguous buffers (p_T nullable as above).
void swiglu_forward_reference(const float* a_TF, const float* b_TF, const float* p_T, float* h_TF, int64_t t,
                              int64_t f);
void swiglu_backward_reference(const float* dh_TF, const float* a_TF, const float* b_TF, const float* p_T,
                               float* da_TF, float* db_TF, float* dp_T, int64_t t, int64_t f);

}  // namespace dsv3
