// The arithmetic a model runs in: fp32, or bf16 GEMM/attention operands with fp32 accumulation, fp32 outputs and
// fp32 everything else (what torch.autocast does).
#pragma once
#include <cstdint>

namespace dsv3 {

enum class Precision : uint8_t { kF32, kBF16 };

}  // namespace dsv3
