// `dsv3 train --device auto|cpu|cuda`: which backend trains, decided once at start-up and printed.
#pragma once
#include <string>

#include "kernels/backend.h"

namespace dsv3 {

struct DeviceChoice {
  DeviceKind kind = DeviceKind::kCpu;
  std::string line;  // printed at start-up (rank 0): the choice and why
};

// "cpu": the CPU. "cuda": the GPU, or an error in one line saying why not (no GPU visible, a build without the
// CUDA backend, or — today — that the model does not yet run on the CUDA backend). "auto": cuda where it can
// train, else cpu, saying which GPU was seen and why it was not used. Anything else is refused by name.
DeviceChoice choose_device(const std::string& requested);

}  // namespace dsv3
