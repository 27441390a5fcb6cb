// Causal multi-head attention over packed sequences, forward and backward, flash-attention style: memory is
// linear in the sequence length (only o and the per-row logsumexp are kept; backward recomputes probabilities
// tile by tile), softmax in fp32. MLA uses it with d_qk = nope+rope and d_v != d_qk.
//
// Legend: B batch, S sequence, H heads, Dqk query/key head size, Dv value head size, T = B*S tokens.
// A [B,S,H,D] tensor is given as a strided view: element (b,s,h,d) lives at p[(b*S+s)*ld_token + h*ld_head + d],
// so q, k, v may be slices of wider projection outputs (MLA's q_b_proj and kv_b_proj rows) without copies.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/precision.h"

namespace dsv3 {

struct AttentionShape {
  int64_t batch = 0, seq = 0, heads = 0, d_qk = 0, d_v = 0;
  float scale = 1.f;  // softmax scale applied to q·k
};

struct HeadsView {  // read-only [B,S,H,D]
  const float* p = nullptr;
  int64_t ld_token = 0, ld_head = 0;
};
struct HeadsViewMut {  // written [B,S,H,D]
  float* p = nullptr;
  int64_t ld_token = 0, ld_head = 0;
};

// Per-thread tile buffers; sized on first use, reused afterwards (steady-state calls do not allocate).
struct AttentionScratch {
  std::vector<std::vector<float>> thread;
};

// o = softmax(scale · q kᵀ + causal mask) v; lse_BHS[b,h,s] = logsumexp of the scaled, masked scores (saved for
// backward). Precision::kBF16 rounds the matmul operands (q, k, v and the probabilities) to bf16 and keeps fp32
// accumulation and an fp32 softmax, like an autocast eager attention.
void attention_forward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsViewMut o,
                       float* lse_BHS, Precision p, AttentionScratch& scratch);

// Flash-attention-2 backward (D_i = rowsum(dO ⊙ O)): dq, dk, dv are assigned. o and lse come from the forward.
void attention_backward(const AttentionShape& s, HeadsView q, HeadsView k, HeadsView v, HeadsView o,
                        const float* lse_BHS, HeadsView do_, HeadsViewMut dq, HeadsViewMut dk,
                        HeadsViewMut dv, Precision p, AttentionScratch& scratch);

// Test oracles: full-matrix attention in double on contiguous [B,S,H,D] arrays.
void attention_forward_reference(const AttentionShape& s, const double* q, const double* k, const double* v,
                                 double* o, double* lse_BHS);
void attention_backward_reference(const AttentionShape& s, const double* q, const double* k, const double* v,
                                  const double* do_, double* dq, double* dk, double* dv);

}  // namespace dsv3
