// The --device decision (see the header).
#include "train/device_select.h"

#include "core/error.h"

namespace dsv3 {

DeviceChoice choose_device(const std::string& requested, const std::string& cuda_blockers) {
  DSV3_CHECK(requested == "auto" || requested == "cpu" || requested == "cuda" || requested == "host-guarded",
             "argument --device: invalid choice: '", requested, "' (choose from 'auto', 'cpu', 'cuda')");
  if (requested == "cpu") return {DeviceKind::kCpu, nullptr, "device: cpu (--device cpu)"};
  if (requested ==
      "host-guarded") {  // for tests: the GPU's code path (host staging, device buffers) on the CPU
    DSV3_CHECK(cuda_blockers.empty(), "--device host-guarded: the device path ", cuda_blockers);
    return {DeviceKind::kHostGuarded, make_host_guarded_backend(),
            "device: host-guarded (a test device: the GPU code path with the CPU's kernels)"};
  }
  std::string why, name;
  // auto with a reason to stay on the CPU (a multi-rank run): the driver is asked, no backend made (no context or
  // cuBLASLt per rank).
  if (requested == "auto" && !cuda_blockers.empty()) {
    if (!cuda_gpu_visible(0, &name, &why))
      return {DeviceKind::kCpu, nullptr, "device: cpu (auto: " + why + ")"};
    return {DeviceKind::kCpu, nullptr,
            "device: cpu (auto: cuda:0 " + name + " is visible, but the CUDA path " + cuda_blockers + ")"};
  }
  std::shared_ptr<Backend> gpu = make_cuda_backend(0, &why);
  if (requested == "cuda") {
    DSV3_CHECK(gpu, "--device cuda: ", why);
    DSV3_CHECK(cuda_blockers.empty(), "--device cuda: ", gpu->name(), " is visible, but the CUDA path ",
               cuda_blockers, "; use --device cpu");
    return {DeviceKind::kCuda, gpu, "device: " + gpu->name() + " (--device cuda)"};
  }
  if (!gpu) return {DeviceKind::kCpu, nullptr, "device: cpu (auto: " + why + ")"};
  return {DeviceKind::kCuda, gpu, "device: " + gpu->name() + " (auto)"};
}

}  // namespace dsv3
