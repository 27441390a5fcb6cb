// What the GPU path relies on, checked on the CPU backend: a steady-state training step allocates no backend
// memory, DeviceArray grows keeping its contents, and the optimizer over segment lists (optim/backend_adamw.h)
// is bit-identical to the per-tensor AdamW, grad norm and clip the CPU trainer runs.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>

#include "core/profile.h"
#include "kernels/device_array.h"
#include "kernels/kernel_test_util.h"
#include "model/model.h"
#include "optim/backend_adamw.h"
#include "optim/grad_clip.h"
#include "test_util.h"

namespace dsv3 {
namespace {

ModelConfig dense_config() {
  return ModelConfig::from_json_file(
      (testing::source_dir() / "examples/deepseek/configs/demo-dense.json").string());
}

struct Batch {
  int64_t B = 2, S = 19;
  std::vector<int32_t> ids, labels;
  explicit Batch(int64_t vocab) {
    for (int64_t i = 0; i < B * S; ++i)
      ids.push_back((i * 131 + 7) % vocab), labels.push_back((i * 37 + 3) % vocab);
  }
};

void step(Model& m, const Batch& b) {
  const ForwardStats st = m.forward(b.ids.data(), b.labels.data(), b.B, b.S, true);
  m.zero_grads();
  m.backward(1.f / st.lm_tokens, 0.f, {0.1f / st.mtp_tokens.at(0)});
}

TEST(ModelBackend, ASteadyStateStepAllocatesNothing) {
  for (Precision prec : {Precision::kF32, Precision::kBF16}) {
    ModelOptions o;
    o.precision = prec;
    Model m(dense_config(), o);
    m.init(3);
    const Batch b(m.config().vocab_size);
    step(m, b);
    const int64_t before = cpu_backend().allocations();
    step(m, b);
    EXPECT_EQ(cpu_backend().allocations(), before);
  }
}

// A step of several micro-batches reads backend memory once for its losses (on a GPU every read waits for the
// stream): the sums wait in backend memory until resolve_losses, and equal the per-forward reads.
TEST(ModelBackend, LossesAreReadOncePerStep) {
  ModelOptions o;
  Model m(dense_config(), o);
  m.init(3);
  const Batch b(m.config().vocab_size);
  const int64_t depths = m.config().num_nextn_predict_layers;
  std::vector<ForwardStats> immediate;
  for (int k = 0; k < 3; ++k) immediate.push_back(m.forward(b.ids.data(), b.labels.data(), b.B, b.S, true));
  m.defer_losses(3 * (1 + depths));
  std::vector<ForwardStats> deferred;
  const int64_t reads = cpu_backend().host_reads();
  for (int k = 0; k < 3; ++k) {
    deferred.push_back(m.forward(b.ids.data(), b.labels.data(), b.B, b.S, true));
    m.zero_grads();
    m.backward(1.f / deferred.back().lm_tokens, 0.f, {0.1f / deferred.back().mtp_tokens.at(0)});
  }
  EXPECT_EQ(cpu_backend().host_reads(), reads) << "a dense model's forward and backward read nothing back";
  EXPECT_TRUE(std::isnan(deferred[0].lm_loss_sum));
  m.resolve_losses(deferred);
  EXPECT_EQ(cpu_backend().host_reads(), reads + 1);
  for (int k = 0; k < 3; ++k) {
    EXPECT_EQ(deferred[k].lm_loss_sum, immediate[k].lm_loss_sum);
    EXPECT_EQ(deferred[k].mtp_loss_sum, immediate[k].mtp_loss_sum);
  }
  m.defer_losses(0);
}

// bf16 copies of the weights are made once per optimizer step, not per micro-batch: the next forward after
// params() was asked for (or params_changed()) refreshes them, the others reuse them.
TEST(ModelBackend, Bf16WeightCopiesAreRefreshedOncePerParameterChange) {
  ModelOptions o;
  o.precision = Precision::kBF16;
  Model m(dense_config(), o);
  m.init(3);
  const Batch b(m.config().vocab_size);
  auto refreshes = [&] {
    for (const auto& e : profile::entries())
      if (std::string(e.label) == "fwd.bf16_weights") return e.calls;
    return int64_t{0};
  };
  profile::reset(), profile::set_enabled(true);
  const double l0 = m.forward(b.ids.data(), b.labels.data(), b.B, b.S, true).lm_loss_sum;
  EXPECT_EQ(m.forward(b.ids.data(), b.labels.data(), b.B, b.S, true).lm_loss_sum, l0);  // micro-batch 2
  EXPECT_EQ(refreshes(), 1);
  const float w0 = m.param("lm_head.weight")[0];
  m.param("lm_head.weight")[0] = w0 + 1.f;  // a write through param(name) is announced
  m.params_changed();
  const double l1 = m.forward(b.ids.data(), b.labels.data(), b.B, b.S, true).lm_loss_sum;
  EXPECT_EQ(refreshes(), 2);
  EXPECT_NE(l1, l0);
  m.params()[m.store().offset("lm_head.weight")] = w0;  // an optimizer step writes through params()
  EXPECT_EQ(m.forward(b.ids.data(), b.labels.data(), b.B, b.S, true).lm_loss_sum, l0);
  EXPECT_EQ(refreshes(), 3);
  profile::set_enabled(false);
}

TEST(ModelBackend, DeviceArrayGrowsKeepingItsContents) {
  DeviceArray<float> a;
  float* p = grow(cpu_backend(), a, 3);
  p[0] = 1, p[1] = 2, p[2] = 3;
  EXPECT_EQ(grow(cpu_backend(), a, 2), p);  // never shrinks, keeps its address
  grow(cpu_backend(), a, 5);
  EXPECT_EQ(a.to_host(), (std::vector<float>{1, 2, 3, 0, 0}));
}

TEST(ModelBackend, SegmentListOptimizerIsBitIdenticalToThePerTensorOne) {
  ModelOptions o;
  Model m(dense_config(), o);
  m.init(4);
  const Batch b(m.config().vocab_size);
  const AdamWConfig cfg{0.9, 0.95, 1e-8};
  AdamW per_tensor(m.params().size(), cfg);
  BackendAdamW segments(cpu_backend(), m.table(), m.store(), cfg);
  std::vector<float> p_ref = m.params_to_host(), p_seg = p_ref;
  for (int s = 1; s <= 3; ++s) {
    m.params_from_host(p_ref);  // the gradient of the reference's weights feeds both
    step(m, b);
    std::vector<float> g = m.grads_to_host(), g_seg = g;
    const double norm_ref = l2_norm(g.data(), static_cast<int64_t>(g.size()));
    EXPECT_EQ(segments.grad_norm(g_seg.data()), norm_ref);
    const float coeff = static_cast<float>(clip_coefficient(norm_ref, 0.5));
    scale_inplace(g.data(), static_cast<int64_t>(g.size()), coeff);
    segments.scale(g_seg.data(), coeff);
    per_tensor.begin_step();
    for (const auto& p : m.table().params())
      if (p.tied_to.empty() && p.trainable && m.store().contains(p.name))
        per_tensor.update(p_ref.data(), g.data(), m.store().offset(p.name), p.numel, 1e-3,
                          p.weight_decay ? 0.1 : 0);
    segments.step(p_seg.data(), g_seg.data(), s, 1e-3, 0.1);
    ASSERT_EQ(0, std::memcmp(p_ref.data(), p_seg.data(), p_ref.size() * sizeof(float))) << "step " << s;
  }
  std::vector<float> m1, v1;
  segments.moments_to_host(m1, v1);
  EXPECT_EQ(m1, per_tensor.exp_avg());
  EXPECT_EQ(v1, per_tensor.exp_avg_sq());
}

}  // namespace
}  // namespace dsv3
