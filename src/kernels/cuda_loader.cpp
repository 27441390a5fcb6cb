// make_cuda_backend: the CUDA backend lives in its own shared library, libdsv3_cuda.so (src/kernels/cuda/*.cu
// with cudart and cuBLASLt), opened on first use. Linking it into dsv3 would map cuBLASLt into every process:
// about 200 MB of resident memory per rank (measured: 199 MB RSS for dlopen("libcublasLt.so.13") alone) and
// its load time, paid by every CPU run and every MPI rank that never touches a GPU.
//
// Where it is looked for: $DSV3_CUDA_LIBRARY when set (only there); else next to the running program, ../lib
// beside it (an installed layout), then the dynamic linker's own search (LD_LIBRARY_PATH, ...), first hit wins.
#include <dlfcn.h>

#include <cstdlib>
#include <filesystem>
#include <mutex>
#include <string>
#include <vector>

#include "kernels/backend.h"

namespace dsv3 {

#ifdef DSV3_HAVE_CUDA
namespace {

using MakeFn = Backend* (*)(int, std::string*);

struct Plugin {
  MakeFn make = nullptr;
  std::string error;  // why it could not be opened (when make is null)
};

const Plugin& plugin() {
  static Plugin p;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* kName = "libdsv3_cuda.so";
    std::vector<std::string> candidates;
    std::error_code ec;
    if (const char* env = std::getenv("DSV3_CUDA_LIBRARY"); env && *env) {
      candidates.push_back(env);  // asked for by name: only that one
    } else {
      const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
      if (!ec) {
        candidates.push_back((exe.parent_path() / kName).string());
        candidates.push_back((exe.parent_path().parent_path() / "lib" / kName).string());
      }
      candidates.push_back(kName);
    }
    std::string tried;
    for (const auto& c : candidates) {
      if (c.find('/') != std::string::npos && !std::filesystem::exists(c, ec)) {
        tried += (tried.empty() ? "" : "; ") + c + ": no such file";
        continue;
      }
      // RTLD_LOCAL: the plugin's CUDA symbols stay its own; it holds no state dsv3 shares.
      void* h = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!h) {
        const char* e = dlerror();
        tried += (tried.empty() ? "" : "; ") + std::string(e ? e : c.c_str());
        continue;
      }
      p.make = reinterpret_cast<MakeFn>(dlsym(h, "dsv3_cuda_make_backend"));
      if (p.make) return;
      tried += (tried.empty() ? "" : "; ") + c + ": no dsv3_cuda_make_backend";
    }
    p.error = "the CUDA backend library " + std::string(kName) + " could not be loaded (" + tried +
              "); set DSV3_CUDA_LIBRARY to its path";
  });
  return p;
}

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(int device, std::string* why_not) {
  const Plugin& p = plugin();
  if (!p.make) {
    if (why_not) *why_not = p.error;
    return nullptr;
  }
  return std::unique_ptr<Backend>(p.make(device, why_not));
}

#else

std::unique_ptr<Backend> make_cuda_backend(int, std::string* why_not) {
  if (why_not)
    *why_not =
        "this build of dsv3 has no CUDA backend (nvcc was not found at build time, or -DDSV3_CUDA=OFF)";
  return nullptr;
}

#endif

}  // namespace dsv3
