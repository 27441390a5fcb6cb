// The whole model against HuggingFace transformers' DeepseekV3ForCausalLM (tests/reference/hf_model_golden.py):
// logits, loss and the gradient of every parameter, fp32 to 1e-5 and bf16 within a stated bound; plus full-layer
// recompute reproducing the stored-activation run bit for bit.
#include "model/model.h"

#include <cmath>

#include "model/safetensors.h"
#include "test_util.h"

namespace dsv3 {
namespace {

const std::filesystem::path kGolden = testing::source_dir() / "tests/golden/hf_tiny";

// max |a - b| / max |b| over a tensor.
double rel_err(const float* a, const std::vector<float>& b) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    diff = std::max(diff, std::fabs(double(a[i]) - b[i]));
    ref = std::max(ref, std::fabs(double(b[i])));
  }
  return ref > 0 ? diff / ref : diff;
}

struct Golden {
  ModelConfig cfg;
  int64_t B = 0, S = 0;
  std::vector<int32_t> ids, labels;  // labels shifted to next-token form (dsv3's convention)
  SafetensorsReader outputs{(kGolden / "outputs.safetensors").string()};
  SafetensorsReader grads{(kGolden / "grads.safetensors").string()};
  Golden() {
    cfg = ModelConfig::from_json_file((kGolden / "config.json").string());
    SafetensorsReader in((kGolden / "inputs.safetensors").string());
    auto ids64 = in.read_i64("input_ids"), lab64 = in.read_i64("labels");
    B = in.info("input_ids").shape[0], S = in.info("input_ids").shape[1];
    ids.assign(ids64.begin(), ids64.end());
    labels.assign(B * S, -100);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s + 1 < S; ++s) labels[b * S + s] = static_cast<int32_t>(lab64[b * S + s + 1]);
  }
};

struct RunResult {
  double loss = 0;
  std::vector<float> logits;
  std::unique_ptr<Model> model;
};

RunResult run(const Golden& g, ModelOptions opt) {
  opt.mtp = false;  // HF's class has no MTP layer
  RunResult r;
  r.model = std::make_unique<Model>(g.cfg, opt);
  r.model->load_safetensors((kGolden / "model.safetensors").string());
  r.logits.resize(g.B * g.S * g.cfg.vocab_size);
  auto st = r.model->forward(g.ids.data(), g.labels.data(), g.B, g.S, true, r.logits.data());
  r.loss = st.lm_loss_sum / st.lm_tokens;
  r.model->zero_grads();
  r.model->backward(1.f / st.lm_tokens, 0.f);
  return r;
}

// Returns the worst gradient error over all parameters HF has, naming it.
std::pair<double, std::string> worst_grad(const Golden& g, Model& m) {
  std::pair<double, std::string> worst{0, ""};
  for (const auto& name : g.grads.names()) {
    auto ref = g.grads.read_f32(name);
    const double e = rel_err(m.grad(name), ref);
    if (e > worst.first) worst = {e, name};
  }
  return worst;
}

TEST(ModelHf, Fp32MatchesTransformers) {
  Golden g;
  auto r = run(g, {});
  const double ref_loss = g.outputs.read_f32("loss")[0];
  EXPECT_NEAR(r.loss, ref_loss, 1e-5 * std::fabs(ref_loss));
  EXPECT_LE(rel_err(r.logits.data(), g.outputs.read_f32("logits")), 1e-5);
  // Every parameter HF has a gradient for is compared, none skipped.
  EXPECT_GE(g.grads.names().size(), 40u);
  for (const auto& name : g.grads.names()) {
    auto ref = g.grads.read_f32(name);
    ASSERT_EQ(static_cast<int64_t>(ref.size()), r.model->table().at(name).numel) << name;
    EXPECT_LE(rel_err(r.model->grad(name), ref), 1e-5) << name;
  }
}

