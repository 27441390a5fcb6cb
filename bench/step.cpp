// bench_step: one DeepSeek-V3 training step (zero_grads + forward + backward) on the CPU, timed, with the
// model's training FLOPs, the measured oneDNN GEMM roofline of this machine, MFU and a per-operator
// breakdown.
//
//   ./build/bench_step [--config examples/deepseek/configs/proxy-cpu.json] [--batch 8] [--seq 256]
//                      [--threads 2] [--warmup 1] [--steps 3] [--precisions bf16,fp32] [--no-profile]
//
// Prints per precision `ours: precision=<p> tokens_per_s=<x> step_s=<median> gflops=<achieved> mfu=<y>`, the
// roofline lines, and an op table (exclusive wall time per DSV3_PROFILE label, from one extra profiled step).
//
// FLOPs per token (spec deepseek-v3-architecture §6; a multiply-add is 2 FLOPs, backward = 2× forward):
//   A     = d·q_lora + q_lora·H·(dn+dr) + d·(kv_lora+dr) + kv_lora·H·(dn+dv) + H·dv·d        (MLA matmuls;
//           q_lora = 0: d·H·(dn+dr) instead of the first two)
//   N_mm  = L·A + n_dense·3·d·F + n_moe·(K·3·d·Fm + N_s·3·d·Fm + E·d) + V·d            (router and head
//   included,
//           embedding lookup excluded)
//   F_att = L·(2·H·(dn+dr) + 2·H·dv)·S_eff, S_eff = (S+1)/2: QKᵀ and PV counted causally (the exact mean
//   number
//           of keys a query sees), not the full S² square
//   MTP (D depths, each: eh_proj 2d·d, one MoE/dense layer, the shared head): D·(2d² + layer + V·d) more
//   matmul
//           params and D more attention layers.
//   train = 6·N_mm + 3·F_att.
// Megatron's num_floating_point_operations (megatron-deepseek-system §5.1) differs only in small terms: it
// adds the RMSNorm weights (the "+1"s), leaves the router out, and counts attention as S/2 instead of
// (S+1)/2. Both are printed; MFU is reported with Megatron's formula (DESIGN.md, Performance), against the
// measured bf16 GEMM roofline.
#include <omp.h>
#include <sys/resource.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/profile.h"
#include "kernels/cpu/gemm.h"
#include "model/config.h"
#include "model/model.h"

using namespace dsv3;

