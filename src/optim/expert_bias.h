// Aux-loss-free expert-bias update (spec §7.1.8; Megatron-Core moe_utils.get_updated_expert_bias, called from
// finalize_model_grads after every global batch with the batch's token counts all-reduced over TP×CP×DP):
//   bias_e += rate · sign(mean(counts) - counts_e)
// in fp32 as Megatron computes it (counts and bias are fp32 tensors there): mean = fp32(Σcounts) / fp32(E), the
// offset is fp32, the step is ±fp32(rate). Σcounts is exact here and rounded once to fp32 (Megatron's fp32 sum of
// integer-valued floats is exact below 2^24 and rounds in a device-dependent order above). Equal counts — e.g. every
// expert padded to capacity (--moe-pad-expert-input-to-capacity) — leave the bias unchanged.
#pragma once
#include <cstdint>

namespace dsv3 {

// One MoE layer: bias_E and counts_E have e entries.
void update_expert_bias(float* bias_E, const int64_t* counts_E, int64_t e, double rate);

}  // namespace dsv3
