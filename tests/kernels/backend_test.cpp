// The op table on the CPU: the segment-list forms the step uses (one AdamW call, one norm call for the whole flat
// buffer) against the per-range forms the optimizer has always used, memory accounting, and what a binary says
// about its CUDA backend on this machine.
#include "kernels/backend.h"

#include <gtest/gtest.h>

#include <cstring>

#include "core/error.h"
#include "kernels/cpu/adamw.h"
#include "kernels/kernel_test_util.h"
#include "optim/adamw.h"
#include "optim/grad_clip.h"
#include "train/device_select.h"
#include "train_util.h"

namespace dsv3 {
namespace {

using testing::philox_normals;

TEST(Backend, CpuAdamWOverSegmentsIsBitIdenticalToThePerRangeOptimizer) {
  const int64_t n = 50021;
  const AdamWConfig cfg{0.9, 0.95, 1e-8};
  auto p1 = philox_normals(1, n, 1), p2 = p1;
  AdamW opt(n, cfg);
  std::vector<float> m(n), v(n);
  for (int64_t step = 1; step <= 3; ++step) {
    const auto g = philox_normals(1, n, 10 + step, 1e-2f);
    opt.begin_step();
    opt.update(p1.data(), g.data(), 0, 30000, 1e-3 * step, 0.1);
    opt.update(p1.data(), g.data(), 30000, n - 30000, 1e-3 * step, 0.0);
    cpu_backend().adamw(
        p2.data(), g.data(), m.data(), v.data(),
        {{0, 30000, adamw_step_consts(cfg.beta1, cfg.beta2, cfg.eps, step, 1e-3 * step, 0.1)},
         {30000, n - 30000, adamw_step_consts(cfg.beta1, cfg.beta2, cfg.eps, step, 1e-3 * step, 0.0)}});
  }
  EXPECT_EQ(std::memcmp(p1.data(), p2.data(), n * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(opt.exp_avg().data(), m.data(), n * sizeof(float)), 0);
  EXPECT_EQ(std::memcmp(opt.exp_avg_sq().data(), v.data(), n * sizeof(float)), 0);
}

TEST(Backend, CpuSumOfSquaresOverSegmentsAddsThePerSegmentSums) {
  const auto x = philox_normals(2, 40000, 1);
  const double want = sum_of_squares(x.data() + 3, 20000) + sum_of_squares(x.data() + 25000, 15000);
  EXPECT_EQ(cpu_backend().sum_of_squares(x.data(), {{3, 20000}, {25000, 15000}}), want);
}

TEST(Backend, DeviceBufferGrowsOnlyAndCountsAllocations) {
  Backend& be = cpu_backend();
  const int64_t before = be.allocations();
  DeviceBuffer b;
  b.ensure(be, 100);
  const void* first = b.data();
  for (int i = 0; i < 100; ++i) EXPECT_EQ(b.as<unsigned char>()[i], 0) << "alloc() must zero-fill";
  b.ensure(be, 64);  // fits: no new allocation
  EXPECT_EQ(b.data(), first);
  EXPECT_EQ(be.allocations(), before + 1);
  b.ensure(be, 1000);
  EXPECT_EQ(be.allocations(), before + 2);
  EXPECT_GE(b.bytes(), 1000u);
}

// Without a GPU (or without the CUDA build) the factory says why in one line; with one it names the GPU.
TEST(Backend, CudaBackendIsNamedOrRefusedWithAReason) {
  std::string why;
  const auto gpu = make_cuda_backend(0, &why);
  if (gpu) {
    EXPECT_EQ(gpu->name().rfind("cuda:0 ", 0), 0u) << gpu->name();
  } else {
    EXPECT_FALSE(why.empty());
    EXPECT_EQ(why.find('\n'), std::string::npos) << why;
  }
}

// The CUDA backend is a plugin (kernels/cuda_loader.cpp): the dsv3 program does not link cudart or cuBLASLt (a CPU
// rank would map ~200 MB of cuBLASLt for nothing), finds libdsv3_cuda.so beside itself, and a bad
// DSV3_CUDA_LIBRARY is reported by name instead of falling back to another copy. A CPU run asks the driver only:
// training here (no GPU, or a GPU with --device cpu) never maps cuBLASLt.
TEST(Backend, CudaBackendIsAPluginThatCpuRunsNeverLoad) {
  const auto dir = testing::scratch_dir();
  const auto bin = testing::dsv3_binary();
  const auto ldd = testing::run_shell("ldd " + bin.string(), dir);
  ASSERT_EQ(ldd.rc, 0) << ldd.out;
  EXPECT_EQ(ldd.out.find("libcublas"), std::string::npos) << ldd.out;
  EXPECT_EQ(ldd.out.find("libcudart"), std::string::npos) << ldd.out;
  const auto info = testing::run_shell(bin.string() + " device-info", dir);
  ASSERT_EQ(info.rc, 0) << info.out;
  if (!std::filesystem::exists(bin.parent_path() / "libdsv3_cuda.so")) {
    // A build without nvcc (or -DDSV3_CUDA=OFF) has no plugin and says so.
    EXPECT_NE(info.out.find("cuda backend library: not loaded: this build of dsv3 has no CUDA backend"),
              std::string::npos)
        << info.out;
    return;
  }
  // The plugin is found beside the program and loads (its cudart and cuBLASLt resolve), GPU or not.
  EXPECT_NE(info.out.find("cuda backend library: " + (bin.parent_path() / "libdsv3_cuda.so").string() + "\n"),
            std::string::npos)
      << info.out;
  const auto bad = testing::run_shell(
      "DSV3_CUDA_LIBRARY=" + (dir / "missing.so").string() + " " + bin.string() + " device-info", dir);
  EXPECT_NE(bad.out.find("libdsv3_cuda.so could not be loaded (" + (dir / "missing.so").string() +
                         ": no such file)"),
            std::string::npos)
      << bad.out;
}

}  // namespace
}  // namespace dsv3

namespace dsv3 {
namespace {

TEST(DeviceSelect, CpuAutoAndCudaAreDecidedWithAReason) {
  EXPECT_EQ(choose_device("cpu").kind, DeviceKind::kCpu);
  EXPECT_THROW(choose_device("tpu"), Error);
  auto refused = [](const std::string& blockers) {
    try {
      choose_device("cuda", blockers);
      return std::string();
    } catch (const Error& e) {
      EXPECT_EQ(std::string(e.what()).rfind("--device cuda: ", 0), 0u) << e.what();
      EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
      return std::string(e.what());
    }
  };
  const std::string blockers = "does not run MoE layers yet";
  std::string why;
  if (!make_cuda_backend(0, &why)) {  // no GPU here: auto trains on the CPU and says why; cuda is refused
    const DeviceChoice a = choose_device("auto");
    EXPECT_EQ(a.kind, DeviceKind::kCpu);
    EXPECT_EQ(a.line, "device: cpu (auto: " + why + ")");
    EXPECT_NE(refused(""), "");
    // Deciding so asked the driver only: the CUDA backend and its cuBLASLt are not in this process.
    const std::string maps = testing::slurp("/proc/self/maps");
    EXPECT_EQ(maps.find("libdsv3_cuda.so"), std::string::npos);
    EXPECT_EQ(maps.find("libcublasLt"), std::string::npos);
    return;
  }
  const DeviceChoice a = choose_device("auto"), c = choose_device("cuda");
  EXPECT_EQ(a.kind, DeviceKind::kCuda);
  EXPECT_EQ(c.kind, DeviceKind::kCuda);
  ASSERT_TRUE(c.backend);
  EXPECT_EQ(c.line, "device: " + c.backend->name() + " (--device cuda)");
  const DeviceChoice b = choose_device("auto", blockers);  // what the run asks for keeps it on the CPU
  EXPECT_EQ(b.kind, DeviceKind::kCpu);
  EXPECT_NE(b.line.find(blockers), std::string::npos) << b.line;
  EXPECT_NE(refused(blockers).find(blockers), std::string::npos);
}

}  // namespace
}  // namespace dsv3
