// The GPU's code path, run on this machine: the host-guarded test backend (kernels/guarded_backend.cpp) runs the
// CPU kernels on memory the host may not touch outside an op, so everything a GPU run does besides the CUDA
// kernels themselves (device buffers, host staging of the router's logits, the expert bias, checkpoints and
// moments, the optimizer over segment lists) runs here, and any host access to device memory crashes the test.
// Against the CPU backend the numbers are the same: the same kernels, the same order.
#include <gtest/gtest.h>

#include <cmath>
#include <csignal>
#include <numeric>

#include "kernels/backend.h"
#include "model/model.h"
#include "train_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

ModelConfig config(const std::string& name) {
  return ModelConfig::from_json_file((testing::source_dir() / "examples/deepseek/configs" / name).string());
}

double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, m = 0;
  for (size_t i = 0; i < b.size(); ++i)
    d = std::max(d, std::fabs(double(a[i]) - b[i])), m = std::max(m, std::fabs(double(b[i])));
  return m > 0 ? d / m : d;
}

TEST(GuardedDevice, HostAccessOutsideAnOpCrashes) {
  auto be = make_host_guarded_backend();
  DeviceBuffer b(*be, 64);
  float one = 1.f;
  be->copy_to_device(b.data(), &one, sizeof one);  // through the backend: fine
  float back = 0;
  be->copy_to_host(&back, b.data(), sizeof back);
  EXPECT_EQ(back, 1.f);
  EXPECT_EXIT(
      {
        volatile float x = *b.as<float>();
        (void)x;
        std::exit(0);
      },
      ::testing::KilledBySignal(SIGSEGV), ".*");
}

int64_t moe_layer_count(const ModelConfig& cfg) {  // MTP depths included
  int64_t n = 0;
  for (int64_t i = 0; i < cfg.num_hidden_layers + cfg.num_nextn_predict_layers; ++i) n += cfg.is_moe_layer(i);
  return n;
}

struct Run {
  double loss = 0, mtp = 0, aux = 0;
  std::vector<float> logits, grads;
};

Run run(const ModelConfig& cfg, ModelOptions o, Backend& be) {
  o.backend = &be;
  Model m(cfg, o);
  m.init(6);
  std::vector<float> p = m.params_to_host();
  for (const auto& info : m.table().params())  // biased routing: the selection differs from the plain top-k
    if (info.name.find("e_score_correction_bias") != std::string::npos && m.store().contains(info.name))
      for (int64_t i = 0; i < info.numel; ++i)
        p[m.store().offset(info.name) + i] = 0.01f * static_cast<float>((i * 7) % 5);
  m.params_from_host(p);
  const int64_t B = 2, S = 23, T = B * S;
  std::vector<int32_t> ids(T), labels(T);
  for (int64_t i = 0; i < T; ++i)
    ids[i] = (i * 131 + 7) % cfg.vocab_size, labels[i] = i % 7 == 3 ? -100 : (i * 37 + 1) % cfg.vocab_size;
  Run r;
  r.logits.resize(T * cfg.vocab_size);
  for (int pass = 0; pass < 2; ++pass) {  // the second pass: steady state (buffers reused)
    const ForwardStats st = m.forward(ids.data(), labels.data(), B, S, true, r.logits.data());
    r.loss = st.lm_loss_sum / st.lm_tokens, r.aux = st.aux_loss_sum;
    r.mtp = st.mtp_loss_sum.empty() ? 0 : st.mtp_loss_sum[0] / st.mtp_tokens[0];
    m.zero_grads();
    m.backward(1.f / st.lm_tokens, 1.f, {st.mtp_tokens.empty() ? 0.f : 0.3f / st.mtp_tokens[0]});
  }
  r.grads = m.grads_to_host();
  return r;
}

void expect_same(const ModelConfig& cfg, ModelOptions o, const char* what) {
  auto guarded = make_host_guarded_backend();
  const Run c = run(cfg, o, cpu_backend()), g = run(cfg, o, *guarded);
  // Expected bit-identical with one OpenMP thread (make test); with more, the CPU runs the experts' GEMMs in
  // parallel and the device path in order, which may split them differently: 1e-6.
  EXPECT_LE(testing::rel_diff(g.loss, c.loss), 1e-6) << what;
  EXPECT_LE(testing::rel_diff(g.mtp, c.mtp), 1e-6) << what;
  EXPECT_LE(testing::rel_diff(g.aux, c.aux), 1e-6) << what;
  EXPECT_LE(max_rel(g.logits, c.logits), 1e-6) << what;
  EXPECT_LE(max_rel(g.grads, c.grads), 1e-6) << what;
}

