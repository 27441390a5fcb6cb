// Router: selection semantics on hand-made cases, and routing / capacity dropping / sequence aux loss /
// logits gradient against megatron-core 0.16.1 fixtures (tests/reference/moe_megatron_ref.py).
#include "moe/router.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "core/error.h"
#include "model/safetensors.h"
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
