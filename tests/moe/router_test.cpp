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

// What the backend's route op gives, forward and backward (the MoE layer's device path), from host logits.
struct BackendRoute {
  std::vector<float> scores, weight, denom, aux_dlogits, dlogits;
  std::vector<int32_t> idx, offsets, routed, token, slot, row;
  std::vector<uint8_t> kept;
  float aux_loss = 0.f;
};
BackendRoute route_with_backend(Backend& be, const RouterConfig& cfg, const std::vector<float>& logits,
                                const float* bias, int64_t t, int64_t batch,
                                const std::vector<float>& dweight) {
  const int64_t e = cfg.num_experts, k = cfg.topk;
  BackendRoute o;
  o.scores.resize(t * e), o.weight.resize(t * k), o.denom.resize(t), o.aux_dlogits.resize(t * e);
  o.dlogits.resize(t * e), o.idx.resize(t * k), o.offsets.resize(e + 1), o.routed.resize(e + 1);
  o.token.resize(t * k), o.slot.resize(t * k), o.row.resize(t * k), o.kept.assign(t * k, 1);
  RouteForwardArgs f;
  f.cfg = route_select(cfg), f.t = t, f.batch = batch, f.logits_TE = logits.data(), f.bias_E = bias;
  f.scores_TE = o.scores.data(), f.weight_TK = o.weight.data(), f.denom_T = o.denom.data();
  f.idx_TK = o.idx.data(), f.offsets_E1 = o.offsets.data(), f.token_R = o.token.data();
  f.slot_R = o.slot.data(), f.row_TK = o.row.data();
  f.aux_coeff = cfg.seq_aux_coeff, f.aux_loss_1 = &o.aux_loss, f.aux_dlogits_TE = o.aux_dlogits.data();
  if (!cfg.dropless()) {
    f.capacity = expert_capacity(t, k, e, cfg.capacity_factor);
    f.drop_by_position = cfg.drop_policy == DropPolicy::kPosition;
    f.kept_TK = o.kept.data(), f.routed_E1 = o.routed.data();
  }
  be.route_forward(f);
  if (cfg.dropless()) o.routed = o.offsets;
  RouteBackwardArgs b;
  b.cfg = f.cfg, b.t = t, b.scores_TE = o.scores.data(), b.denom_T = o.denom.data(),
  b.dweight_TK = dweight.data();
  b.idx_TK = o.idx.data(), b.kept_TK = cfg.dropless() ? nullptr : o.kept.data();
  b.aux_dlogits_TE = cfg.seq_aux_coeff > 0.f ? o.aux_dlogits.data() : nullptr, b.aux_grad = 1.f;
  b.dlogits_TE = o.dlogits.data();
  be.route_backward(b);
  return o;
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

  // The backend's route op (what a GPU runs, here on the CPU backend) from the same logits: the same routing and
  // gradient as the fixture, and its permutation holds the kept pairs in build_permutation's order.
  const BackendRoute op = route_with_backend(cpu_backend(), c, f.read_f32("logits"), bias.data(), t, b_n, dw);
  EXPECT_EQ(op.idx, a.idx_TK);
  std::vector<int64_t> op_kept(t * e_n, 0), tokens(e_n), routed(e_n);
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < k_n; ++j) {
      const int64_t e = op.idx[i * k_n + j];
      op_kept[i * e_n + e] = op.kept[i * k_n + j];
      if (op.kept[i * k_n + j]) {
        ASSERT_NEAR(op.weight[i * k_n + j], ref_probs[i * e_n + e], 2e-6f) << i;
      }
    }
  EXPECT_EQ(op_kept, f.read_i64("kept"));
  for (int64_t e = 0; e < e_n; ++e) {
    tokens[e] = tokens_per_expert(c, t, a.capacity, op.offsets[e + 1] - op.offsets[e]);
    routed[e] = op.routed[e + 1] - op.routed[e];
  }
  EXPECT_EQ(tokens, f.read_i64("tokens_per_expert"));
  EXPECT_EQ(routed, f.read_i64("routed_per_expert"));
  EXPECT_NEAR(op.aux_loss, aux_ref, 1e-5f * std::abs(aux_ref) + 1e-9f);
  for (int64_t i = 0; i < t * e_n; ++i)
    ASSERT_NEAR(op.dlogits[i], ref_dl[i], 1e-5f * scale) << "dlogit " << i;
  MoePermutation perm;
  build_permutation(op.idx.data(), op.kept.data(), t, k_n, e_n, perm);
  EXPECT_EQ(std::vector<int32_t>(op.offsets.begin(), op.offsets.end()),
            std::vector<int32_t>(perm.offsets_E1.begin(), perm.offsets_E1.end()));
  EXPECT_EQ(std::vector<int32_t>(op.token.begin(), op.token.begin() + perm.rows()), perm.token_R);
  EXPECT_EQ(std::vector<int32_t>(op.slot.begin(), op.slot.begin() + perm.rows()), perm.slot_R);
  EXPECT_EQ(op.row, perm.row_TK);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, RouterMegatron,
                         ::testing::Values("dropless_aux", "probs", "probs_pad", "position", "position_pad",
                                           "cap_over_T", "hot_probs", "hot_position_pad", "top1_all_one"));

}  // namespace
}  // namespace dsv3