TEST(GuardedDevice, DenseModelTakesTheDevicePathWithTheCpusNumbers) {
  for (Precision p : {Precision::kF32, Precision::kBF16}) {
    ModelOptions o;
    o.precision = p;
    expect_same(config("demo-dense.json"), o, p == Precision::kF32 ? "dense fp32" : "dense bf16");
  }
}

TEST(GuardedDevice, MoeModelTakesTheDevicePathWithTheCpusNumbers) {
  ModelOptions o;
  o.seq_aux_coeff = 1e-2f;
  expect_same(config("demo-cpu.json"), o, "moe fp32");
  o.capacity_factor = 1.0, o.recompute = true;
  expect_same(config("demo-cpu.json"), o, "moe fp32, token drop, recompute");
  o.precision = Precision::kBF16;
  expect_same(config("demo-cpu.json"), o, "moe bf16, token drop, recompute");
  o.force_load_balancing = true;  // the normals replace the logits on the device as on the host
  expect_same(config("demo-cpu.json"), o, "moe bf16, token drop, recompute, forced balance");
}

// The grouped expert GEMMs (MoeConfig::ExpertGemm::kGrouped, a GPU's default where it has the kernel): every
// bf16 expert GEMM of a layer goes to Backend::grouped_gemm (2 kinds forward, 5 backward), with the row offsets
// in backend memory (on the device path the router's own, on the CPU uploaded from the dispatch), and gives the
// per-expert GEMMs' numbers, token drop included.
TEST(GuardedDevice, GroupedExpertGemmsGiveThePerExpertNumbers) {
  const ModelConfig cfg = config("demo-cpu.json");
  const int64_t moe_layers = moe_layer_count(cfg);
  ASSERT_GT(moe_layers, 0);
  for (const double capacity : {-1.0, 1.0}) {
    SCOPED_TRACE(capacity < 0 ? "dropless" : "capacity 1.0");
    ModelOptions o;
    o.precision = Precision::kBF16, o.seq_aux_coeff = 1e-2f, o.capacity_factor = capacity;
    o.expert_gemm = MoeConfig::ExpertGemm::kPerExpert;
    const auto ref = run(cfg, o, cpu_backend());
    o.expert_gemm = MoeConfig::ExpertGemm::kGrouped;
    auto guarded = make_host_guarded_backend();
    const auto g = run(cfg, o, *guarded), c = run(cfg, o, cpu_backend());
    EXPECT_EQ(guarded->grouped_gemms(), 2 * moe_layers * 7);  // two passes
    for (const auto* r : {&g, &c}) {
      EXPECT_LE(testing::rel_diff(r->loss, ref.loss), 1e-6);
      EXPECT_LE(testing::rel_diff(r->aux, ref.aux), 1e-6);
      EXPECT_LE(max_rel(r->logits, ref.logits), 1e-6);
      EXPECT_LE(max_rel(r->grads, ref.grads), 1e-6);
    }
    auto per_expert = make_host_guarded_backend();
    o.expert_gemm = MoeConfig::ExpertGemm::kPerExpert;
    run(cfg, o, *per_expert);
    EXPECT_EQ(per_expert->grouped_gemms(), 0);
  }
}

// On one device rank the router runs there (kernels/route.h), capacity rule included: a training step reads back
// one small buffer per MoE layer (its expert offsets and aux loss) and nothing in the backward. The numbers are
// the host router's (the tests above, and GuardedTrain bit for bit).
TEST(GuardedDevice, RoutingReadsOnlyTheExpertOffsetsPerLayer) {
  const ModelConfig cfg = config("demo-cpu.json");
  const int64_t moe_layers = moe_layer_count(cfg);
  ASSERT_GT(moe_layers, 0);
  for (const double capacity : {-1.0, 1.0}) {
    auto guarded = make_host_guarded_backend();
    ModelOptions o;
    o.backend = guarded.get(), o.seq_aux_coeff = 1e-2f, o.capacity_factor = capacity;
    Model m(cfg, o);
    m.init(6);
    const int64_t B = 2, S = 16, T = B * S;
    std::vector<int32_t> ids(T), labels(T);
    for (int64_t i = 0; i < T; ++i)
      ids[i] = (i * 131 + 7) % cfg.vocab_size, labels[i] = (i * 37 + 1) % cfg.vocab_size;
    m.defer_losses(1 + cfg.num_nextn_predict_layers);
    const int64_t before = guarded->host_reads();
    std::vector<ForwardStats> st{m.forward(ids.data(), labels.data(), B, S, true)};
    const int64_t after_forward = guarded->host_reads();
    m.backward(1.f / st[0].lm_tokens, 1.f, {0.1f / st[0].mtp_tokens.at(0)});
    const int64_t after_backward = guarded->host_reads();
    m.resolve_losses(st);
    m.defer_losses(0);
    SCOPED_TRACE(capacity < 0 ? "dropless" : "capacity 1.0");
    EXPECT_EQ(after_forward - before, moe_layers);
    EXPECT_EQ(after_backward - after_forward, 0);
    const auto& kept = st[0].kept_pairs;
    const auto& routed = st[0].routed_pairs;
    if (capacity > 0) {  // the rule dropped pairs
      EXPECT_LT(std::accumulate(kept.begin(), kept.end(), int64_t{0}),
                std::accumulate(routed.begin(), routed.end(), int64_t{0}));
    }
  }
}

