// DeepSeek-V3 on the CUDA backend against the same model on the CPU backend (the exact reference): the dense
// model (MLA with q-LoRA and YaRN, dense SwiGLU layers, MTP) and the MoE model (dense first layer, sigmoid
// group-limited routing with a bias, shared expert, sequence aux loss, token drop, MTP): logits, losses and every
// parameter gradient; two GPU runs bit-identical; recompute bit-identical to stored activations; a steady-state
// step allocating nothing. Then `dsv3 train --device cuda` against `--device cpu`: 10 iterations' losses and grad
// norms (and the MoE's expert biases), and checkpoints moving between the two.
//
// Tolerances: fp32 ≤ 1e-5 relative (max |gpu − cpu| / max |cpu| per tensor): the arithmetic is the same, only
// GEMM and reduction orders differ. bf16: both sides round the same operands to bf16, but an fp32 value that
// differs in its last bits may round to the neighbouring bf16 (2^-8 relative) and that difference travels
// through the layers: stated per check below.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <regex>

#include "hf_interop.h"
#include "kernels/kernel_test_util.h"
#include "model/model.h"
#include "train/checkpoint.h"
#include "train_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

std::unique_ptr<Backend> gpu_or_skip() {
  std::string why;
  return make_cuda_backend(0, &why);
}

ModelConfig config(const std::string& name) {
  return ModelConfig::from_json_file((testing::source_dir() / "examples/deepseek/configs" / name).string());
}
ModelConfig dense_config() {
  return config("demo-dense.json");
}

double rel(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0, m = 0;
  for (size_t i = 0; i < b.size(); ++i)
    d = std::max(d, std::fabs(double(a[i]) - b[i])), m = std::max(m, std::fabs(double(b[i])));
  return m > 0 ? d / m : d;
}

struct Batch {
  int64_t B = 2, S = 37;  // S odd: partial attention tiles
  std::vector<int32_t> ids, labels;
  explicit Batch(int64_t vocab) {
    auto r = testing::philox_normals(11, B * S, 3);
    for (int64_t i = 0; i < B * S; ++i) {
      ids.push_back(static_cast<int32_t>(std::fabs(r[i]) * 997) % vocab);
      labels.push_back(i % 9 == 4 ? -100
                                  : static_cast<int32_t>(std::fabs(r[(i + 5) % (B * S)]) * 1009) % vocab);
    }
  }
};

struct StepResult {
  double loss = 0, mtp_loss = 0, aux_loss = 0;
  std::vector<float> logits, grads;
};

// One forward (with logits) and backward of the Megatron objective (lm mean + aux + 0.3 · MTP mean).
StepResult step(Model& m, const Batch& b, bool logits = true) {
  StepResult r;
  if (logits) r.logits.resize(b.B * b.S * m.config().vocab_size);
  ForwardStats st =
      m.forward(b.ids.data(), b.labels.data(), b.B, b.S, true, logits ? r.logits.data() : nullptr);
  r.loss = st.lm_loss_sum / st.lm_tokens;
  r.mtp_loss = st.mtp_loss_sum.at(0) / st.mtp_tokens.at(0);
  r.aux_loss = st.aux_loss_sum;
  m.zero_grads();
  m.backward(1.f / st.lm_tokens, 1.f, {0.3f / st.mtp_tokens[0]});
  r.grads = m.grads_to_host();
  return r;
}

// Per tensor max-relative gradient error; the worst, named.
std::pair<double, std::string> worst_grad(const Model& m, const std::vector<float>& g,
                                          const std::vector<float>& ref) {
  std::pair<double, std::string> w{0, ""};
  for (const auto& p : m.table().params()) {
    if (!p.tied_to.empty() || !m.store().contains(p.name)) continue;
    const int64_t o = m.store().offset(p.name);
    std::vector<float> a(g.begin() + o, g.begin() + o + p.numel),
        b(ref.begin() + o, ref.begin() + o + p.numel);
    const double e = rel(a, b);
    if (e > w.first || w.second.empty()) w = {e, p.name};
  }
  return w;
}

// Random expert biases (the same on both models), so that the selection differs from the plain top-k.
void bias_the_routing(Model& m) {
  std::vector<float> p = m.params_to_host();
  for (const auto& info : m.table().params())
    if (info.name.find("e_score_correction_bias") != std::string::npos && m.store().contains(info.name)) {
      const auto r = testing::philox_normals(31, info.numel, m.store().offset(info.name), 0.05f);
      std::copy(r.begin(), r.end(), p.begin() + m.store().offset(info.name));
    }
  m.params_from_host(p);
}

