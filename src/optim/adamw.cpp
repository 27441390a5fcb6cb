#include "optim/adamw.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "kernels/cpu/adamw.h"

namespace dsv3 {

AdamW::AdamW(int64_t numel, AdamWConfig cfg) : numel_(numel), cfg_(cfg) {
  DSV3_CHECK(numel >= 0, "AdamW: negative parameter count ", numel);
  DSV3_CHECK(cfg.beta1 >= 0.0 && cfg.beta1 < 1.0, "AdamW: beta1 must be in [0, 1), got ", cfg.beta1);
  DSV3_CHECK(cfg.beta2 >= 0.0 && cfg.beta2 < 1.0, "AdamW: beta2 must be in [0, 1), got ", cfg.beta2);
  DSV3_CHECK(cfg.eps >= 0.0, "AdamW: eps must be >= 0, got ", cfg.eps);
  m_.assign(static_cast<size_t>(numel), 0.f);
  v_.assign(static_cast<size_t>(numel), 0.f);
}

void AdamW::begin_step() {
  ++step_;
}

void AdamW::set_step(int64_t s) {
  DSV3_CHECK(s >= 0, "AdamW: negative step ", s);
  step_ = s;
}

void AdamW::update(float* params, const float* grads, int64_t begin, int64_t n, double lr, double wd) {
  update_range(params + begin, grads + begin, begin, n, lr, wd);
}

void AdamW::update_range(float* p, const float* g, int64_t begin, int64_t n, double lr, double wd) {
  DSV3_CHECK(step_ > 0, "AdamW::update called before begin_step()");
  DSV3_CHECK(begin >= 0 && n >= 0 && begin + n <= numel_, "AdamW::update: range [", begin, ", ", begin + n,
             ") outside the ", numel_, " optimizer elements");
  if (n == 0) return;
  const AdamWStepConsts k = adamw_step_consts(cfg_.beta1, cfg_.beta2, cfg_.eps, step_, lr, wd);
  float* m = m_.data() + begin;
  float* v = v_.data() + begin;
  adamw_segments_cpu(p, g, m, v, {AdamWSegment{0, n, k}});
}

}  // namespace dsv3
