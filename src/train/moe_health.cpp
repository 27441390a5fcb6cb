// MoE health figures and their log line (see the header).
#include "train/moe_health.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace dsv3 {

namespace {
constexpr int64_t kFields = 6;
}

MoeLayerHealth moe_layer_health(int64_t layer, const std::vector<int64_t>& tokens, int64_t kept,
                                int64_t routed, double aux, const float* bias, int64_t experts) {
  MoeLayerHealth h;
  h.layer = layer;
  int64_t sum = 0, mx = 0;
  for (int64_t c : tokens) sum += c, mx = std::max(mx, c), h.experts_without_tokens += c == 0;
  h.max_over_mean =
      sum > 0 ? static_cast<double>(mx) * static_cast<double>(tokens.size()) / static_cast<double>(sum) : 0.0;
  h.dropped_fraction = routed > 0 ? 1.0 - static_cast<double>(kept) / static_cast<double>(routed) : 0.0;
  h.seq_aux_loss = aux;
  if (bias && experts > 0) {
    const auto [lo, hi] = std::minmax_element(bias, bias + experts);
    h.bias_spread = static_cast<double>(*hi) - static_cast<double>(*lo);
  }
  return h;
}

void MoeHealthInterval::add(const std::vector<MoeLayerHealth>& it) {
  if (layers_.empty()) {
    layers_ = it;
  } else {
    for (size_t l = 0; l < layers_.size() && l < it.size(); ++l) {
      MoeLayerHealth& w = layers_[l];
      w.max_over_mean = std::max(w.max_over_mean, it[l].max_over_mean);
      w.experts_without_tokens = std::max(w.experts_without_tokens, it[l].experts_without_tokens);
      w.dropped_fraction = std::max(w.dropped_fraction, it[l].dropped_fraction);
      w.seq_aux_loss += it[l].seq_aux_loss;
      w.bias_spread = it[l].bias_spread;  // the bias after the latest update
    }
  }
  ++iterations_;
}

std::vector<MoeLayerHealth> MoeHealthInterval::summary() const {
  std::vector<MoeLayerHealth> out = layers_;
  for (auto& h : out) h.seq_aux_loss /= static_cast<double>(std::max<int64_t>(iterations_, 1));
  return out;
}

std::string moe_health_line(const std::vector<MoeLayerHealth>& layers) {
  if (layers.empty()) return "";
  auto worst = [&](auto key) {
    return *std::max_element(layers.begin(), layers.end(),
                             [&](const auto& a, const auto& b) { return key(a) < key(b); });
  };
  const auto load = worst([](const MoeLayerHealth& h) { return h.max_over_mean; });
  const auto dead =
      worst([](const MoeLayerHealth& h) { return static_cast<double>(h.experts_without_tokens); });
  const auto drop = worst([](const MoeLayerHealth& h) { return h.dropped_fraction; });
  const auto aux = worst([](const MoeLayerHealth& h) { return h.seq_aux_loss; });
  const auto spread = worst([](const MoeLayerHealth& h) { return h.bias_spread; });
  char buf[400];
  std::snprintf(
      buf, sizeof buf,
      "moe: %zu layers | max/mean load %.2f (layer %lld) | experts without tokens %lld (layer %lld) | "
      "dropped %.2f%% (layer %lld) | seq aux loss %.3E (layer %lld) | bias spread %.4g (layer %lld)",
      layers.size(), load.max_over_mean, static_cast<long long>(load.layer),
      static_cast<long long>(dead.experts_without_tokens), static_cast<long long>(dead.layer),
      100.0 * drop.dropped_fraction, static_cast<long long>(drop.layer), aux.seq_aux_loss,
      static_cast<long long>(aux.layer), spread.bias_spread, static_cast<long long>(spread.layer));
  return buf;
}

std::vector<double> pack_health(const std::vector<MoeLayerHealth>& layers, int64_t max_layers) {
  std::vector<double> out(static_cast<size_t>(max_layers * kFields), NAN);
  for (size_t l = 0; l < layers.size() && static_cast<int64_t>(l) < max_layers; ++l) {
    const auto& h = layers[l];
    const double rec[kFields] = {
        static_cast<double>(h.layer), h.max_over_mean, static_cast<double>(h.experts_without_tokens),
        h.dropped_fraction,           h.seq_aux_loss,  h.bias_spread};
    std::copy(rec, rec + kFields, out.begin() + static_cast<int64_t>(l) * kFields);
  }
  return out;
}

std::vector<MoeLayerHealth> unpack_health(const std::vector<double>& packed) {
  std::vector<MoeLayerHealth> out;
  for (size_t i = 0; i + kFields <= packed.size(); i += kFields) {
    if (std::isnan(packed[i])) continue;  // an unused slot
    MoeLayerHealth h;
    h.layer = static_cast<int64_t>(packed[i]), h.max_over_mean = packed[i + 1];
    h.experts_without_tokens = static_cast<int64_t>(packed[i + 2]), h.dropped_fraction = packed[i + 3];
    h.seq_aux_loss = packed[i + 4], h.bias_spread = packed[i + 5];
    out.push_back(h);
  }
  std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.layer < b.layer; });
  return out;
}

}  // namespace dsv3
