// AdamW's per-element update (torch.optim.AdamW's arithmetic and roundings; see optim/adamw.h) over segments of
// flat fp32 buffers: params, grads and both moments indexed alike. Elementwise, so the result does not depend on
// how the work is split.
#pragma once
#include <cstdint>
#include <vector>

#include "kernels/backend.h"

namespace dsv3 {

// The constants of one step for a range with this lr and weight decay, formed in double as torch forms them
// from Python floats. The CPU update and the CUDA kernel use the same ones, so their results are bit-identical.
AdamWStepConsts adamw_step_consts(double beta1, double beta2, double eps, int64_t step, double lr, double wd);

void adamw_segments_cpu(float* params, const float* grads, float* exp_avg, float* exp_avg_sq,
                        const std::vector<AdamWSegment>& segments);

}  // namespace dsv3
