// Router: selection semantics on hand-made cases, and routing / capacity dropping / sequence aux loss /
// logits gradient against megatron-core 0.16.1 fixtures (tests/reference/moe_megatron_ref.py).
#include "moe/router.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "core/error.h"
#include "kernels/backend.h"
#include "model/safetensors.h"
#include "moe/permute.h"
#include "test_util.h"

namespace dsv3 {
namespace {

RouterActs route_logits(const RouterConfig& c, const std::vector<float>& logits, const float* bias, int64_t t,
                        int64_t batch = 1, bool training = false) {
  RouterActs a;
  a.logits_TE = logits;
  router_route(c, bias, t, batch, training, a);
  return a;
}

TEST(Router, EqualScoresPickLowestIndicesFirst) {
  RouterConfig c = RouterConfig::megatron(8, 3, 1, 1, 1.f);
  c.n_group = 1;
  RouterActs a = route_logits(c, std::vector<float>(8, 0.f), nullptr, 1);
  EXPECT_EQ(std::vector<int32_t>(a.idx_TK.begin(), a.idx_TK.end()), (std::vector<int32_t>{0, 1, 2}));
  for (float w : a.weight_TK) EXPECT_FLOAT_EQ(w, 1.f / 3.f);
}

// Experts {0,1} | {2,3}; all s = 0.5; bias gives choices [0.9, -0.4, 0.05, 0.04] → group 0 kept (0.5 vs
// 0.09). −inf mask: {0, 1}. HF's 0.0 mask: the masked experts (0.0) beat expert 1 (−0.4): {0, 2}.
TEST(Router, GroupMaskZeroLetsMaskedExpertsBeatNegativeChoices) {
  const std::vector<float> logits(4, 0.f), bias{0.4f, -0.9f, -0.45f, -0.46f};
  RouterConfig c = RouterConfig::megatron(4, 2, 2, 1, 2.5f);
  c.group_score_topk = 2;
  RouterActs neg = route_logits(c, logits, bias.data(), 1);
  EXPECT_EQ(neg.idx_TK, (std::vector<int32_t>{0, 1}));
  RouterConfig h = RouterConfig::hf(4, 2, 2, 1, true, 2.5f);
  RouterActs zero = route_logits(h, logits, bias.data(), 1);
  EXPECT_EQ(zero.idx_TK, (std::vector<int32_t>{0, 2}));
  // Weights come from the unbiased scores (all 0.5), renormalised and scaled.
  for (float w : zero.weight_TK) EXPECT_FLOAT_EQ(w, 1.25f);
}

// HF always scores a group by its top-2; Megatron by its top-(K/topk_group). Group {0..3} has one big score,
// group {4..7} two medium ones: top-1 prefers group 0, top-2 group 1.
TEST(Router, GroupScoreTopkIsAParameter) {
  const std::vector<float> logits{3.f, -3.f, -3.f, -3.f, 1.f, 1.f, -3.f, -3.f};
  RouterConfig c = RouterConfig::megatron(8, 2, 2, 1, 1.f);  // K/topk_group = 2
  EXPECT_EQ(c.group_score_topk, 2);
  RouterActs a2 = route_logits(c, logits, nullptr, 1);
  EXPECT_EQ(a2.idx_TK, (std::vector<int32_t>{4, 5}));
  c.group_score_topk = 1;
  RouterActs a1 = route_logits(c, logits, nullptr, 1);
  EXPECT_EQ(a1.idx_TK[0], 0);
}

TEST(Router, CapacityFormulaIsMegatrons) {
  EXPECT_EQ(expert_capacity(10, 3, 8, 1.0), 4);   // ceil(3.75)
  EXPECT_EQ(expert_capacity(16, 3, 8, 1.0), 6);   // exactly 6
  EXPECT_EQ(expert_capacity(16, 3, 8, 1.25), 8);  // ceil(7.5)
  EXPECT_EQ(expert_capacity(4096, 8, 256, 1.0), 128);
}

TEST(Router, RejectsBadConfigsWithClearMessages) {
  RouterConfig c = RouterConfig::megatron(8, 3, 3, 2, 1.f);
  try {
    c.validate();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("n_group=3"), std::string::npos) << e.what();
  }
  c = RouterConfig::megatron(8, 6, 4, 2, 1.f);  // 6 > 2 kept groups × 2 experts
  EXPECT_THROW(c.validate(), Error);
  c = RouterConfig::megatron(8, 2, 1, 1, 1.f);
  c.pad_to_capacity = true;
  EXPECT_THROW(c.validate(), Error);
  RouterActs a;
  a.logits_TE = {0.f, NAN, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  c = RouterConfig::megatron(8, 2, 1, 1, 1.f);
  try {
    router_route(c, nullptr, 1, 1, false, a);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("expert 1"), std::string::npos) << e.what();
  }
}

// ---- megatron-core 0.16.1 fixtures ----

class RouterMegatron : public ::testing::TestWithParam<std::string> {};

TEST_P(RouterMegatron, MatchesMegatronCore) {
  const auto path =
      testing::source_dir() / "tests/golden/moe" / ("mcore_router_" + GetParam() + ".safetensors");
  SafetensorsReader f(path.string());
  const auto ints = f.read_i64("ints");      // E K G TG B S capacity? position? pad?
  const auto floats = f.read_f32("floats");  // scale cf aux
  const int64_t e_n = ints[0], k_n = ints[1], g_n = ints[2], tg = ints[3], b_n = ints[4], s_n = ints[5];
  const int64_t t = b_n * s_n;
  RouterConfig c = RouterConfig::megatron(e_n, k_n, tg > 0 ? g_n : 1, tg > 0 ? tg : 1, floats[0]);
  if (ints[6]) {
    c.capacity_factor = floats[1];
    c.drop_policy = ints[7] ? DropPolicy::kPosition : DropPolicy::kProbs;
    c.pad_to_capacity = ints[8] != 0;
  }
  c.seq_aux_coeff = floats[2];
  const auto bias = f.read_f32("bias");
  RouterActs a = route_logits(c, f.read_f32("logits"), bias.data(), t, b_n, /*training=*/true);

  // Dense final probs and the kept map.
  std::vector<float> probs(t * e_n, 0.f);
  std::vector<int64_t> kept(t * e_n, 0), topk(t * e_n, 0);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < k_n; ++j) {
      const int64_t e = a.idx_TK[i * k_n + j];
      topk[i * e_n + e] = 1;
      kept[i * e_n + e] = a.kept_TK[i * k_n + j];
      probs[i * e_n + e] = a.kept_TK[i * k_n + j] ? a.weight_TK[i * k_n + j] : 0.f;
    }
  EXPECT_EQ(topk, f.read_i64("topk_map"));
  EXPECT_EQ(kept, f.read_i64("kept"));
  EXPECT_EQ(a.tokens_per_expert_E, f.read_i64("tokens_per_expert"));
  EXPECT_EQ(a.routed_per_expert_E, f.read_i64("routed_per_expert"));
  const auto ref_probs = f.read_f32("final_probs");
  for (int64_t i = 0; i < t * e_n; ++i) ASSERT_NEAR(probs[i], ref_probs[i], 2e-6f) << "pair " << i;
  const float aux_ref = f.read_f32("aux_loss")[0];
  EXPECT_NEAR(a.seq_aux_loss, aux_ref, 1e-5f * std::abs(aux_ref) + 1e-9f);