void compare(const ModelConfig& cfg, ModelOptions o, const char* what, double tol_loss, double tol_logits,
             double tol_grad) {
  auto gpu = gpu_or_skip();
  if (!gpu) GTEST_SKIP() << "needs a GPU";
  Model cpu_m(cfg, o);
  o.backend = gpu.get();
  Model gpu_m(cfg, o);
  cpu_m.init(5), gpu_m.init(5);
  bias_the_routing(cpu_m), bias_the_routing(gpu_m);
  ASSERT_EQ(cpu_m.params_to_host(), gpu_m.params_to_host());
  const Batch b(cfg.vocab_size);
  const StepResult c = step(cpu_m, b), g = step(gpu_m, b);
  const auto [gerr, gname] = worst_grad(cpu_m, g.grads, c.grads);
  std::printf(
      "%s: loss cpu %.9g gpu %.9g | mtp cpu %.9g gpu %.9g | aux cpu %.9g gpu %.9g | logits %.3g | worst grad "
      "%.3g (%s)\n",
      what, c.loss, g.loss, c.mtp_loss, g.mtp_loss, c.aux_loss, g.aux_loss, rel(g.logits, c.logits), gerr,
      gname.c_str());
  EXPECT_LE(testing::rel_diff(g.loss, c.loss), tol_loss);
  EXPECT_LE(testing::rel_diff(g.mtp_loss, c.mtp_loss), tol_loss);
  EXPECT_LE(testing::rel_diff(g.aux_loss, c.aux_loss), tol_loss);
  EXPECT_LE(rel(g.logits, c.logits), tol_logits);
  EXPECT_LE(gerr, tol_grad) << gname;
}

void compare(Precision prec, double tol_loss, double tol_logits, double tol_grad) {
  ModelOptions o;
  o.precision = prec;
  compare(dense_config(), o, prec == Precision::kF32 ? "fp32" : "bf16", tol_loss, tol_logits, tol_grad);
}

TEST(CudaModel, DenseFp32MatchesCpu) {
  compare(Precision::kF32, 1e-5, 1e-5, 1e-5);
}

// bf16: 2e-3 on the losses (a mean over 74 tokens of per-token losses that move by a bf16 rounding at most),
// 1e-2 on logits (a few elements one bf16 ulp apart after four layers), 5e-2 on the worst gradient tensor (small
// tensors such as norm weights sum few products, so one flipped rounding shows more).
TEST(CudaModel, DenseBf16MatchesCpuWithinBf16Rounding) {
  compare(Precision::kBF16, 2e-3, 1e-2, 5e-2);
}

TEST(CudaModel, TwoGpuRunsAreBitIdenticalAndAStepAllocatesNothing) {
  auto gpu = gpu_or_skip();
  if (!gpu) GTEST_SKIP() << "needs a GPU";
  const ModelConfig cfg = dense_config();
  for (Precision prec : {Precision::kF32, Precision::kBF16}) {
    ModelOptions o;
    o.precision = prec, o.backend = gpu.get();
    Model a(cfg, o), b(cfg, o);
    a.init(9), b.init(9);
    const Batch batch(cfg.vocab_size);
    const StepResult ra = step(a, batch, false), rb = step(b, batch, false);
    EXPECT_EQ(ra.loss, rb.loss);
    EXPECT_EQ(0, std::memcmp(ra.grads.data(), rb.grads.data(), ra.grads.size() * sizeof(float)));
    const int64_t before = gpu->allocations();
    const StepResult again = step(a, batch, false);
    EXPECT_EQ(gpu->allocations(), before) << "a steady-state step allocated device memory";
    EXPECT_EQ(again.loss, ra.loss);
  }
}

// The MoE test config: MLA, one dense layer, MoE layers with a shared expert, MTP; biased routing and the
// sequence aux loss; then the same with token dropping (capacity 1.0, Megatron's probs policy).
TEST(CudaModel, MoeFp32MatchesCpu) {
  ModelOptions o;
  o.seq_aux_coeff = 1e-2f;
  compare(config("demo-cpu.json"), o, "moe fp32", 1e-5, 1e-5, 1e-5);
  o.capacity_factor = 1.0;
  compare(config("demo-cpu.json"), o, "moe fp32 token drop", 1e-5, 1e-5, 1e-5);
}

TEST(CudaModel, MoeBf16MatchesCpuWithinBf16Rounding) {
  ModelOptions o;
  o.precision = Precision::kBF16, o.seq_aux_coeff = 1e-2f;
  compare(config("demo-cpu.json"), o, "moe bf16", 2e-3, 1e-2, 5e-2);
}

