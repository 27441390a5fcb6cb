// The optimizer step over a model's flat buffers in a backend's memory (the GPU's): the global grad norm, the
// clip and AdamW each run once over the whole buffer (AdamW as one launch over a segment list: one segment per
// parameter tensor, with its own weight decay), never per tensor, and the host reads one number per step (the
// norm). Bit-identical to the CPU path (optim/adamw.h per tensor, optim/grad_clip.h l2_norm) for the same inputs.
// The moments live here; optim/adamw.h's AdamW keeps the step count and is the checkpoint's host copy.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/device_array.h"
#include "model/param_store.h"
#include "model/param_table.h"
#include "optim/adamw.h"

namespace dsv3 {

class BackendAdamW {
 public:
  // The trainable, untied tensors of `store` (this rank's) are updated; moments start at zero.
  BackendAdamW(Backend& be, const ParamTable& table, const ParamStore& store, AdamWConfig cfg);

  double grad_norm(const float* grads) const;  // sqrt(Σ g²) over the whole buffer
  void scale(float* grads, float coeff) const;
  // One AdamW step numbered `step` (1-based, after AdamW::begin_step) at lr; wd applies to the tensors with
  // weight decay.
  void step(float* params, const float* grads, int64_t step, double lr, double wd);

  void moments_to_host(std::vector<float>& exp_avg, std::vector<float>& exp_avg_sq) const;
  void moments_from_host(const std::vector<float>& exp_avg, const std::vector<float>& exp_avg_sq);

 private:
  struct Range {
    int64_t begin, n;
    bool decay;
  };
  Backend& be_;
  AdamWConfig cfg_;
  int64_t numel_;
  std::vector<Range> ranges_;
  std::vector<AdamWSegment> segments_;  // rebuilt per step (lr changes); capacity kept
  DeviceArray<float> m_, v_;
};

}  // namespace dsv3
