// One DeepSeek-V3 decoder layer (pre-norm), forward and backward:
//   h_mid = x + MLA(RMSNorm_in(x));   out = h_mid + FFN(RMSNorm_post(h_mid)),   FFN = dense SwiGLU or MoE.
// The caller owns x (the residual stream) and keeps it alive until backward; everything else the backward needs
// lives in BlockActs. Under tensor parallelism the attention and the dense FFN are TP regions whose edges the
// block owns (tensor_parallel.h); with sequence parallelism x, out and the norms hold this rank's Tl = T/TP
// tokens and each region is entered by an all-gather (MLA gathers its narrower latents itself, mla.h) and left
// by a reduce-scatter.
// Legend: T = B·S tokens, Tl this rank's tokens outside the TP regions (T without SP), D hidden, F dense FFN width.
#pragma once
#include <cstdint>
#include <vector>

#include "model/mla.h"
#include "moe/moe.h"

namespace dsv3 {

struct BlockParams {
  const float* input_norm_w = nullptr;  // input_layernorm.weight [D]
  const float* post_norm_w = nullptr;   // post_attention_layernorm.weight [D]
  MlaParams mla;
  // dense FFN (mlp.{gate,up,down}_proj.weight): [F,D], [F,D], [D,F]
  const float* gate_FD = nullptr;
  const float* up_FD = nullptr;
  const float* down_DF = nullptr;
  MoeParams moe;
  const Bf16Weights* bf16_weights = nullptr;  // bf16 copies for the dense FFN (mla and moe carry their own)
};

struct BlockGrads {
  float* input_norm_w = nullptr;
  float* post_norm_w = nullptr;
  MlaGrads mla;
  float* gate_FD = nullptr;
  float* up_FD = nullptr;
  float* down_DF = nullptr;
  MoeGrads moe;
};

struct BlockDims {
  int64_t D = 0, F = 0;  // F: dense width (unused for MoE blocks); this rank's share under TP
  TensorParallel tp;     // the attention's and the dense FFN's TP regions (and sequence parallelism)
  float norm_eps = 1e-6f;
  bool is_moe = false;
  MlaDims mla;
  MoeConfig moe;
};

struct BlockActs {
  const float* x_TD = nullptr;
  int64_t B = 0, S = 0;
  DeviceArray<float> xn1_TD, rstd1_T, h_mid_TD, xn2_TD, rstd2_T, tmp_TD;  // [Tl, ·]
  DeviceArray<float> xn2_full_TD;  // SP: the dense FFN's normed input gathered (its saved input)
  MlaActs mla;
  MlpActs mlp;  // dense FFN
  MoeActs moe;
};

// Backward temporaries shared by all blocks of a model (one block runs at a time).
struct BlockScratch {
  MlaScratch mla;
  MlpScratch mlp;
  LinearScratch lin;
  DeviceArray<float> dxn_TD, dh_mid_TD, dh_TF;  // dh_TF: free for the caller between blocks
  DeviceArray<float> full_TD, dfull_TD;         // SP: a region's whole-sequence output and input gradient
  MoeScratch moe;
};

void block_forward(Backend& be, const BlockDims& d, const BlockParams& p, const float* x_TD, int64_t B,
                   int64_t S, bool training, float* out_TD, BlockActs& a, BlockScratch& s, Precision prec);
// Kernels run on `be` (the MoE router and token permutation only on the CPU: see moe.cpp). dx_TD is assigned
// (it may not alias dout_TD); parameter gradients accumulate. aux_grad scales the MoE
// sequence aux loss gradient.
void block_backward(Backend& be, const BlockDims& d, const BlockParams& p, BlockActs& a, const float* dout_TD,
                    float aux_grad, float* dx_TD, BlockGrads& g, BlockScratch& s, Precision prec);

}  // namespace dsv3
