// `make bench-gpu`, our side: the measured cuBLASLt bf16 GEMM roofline of this GPU (the MFU denominator, measured
// in the same run as llm.c #796 teaches) and the Megatron FLOPs of one training iteration of the config, so the
// script can turn tokens/s (ours and PyTorch's) into TFLOP/s and MFU.
//
//   bench_gpu --config examples/deepseek/configs/proxy-gpu-dense.json --batch 1 --seq 4096
//
// Prints `gpu: <name>`, `roofline: cublaslt_bf16 m=.. n=.. k=.. tflops=<x>` lines, and `flops_per_iteration=<f>`.
// Without a GPU it prints `gpu: unavailable: <why>` and exits 0. dsv3's own GPU training step joins here once the
// model runs on the CUDA backend.
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>

#include "kernels/backend.h"
#include "model/config.h"
#include "train/log_format.h"

using namespace dsv3;

namespace {

double roofline_tflops(Backend& gpu, int64_t m, int64_t n, int64_t k, int reps) {
  DeviceBuffer a(gpu, m * k * 2), b(gpu, n * k * 2), c(gpu, m * n * 2);
  GemmArgs g;
  g.m = m, g.n = n, g.k = k;
  g.a = a.data(), g.lda = k;
  g.b = b.data(), g.ldb = k, g.trans_b = true;  // a linear layer's layout
  g.c = c.data(), g.ldc = n;
  g.ab_type = GemmType::kBF16, g.c_type = GemmType::kBF16;
  for (int i = 0; i < 3; ++i) gpu.gemm(g);
  gpu.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < reps; ++i) gpu.gemm(g);
  gpu.synchronize();
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return 2.0 * m * n * k * reps / s / 1e12;
}

}  // namespace

int main(int argc, char** argv) {
  std::string config = "examples/deepseek/configs/proxy-gpu-dense.json";
  int64_t batch = 1, seq = 4096;
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--config"))
      config = argv[i + 1];
    else if (!std::strcmp(argv[i], "--batch"))
      batch = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--seq"))
      seq = std::atoll(argv[i + 1]);
  }
  const ModelConfig cfg = ModelConfig::from_json_file(config);
  const int64_t padded_vocab = (cfg.vocab_size + 127) / 128 * 128;
  std::printf("flops_per_iteration=%.6e (Megatron's formula, batch %lld, seq %lld)\n",
              megatron_flops_per_iteration(cfg, batch, seq, padded_vocab, 0), static_cast<long long>(batch),
              static_cast<long long>(seq));
  std::string why;
  const auto gpu = make_cuda_backend(0, &why);
  if (!gpu) {
    std::printf("gpu: unavailable: %s\n", why.c_str());
    return 0;
  }
  std::printf("gpu: %s\n", gpu->name().c_str());
  const int64_t t = batch * seq;
  struct Shape {
    int64_t m, n, k;
  };
  // The square peak, then the proxy's own largest shapes (FFN up/down, head) at its token count.
  for (const Shape s :
       {Shape{8192, 8192, 8192}, Shape{t, cfg.intermediate_size, cfg.hidden_size},
        Shape{t, cfg.hidden_size, cfg.intermediate_size}, Shape{t, padded_vocab, cfg.hidden_size}})
    std::printf("roofline: cublaslt_bf16 m=%lld n=%lld k=%lld tflops=%.1f\n", static_cast<long long>(s.m),
                static_cast<long long>(s.n), static_cast<long long>(s.k),
                roofline_tflops(*gpu, s.m, s.n, s.k, 20));
  std::printf("ours: unavailable (the model does not run on the CUDA backend yet)\n");
  return 0;
}