namespace {

double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Process CPU seconds (user + system, all threads): on a shared machine this moves much less than wall time
// when other processes steal cores (with OMP_WAIT_POLICY=passive it is the work itself, not spinning).
double cpu_s() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + 1e-6 * (u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

struct Flops {
  double ours = 0, megatron = 0;  // per token
};

Flops flops_per_token(const ModelConfig& c, int64_t S, bool mtp) {
  const double d = c.hidden_size, H = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim,
               dv = c.v_head_dim, ql = c.q_lora_rank, kvl = c.kv_lora_rank, F = c.intermediate_size,
               Fm = c.moe_intermediate_size, K = c.num_experts_per_tok, E = c.n_routed_experts,
               Ns = c.n_shared_experts, V = c.vocab_size;
  const int64_t D = mtp ? c.num_nextn_predict_layers : 0;
  const double A = (ql > 0 ? d * ql + ql * H * (dn + dr) : d * H * (dn + dr)) + d * (kvl + dr) +
                   kvl * H * (dn + dv) + H * dv * d;
  const double moe_mm = K * 3 * d * Fm + Ns * 3 * d * Fm + E * d, dense_mm = 3 * d * F;
  double n_mm = V * d, layers = 0;
  for (int64_t i = 0; i < c.num_hidden_layers + D; ++i) {
    n_mm += A + (c.is_moe_layer(i) ? moe_mm : dense_mm);
    layers += 1;
  }
  n_mm += D * (2 * d * d + V * d);
  const double s_eff = (S + 1) / 2.0;
  const double f_att = layers * (2 * H * (dn + dr) + 2 * H * dv) * s_eff;
  Flops f;
  f.ours = 6 * n_mm + 3 * f_att;

  // Megatron §5.1, per token (B·s factored out), L = layers incl. MTP.
  const double L = layers, s = S;
  double l_moe = 0, l_dense = 0;
  for (int64_t i = 0; i < c.num_hidden_layers + D; ++i) (c.is_moe_layer(i) ? l_moe : l_dense) += 1;
  const double shared = Ns * Fm;
  const double qk = dn, qkpe = dr, v = dv;
  const double q_term = ql > 0 ? ql * (d + H * (qk + qkpe) + 1) : d * H * (qk + qkpe);
  f.megatron =
      12 * L * d * (F * 1.5 * (l_dense / L) + Fm * K * 1.5 * (l_moe / L) + shared * 1.5 * (l_moe / L)) +
      6 * L *
          (q_term + kvl * (d + H * (qk + v) + 1) + d * qkpe + H * v * d + s * H * (qk + qkpe) / 2 +
           s * H * v / 2) +
      6 * D * (3 * d + 2 * d * d) + 6 * d * V * (D + 1);
  return f;
}

// Best-of-reps GFLOP/s of one large oneDNN matmul (C = A·Bᵀ, the linear-layer form) with the current threads.
double gemm_roofline(GemmType t, int64_t m, int64_t n, int64_t k, int reps) {
  const int64_t es = t == GemmType::kF32 ? 4 : 2;
  std::vector<uint8_t> a(m * k * es), b(n * k * es);
  std::vector<float> c(m * n);
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  auto fill = [&](std::vector<uint8_t>& buf, int64_t cnt) {
    for (int64_t i = 0; i < cnt; ++i) {
      const float x = u(rng);
      if (t == GemmType::kF32)
        reinterpret_cast<float*>(buf.data())[i] = x;
      else
        reinterpret_cast<bf16*>(buf.data())[i] = to_bf16(x);
    }
  };
  fill(a, m * k), fill(b, n * k);
  GemmArgs g;
  g.m = m, g.n = n, g.k = k;
  g.a = a.data(), g.lda = k;
  g.b = b.data(), g.ldb = k, g.trans_b = true;
  g.c = c.data(), g.ldc = n, g.ab_type = t;
  gemm(g);  // primitive creation + warm caches
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    const double t0 = now_s();
    gemm(g);
    best = std::min(best, now_s() - t0);
  }
  return 2.0 * m * n * k / best / 1e9;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"dsv3 training-step benchmark"};
  std::string config = "examples/deepseek/configs/proxy-cpu.json", precisions = "bf16,fp32";
  int64_t batch = 8, seq = 256;
  int threads = 2, warmup = 1, steps = 3;
  bool no_profile = false;
  app.add_option("--config", config);
  app.add_option("--batch", batch);
  app.add_option("--seq", seq);
  app.add_option("--threads", threads);
  app.add_option("--warmup", warmup);
  app.add_option("--steps", steps);
  app.add_option("--precisions", precisions, "comma-separated: bf16, fp32");
  app.add_flag("--no-profile", no_profile, "skip the profiled step and the op table");
  CLI11_PARSE(app, argc, argv);

  omp_set_num_threads(threads);
  const ModelConfig cfg = ModelConfig::from_json_file(config);
  const int64_t T = batch * seq;
  const Flops fpt = flops_per_token(cfg, seq, true);
  std::printf("config: %s  layers=%lld (moe %lld) mtp=%lld  batch=%lld seq=%lld threads=%d\n", config.c_str(),
              static_cast<long long>(cfg.num_hidden_layers), static_cast<long long>(cfg.num_moe_layers()),
              static_cast<long long>(cfg.num_nextn_predict_layers), static_cast<long long>(batch),
              static_cast<long long>(seq), threads);
  std::printf(
      "flops: per_token ours=%.4g (causal attention, (S+1)/2 keys) megatron=%.4g (S/2)  diff=%+.2f%%"
      "  per_step megatron=%.4g\n",
      fpt.ours, fpt.megatron, 100.0 * (fpt.ours - fpt.megatron) / fpt.megatron, fpt.megatron * T);

  const double roof_bf16 = gemm_roofline(GemmType::kBF16, 2048, 2048, 2048, 5);
  const double roof_f32 = gemm_roofline(GemmType::kF32, 2048, 2048, 2048, 3);
  std::printf("roofline: onednn_gemm_2048^3 bf16_gflops=%.1f fp32_gflops=%.1f\n", roof_bf16, roof_f32);

