#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

#include "core/error.h"

namespace dsv3 {

LrScheduler::LrScheduler(LrScheduleConfig c) : cfg_(std::move(c)) {
  const auto& k = cfg_;
  DSV3_CHECK(k.min_lr >= 0.0, "learning-rate schedule: min_lr must be >= 0 (got ", k.min_lr, ")");
  DSV3_CHECK(k.max_lr >= k.min_lr, "learning-rate schedule: max_lr (", k.max_lr, ") must be >= min_lr (",
             k.min_lr, ")");
  DSV3_CHECK(k.init_lr <= k.max_lr, "learning-rate schedule: init_lr (", k.init_lr, ") must be <= max_lr (",
             k.max_lr, ")");
  DSV3_CHECK(k.decay_steps > 0, "learning-rate schedule: lr decay steps must be > 0 (got ", k.decay_steps,
             "; set --lr-decay-iters or --train-iters)");
  DSV3_CHECK(k.warmup_steps >= 0, "learning-rate schedule: warmup steps must be >= 0 (got ", k.warmup_steps,
             ")");
  DSV3_CHECK(k.warmup_steps < k.decay_steps, "learning-rate schedule: warmup steps (", k.warmup_steps,
             ") must be < decay steps (", k.decay_steps, ")");
  if (k.decay_style == "constant")
    style_ = Style::kConstant;
  else if (k.decay_style == "linear")
    style_ = Style::kLinear;
  else if (k.decay_style == "cosine")
    style_ = Style::kCosine;
  else if (k.decay_style == "inverse-square-root")
    style_ = Style::kInvSqrt;
  else
    fail("learning-rate schedule: decay style '", k.decay_style,
         "' is not supported (constant, linear, cosine, inverse-square-root)");
}

double LrScheduler::lr() const {
  return lr_at(num_steps_);
}

double LrScheduler::lr_at(int64_t n) const {
  const auto& k = cfg_;
  const double max_lr = k.max_lr, min_lr = k.min_lr;
  if (k.warmup_steps > 0 && n <= k.warmup_steps)
    return k.init_lr + (max_lr - k.init_lr) * static_cast<double>(n) / static_cast<double>(k.warmup_steps);
  if (style_ == Style::kConstant) return max_lr;
  if (n > k.decay_steps) return min_lr;
  if (style_ == Style::kInvSqrt) {
    const double w = static_cast<double>(std::max<int64_t>(k.warmup_steps, 1));
    const double s = static_cast<double>(std::max<int64_t>(n, 1));
    const double lr = max_lr * std::pow(w, 0.5) / std::pow(s, 0.5);
    return std::max(min_lr, lr);
  }
  const double ratio =
      static_cast<double>(n - k.warmup_steps) / static_cast<double>(k.decay_steps - k.warmup_steps);
  DSV3_CHECK(ratio >= 0.0 && ratio <= 1.0, "learning-rate schedule: decay ratio ", ratio,
             " outside [0, 1] at step ", n);
  const double delta = max_lr - min_lr;
  const double coeff =
      style_ == Style::kLinear ? 1.0 - ratio : 0.5 * (std::cos(std::numbers::pi * ratio) + 1.0);
  return min_lr + coeff * delta;
}

void LrScheduler::step(int64_t increment) {
  set_num_steps(num_steps_ + increment);
}

void LrScheduler::set_num_steps(int64_t n) {
  DSV3_CHECK(n >= 0, "learning-rate schedule: num_steps must be >= 0 (got ", n, ")");
  num_steps_ = n;
}

}  // namespace dsv3
