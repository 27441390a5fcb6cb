#include "optim/expert_bias.h"

#include "core/error.h"

namespace dsv3 {

void update_expert_bias(float* bias_E, const int64_t* counts_E, int64_t e, double rate) {
  DSV3_CHECK(e > 0, "update_expert_bias: number of experts must be > 0 (got ", e, ")");
  int64_t sum = 0;
  for (int64_t i = 0; i < e; ++i) {
    DSV3_CHECK(counts_E[i] >= 0, "update_expert_bias: negative token count ", counts_E[i], " for expert ", i);
    sum += counts_E[i];
  }
  const float mean = static_cast<float>(sum) / static_cast<float>(e);
  const float r = static_cast<float>(rate);
  for (int64_t i = 0; i < e; ++i) {
    const float offset = mean - static_cast<float>(counts_E[i]);
    const float s = offset > 0.f ? 1.f : (offset < 0.f ? -1.f : 0.f);
    bias_E[i] = bias_E[i] + s * r;
  }
}

}  // namespace dsv3