  // A fresh batch for every step, as in training: the routing, so every expert's row count, changes each step
  // (a repeated batch would hide the cost of shapes the GEMMs have not seen).
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(cfg.vocab_size) - 1);
  const int n_batches = warmup + steps + 1;
  std::vector<std::vector<int32_t>> ids(n_batches, std::vector<int32_t>(T)),
      labels(n_batches, std::vector<int32_t>(T));
  for (int i = 0; i < n_batches; ++i)
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<int32_t> row(seq + 1);
      for (auto& x : row) x = tok(rng);
      std::copy(row.begin(), row.end() - 1, ids[i].begin() + b * seq);
      std::copy(row.begin() + 1, row.end(), labels[i].begin() + b * seq);
    }

  size_t pos = 0;
  while (pos <= precisions.size()) {
    size_t comma = precisions.find(',', pos);
    if (comma == std::string::npos) comma = precisions.size();
    const std::string prec = precisions.substr(pos, comma - pos);
    pos = comma + 1;
    if (prec.empty()) continue;
    if (prec != "bf16" && prec != "fp32") {
      std::fprintf(stderr, "bench_step: unknown precision %s\n", prec.c_str());
      return 2;
    }
    ModelOptions opt;
    opt.precision = prec == "bf16" ? Precision::kBF16 : Precision::kF32;
    Model model(cfg, opt);
    model.init(1234);
    int next = 0;
    auto step = [&] {
      {
        DSV3_PROFILE("zero_grads");
        model.zero_grads();
      }
      const int i = next++ % n_batches;
      const ForwardStats st = model.forward(ids[i].data(), labels[i].data(), batch, seq, true);
      std::vector<float> mtp_scales;
      for (int64_t n : st.mtp_tokens) mtp_scales.push_back(n > 0 ? 0.1f / n : 0.f);
      model.backward(1.f / static_cast<float>(st.lm_tokens), 0.f, mtp_scales);
      return st.lm_loss_sum / st.lm_tokens;
    };
    double loss = 0;
    for (int i = 0; i < warmup; ++i) loss = step();
    std::vector<double> times, cpus;
    for (int i = 0; i < steps; ++i) {
      const double t0 = now_s(), c0 = cpu_s();
      loss = step();
      times.push_back(now_s() - t0);
      cpus.push_back(cpu_s() - c0);
    }
    const double step_s = median(times);
    const double tps = T / step_s, gflops = fpt.megatron * T / step_s / 1e9;
    std::printf(
        "ours: precision=%s tokens_per_s=%.1f step_s=%.3f gflops=%.1f mfu=%.3f (vs %s roofline %.1f: "
        "%.3f) loss=%.4f step_cpu_s=%.3f\n",
        prec.c_str(), tps, step_s, gflops, gflops / roof_bf16, prec.c_str(),
        prec == "bf16" ? roof_bf16 : roof_f32, gflops / (prec == "bf16" ? roof_bf16 : roof_f32), loss,
        median(cpus));
    if (!no_profile) {
      profile::reset();
      profile::set_enabled(true);
      const double t0 = now_s();
      step();
      const double total = now_s() - t0;
      profile::set_enabled(false);
      auto e = profile::entries();
      std::sort(e.begin(), e.end(), [](const auto& a, const auto& b) { return a.self_s > b.self_s; });
      double covered = 0;
      std::printf("profile (%s, one step %.1f ms, exclusive time per op):\n", prec.c_str(), total * 1e3);
      std::printf("  %-22s %10s %7s %7s\n", "op", "ms/step", "%step", "calls");
      for (const auto& x : e) {
        covered += x.self_s;
        std::printf("  %-22s %10.2f %6.1f%% %7lld\n", x.label, x.self_s * 1e3, 100 * x.self_s / total,
                    static_cast<long long>(x.calls));
      }
      std::printf("  %-22s %10.2f %6.1f%%\n", "(outside scopes)", (total - covered) * 1e3,
                  100 * (total - covered) / total);
    }
  }
  return 0;
}
