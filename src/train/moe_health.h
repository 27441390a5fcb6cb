// MoE health in the logs (what a user needs to see a dying or a hot expert the interval it happens, before the
// loss shows it): per MoE layer and iteration, the max/mean expert load, the experts that received no token, the
// fraction of routed (token, expert) pairs dropped by the capacity rule, the sequence aux loss and the spread of
// the expert bias; the worst value of each over the log interval goes to TensorBoard (`moe/<metric>_layer_<i>`,
// Megatron's per-layer naming) and one compact line goes to the text log.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace dsv3 {

struct MoeLayerHealth {
  int64_t layer = 0;         // HF layer index (MTP layers follow the decoder's)
  double max_over_mean = 0;  // max_e tokens_e / mean_e tokens_e (1 = perfectly balanced)
  int64_t experts_without_tokens = 0;
  double dropped_fraction = 0;  // 1 − kept pairs / routed pairs (0 when dropless)
  double seq_aux_loss = 0;      // per layer, as the loss adds it (× coeff), mean over the interval
  double bias_spread = 0;       // max − min of e_score_correction_bias (0 without the bias)
};

// One iteration's health of one layer from its global counts.
MoeLayerHealth moe_layer_health(int64_t layer, const std::vector<int64_t>& tokens_per_expert,
                                int64_t kept_pairs, int64_t routed_pairs, double seq_aux_loss,
                                const float* bias_E, int64_t experts);

// The worst over the iterations of a log interval, layer by layer (aux loss averaged).
class MoeHealthInterval {
 public:
  void add(const std::vector<MoeLayerHealth>& iteration);
  std::vector<MoeLayerHealth> summary() const;  // empty when nothing was added
  void clear() { layers_.clear(), iterations_ = 0; }

 private:
  std::vector<MoeLayerHealth> layers_;
  int64_t iterations_ = 0;
};

// "moe: 3 layers | max/mean load 2.41 (layer 2) | experts without tokens 1 (layer 3) | dropped 0.0% | seq aux loss
// 1.234E-03 | bias spread 0.012 (layer 1)": each figure is the worst layer's.
std::string moe_health_line(const std::vector<MoeLayerHealth>& layers);

// Fixed-width records, so pipeline stages can gather their layers' health on the last stage.
std::vector<double> pack_health(const std::vector<MoeLayerHealth>& layers, int64_t max_layers);
std::vector<MoeLayerHealth> unpack_health(const std::vector<double>& packed);

}  // namespace dsv3