TEST(CudaModel, MoeRecomputeIsBitIdenticalToStoredActivationsAndRerunsAgree) {
  auto gpu = gpu_or_skip();
  if (!gpu) GTEST_SKIP() << "needs a GPU";
  const ModelConfig cfg = config("demo-cpu.json");
  std::vector<std::vector<float>> grads;
  for (bool recompute : {false, true, true}) {
    ModelOptions o;
    o.backend = gpu.get(), o.recompute = recompute, o.seq_aux_coeff = 1e-2f;
    Model m(cfg, o);
    m.init(8);
    bias_the_routing(m);
    grads.push_back(step(m, Batch(cfg.vocab_size), false).grads);
  }
  EXPECT_EQ(0, std::memcmp(grads[0].data(), grads[1].data(), grads[0].size() * sizeof(float)));
  EXPECT_EQ(0, std::memcmp(grads[1].data(), grads[2].data(), grads[1].size() * sizeof(float)));
}

// ---- dsv3 train --device cuda against --device cpu

// The MoE runs add: --model-config .../demo-cpu.json plus kMoeFlags (a later --model-config wins).
const std::string kMoeFlags =
    " --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-2 "
    "--moe-router-enable-expert-bias";

std::string train_args(const fs::path& dir, const std::string& data, const std::string& extra) {
  const auto src = testing::source_dir();
  return "train --model-config " + (src / "examples/deepseek/configs/demo-dense.json").string() +
         " --data-path " + data + " --split 90,5,5 --data-cache-path " + (dir / "cache").string() +
         " --tokenizer-type HuggingFaceTokenizer --tokenizer-model " + (src / "data/tiny-4k").string() +
         " --seq-length 32 --micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --min-lr 3e-4 "
         "--lr-warmup-iters 1"
         " --lr-decay-style cosine --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0 --log-interval 1"
         " --eval-interval 1000 --eval-iters 1 --seed 7 --train-iters 10 " +
         extra;
}

// The losses and grad norms per iteration, from the run's TensorBoard scalars (fp32: 7 significant digits; the
// log line prints the grad norm to 3 decimals only).
struct Curve {
  std::vector<double> loss, norm;
};
Curve curve(const fs::path& tb) {
  Curve c;
  const testing::Scalars s = testing::read_scalars(tb);
  for (const auto& [it, v] : s.count("lm loss") ? s.at("lm loss") : std::map<int64_t, double>{})
    c.loss.push_back(v);
  for (const auto& [it, v] : s.count("grad-norm") ? s.at("grad-norm") : std::map<int64_t, double>{})
    c.norm.push_back(v);
  return c;
}

double max_rel(const std::vector<double>& a, const std::vector<double>& b, size_t from = 0) {
  double w = a.size() == b.size() ? 0 : INFINITY;
  for (size_t i = from; i < a.size() && i < b.size(); ++i) w = std::max(w, testing::rel_diff(a[i], b[i]));
  return w;
}

class CudaTrain : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!gpu_or_skip()) GTEST_SKIP() << "needs a GPU";
    dir_ = testing::scratch_dir();
    data_ = testing::make_tiny_data(dir_);
  }
  // A run writing TensorBoard into dir/tb-<n>; returns its output and that folder.
  std::pair<testing::CmdResult, fs::path> train(const std::string& extra) {
    const fs::path tb = dir_ / ("tb-" + std::to_string(runs_++));
    return {
        testing::run_dsv3_single(train_args(dir_, data_, extra + " --tensorboard-dir " + tb.string()), dir_),
        tb};
  }
  int runs_ = 0;
  fs::path dir_;
  std::string data_;
};

TEST_F(CudaTrain, TenIterationsGiveTheCpuLossesAndGradNorms) {
  for (const std::string prec : {"", "--bf16"}) {
    const auto [c, c_tb] = train("--device cpu " + prec);
    const auto [g, g_tb] = train("--device cuda " + prec);
    const auto [g2, g2_tb] = train("--device cuda " + prec);
    ASSERT_EQ(c.rc, 0) << c.out;
    ASSERT_EQ(g.rc, 0) << g.out;
    EXPECT_NE(g.out.find("device: cuda:0"), std::string::npos) << g.out;
    const Curve cc = curve(c_tb), gc = curve(g_tb), gc2 = curve(g2_tb);
    ASSERT_EQ(cc.loss.size(), 10u) << c.out;
    ASSERT_EQ(cc.norm.size(), 10u) << c.out;
    // fp32: 1e-5. bf16: 1e-2 (see the file's header; Adam turns
    // gradient differences of one bf16 rounding into weight differences of the same order each step).
    const double tol = prec.empty() ? 1e-5 : 1e-2;
    std::printf(
        "%s: max rel diff over 10 iterations: loss %.3g, grad norm %.3g (cpu loss[9] %.7g, gpu %.7g)\n",
        prec.empty() ? "fp32" : "bf16", max_rel(gc.loss, cc.loss), max_rel(gc.norm, cc.norm), cc.loss[9],
        gc.loss[9]);
    EXPECT_LE(max_rel(gc.loss, cc.loss), tol);
    EXPECT_LE(max_rel(gc.norm, cc.norm), tol);
    EXPECT_EQ(gc.loss, gc2.loss) << "two GPU runs differ";
    EXPECT_EQ(gc.norm, gc2.norm) << "two GPU runs differ";
  }
}