// ---- dsv3 train --device host-guarded: the trainer's GPU path (BackendAdamW, staged checkpoints and biases)

class GuardedTrain : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::scratch_dir();
    data_ = testing::make_tiny_data(dir_);
  }
  std::pair<testing::CmdResult, fs::path> train(const std::string& extra) {
    const fs::path tb = dir_ / ("tb-" + std::to_string(runs_++));
    const auto src = testing::source_dir();
    // tiny_train_args: demo-cpu.json (MoE, MTP), seq aux loss, expert bias; 6 iterations.
    return {testing::run_dsv3_single(testing::tiny_train_args(dir_, data_, 2, 4) +
                                         " --train-iters 6 --tensorboard-dir " + tb.string() + " " + extra,
                                     dir_),
            tb};
  }
  static std::vector<double> series(const fs::path& tb, const std::string& tag) {
    std::vector<double> v;
    const auto s = testing::read_scalars(tb);
    if (s.count(tag))
      for (const auto& [it, x] : s.at(tag)) v.push_back(x);
    return v;
  }
  fs::path dir_;
  std::string data_;
  int runs_ = 0;
};

TEST_F(GuardedTrain, SixIterationsGiveTheCpuLossesGradNormsAndBiases) {
  for (const std::string prec : {"", "--bf16"}) {
    const auto [c, c_tb] =
        train("--device cpu --save-interval 6 --save " + (dir_ / ("c" + prec)).string() + " " + prec);
    const auto [g, g_tb] = train("--device host-guarded --save-interval 6 --save " +
                                 (dir_ / ("g" + prec)).string() + " " + prec);
    ASSERT_EQ(c.rc, 0) << c.out;
    ASSERT_EQ(g.rc, 0) << g.out;
    EXPECT_NE(g.out.find("device: host-guarded"), std::string::npos) << g.out;
    EXPECT_NE(g.out.find("moe: "), std::string::npos)
        << g.out;  // the health line reads the biases through a copy
    ASSERT_EQ(series(c_tb, "lm loss").size(), 6u) << c.out;
    EXPECT_EQ(series(g_tb, "lm loss"), series(c_tb, "lm loss")) << prec;
    EXPECT_EQ(series(g_tb, "grad-norm"), series(c_tb, "grad-norm")) << prec;
    const auto wc = testing::read_weights(dir_ / ("c" + prec) / "iter_0000006");
    const auto wg = testing::read_weights(dir_ / ("g" + prec) / "iter_0000006");
    EXPECT_EQ(wg, wc) << prec;  // every weight, the expert biases included
  }
}

TEST_F(GuardedTrain, CheckpointsMoveBetweenTheDevicePathAndTheCpu) {
  for (const auto& [from, to] :
       {std::pair<std::string, std::string>{"host-guarded", "cpu"}, {"cpu", "host-guarded"}}) {
    const fs::path ckpt = dir_ / ("ckpt-" + from);
    const auto [full, full_tb] =
        train("--device " + from + " --save " + ckpt.string() + " --save-interval 3");
    ASSERT_EQ(full.rc, 0) << full.out;
    std::ofstream(ckpt / "latest_checkpointed_iteration.txt", std::ios::trunc) << 3;
    const auto [resumed, resumed_tb] = train("--device " + to + " --load " + ckpt.string());
    ASSERT_EQ(resumed.rc, 0) << resumed.out;
    const auto a = series(full_tb, "lm loss"), b = series(resumed_tb, "lm loss");
    ASSERT_EQ(a.size(), 6u);
    EXPECT_EQ(b, std::vector<double>(a.begin() + 3, a.end())) << from << " -> " << to;
  }
}

}  // namespace
}  // namespace dsv3
