#include "optim/backend_adamw.h"

#include <cmath>

#include "core/error.h"
#include "kernels/cpu/adamw.h"

namespace dsv3 {

BackendAdamW::BackendAdamW(Backend& be, const ParamTable& table, const ParamStore& store, AdamWConfig cfg)
    : be_(be), cfg_(cfg), numel_(store.size()), m_(be, store.size()), v_(be, store.size()) {
  for (const auto& p : table.params())
    if (p.tied_to.empty() && p.trainable && store.contains(p.name))
      ranges_.push_back({store.offset(p.name), store.numel(p), p.weight_decay});
  segments_.reserve(ranges_.size());
}

double BackendAdamW::grad_norm(const float* grads) const {
  return std::sqrt(be_.sum_of_squares(grads, {{0, numel_}}));
}

void BackendAdamW::scale(float* grads, float coeff) const {
  be_.scale(grads, numel_, coeff);
}

void BackendAdamW::step(float* params, const float* grads, int64_t step, double lr, double wd) {
  const AdamWStepConsts with = adamw_step_consts(cfg_.beta1, cfg_.beta2, cfg_.eps, step, lr, wd);
  const AdamWStepConsts without = adamw_step_consts(cfg_.beta1, cfg_.beta2, cfg_.eps, step, lr, 0.0);
  segments_.clear();
  for (const Range& r : ranges_) segments_.push_back({r.begin, r.n, r.decay ? with : without});
  be_.adamw(params, grads, m_.data(), v_.data(), segments_);
}

void BackendAdamW::moments_to_host(std::vector<float>& m, std::vector<float>& v) const {
  m.resize(static_cast<size_t>(numel_)), v.resize(static_cast<size_t>(numel_));
  be_.copy_to_host(m.data(), m_.data(), numel_ * sizeof(float));
  be_.copy_to_host(v.data(), v_.data(), numel_ * sizeof(float));
}

void BackendAdamW::moments_from_host(const std::vector<float>& m, const std::vector<float>& v) {
  DSV3_CHECK(static_cast<int64_t>(m.size()) == numel_ && static_cast<int64_t>(v.size()) == numel_,
             "BackendAdamW: moments of ", m.size(), "/", v.size(), " elements for ", numel_, " parameters");
  m_.copy_from_host(m.data(), numel_), v_.copy_from_host(v.data(), numel_);
}

}  // namespace dsv3