// The MoE model with biased routing (the expert-bias update each step) and the sequence aux loss: 10 iterations
// give the CPU's losses and grad norms, and the final biases (from the checkpoints) equal the CPU's.
TEST_F(CudaTrain, MoeTrainingGivesTheCpuLossesNormsAndExpertBiases) {
  const std::string moe = " --model-config " +
                          (testing::source_dir() / "examples/deepseek/configs/demo-cpu.json").string() +
                          kMoeFlags + " --save-interval 10 --save ";
  const auto [c, c_tb] = train("--device cpu" + moe + (dir_ / "moe-cpu").string());
  const auto [g, g_tb] = train("--device cuda" + moe + (dir_ / "moe-gpu").string());
  ASSERT_EQ(c.rc, 0) << c.out;
  ASSERT_EQ(g.rc, 0) << g.out;
  const Curve cc = curve(c_tb), gc = curve(g_tb);
  ASSERT_EQ(cc.loss.size(), 10u) << c.out;
  const auto wc = testing::read_weights(dir_ / "moe-cpu/iter_0000010"),
             wg = testing::read_weights(dir_ / "moe-gpu/iter_0000010");
  double bias_err = 0;
  int biases = 0;
  for (const auto& [name, v] : wc)
    if (name.find("e_score_correction_bias") != std::string::npos) {
      ASSERT_TRUE(wg.count(name)) << name;
      for (size_t i = 0; i < v.size(); ++i)
        bias_err = std::max(bias_err, std::fabs(double(v[i]) - wg.at(name)[i]));
      ++biases;
    }
  std::printf(
      "moe: max rel diff over 10 iterations: loss %.3g, grad norm %.3g; %d bias tensors, max |diff| %.3g\n",
      max_rel(gc.loss, cc.loss), max_rel(gc.norm, cc.norm), biases, bias_err);
  EXPECT_GT(biases, 0);
  EXPECT_LE(max_rel(gc.loss, cc.loss), 1e-5);
  EXPECT_LE(max_rel(gc.norm, cc.norm), 1e-5);
  // The update adds ±rate (1e-3) per step from the token counts: equal counts give bit-equal biases.
  EXPECT_EQ(bias_err, 0.0);

  // The GPU run's checkpoint loads in HF transformers as a CPU one does (tests/hf_interop.h: its logits and loss
  // are dsv3's on the CPU from the same directory). Skipped where python3 lacks torch and transformers.
  const fs::path it = dir_ / "moe-gpu/iter_0000010";
  const ModelConfig cfg = ModelConfig::from_json_file((it / "config.json").string());
  Model m(cfg, ModelOptions{});
  ASSERT_TRUE(load_checkpoint((dir_ / "moe-gpu").string(),
                              {&m.table(), &m.store(), m.params().data(), nullptr, nullptr}, cfg, {}));
  std::string skipped;
  if (!testing::expect_transformers_computes_dsv3(m, it, dir_, &skipped))
    std::printf("moe: the GPU checkpoint was not loaded in transformers: %s\n", skipped.c_str());
}

TEST_F(CudaTrain, CheckpointsMoveBetweenGpuAndCpu) {
  // One uninterrupted run per device, each saving at iteration 5; the other device resumes from it.
  for (const auto& [from, to] : {std::pair<std::string, std::string>{"cuda", "cpu"}, {"cpu", "cuda"}}) {
    const fs::path ckpt = dir_ / ("ckpt-" + from);
    const auto [full, full_tb] =
        train("--device " + from + " --save " + ckpt.string() + " --save-interval 5");
    ASSERT_EQ(full.rc, 0) << full.out;
    fs::remove(ckpt / "latest_checkpointed_iteration.txt");
    std::ofstream(ckpt / "latest_checkpointed_iteration.txt") << 5;
    const auto [resumed, resumed_tb] = train("--device " + to + " --load " + ckpt.string());
    ASSERT_EQ(resumed.rc, 0) << resumed.out;
    const Curve a = curve(full_tb), b = curve(resumed_tb);
    ASSERT_EQ(a.loss.size(), 10u);
    ASSERT_EQ(b.loss.size(), 5u) << resumed.out;
    const std::vector<double> tail(a.loss.begin() + 5, a.loss.end());
    std::printf("%s -> %s: resumed losses max rel diff %.3g\n", from.c_str(), to.c_str(),
                max_rel(b.loss, tail));
    EXPECT_LE(max_rel(b.loss, tail), 1e-5);
  }
}

}  // namespace
}  // namespace dsv3
