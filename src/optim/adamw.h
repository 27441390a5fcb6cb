// Decoupled AdamW over an fp32 master-weight buffer, as Megatron runs it (apex/TE FusedAdam with adam_w_mode,
// which computes what torch.optim.AdamW computes; spec §8 "Optimizer details"):
//   m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²;  bc_i = 1 - β_i^t
//   p ← p·(1 - lr·wd) - (lr/bc1) · m / (sqrt(v)/sqrt(bc2) + eps)
// which is p - lr·(m̂/(sqrt(v̂)+eps) + wd·p) with p the value before the step. The arithmetic per element is fp32
// with torch's CPU kernels' operations and roundings (step constants formed in double, as torch forms them from
// Python floats), so results are bit-identical to torch.optim.AdamW on CPU and equal apex/TE FusedAdam to fp32
// rounding (tests/train/optim_test.cpp, fixtures from tests/reference/optim_golden.py). AVX2, 16Ki-element chunks
// spread over OpenMP threads (static schedule).
//
// The moments have the layout of the parameter buffer they serve (one element per parameter element). A step is
// begin_step() once, then update() for every range (a range carries its own lr and weight decay: Megatron's param
// groups, e.g. wd 0 for 1-D parameters). Elementwise: the result does not depend on the thread count.
#pragma once
#include <cstdint>
#include <vector>

namespace dsv3 {

struct AdamWConfig {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
};

class AdamW {
 public:
  AdamW(int64_t numel, AdamWConfig cfg);  // moments zero, step 0

  void begin_step();  // ++step (one call per optimizer step, before the updates)
  // Updates elements [begin, begin+n) of params (and of the moments) with grads[begin, begin+n), with this range's
  // lr and weight decay. `params`/`grads` point at element 0 of the full buffers.
  void update(float* params, const float* grads, int64_t begin, int64_t n, double lr, double wd);
  // The same for n parameters at p (gradients at g) whose moments are elements [begin, begin+n): the distributed
  // optimizer keeps moments for its shards only, packed.
  void update_range(float* p, const float* g, int64_t begin, int64_t n, double lr, double wd);

  int64_t step() const { return step_; }
  void set_step(int64_t s);
  int64_t numel() const { return numel_; }
  const AdamWConfig& config() const { return cfg_; }

  std::vector<float>& exp_avg() { return m_; }
  std::vector<float>& exp_avg_sq() { return v_; }
  const std::vector<float>& exp_avg() const { return m_; }
  const std::vector<float>& exp_avg_sq() const { return v_; }

 private:
  int64_t numel_;
  AdamWConfig cfg_;
  int64_t step_ = 0;
  std::vector<float> m_, v_;
};

}  // namespace dsv3
