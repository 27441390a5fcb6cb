// The whole DeepSeek-V3 model on one rank: embedding → decoder layers → final RMSNorm → output head with
// cross-entropy, plus D multi-token-prediction depths (Megatron-Core semantics, spec §7.4). Owns parameters and
// gradients (ParamStore layout, HF names) and every activation; forward saves what backward needs, or only the
// layer inputs under full-layer recompute (Megatron --recompute-granularity full).
//
// Loss contract (what the trainer scales): forward returns sums; backward(lm, aux, mtp) differentiates
//   lm · Σ_t lm_loss_t + aux · Σ_layers seq_aux_loss + Σ_k mtp_k · Σ_t mtp_loss_{k,t}.
// MTP depth k at position s embeds token s+k and predicts token s+k+1 (labels rolled left by k, the last k
// positions ignored); its hidden input is the previous depth's output, starting from the main model's final-normed
// hidden state, as Megatron's MultiTokenPredictionBlock does.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/cpu/cross_entropy.h"
#include "model/block.h"
#include "model/config.h"
#include "model/param_store.h"
#include "model/param_table.h"

namespace dsv3 {

struct ModelOptions {
  Precision precision = Precision::kF32;
  bool recompute = false;       // full-layer activation recompute
  double capacity_factor = -1;  // < 0: dropless
  DropPolicy drop_policy = DropPolicy::kProbs;
  bool pad_to_capacity = false;
  float seq_aux_coeff = 0.f;  // sequence-wise balance loss coefficient (0: off)
  bool mtp = true;            // run the config's num_nextn_predict_layers depths
  ExpertParallel ep;          // expert parallelism: this rank holds and runs E/EP experts per MoE layer
  PipelineStage stage;        // pipeline parallelism: the layers (and ends) this rank holds and runs
  // The kernels' backend (kernels/backend.h). Parameters and activations are still host vectors, so only a
  // host-memory backend (the CPU one) is accepted for now.
  Backend* backend = &cpu_backend();
};

struct ForwardStats {
  double lm_loss_sum = 0;
  int64_t lm_tokens = 0;
  std::vector<double> mtp_loss_sum;  // per depth
  std::vector<int64_t> mtp_tokens;
  double aux_loss_sum = 0;  // Σ over MoE layers (main and MTP) of the sequence aux loss
  int64_t moe_layers = 0;
  std::vector<std::vector<int64_t>> tokens_per_expert;  // per MoE layer in order (main, then MTP)
  // Per MoE layer in the same order: its sequence aux loss (× coeff), and the routed (token, expert) pairs
  // before and after the capacity rule (equal when dropless), for the health log (train/moe_health.h).
  std::vector<double> layer_aux_loss;
  std::vector<int64_t> routed_pairs, kept_pairs;
};

class Model {
 public:
  Model(const ModelConfig& cfg, const ModelOptions& opt);
  ~Model();

  const ModelConfig& config() const { return cfg_; }
  const ModelOptions& options() const { return opt_; }
  const ParamTable& table() const { return table_; }
  const ParamStore& store() const { return store_; }

  // Megatron-style initialisation from (seed, name, index).
  void init(uint64_t seed);
  // Loads every tensor this rank holds from a safetensors file (HF names). MTP tensors may be absent (HF's
  // DeepseekV3ForCausalLM drops them); then they keep their current values. Shapes must match.
  void load_safetensors(const std::string& path);

  std::vector<float>& params() { return params_; }
  std::vector<float>& grads() { return grads_; }
  float* param(const std::string& name) { return params_.data() + store_.offset(name); }
  float* grad(const std::string& name) { return grads_.data() + store_.offset(name); }
  void zero_grads();

  // ids/labels [B,S] (labels: next token per position, -100 ignored). logits_out (nullable): [B·S, vocab].
  // A pipeline stage without the embedding takes the previous stage's output as stage_input_TD [B·S, D]; one
  // without the head returns empty stats and leaves its output in stage_output().
  ForwardStats forward(const int32_t* ids_BS, const int32_t* labels_BS, int64_t B, int64_t S,
                       bool training = true, float* logits_out = nullptr,
                       const float* stage_input_TD = nullptr);
  // mtp_scales: one per MTP depth (missing entries count as 0). A stage without the head takes the gradient of
  // its output (from the next stage) as doutput_TD; one without the embedding leaves the gradient of its input
  // in stage_input_grad().
  void backward(float lm_scale, float aux_scale, const std::vector<float>& mtp_scales = {},
                const float* doutput_TD = nullptr);
  // One micro-batch's saved forward state. The pipeline schedule keeps several micro-batches in flight: it swaps
  // a micro-batch's set in before its forward or backward and out afterwards (O(1): buffers are exchanged, not
  // copied). MTP depths are not part of it (pipeline stages run without MTP).
  struct Activations {
    int64_t B = 0, S = 0;
    bool training = true;
    std::vector<int32_t> ids, labels;
    std::vector<std::vector<float>> resid;
    std::vector<BlockActs> acts;
    std::vector<float> hf_TD, rstd_f_T, loss_T, lse_T;
  };
  void swap_activations(Activations& a);
  const float* stage_output() const;      // [B·S, D], after forward (not the last stage)
  const float* stage_input_grad() const;  // [B·S, D], after backward (not the first stage)

 private:
  struct Depth;  // one MTP depth's state
  BlockDims block_dims(int64_t layer) const;
  BlockParams block_params(int64_t layer);
  BlockGrads block_grads(int64_t layer);
  Backend& be() const { return *opt_.backend; }
  const bf16* head_bf16();  // lm_head's bf16 copy (nullptr in fp32)
  // Σ loss_T over t tokens (the ignored ones hold 0), summed on the backend in token order; n_valid from the
  // host labels.
  HeadLossResult loss_sum(const float* loss_T, const int32_t* labels_T, int64_t t);
  void run_block(int64_t layer, const float* x, float* out, BlockActs& acts, bool training);
  void head_backward(float lm_scale, float aux_scale, const std::vector<float>& mtp_scales);

  ModelConfig cfg_;
  ModelOptions opt_;
  ParamTable table_;
  ParamStore store_;
  std::vector<float> params_, grads_;
  Bf16Weights
      bf16_weights_;  // bf16 mode: copies of the dense projections and the head, refreshed per forward
  std::vector<BlockDims> dims_;  // per layer incl. MTP

  // activations of the last forward
  int64_t B_ = 0, S_ = 0;
  bool training_ = true;
  std::vector<int32_t> ids_, labels_;
  std::vector<std::vector<float>> resid_;  // layer inputs h_0..h_L, [T,D] each
  std::vector<BlockActs> acts_;            // per main layer (one shared entry under recompute)
  std::vector<float> hf_TD_, rstd_f_T_, loss_T_, lse_T_;
  std::vector<std::unique_ptr<Depth>> depths_;
  BlockScratch scratch_;
  HeadLossScratch head_scratch_;  // forward with logits_out only (the backend keeps its own otherwise)
  DeviceBuffer loss_sum_;         // one double of backend memory
  std::vector<float> dA_TD_, dB_TD_, dhf_TD_;
};

}  // namespace dsv3
