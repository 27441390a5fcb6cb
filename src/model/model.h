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
#include "model/vocab_parallel.h"
#include "parallel/tensor_parallel.h"

namespace dsv3 {

struct ModelOptions {
  Precision precision = Precision::kF32;
  bool recompute = false;       // full-layer activation recompute
  double capacity_factor = -1;  // < 0: dropless
  DropPolicy drop_policy = DropPolicy::kProbs;
  bool pad_to_capacity = false;
  float seq_aux_coeff = 0.f;          // sequence-wise balance loss coefficient (0: off)
  bool force_load_balancing = false;  // benchmarks only: route on fixed random logits (moe.h MoeConfig)
  MoeConfig::ExpertGemm expert_gemm = MoeConfig::ExpertGemm::kAuto;  // moe.h
  bool mtp = true;      // run the config's num_nextn_predict_layers depths
  ExpertParallel ep;    // expert parallelism: this rank holds and runs E/EP experts per MoE layer
  PipelineStage stage;  // pipeline parallelism: the layers (and ends) this rank holds and runs
  // Tensor parallelism (Megatron's layout, param_table.h TpSplit): this rank holds its heads, FFN columns and
  // vocabulary rows; the CPU backend only. With tp.sequence_parallel the residual stream, the norms, the MoE
  // layers and MTP's norms and eh_proj hold only this rank's S/TP positions of each sequence (tensor_parallel.h):
  // the embedding's output is reduce-scattered, the heads' inputs gathered; stage inputs and outputs of a
  // pipeline stage are then [B·S/TP, D].
  TensorParallel tp;
  // Expert tensor parallelism (--expert-tensor-parallel-size = TP > 1): each routed expert's gate/up rows and
  // down columns are split over tp like the dense FFN (moe.h); false: experts whole on every TP rank.
  bool expert_tensor_parallel = false;
  // The kernels' backend (kernels/backend.h): parameters, gradients and activations live in its memory. A device
  // backend runs one rank (no expert parallelism).
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
  // With deferred loss reads (Model::defer_losses): where the loss sums wait in backend memory; lm_loss_sum and
  // mtp_loss_sum are NaN until resolve_losses() fills them.
  int64_t lm_slot = -1;
  std::vector<int64_t> mtp_slots;
};

// "model.layers.{i}." — the HF name prefix of decoder layer i (MTP depths continue the numbering).
inline std::string layer_prefix(int64_t i) {
  return "model.layers." + std::to_string(i) + ".";
}

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

  // The flat parameter and gradient buffers (ParamStore layout) in the backend's memory: host memory on the
  // CPU, where params()[i] and param(name)[i] work; device memory otherwise (params_to_host / params_from_host).
  // bf16 mode keeps bf16 copies of the weights, refreshed by the next forward after params() was asked for (an
  // optimizer step, a checkpoint load), so once per step and not per micro-batch; a caller that writes
  // through param(name) instead calls params_changed().
  DeviceArray<float>& params() { return bf16_stale_ = true, params_; }
  void params_changed() { bf16_stale_ = true; }
  DeviceArray<float>& grads() { return grads_; }
  float* param(const std::string& name) { return params_.data() + store_.offset(name); }
  float* grad(const std::string& name) { return grads_.data() + store_.offset(name); }
  std::vector<float> params_to_host() const { return params_.to_host(); }
  std::vector<float> grads_to_host() const { return grads_.to_host(); }
  void params_from_host(const std::vector<float>& host);  // all of them (size() elements)
  void zero_grads();
  Backend& backend() const { return *opt_.backend; }

  // ids/labels [B,S] host memory (labels: next token per position, -100 ignored). logits_out (nullable, host):
  // [B·S, vocab]. A pipeline stage without the embedding takes the previous stage's output as stage_input_TD
  // [B·S, D] (host memory); one without the head returns empty stats and leaves its output in stage_output().
  ForwardStats forward(const int32_t* ids_BS, const int32_t* labels_BS, int64_t B, int64_t S,
                       bool training = true, float* logits_out = nullptr,
                       const float* stage_input_TD = nullptr);
  // mtp_scales: one per MTP depth (missing entries count as 0). A stage without the head takes the gradient of
  // its output (from the next stage, host memory) as doutput_TD; one without the embedding leaves the gradient
  // of its input in stage_input_grad().
  void backward(float lm_scale, float aux_scale, const std::vector<float>& mtp_scales = {},
                const float* doutput_TD = nullptr);
  // Deferred loss reads: with slots > 0, each forward leaves its loss sums in backend memory (one slot per head,
  // up to `slots` before the next resolve) instead of reading them back, so a step with several micro-batches
  // syncs once for its losses (on a GPU a read is a wait for the stream). resolve_losses reads every pending sum
  // at once into the stats that point at them; slots = 0 reads after each forward (evaluation, tests).
  void defer_losses(int64_t slots);
  void resolve_losses(std::vector<ForwardStats>& stats);
  // One micro-batch's saved forward state. The pipeline schedule keeps several micro-batches in flight: it swaps
  // a micro-batch's set in before its forward or backward and out afterwards (O(1): buffers are exchanged, not
  // copied). MTP depths are not part of it: the last stage, the only one that runs them, holds one micro-batch at a
  // time.
  struct Activations {
    int64_t B = 0, S = 0;
    bool training = true;
    std::vector<int32_t> labels_host;
    DeviceArray<int32_t> ids, labels;
    std::vector<DeviceArray<float>> resid;
    std::vector<BlockActs> acts;
    DeviceArray<float> hf_TD, rstd_f_T, loss_T, lse_T, hf_full_TD;
  };
  void swap_activations(Activations& a);
  // Backend memory: [B·S, D], after forward (not the last stage) / after backward (not the first stage).
  const float* stage_output() const;
  const float* stage_input_grad() const;

