// `dsv3 train --device auto|cpu|cuda`: which backend trains, decided once at start-up and printed.
#pragma once
#include <memory>
#include <string>

#include "kernels/backend.h"

namespace dsv3 {

struct DeviceChoice {
  DeviceKind kind = DeviceKind::kCpu;
  std::shared_ptr<Backend> backend;  // the CUDA backend when kind is kCuda (null for the CPU's)
  std::string line;                  // printed at start-up (rank 0): the choice and why
};

// "cpu": the CPU. "cuda": the GPU, or an error in one line saying why not (no GPU visible, a build without the
// CUDA backend, or `cuda_blockers`: what this run asks for that the CUDA path does not run yet; empty when
// nothing). "auto": cuda where it can train, else cpu, saying which GPU was seen and why it was not used.
// "host-guarded" (tests): the device code path on the CPU's kernels (make_host_guarded_backend in
// kernels/backend.h). Anything else is refused by name.
DeviceChoice choose_device(const std::string& requested, const std::string& cuda_blockers = "");

}  // namespace dsv3
