// MoE health figures (train/moe_health.h) from hand-made counts: every figure follows from its definition.
#include "train/moe_health.h"

#include <gtest/gtest.h>

#include <cmath>

namespace dsv3 {
namespace {

TEST(MoeHealth, FiguresOfOneLayer) {
  const float bias[4] = {0.01f, -0.02f, 0.f, 0.03f};
  const MoeLayerHealth h = moe_layer_health(3, {4, 0, 2, 2}, 8, 10, 0.25, bias, 4);
  EXPECT_EQ(h.layer, 3);
  EXPECT_DOUBLE_EQ(h.max_over_mean, 2.0);  // max 4 over mean 2
  EXPECT_EQ(h.experts_without_tokens, 1);
  EXPECT_DOUBLE_EQ(h.dropped_fraction, 0.2);  // 8 of 10 routed pairs kept
  EXPECT_DOUBLE_EQ(h.seq_aux_loss, 0.25);
  EXPECT_NEAR(h.bias_spread, 0.05, 1e-7);
  // Dropless without a bias; no tokens at all gives zeros, not NaN.
  const MoeLayerHealth e = moe_layer_health(1, {0, 0}, 0, 0, 0.0, nullptr, 2);
  EXPECT_EQ(e.max_over_mean, 0.0);
  EXPECT_EQ(e.dropped_fraction, 0.0);
  EXPECT_EQ(e.experts_without_tokens, 2);
}

TEST(MoeHealth, IntervalKeepsTheWorstAndAveragesTheAuxLoss) {
  MoeHealthInterval iv;
  iv.add({moe_layer_health(1, {2, 2}, 4, 4, 1.0, nullptr, 2),
          moe_layer_health(2, {3, 1}, 4, 4, 3.0, nullptr, 2)});
  iv.add({moe_layer_health(1, {4, 0}, 3, 4, 2.0, nullptr, 2),
          moe_layer_health(2, {2, 2}, 4, 4, 1.0, nullptr, 2)});
  const auto s = iv.summary();
  ASSERT_EQ(s.size(), 2u);
  EXPECT_DOUBLE_EQ(s[0].max_over_mean, 2.0);  // the second iteration's {4, 0}
  EXPECT_EQ(s[0].experts_without_tokens, 1);
  EXPECT_DOUBLE_EQ(s[0].dropped_fraction, 0.25);
  EXPECT_DOUBLE_EQ(s[0].seq_aux_loss, 1.5);
  EXPECT_DOUBLE_EQ(s[1].max_over_mean, 1.5);  // the first iteration's {3, 1}
  EXPECT_DOUBLE_EQ(s[1].seq_aux_loss, 2.0);
  const std::string line = moe_health_line(s);
  EXPECT_EQ(line.rfind("moe: 2 layers | max/mean load 2.00 (layer 1) | experts without tokens 1 (layer 1) | "
                       "dropped 25.00% (layer 1) | seq aux loss 2.000E+00 (layer 2)",
                       0),
            0u)
      << line;
  iv.clear();
  EXPECT_TRUE(iv.summary().empty());
  EXPECT_EQ(moe_health_line({}), "");
}

// Stages pack their layers into fixed-width records (unused slots NaN); the last stage unpacks them in layer order.
TEST(MoeHealth, PackedRecordsRoundTripAcrossStages) {
  const auto a = pack_health({moe_layer_health(4, {1, 3}, 4, 4, 0.5, nullptr, 2)}, 2);
  const auto b = pack_health({moe_layer_health(1, {2, 2}, 4, 4, 0.1, nullptr, 2),
                              moe_layer_health(2, {0, 4}, 4, 4, 0.2, nullptr, 2)},
                             2);
  std::vector<double> all = a;
  all.insert(all.end(), b.begin(), b.end());
  const auto u = unpack_health(all);
  ASSERT_EQ(u.size(), 3u);
  EXPECT_EQ(u[0].layer, 1);
  EXPECT_EQ(u[1].layer, 2);
  EXPECT_EQ(u[1].experts_without_tokens, 1);
  EXPECT_EQ(u[2].layer, 4);
  EXPECT_DOUBLE_EQ(u[2].max_over_mean, 1.5);
}

}  // namespace
}  // namespace dsv3
