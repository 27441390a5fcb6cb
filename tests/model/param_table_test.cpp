// Parameter table: names, shapes and counts against the spec and against transformers' own checkpoint of the
// tiny model (tests/golden/hf_tiny), and the counter-based initialisation rule.
#include "model/param_table.h"

#include <gtest/gtest.h>

#include <cmath>
#include <set>

#include "core/error.h"
#include "core/philox.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace dsv3 {
namespace {

ModelConfig load_preset(const char* name) {
  return ModelConfig::from_json_file((testing::source_dir() / "examples/deepseek/configs" / name).string());
}

std::filesystem::path golden(const char* file) {
  return testing::source_dir() / "tests/golden/hf_tiny" / file;
}

TEST(ParamTable, CountsOf671BMatchSpec) {
  const ParamTable t(load_preset("deepseek-v3-671b.json"));
  // spec §4.7 [C].
  EXPECT_EQ(t.total_main(), 671'026'419'200);
  EXPECT_EQ(t.active_main(), 37'552'297'472);
  EXPECT_EQ(t.active_main_excl_embedding(), 36'625'618'432);
  EXPECT_EQ(t.total_mtp_unique(), 11'610'068'224);
  EXPECT_EQ(t.hub_total(), 684'489'845'504);
  EXPECT_EQ(t.total_trainable_storage(), 671'026'419'200 + 11'610'068'224);
  // Per-layer pieces quoted in §4.7: attention 187,107,328 (with the 2 latent norms), one expert 44,040,192,
  // MoE layer 11,320,164,608, embedding = head = 926,679,040.
  int64_t attn = 0, moe = 0;
  for (const auto& p : t.params()) {
    if (p.layer == 5 && p.name.find(".self_attn.") != std::string::npos) attn += p.numel;
    if (p.layer == 5 && p.name.find(".mlp.") != std::string::npos) moe += p.numel;
  }
  EXPECT_EQ(attn, 187'107'328);
  EXPECT_EQ(moe, 11'320'164'608);
  EXPECT_EQ(3 * t.at("model.layers.5.mlp.experts.17.up_proj.weight").numel, 44'040'192);
  EXPECT_EQ(t.at("lm_head.weight").numel, 926'679'040);
}

TEST(ParamTable, NamesShapesAndRolesOf671B) {
  const ParamTable t(load_preset("deepseek-v3-671b.json"));
  auto shape = [&](const std::string& n) { return t.at(n).shape; };
  using S = std::vector<int64_t>;
  // spec §5.1.
  EXPECT_EQ(shape("model.embed_tokens.weight"), (S{129280, 7168}));
  EXPECT_EQ(shape("model.layers.0.self_attn.q_a_proj.weight"), (S{1536, 7168}));
  EXPECT_EQ(shape("model.layers.0.self_attn.q_a_layernorm.weight"), (S{1536}));
  EXPECT_EQ(shape("model.layers.0.self_attn.q_b_proj.weight"), (S{24576, 1536}));
  EXPECT_EQ(shape("model.layers.0.self_attn.kv_a_proj_with_mqa.weight"), (S{576, 7168}));
  EXPECT_EQ(shape("model.layers.0.self_attn.kv_a_layernorm.weight"), (S{512}));
  EXPECT_EQ(shape("model.layers.0.self_attn.kv_b_proj.weight"), (S{32768, 512}));
  EXPECT_EQ(shape("model.layers.0.self_attn.o_proj.weight"), (S{7168, 16384}));
  EXPECT_EQ(shape("model.layers.2.mlp.gate_proj.weight"), (S{18432, 7168}));
  EXPECT_EQ(shape("model.layers.2.mlp.down_proj.weight"), (S{7168, 18432}));
  EXPECT_FALSE(t.contains("model.layers.3.mlp.gate_proj.weight"));
  EXPECT_EQ(shape("model.layers.3.mlp.gate.weight"), (S{256, 7168}));
  EXPECT_EQ(shape("model.layers.3.mlp.gate.e_score_correction_bias"), (S{256}));
  EXPECT_EQ(shape("model.layers.60.mlp.experts.255.down_proj.weight"), (S{7168, 2048}));
  EXPECT_EQ(shape("model.layers.60.mlp.shared_experts.up_proj.weight"), (S{2048, 7168}));
  EXPECT_EQ(shape("model.norm.weight"), (S{7168}));
  EXPECT_EQ(shape("lm_head.weight"), (S{129280, 7168}));
  EXPECT_EQ(shape("model.layers.61.eh_proj.weight"), (S{7168, 14336}));
  EXPECT_EQ(shape("model.layers.61.enorm.weight"), (S{7168}));
  EXPECT_EQ(shape("model.layers.61.hnorm.weight"), (S{7168}));
  EXPECT_EQ(shape("model.layers.61.shared_head.norm.weight"), (S{7168}));
  EXPECT_EQ(t.at("model.layers.61.shared_head.head.weight").tied_to, "lm_head.weight");
  EXPECT_EQ(t.at("model.layers.61.embed_tokens.weight").tied_to, "model.embed_tokens.weight");
  EXPECT_TRUE(t.at("model.layers.61.mlp.experts.0.gate_proj.weight").is_mtp);
  EXPECT_EQ(t.at("model.layers.61.mlp.experts.0.gate_proj.weight").layer, 61);

  // Roles, experts, weight decay, init.
  const auto& e = t.at("model.layers.7.mlp.experts.9.gate_proj.weight");
  EXPECT_TRUE(e.is_expert);
  EXPECT_EQ(e.expert, 9);
  EXPECT_FALSE(t.at("model.layers.7.mlp.shared_experts.gate_proj.weight").is_expert);
  EXPECT_FALSE(t.at("model.layers.7.mlp.gate.weight").is_expert);
  EXPECT_FALSE(t.at("model.norm.weight").weight_decay);
  EXPECT_FALSE(t.at("model.layers.7.mlp.gate.e_score_correction_bias").weight_decay);
  EXPECT_FALSE(t.at("model.layers.7.mlp.gate.e_score_correction_bias").trainable);
  EXPECT_TRUE(t.at("model.layers.7.mlp.gate.weight").weight_decay);
  const double sd = 0.02, scaled = 0.02 / std::sqrt(2.0 * 61);
  EXPECT_DOUBLE_EQ(t.at("model.embed_tokens.weight").init_std, sd);
  EXPECT_DOUBLE_EQ(t.at("lm_head.weight").init_std, sd);
  EXPECT_DOUBLE_EQ(t.at("model.layers.7.mlp.gate.weight").init_std, sd);
  EXPECT_DOUBLE_EQ(t.at("model.layers.7.self_attn.q_b_proj.weight").init_std, sd);
  EXPECT_DOUBLE_EQ(t.at("model.layers.7.self_attn.o_proj.weight").init_std, scaled);
  EXPECT_DOUBLE_EQ(t.at("model.layers.7.mlp.experts.3.down_proj.weight").init_std, scaled);
  EXPECT_DOUBLE_EQ(t.at("model.layers.7.mlp.shared_experts.down_proj.weight").init_std, scaled);
  EXPECT_DOUBLE_EQ(t.at("model.layers.1.mlp.down_proj.weight").init_std, scaled);
  EXPECT_DOUBLE_EQ(t.at("model.layers.61.eh_proj.weight").init_std, sd);
  EXPECT_EQ(t.at("model.layers.7.input_layernorm.weight").init, InitKind::kOnes);
  EXPECT_EQ(t.at("model.layers.7.mlp.gate.e_score_correction_bias").init, InitKind::kZeros);
  EXPECT_THROW(t.at("model.layers.99.foo"), Error);
}

TEST(ParamTable, OrderAndNoQLora) {
  ModelConfig c = load_preset("tiny.json");
  const ParamTable t(c);
  EXPECT_EQ(t.params().front().name, "model.embed_tokens.weight");
  // Main model first, then MTP; no duplicates.
  bool seen_mtp = false;
  std::set<std::string> names;
  for (const auto& p : t.params()) {
    EXPECT_TRUE(names.insert(p.name).second) << p.name;
    if (p.is_mtp) seen_mtp = true;
    EXPECT_FALSE(seen_mtp && !p.is_mtp) << p.name << " after the MTP block";
  }
  c.q_lora_rank = 0;
  const ParamTable u(c);
  EXPECT_FALSE(u.contains("model.layers.0.self_attn.q_a_proj.weight"));
  EXPECT_EQ(u.at("model.layers.0.self_attn.q_proj.weight").shape,
            (std::vector<int64_t>{c.num_attention_heads * c.qk_head_dim(), c.hidden_size}));
}

// Every parameter transformers' DeepseekV3ForCausalLM saved for tiny.json is in our table with the same
// shape, and the table's non-MTP entries are exactly what it saved; the gradient file covers every trainable
// one.
TEST(HfTinyFixture, CheckpointMatchesParamTable) {
  const ModelConfig cfg = ModelConfig::from_json_file(golden("config.json").string());
  const ParamTable t(cfg);
  SafetensorsReader model(golden("model.safetensors").string());
  SafetensorsReader grads(golden("grads.safetensors").string());
  std::set<std::string> hf(model.names().begin(), model.names().end());
  for (const auto& name : model.names()) {
    ASSERT_TRUE(t.contains(name)) << name << " saved by transformers is not in the parameter table";
    const auto& p = t.at(name);
    EXPECT_EQ(model.info(name).shape, p.shape) << name;
    EXPECT_EQ(model.info(name).dtype, StDtype::kF32) << name;
    EXPECT_FALSE(p.is_mtp) << name;
    EXPECT_EQ(model.read_f32(name).size(), static_cast<size_t>(p.numel));
  }
  size_t main_entries = 0;
  for (const auto& p : t.params()) {
    if (p.is_mtp) continue;
    ++main_entries;
    EXPECT_TRUE(hf.count(p.name)) << p.name << " is missing from transformers' checkpoint";
    if (p.trainable) {
      ASSERT_TRUE(grads.contains(p.name)) << "no gradient for " << p.name;
      EXPECT_EQ(grads.info(p.name).shape, p.shape) << p.name;
    } else {
      EXPECT_FALSE(grads.contains(p.name)) << p.name;
    }
  }
  EXPECT_EQ(main_entries, hf.size());
  int64_t saved = 0;
  for (const auto& name : model.names()) saved += model.info(name).numel;
  EXPECT_EQ(saved, t.total_main());
  // HF drops the MTP layer: nothing at index num_hidden_layers.
  for (const auto& name : model.names())
    EXPECT_EQ(name.find("model.layers." + std::to_string(cfg.num_hidden_layers) + "."), std::string::npos)
        << name;
  // The expert bias is non-zero (it must influence routing in the golden).
  const auto b = model.read_f32("model.layers.1.mlp.gate.e_score_correction_bias");
  double s = 0;
  for (float v : b) s += std::abs(v);
  EXPECT_GT(s, 0.1);
}

TEST(HfTinyFixture, InputsAndOutputsAreConsistent) {
  const ModelConfig cfg = ModelConfig::from_json_file(golden("config.json").string());
  SafetensorsReader in(golden("inputs.safetensors").string());
  SafetensorsReader out(golden("outputs.safetensors").string());
  const auto ids = in.read_i64("input_ids");
  const auto labels = in.read_i64("labels");
  const auto& shp = in.info("input_ids").shape;
  ASSERT_EQ(shp.size(), 2u);
  const int64_t B = shp[0], S = shp[1];
  EXPECT_EQ(in.info("labels").shape, shp);
  for (int64_t v : ids) EXPECT_TRUE(v >= 0 && v < cfg.vocab_size);
  for (int64_t v : labels) EXPECT_TRUE(v == -100 || (v >= 0 && v < cfg.vocab_size));
  EXPECT_EQ(out.info("logits").shape, (std::vector<int64_t>{B, S, cfg.vocab_size}));
  EXPECT_TRUE(out.info("loss").shape.empty());
  const float loss = out.read_f32("loss")[0];
  EXPECT_TRUE(std::isfinite(loss) && loss > 0.0f);
  for (int64_t l = 0; l < cfg.num_hidden_layers; ++l) {
    const std::string pre = "router." + std::to_string(l) + ".";
    EXPECT_EQ(out.contains(pre + "topk_indices"), cfg.is_moe_layer(l)) << l;
    if (!cfg.is_moe_layer(l)) continue;
    EXPECT_EQ(out.info(pre + "topk_indices").shape, (std::vector<int64_t>{B * S, cfg.num_experts_per_tok}));
    const auto w = out.read_f32(pre + "topk_weights");
    // Renormalised weights times routed_scaling_factor sum to the factor per token.
    for (int64_t t = 0; t < B * S; ++t) {
      double s = 0;
      for (int64_t k = 0; k < cfg.num_experts_per_tok; ++k) s += w[t * cfg.num_experts_per_tok + k];
      EXPECT_NEAR(s, cfg.routed_scaling_factor, 1e-5);
    }
  }
  EXPECT_TRUE(out.contains("hidden_states." + std::to_string(cfg.num_hidden_layers)));
}

TEST(ParamInit, CounterBasedRule) {
  const ModelConfig c = load_preset("tiny.json");
  const ParamTable t(c);
  const uint64_t seed = 1234;
  for (const auto& p : t.params()) {
    std::vector<float> whole(static_cast<size_t>(p.numel));
    init_param(p, seed, c, whole.data());
    const std::string& stream = p.tied_to.empty() ? p.name : p.tied_to;
    for (int64_t k = 0; k < p.numel; k += 7) {
      float want = p.init == InitKind::kOnes ? 1.0f
                   : p.init == InitKind::kZeros
                       ? 0.0f
                       : static_cast<float>(p.init_std * philox_normal(seed, name_hash(stream), k));
      ASSERT_EQ(whole[k], want) << p.name << "[" << k << "]";
      ASSERT_EQ(init_value(p, seed, k, c.pad_token_id), want) << p.name << "[" << k << "]";
    }
  }
}

TEST(ParamInit, BlocksEqualTheWholeTensorAndTiesEqualOwners) {
  ModelConfig c = load_preset("tiny.json");
  c.pad_token_id = 5;
  const ParamTable t(c);
  const auto& w = t.at("model.layers.1.self_attn.kv_b_proj.weight");  // [2*(12+10), 20]
  std::vector<float> whole(static_cast<size_t>(w.numel));
  init_param(w, 7, c, whole.data());
  const int64_t C = w.shape[1];
  // A TP-style column block and a row block.
  for (auto [r0, rows, c0, cols] :
       {std::array<int64_t, 4>{3, 10, 4, 9}, std::array<int64_t, 4>{0, 44, 0, 20}}) {
    std::vector<float> blk(static_cast<size_t>(rows * cols));
    init_param_block(w, 7, c, r0, rows, c0, cols, blk.data());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t k = 0; k < cols; ++k) ASSERT_EQ(blk[r * cols + k], whole[(r0 + r) * C + c0 + k]);
  }
  EXPECT_THROW(init_param_block(w, 7, c, 40, 5, 0, 1, whole.data()), Error);

  // MTP copies draw the owner's values; the padding row is zero.
  const auto& emb = t.at("model.embed_tokens.weight");
  const auto& emb_copy = t.at("model.layers.3.embed_tokens.weight");
  std::vector<float> a(static_cast<size_t>(emb.numel)), b(a.size());
  init_param(emb, 9, c, a.data());
  init_param(emb_copy, 9, c, b.data());
  EXPECT_EQ(a, b);
  for (int64_t k = 0; k < c.hidden_size; ++k) EXPECT_EQ(a[5 * c.hidden_size + k], 0.0f);
  EXPECT_EQ(init_value(emb, 9, 5 * c.hidden_size + 3, c.pad_token_id), 0.0f);
  EXPECT_NE(a[4 * c.hidden_size], 0.0f);

  // Statistics of a large tensor: mean 0, std = init_std; different names give different streams.
  const auto& head = t.at("lm_head.weight");
  std::vector<float> h(static_cast<size_t>(head.numel));
  init_param(head, 9, c, h.data());
  double s = 0, s2 = 0;
  for (float v : h) s += v, s2 += double(v) * v;
  const double n = static_cast<double>(h.size()), mean = s / n, sd = std::sqrt(s2 / n - mean * mean);
  EXPECT_NEAR(mean, 0.0, 4 * head.init_std / std::sqrt(n));
  EXPECT_NEAR(sd / head.init_std, 1.0, 0.05);
  EXPECT_NE(h[0], a[0]);
}

}  // namespace
}  // namespace dsv3
