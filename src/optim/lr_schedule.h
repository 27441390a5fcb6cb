// Megatron's OptimizerParamScheduler, learning-rate part (megatron/core/optimizer_param_scheduler.py; the weight
// decay is constant in this system, spec §8). Steps count samples: the trainer calls step(global_batch_size) after
// every successful iteration, so iteration 1 runs at num_steps 0 (lr = init_lr = 0 under warmup).
//   num_steps <= warmup_steps (warmup_steps > 0): init_lr + (max_lr - init_lr)·num_steps/warmup_steps
//   decay_style constant: max_lr afterwards (also beyond decay_steps)
//   num_steps > decay_steps: min_lr
//   inverse-square-root: max(min_lr, max_lr·sqrt(max(warmup,1))/sqrt(max(num_steps,1)))
//   linear / cosine over r = (num_steps-warmup)/(decay-warmup): min_lr + coeff·(max_lr-min_lr),
//     coeff = 1-r  |  0.5·(cos(π r)+1)
// Evaluated with Megatron's operation order in double, so values equal Megatron's bit for bit.
#pragma once
#include <cstdint>
#include <string>

namespace dsv3 {

struct LrScheduleConfig {
  double max_lr = 0, min_lr = 0, init_lr = 0;
  int64_t warmup_steps = 0, decay_steps = 0;
  std::string decay_style = "linear";  // constant | linear | cosine | inverse-square-root
};

class LrScheduler {
 public:
  // Validates as Megatron's constructor asserts (min_lr >= 0, max_lr >= min_lr, init_lr <= max_lr,
  // decay_steps > 0, warmup_steps < decay_steps) plus a known decay style; throws dsv3::Error naming the rule.
  explicit LrScheduler(LrScheduleConfig c);

  double lr() const;  // at the current num_steps
  double lr_at(int64_t num_steps) const;
  void step(int64_t increment);  // num_steps += increment
  int64_t num_steps() const { return num_steps_; }
  void set_num_steps(int64_t n);
  const LrScheduleConfig& config() const { return cfg_; }

 private:
  enum class Style { kConstant, kLinear, kCosine, kInvSqrt };
  LrScheduleConfig cfg_;
  Style style_;
  int64_t num_steps_ = 0;
};

}  // namespace dsv3
