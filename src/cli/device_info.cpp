// `dsv3 device-info`: which backends this binary has and which devices it sees (the first thing to run on a new
// machine, and what scripts/device-check.sh prints before its tests).
#include <cstdio>
#include <string>

#include "cli/commands.h"
#include "kernels/backend.h"

namespace dsv3::cli {

int device_info_main(int, char**) {
  std::printf("cpu: available\n");
  std::string why;
  const auto gpu = make_cuda_backend(0, &why);
  if (gpu)
    std::printf("cuda: available (%s)\n", gpu->name().c_str());
  else
    std::printf("cuda: unavailable: %s\n", why.c_str());
  // The backend library, loaded even without a GPU: a build or packing problem shows here, not on the GPU machine.
  std::string lib_why;
  const std::string lib = cuda_library(&lib_why);
  std::printf("cuda backend library: %s\n", lib.empty() ? ("not loaded: " + lib_why).c_str() : lib.c_str());
  return 0;
}

}  // namespace dsv3::cli
