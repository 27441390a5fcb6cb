// `make bench-gpu`, our side: the measured cuBLASLt bf16 GEMM roofline of this GPU (the MFU denominator, measured
// in the same run as llm.c #796 teaches) and the Megatron FLOPs of one training iteration of the config, so the
// script can turn tokens/s (ours and PyTorch's) into TFLOP/s and MFU.
//
//   bench_gpu --config examples/deepseek/configs/proxy-gpu-dense.json --batch 1 --seq 4096
//
// Prints `gpu: <name>`, `roofline: cublaslt_bf16 m=.. n=.. k=.. tflops=<x>` lines, `flops_per_iteration=<f>`, and
// dsv3's own training step (bf16, forward + backward + grad norm + AdamW on the GPU, fresh batch each step) as
// `ours: mode=dsv3 tokens_per_s=<x> step_s=<median> ...` with the median split into forward / backward / optimizer
// (measured in extra steps synchronised between the phases). Without a GPU it prints `gpu: unavailable: <why>`
// and exits 0; a config the GPU path cannot run prints `ours: unavailable: <why>`. --routing balanced (MoE): every
// layer routes on fixed normal logits (Megatron's --moe-router-force-load-balancing), untrained (default) on the
// initialised router weights.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/profile.h"
#include "kernels/backend.h"
#include "model/config.h"
#include "model/model.h"
#include "optim/backend_adamw.h"
#include "train/log_format.h"
#include "train/memory_plan.h"

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

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// dsv3's training step on the GPU: bf16, the Megatron objective's backward, grad norm and AdamW.
void our_step(Backend& gpu, const ModelConfig& cfg, int64_t batch, int64_t seq, bool balanced) {
  using Clock = std::chrono::steady_clock;
  auto secs = [](Clock::time_point a) { return std::chrono::duration<double>(Clock::now() - a).count(); };
  ModelOptions o;
  o.precision = Precision::kBF16, o.backend = &gpu, o.force_load_balancing = balanced;
  Model m(cfg, o);
  m.init(1234);
  BackendAdamW opt(gpu, m.table(), m.store(), AdamWConfig{0.9, 0.95, 1e-8});
  const int64_t t = batch * seq;
  std::vector<int32_t> ids(t), labels(t);
  uint64_t x = 88172645463325252ull;
  auto fill = [&] {
    for (int64_t i = 0; i < t; ++i) x ^= x << 13, x ^= x >> 7, x ^= x << 17, ids[i] = x % cfg.vocab_size;
    for (int64_t i = 0; i < t; ++i) labels[i] = i + 1 < t ? ids[i + 1] : -100;
  };
  int64_t n_step = 0;
  auto step = [&](bool split, double* f, double* b, double* u) {
    fill();
    auto t0 = Clock::now();
    m.zero_grads();
    const ForwardStats st = m.forward(ids.data(), labels.data(), batch, seq, true);  // reads the loss: a sync
    *f = secs(t0), t0 = Clock::now();
    m.backward(1.f / st.lm_tokens, 0.f);
    if (split) gpu.synchronize();
    *b = secs(t0), t0 = Clock::now();
    const double norm = opt.grad_norm(m.grads().data());  // reads the norm: a sync
    if (norm > 1.0) opt.scale(m.grads().data(), static_cast<float>(1.0 / (norm + 1e-6)));
    opt.step(m.params().data(), m.grads().data(), ++n_step, 3e-4, 0.1);
    gpu.synchronize();
    *u = secs(t0);
  };
  double f, b, u;
  for (int i = 0; i < 2; ++i) step(false, &f, &b, &u);  // warm-up: plans, scratch, first-touch
  std::vector<double> whole, fw, bw, up;
  for (int i = 0; i < 5; ++i) step(false, &f, &b, &u), whole.push_back(f + b + u);
  for (int i = 0; i < 3; ++i) step(true, &f, &b, &u), fw.push_back(f), bw.push_back(b), up.push_back(u);
  // Where the time goes: one more step with every profiler scope synchronised (slower than the steps above,
  // but each scope's time is its device work).
  static Backend* sync_be = &gpu;
  profile::g_sync = [] { sync_be->synchronize(); };
  profile::reset(), profile::set_enabled(true);
  step(true, &f, &b, &u);
  profile::set_enabled(false), profile::g_sync = nullptr;
  double total = 0;
  for (const auto& e : profile::entries()) total += e.self_s;
  std::printf("ours: per-op self time of one synchronised step (%.1f ms in scopes):\n", total * 1e3);
  for (const auto& e : profile::entries())
    std::printf("ours:   %-22s %8.2f ms %5.1f%%\n", e.label, e.self_s * 1e3, 100 * e.self_s / total);
  // Device memory: what the backend allocated at its peak (model, its bf16 copies, activations, scratch and the
  // Adam moments) beside the memory plan's prediction of the same (train/memory_plan.h; CUDA's own not included).
  MemoryRun run;
  run.micro_batch = batch, run.seq = seq, run.precision = Precision::kBF16, run.cpu = false, run.mtp = true;
  const StageMemory plan = plan_memory(cfg, MemoryLayout{}, run)[0];
  std::printf("ours: memory: backend max allocated %.2f GiB, planned %.2f GiB\n",
              static_cast<double>(gpu.peak_bytes()) / (1 << 30),
              static_cast<double>(plan.backend() + plan.adam) / (1 << 30));
  const double s = median(whole);
  std::printf(
      "ours: mode=dsv3 routing=%s tokens_per_s=%.1f step_s=%.4f forward_s=%.4f backward_s=%.4f "
      "optimizer_s=%.4f\n",
      balanced ? "balanced" : "untrained", t / s, s, median(fw), median(bw), median(up));
}

}  // namespace

int main(int argc, char** argv) {
  std::string config = "examples/deepseek/configs/proxy-gpu-dense.json";
  int64_t batch = 1, seq = 4096;
  bool balanced =
      false;  // --routing balanced: MoE layers route on fixed normals (moe.h force_load_balancing)
  for (int i = 1; i + 1 < argc; i += 2) {
    if (!std::strcmp(argv[i], "--config"))
      config = argv[i + 1];
    else if (!std::strcmp(argv[i], "--batch"))
      batch = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--seq"))
      seq = std::atoll(argv[i + 1]);
    else if (!std::strcmp(argv[i], "--routing"))
      balanced = !std::strcmp(argv[i + 1], "balanced");
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
  try {
    our_step(*gpu, cfg, batch, seq, balanced);
  } catch (const Error& e) {
    std::printf("ours: unavailable: %s\n", e.what());
  }
  return 0;
}