namespace dsv3 {
namespace {

// The backend's route op (the MoE layer's device path) against the host router (SP, EP and the CPU layer's path)
// bit for bit, where both must take the same decisions on ties: DeepSeek-V3's 256 experts top-8 in 8 groups
// choosing 4 (Megatron's group score), the MoE proxy's 64 top-6, 8 experts top-2 with HF's 0.0 mask; logits with
// many exact ties (a coarse grid) and a bias that creates more, the sequence aux loss over 3 sequences, the
// logits' gradient; dropless and with the capacity rule (both policies, with a hot expert). The op's permutation
// is build_permutation's (the host's counting sort) of its kept pairs.
TEST(Router, BackendRouteOpMatchesTheHostRouterBitForBit) {
  struct Case {
    RouterConfig cfg;
    const char* what;
  };
  RouterConfig probs = RouterConfig::megatron(64, 6, 8, 3, 2.5f), position = probs;
  probs.capacity_factor = position.capacity_factor = 1.0;
  position.drop_policy = DropPolicy::kPosition;
  position.pad_to_capacity = true;
  const Case cases[] = {{RouterConfig::megatron(256, 8, 8, 4, 2.5f), "256 top-8, 8 groups choose 4"},
                        {RouterConfig::megatron(64, 6, 8, 3, 2.5f), "64 top-6, 8 groups choose 3"},
                        {RouterConfig::hf(8, 2, 4, 2, true, 2.5f), "8 top-2, HF 0.0 mask"},
                        {probs, "64 top-6, capacity 1.0, probs"},
                        {position, "64 top-6, capacity 1.0, position, padded"}};
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
    if (!cfg.dropless()) bias[5] = 2.f;  // a hot expert: the rule must drop
    router_route(cfg, bias.data(), t, batch, true, host);
    std::vector<float> dweight(t * k);
    for (int64_t i = 0; i < t * k; ++i) dweight[i] = 0.01f * static_cast<float>((i * 31) % 17) - 0.08f;
    router_backward_logits(cfg, host, dweight.data(), 1.f);
    if (!cfg.dropless()) {
      EXPECT_LT(host.kept_pairs, t * k);
    }

    const BackendRoute op =
        route_with_backend(cpu_backend(), cfg, host.logits_TE, bias.data(), t, batch, dweight);
    EXPECT_EQ(op.scores, host.scores_TE);
    EXPECT_EQ(op.idx, host.idx_TK);
    EXPECT_EQ(op.weight, host.weight_TK);
    EXPECT_EQ(op.denom, host.denom_T);
    EXPECT_EQ(op.kept, host.kept_TK);
    for (int64_t j = 0; j < e; ++j) {
      EXPECT_EQ(tokens_per_expert(cfg, t, host.capacity, op.offsets[j + 1] - op.offsets[j]),
                host.tokens_per_expert_E[j])
          << j;
      EXPECT_EQ(op.routed[j + 1] - op.routed[j], host.routed_per_expert_E[j]) << j;
    }
    EXPECT_EQ(op.offsets[e], host.kept_pairs);
    EXPECT_EQ(op.aux_loss, host.seq_aux_loss);
    EXPECT_EQ(op.aux_dlogits, host.aux_dlogits_TE);
    EXPECT_EQ(op.dlogits, host.dlogits_TE);
    MoePermutation perm;
    build_permutation(host.idx_TK.data(), host.kept_TK.data(), t, k, e, perm);
    EXPECT_EQ(std::vector<int32_t>(op.token.begin(), op.token.begin() + perm.rows()), perm.token_R);
    EXPECT_EQ(std::vector<int32_t>(op.slot.begin(), op.slot.begin() + perm.rows()), perm.slot_R);
    EXPECT_EQ(op.row, perm.row_TK);
  }
}

}  // namespace
}  // namespace dsv3
