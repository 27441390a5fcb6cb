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

// The driver, asked directly (libcuda.so.1, a few MB, no context made): is there a GPU? So that `--device auto`
// on a machine without one, or a CPU rank on a machine with one, never loads the plugin and its cuBLASLt.
struct Driver {
  int devices = 0;
  std::vector<std::string> names;
  std::string why;  // when devices == 0
};

const Driver& driver() {
  static Driver d;
  static std::once_flag once;
  std::call_once(once, [] {
    void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      d.why = "no CUDA GPU visible (no NVIDIA driver: libcuda.so.1 not found)";
      return;
    }
    using InitFn = int (*)(unsigned);
    using CountFn = int (*)(int*);
    using GetFn = int (*)(int*, int);
    using NameFn = int (*)(char*, int, int);
    using ErrFn = int (*)(int, const char**);
    auto init = reinterpret_cast<InitFn>(dlsym(h, "cuInit"));
    auto count = reinterpret_cast<CountFn>(dlsym(h, "cuDeviceGetCount"));
    auto get = reinterpret_cast<GetFn>(dlsym(h, "cuDeviceGet"));
    auto name = reinterpret_cast<NameFn>(dlsym(h, "cuDeviceGetName"));
    auto err = reinterpret_cast<ErrFn>(dlsym(h, "cuGetErrorString"));
    if (!init || !count || !get || !name) {
      d.why = "no CUDA GPU visible (libcuda.so.1 lacks the driver API)";
      return;
    }
    int rc = init(0);
    if (rc == 0) rc = count(&d.devices);
    if (rc != 0) {
      const char* text = nullptr;
      if (err) err(rc, &text);
      d.devices = 0;
      d.why = "no CUDA GPU visible (" + std::string(text ? text : "CUDA driver error " + std::to_string(rc)) +
              ")";
      return;
    }
    if (d.devices == 0) d.why = "no CUDA GPU visible (0 devices)";
    for (int i = 0; i < d.devices; ++i) {
      char buf[256] = {};
      int dev = 0;
      d.names.push_back(get(&dev, i) == 0 && name(buf, sizeof buf, dev) == 0 ? buf : "?");
    }
  });
  return d;
}

struct Plugin {
  MakeFn make = nullptr;
  std::string path;   // what was opened
  std::string error;  // why it could not be opened (when make is null)
};

const Plugin& plugin() {
  static Plugin p;
  static std::once_flag once;
  std::call_once(once, [] {
    const char* kName = "libdsv3_cuda.so";
    // A program linked against the plugin (the CUDA op tests) has it loaded already: use that copy, not a second
    // one from another path with its own state.
    if (auto f = reinterpret_cast<MakeFn>(dlsym(RTLD_DEFAULT, "dsv3_cuda_make_backend"))) {
      p.make = f, p.path = "(linked into this program)";
      return;
    }
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
    std::string tried;  // why each candidate failed, "; "-separated
    auto failed = [&](const std::string& why) { tried += (tried.empty() ? "" : "; ") + why; };
    for (const auto& c : candidates) {
      if (c.find('/') != std::string::npos && !std::filesystem::exists(c, ec)) {
        failed(c + ": no such file");
        continue;
      }
      // RTLD_LOCAL: the plugin's CUDA symbols stay its own; it holds no state dsv3 shares.
      void* h = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL);
      if (!h) {
        const char* e = dlerror();
        failed(e ? e : c);
        continue;
      }
      p.make = reinterpret_cast<MakeFn>(dlsym(h, "dsv3_cuda_make_backend"));
      p.path = c;
      if (p.make) return;
      failed(c + ": no dsv3_cuda_make_backend");
    }
    p.error = "the CUDA backend library " + std::string(kName) + " could not be loaded (" + tried +
              "); set DSV3_CUDA_LIBRARY to its path";
  });
  return p;
}

}  // namespace

bool cuda_gpu_visible(int device, std::string* name, std::string* why_not) {
  const Driver& d = driver();
  if (d.devices == 0 || device < 0 || device >= d.devices) {
    if (why_not)
      *why_not = d.devices == 0 ? d.why
                                : "GPU " + std::to_string(device) + " does not exist (" +
                                      std::to_string(d.devices) + " visible)";
    return false;
  }
  if (name) *name = d.names[static_cast<size_t>(device)];
  return true;
}

std::string cuda_library(std::string* why_not) {
  const Plugin& p = plugin();
  if (!p.make && why_not) *why_not = p.error;
  return p.make ? p.path : "";
}

std::unique_ptr<Backend> make_cuda_backend(int device, std::string* why_not) {
  if (!cuda_gpu_visible(device, nullptr, why_not)) return nullptr;
  const Plugin& p = plugin();
  if (!p.make) {
    if (why_not) *why_not = p.error;
    return nullptr;
  }
  return std::unique_ptr<Backend>(p.make(device, why_not));
}

#else

namespace {
const char* kNoCuda =
    "this build of dsv3 has no CUDA backend (nvcc was not found at build time, or -DDSV3_CUDA=OFF)";
}

bool cuda_gpu_visible(int, std::string*, std::string* why_not) {
  if (why_not) *why_not = kNoCuda;
  return false;
}

std::string cuda_library(std::string* why_not) {
  if (why_not) *why_not = kNoCuda;
  return "";
}

std::unique_ptr<Backend> make_cuda_backend(int, std::string* why_not) {
  if (why_not) *why_not = kNoCuda;
  return nullptr;
}

#endif

}  // namespace dsv3