  // d(Σ final_probs·G + aux)/dlogits.
  const auto g_up = f.read_f32("dprobs");
  std::vector<float> dw(t * k_n);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < k_n; ++j) dw[i * k_n + j] = g_up[i * e_n + a.idx_TK[i * k_n + j]];
  router_backward_logits(c, a, dw.data(), 1.f);
  const auto ref_dl = f.read_f32("dlogits");
  float scale = 0.f;
  for (float v : ref_dl) scale = std::max(scale, std::abs(v));
  for (int64_t i = 0; i < t * e_n; ++i)
    ASSERT_NEAR(a.dlogits_TE[i], ref_dl[i], 1e-5f * scale) << "dlogit " << i;
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RouterMegatron,
                         ::testing::Values("dropless_aux", "probs", "probs_pad", "position", "position_pad",
                                           "cap_over_T", "hot_probs", "hot_position_pad", "top1_all_one"));

}  // namespace
}  // namespace dsv3

namespace dsv3 {
namespace {

// The device router's bodies (kernels/route.h, what route.cu runs per token) on the CPU backend against the host
// router they transcribe, bit for bit: DeepSeek-V3's 256 experts top-8 in 8 groups choosing 4 (Megatron's group
// score), the MoE proxy's 64 top-6, 8 experts top-2 with HF's 0.0 mask; logits with many exact ties (a coarse
// grid) and a bias that creates more, the sequence aux loss over 3 sequences, the counts, the permutation and the
// logits' gradient.
TEST(Router, DeviceBodiesMatchTheHostRouterBitForBit) {
  struct Case {
    RouterConfig cfg;
    const char* what;
  };
  const Case cases[] = {{RouterConfig::megatron(256, 8, 8, 4, 2.5f), "256 top-8, 8 groups choose 4"},
                        {RouterConfig::megatron(64, 6, 8, 3, 2.5f), "64 top-6, 8 groups choose 3"},
                        {RouterConfig::hf(8, 2, 4, 2, true, 2.5f), "8 top-2, HF 0.0 mask"}};
  for (const auto& [cfg0, what] : cases) {
    SCOPED_TRACE(what);
    RouterConfig cfg = cfg0;
    cfg.seq_aux_coeff = 1e-2f;
    const int64_t batch = 3, seq = 40, t = batch * seq, e = cfg.num_experts, k = cfg.topk;
    RouterActs host;
    host.logits_TE.resize(t * e);
    for (int64_t i = 0; i < t * e; ++i)
      host.logits_TE[i] = 0.25f * static_cast<float>((i * 7919) % 13) - 1.5f;
    std::vector<float> bias(e);
    for (int64_t j = 0; j < e; ++j) bias[j] = 0.125f * static_cast<float>(j % 3);
    router_route(cfg, bias.data(), t, batch, true, host);
    std::vector<float> dweight(t * k);
    for (int64_t i = 0; i < t * k; ++i) dweight[i] = 0.01f * static_cast<float>((i * 31) % 17) - 0.08f;
    router_backward_logits(cfg, host, dweight.data(), 0.5f);

    RouteForwardArgs f;
    f.cfg.e = static_cast<int32_t>(e), f.cfg.k = static_cast<int32_t>(k);
    f.cfg.n_group = static_cast<int32_t>(cfg.n_group),
    f.cfg.topk_group = static_cast<int32_t>(cfg.topk_group);
    f.cfg.group_score_topk = static_cast<int32_t>(cfg.group_score_topk);
    f.cfg.mask_neg_inf = cfg.group_mask == GroupMaskValue::kNegInf, f.cfg.normalise = cfg.normalise;
    f.cfg.scaling = cfg.scaling_factor;
    f.t = t, f.batch = batch, f.logits_TE = host.logits_TE.data(), f.bias_E = bias.data();
    std::vector<float> scores(t * e), weight(t * k), denom(t), aux(t * e), dl(t * e);
    std::vector<int32_t> idx(t * k), readback(e + 2), token(t * k), slot(t * k), row(t * k);
    f.scores_TE = scores.data(), f.weight_TK = weight.data(), f.denom_T = denom.data(), f.idx_TK = idx.data();
    f.offsets_E1 = readback.data(), f.token_R = token.data(), f.slot_R = slot.data(), f.row_TK = row.data();
    f.aux_coeff = cfg.seq_aux_coeff, f.aux_loss_1 = reinterpret_cast<float*>(readback.data() + e + 1);
    f.aux_dlogits_TE = aux.data();
    cpu_backend().route_forward(f);
    RouteBackwardArgs b{f.cfg,      t,          scores.data(), denom.data(), dweight.data(),
                        idx.data(), aux.data(), 0.5f,          dl.data()};
    cpu_backend().route_backward(b);

    EXPECT_EQ(scores, host.scores_TE);
    EXPECT_EQ(idx, host.idx_TK);
    EXPECT_EQ(weight, host.weight_TK);
    EXPECT_EQ(denom, host.denom_T);
    for (int64_t j = 0; j < e; ++j)
      EXPECT_EQ(readback[j + 1] - readback[j], host.tokens_per_expert_E[j]) << j;
    float loss = 0;
    std::memcpy(&loss, &readback[e + 1], sizeof loss);
    EXPECT_EQ(loss, host.seq_aux_loss);
    EXPECT_EQ(aux, host.aux_dlogits_TE);
    EXPECT_EQ(dl, host.dlogits_TE);
    MoePermutation perm;
    build_permutation(host.idx_TK.data(), nullptr, t, k, e, perm);
    EXPECT_EQ(std::vector<int32_t>(perm.token_R.begin(), perm.token_R.end()), token);
    EXPECT_EQ(std::vector<int32_t>(perm.slot_R.begin(), perm.slot_R.end()), slot);
    EXPECT_EQ(std::vector<int32_t>(perm.row_TK.begin(), perm.row_TK.end()), row);
  }
}

}  // namespace
}  // namespace dsv3