// bf16 GEMM operands (fp32 accumulation, fp32 norms/softmax/loss) against HF's fp32 numbers. Bound: 2e-2 on the
// loss and logits, 6e-2 on any parameter gradient (max-abs normalised) — bf16 has 8 mantissa bits (4e-3 per
// rounding) and the tiny model chains ~10 roundings.
TEST(ModelHf, Bf16WithinStatedBound) {
  Golden g;
  ModelOptions opt;
  opt.precision = Precision::kBF16;
  auto r = run(g, opt);
  const double ref_loss = g.outputs.read_f32("loss")[0];
  EXPECT_NEAR(r.loss, ref_loss, 2e-2 * std::fabs(ref_loss));
  EXPECT_LE(rel_err(r.logits.data(), g.outputs.read_f32("logits")), 2e-2);
  auto [err, name] = worst_grad(g, *r.model);
  EXPECT_LE(err, 6e-2) << name;
  EXPECT_GT(err, 0.0);  // it really ran in bf16
}

TEST(ModelHf, RecomputeIsBitIdentical) {
  Golden g;
  auto a = run(g, {});
  ModelOptions opt;
  opt.recompute = true;
  auto b = run(g, opt);
  EXPECT_EQ(a.loss, b.loss);
  EXPECT_EQ(a.model->grads_to_host(), b.model->grads_to_host());
}

// MTP depth 1 (Megatron semantics) against tests/reference/mtp_golden.py, built from transformers' own layers:
// both losses and d(main + 0.1·mtp)/d(param) for every parameter, main and MTP.
TEST(ModelMtp, LossAndGradientsMatchReference) {
  Golden g;
  const auto dir = testing::source_dir() / "tests/golden/mtp";
  SafetensorsReader ref((dir / "outputs.safetensors").string());
  Model m(g.cfg, {});
  m.load_safetensors((dir / "model.safetensors").string());
  auto st = m.forward(g.ids.data(), g.labels.data(), g.B, g.S);
  ASSERT_EQ(st.mtp_loss_sum.size(), 1u);
  const double main_loss = st.lm_loss_sum / st.lm_tokens, mtp_loss = st.mtp_loss_sum[0] / st.mtp_tokens[0];
  EXPECT_NEAR(main_loss, ref.read_f32("main_loss")[0], 1e-5 * main_loss);
  EXPECT_NEAR(mtp_loss, ref.read_f32("mtp_loss")[0], 1e-5 * mtp_loss);
  m.zero_grads();
  m.backward(1.f / st.lm_tokens, 0.f, {0.1f / st.mtp_tokens[0]});
  int compared = 0;
  for (const auto& p : m.table().params()) {
    if (!p.trainable || !p.tied_to.empty()) continue;
    const std::string key = "grad." + p.name;
    ASSERT_TRUE(ref.contains(key)) << key;
    EXPECT_LE(rel_err(m.grad(p.name), ref.read_f32(key)), 1e-5) << p.name;
    ++compared;
  }
  EXPECT_GT(compared, 60);
}

// The sequence aux loss is wired through every MoE layer: d(Σ aux)/d(router weight) equals central finite
// differences of the forward's aux sum (coefficient 1 so the loss is O(1); the step is far below the routing
// margins of this fixture, so no expert choice flips).
TEST(ModelAux, SeqAuxGradientMatchesFiniteDifferences) {
  Golden g;
  ModelOptions opt;
  opt.seq_aux_coeff = 1.f;
  opt.mtp = false;
  Model m(g.cfg, opt);
  m.load_safetensors((kGolden / "model.safetensors").string());
  auto st = m.forward(g.ids.data(), g.labels.data(), g.B, g.S);
  ASSERT_EQ(st.moe_layers, 2);
  EXPECT_GT(st.aux_loss_sum, 0.0);
  m.zero_grads();
  m.backward(0.f, 1.f);
  int checked = 0;
  for (const char* name : {"model.layers.1.mlp.gate.weight", "model.layers.2.mlp.gate.weight",
                           "model.layers.1.self_attn.o_proj.weight"}) {
    const int64_t n = m.table().at(name).numel;
    float* w = m.param(name);
    const float* gw = m.grad(name);
    int64_t best = 0;
    for (int64_t i = 1; i < n; ++i)
      if (std::fabs(gw[i]) > std::fabs(gw[best])) best = i;
    const float h = 1e-3f, w0 = w[best];
    w[best] = w0 + h;
    const double up = m.forward(g.ids.data(), g.labels.data(), g.B, g.S).aux_loss_sum;
    w[best] = w0 - h;
    const double down = m.forward(g.ids.data(), g.labels.data(), g.B, g.S).aux_loss_sum;
    w[best] = w0;
    const double fd = (up - down) / (2 * h);
    EXPECT_NEAR(gw[best], fd, 2e-2 * std::fabs(fd) + 1e-5) << name;
    ++checked;
  }
  EXPECT_EQ(checked, 3);
}

}  // namespace
}  // namespace dsv3