 private:
  struct Depth;  // one MTP depth's state (mtp.h)
  BlockDims block_dims(int64_t layer) const;
  BlockParams block_params(int64_t layer);
  BlockGrads block_grads(int64_t layer);
  Backend& be() const { return *opt_.backend; }
  const bf16* head_bf16();  // lm_head's bf16 copy (nullptr in fp32)
  // Σ loss_T over t tokens (the ignored ones hold 0), summed on the backend in token order; n_valid from the
  // host labels.
  HeadLossResult loss_sum(const float* loss_T, const int32_t* host_labels_T, int64_t t, int64_t* slot);
  // The embedding and the head with its cross-entropy, whole or vocab-parallel (model/vocab_parallel.h).
  void embed(const int32_t* ids_T, float* out_TD, int64_t t);
  void embed_backward(const float* dout_TD, const int32_t* ids_T, int64_t t);
  void head_ce_forward(const float* h_TD, const int32_t* labels_T, float* loss_T, float* lse_T, int64_t t);
  // t = B·S tokens; with SP, h_TD is the gathered head input and dh_TD this rank's [t/TP, D] (assigned).
  void head_ce_backward(const float* h_TD, const int32_t* labels_T, const float* lse_T, float scale,
                        float* dh_TD, int64_t t);
  // The head's input: h_local itself, or with SP all of it gathered into h_full.
  const float* gather_for_head(const DeviceArray<float>& h_local, DeviceArray<float>& h_full);
  // The full logits [t, V] into host memory (tests and HF goldens), on any backend.
  void logits_to_host(const float* h_TD, int64_t t, float* logits_host);
  void run_block(int64_t layer, const float* x, float* out, BlockActs& acts, bool training);
  void head_backward(float lm_scale, float aux_scale, const std::vector<float>& mtp_scales);
  // MTP depths (mtp.cpp): forward from the main model's final-normed hidden state h_prev, backward into dhf_TD_.
  void mtp_forward(const int32_t* ids, const int32_t* labels, const float* h_prev, bool training,
                   ForwardStats& st);
  void mtp_backward(float aux_scale, const std::vector<float>& mtp_scales);
  static void collect_moe_stats(const BlockDims& d, const BlockActs& a, ForwardStats& st);

  ModelConfig cfg_;
  ModelOptions opt_;
  ParamTable table_;
  ParamStore store_;
  DeviceArray<float> params_, grads_;
  bool bf16_stale_ = true;  // the bf16 copies may be older than the parameters
  // bf16 mode: copies of the dense projections and the head, and per MoE layer of its local experts, refreshed by
  // the first forward after the parameters changed (once per optimizer step).
  Bf16Weights bf16_weights_;
  std::vector<ExpertBf16> expert_bf16_;  // per layer (incl. MTP); empty for dense layers and other stages
  std::vector<BlockDims> dims_;          // per layer incl. MTP

  // activations of the last forward
  int64_t B_ = 0, S_ = 0;
  bool training_ = true;
  std::vector<int32_t> labels_host_;
  DeviceArray<int32_t> ids_, labels_;
  std::vector<DeviceArray<float>> resid_;  // layer inputs h_0..h_L, [T,D] each
  std::vector<BlockActs> acts_;            // per main layer (one shared entry under recompute)
  DeviceArray<float> hf_TD_, rstd_f_T_, loss_T_, lse_T_;
  DeviceArray<float> hf_full_TD_;  // SP: hf gathered, the head's input (kept for its backward)
  std::vector<std::unique_ptr<Depth>> depths_;
  BlockScratch scratch_;
  DeviceBuffer loss_sum_;         // one double of backend memory
  DeviceArray<double> deferred_;  // deferred loss sums (defer_losses)
  int64_t deferred_slots_ = 0, deferred_used_ = 0;
  DeviceArray<float> dA_TD_, dB_TD_, dhf_TD_, logits_scratch_;
  DeviceArray<float> full_TD_;  // SP: the embedding's whole lookup and the head's input gradient, [B·S, D]
  VocabShard vocab_;            // this rank's rows of the embedding and lm_head
  VocabParallelScratch vp_scratch_;
};

}  // namespace dsv3
