// The --device decision (see the header). The model's layers call the CPU kernels directly today; the CUDA backend
// has the dense path's ops (tested op by op against the CPU's) but the model does not route through it yet, so a
// GPU is detected and named but not used to train.
#include "train/device_select.h"

#include "core/error.h"

namespace dsv3 {

namespace {
constexpr const char* kModelNotOnCuda =
    "the DeepSeek-V3 model does not run on the CUDA backend yet (its ops are in place and tested; the model "
    "still "
    "calls the CPU kernels)";
}  // namespace

DeviceChoice choose_device(const std::string& requested) {
  DSV3_CHECK(requested == "auto" || requested == "cpu" || requested == "cuda",
             "argument --device: invalid choice: '", requested, "' (choose from 'auto', 'cpu', 'cuda')");
  if (requested == "cpu") return {DeviceKind::kCpu, "device: cpu (--device cpu)"};
  std::string why;
  const auto gpu = make_cuda_backend(0, &why);
  if (requested == "cuda") {
    DSV3_CHECK(gpu, "--device cuda: ", why);
    fail("--device cuda: ", gpu->name(), " is visible, but ", kModelNotOnCuda, "; use --device cpu");
  }
  if (!gpu) return {DeviceKind::kCpu, "device: cpu (auto: " + why + ")"};
  return {DeviceKind::kCpu,
          "device: cpu (auto: " + gpu->name() + " is visible, but " + kModelNotOnCuda + ")"};
}

}  // namespace dsv3