namespace dsv3 {
namespace {

// Pipeline stages: the tiny model cut after layer 1 into a first stage (embedding, layers 0–1) and a last stage
// (layer 2, final norm, head), chained by hand as the pipeline schedule chains them, gives the whole model's loss
// and every parameter gradient bit for bit (each stage holds only its parameters), with and without recompute.
TEST(ModelPipeline, StagesReproduceTheWholeModel) {
  const Golden g;
  for (bool recompute : {false, true}) {
    ModelOptions opt;
    opt.mtp = false;
    opt.recompute = recompute;
    opt.seq_aux_coeff = 0.01f;
    Model whole(g.cfg, opt);
    whole.load_safetensors((kGolden / "model.safetensors").string());
    ModelOptions o1 = opt, o2 = opt;
    o1.stage = {0, 2, true, false};
    o2.stage = {2, -1, false, true};
    Model first(g.cfg, o1), last(g.cfg, o2);
    first.load_safetensors((kGolden / "model.safetensors").string());
    last.load_safetensors((kGolden / "model.safetensors").string());
    EXPECT_FALSE(first.store().contains("lm_head.weight"));
    EXPECT_FALSE(last.store().contains("model.embed_tokens.weight"));
    EXPECT_FALSE(first.store().contains("model.layers.2.self_attn.o_proj.weight"));

    const auto ws = whole.forward(g.ids.data(), g.labels.data(), g.B, g.S, true);
    const auto s1 = first.forward(g.ids.data(), g.labels.data(), g.B, g.S, true);
    const auto s2 =
        last.forward(g.ids.data(), g.labels.data(), g.B, g.S, true, nullptr, first.stage_output());
    EXPECT_EQ(s2.lm_loss_sum, ws.lm_loss_sum);
    EXPECT_EQ(s1.aux_loss_sum + s2.aux_loss_sum, ws.aux_loss_sum);
    EXPECT_EQ(s1.moe_layers + s2.moe_layers, ws.moe_layers);
    whole.zero_grads(), first.zero_grads(), last.zero_grads();
    const float lm = 1.f / static_cast<float>(ws.lm_tokens);
    whole.backward(lm, 0.5f);
    last.backward(lm, 0.5f);
    first.backward(lm, 0.5f, {}, last.stage_input_grad());
    int64_t compared = 0;
    for (const auto& p : whole.table().params()) {
      if (!p.tied_to.empty() || p.is_mtp) continue;
      Model& m = first.store().contains(p.name) ? first : last;
      ASSERT_TRUE(m.store().contains(p.name)) << p.name;
      const float* a = whole.grad(p.name);
      const float* b = m.grad(p.name);
      for (int64_t i = 0; i < p.numel; ++i)
        ASSERT_EQ(a[i], b[i]) << p.name << "[" << i << "] recompute " << recompute;
      ++compared;
    }
    EXPECT_GT(compared, 20);
  }
}

}  // namespace
}  // namespace dsv3
