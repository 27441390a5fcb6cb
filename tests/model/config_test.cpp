// ModelConfig: loading the presets and transformers-written config.json, rejections by name, HF/Megatron
// semantic fields, to_hf_json round trips, and `dsv3 model-info` output (counts, and what each rank of a layout holds).
#include "model/config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "cli/model_info.h"
#include "core/error.h"
#include "model/param_table.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace dsv3 {
namespace {

std::string preset(const char* name) {
  return (testing::source_dir() / "examples/deepseek/configs" / name).string();
}

// A valid tiny config as JSON, to be mutated by the rejection tests.
nlohmann::json tiny_json() {
  std::ifstream in(preset("tiny.json"));
  return nlohmann::json::parse(in);
}

std::string load_error(const nlohmann::json& j) {
  try {
    ModelConfig::from_json_string(j.dump(), "test.json");
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

TEST(ModelConfig, LoadsOfficialHubConfig) {
  const ModelConfig c = ModelConfig::from_json_file(preset("deepseek-v3-671b.json"));
  EXPECT_EQ(c.vocab_size, 129280);
  EXPECT_EQ(c.hidden_size, 7168);
  EXPECT_EQ(c.num_hidden_layers, 61);
  EXPECT_EQ(c.num_nextn_predict_layers, 1);
  EXPECT_EQ(c.q_lora_rank, 1536);
  EXPECT_EQ(c.qk_head_dim(), 192);
  EXPECT_EQ(c.n_routed_experts, 256);
  EXPECT_EQ(c.num_experts_per_tok, 8);
  ASSERT_TRUE(c.rope_scaling.has_value());
  EXPECT_EQ(c.rope_scaling->factor, 40.0);
  EXPECT_EQ(c.rope_scaling->original_max_position_embeddings, 4096);
  EXPECT_EQ(c.source, ConfigSource::kHuggingFace);
  EXPECT_EQ(c.group_score_topk, 2);
  EXPECT_EQ(c.latent_norm_eps, 1e-6);
  EXPECT_TRUE(c.always_renormalise);
  // spec §2.4 [C]: m = 1.3688879454, softmax_scale = 0.0721687836 × 1.8738540 = 0.1352337789.
  EXPECT_NEAR(std::sqrt(c.yarn_softmax_mscale), 1.3688879454, 1e-9);
  EXPECT_NEAR(c.softmax_scale(), 0.1352337789, 1e-9);
  EXPECT_DOUBLE_EQ(c.yarn_attention_factor, 1.0);  // mscale == mscale_all_dim
  // Layer plan: 0..2 dense, 3..60 MoE, MTP layer 61 MoE.
  for (int64_t i = 0; i < 3; ++i) EXPECT_FALSE(c.is_moe_layer(i)) << i;
  for (int64_t i = 3; i < 62; ++i) EXPECT_TRUE(c.is_moe_layer(i)) << i;
  EXPECT_EQ(c.num_dense_layers(), 3);
  EXPECT_EQ(c.num_moe_layers(), 58);
  EXPECT_TRUE(c.is_mtp_layer(61));
  EXPECT_FALSE(c.is_mtp_layer(60));
  EXPECT_TRUE(semantic_differences_from_hf(c).empty());
}

TEST(ModelConfig, SeedReducedIsMegatronFilled) {
  const ModelConfig c = ModelConfig::from_json_file(preset("seed-reduced.json"));
  EXPECT_EQ(c.source, ConfigSource::kMegatron);
  EXPECT_EQ(c.num_hidden_layers, 4);
  EXPECT_EQ(c.num_dense_layers(), 3);
  EXPECT_EQ(c.num_moe_layers(), 1);
  EXPECT_EQ(c.vocab_size, 128896);  // 128815 padded to a multiple of 128 (TP=1)
  EXPECT_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_EQ(c.latent_norm_eps, 1e-5);  // Megatron: --norm-epsilon for the latent norms too
  EXPECT_EQ(c.group_score_topk, 2);    // 8 / 4
  EXPECT_DOUBLE_EQ(c.yarn_softmax_mscale, 1.0);
  EXPECT_NEAR(c.softmax_scale(), 1.0 / std::sqrt(192.0), 1e-15);
  EXPECT_EQ(c.initializer_range, 0.006);
  EXPECT_EQ(c.num_nextn_predict_layers, 0);
  const auto diffs = semantic_differences_from_hf(c);
  ASSERT_EQ(diffs.size(), 2u);
  EXPECT_NE(diffs[0].find("latent_norm_eps"), std::string::npos);
  EXPECT_NE(diffs[1].find("group mask"), std::string::npos);
}

TEST(ModelConfig, TinyAndProxyPresets) {
  const ModelConfig t = ModelConfig::from_json_file(preset("tiny.json"));
  EXPECT_GE(t.num_hidden_layers, 3);
  EXPECT_GE(t.num_dense_layers(), 1);
  EXPECT_GE(t.num_moe_layers(), 2);
  EXPECT_GE(t.n_routed_experts, 8);
  EXPECT_GT(t.n_group, 1);
  EXPECT_TRUE(t.has_q_lora());
  ASSERT_TRUE(t.rope_scaling.has_value());
  EXPECT_GT(t.rope_scaling->factor, 1.0);
  EXPECT_EQ(t.num_nextn_predict_layers, 1);
  EXPECT_EQ(t.yarn_original_max_position(), 64);
  // HF: softmax mscale from mscale_all_dim (0.8), cos/sin amplitude mscale(4, 1.0) / mscale(4, 0.8).
  const double m_all = 0.1 * 0.8 * std::log(4.0) + 1.0, m = 0.1 * 1.0 * std::log(4.0) + 1.0;
  EXPECT_NEAR(t.yarn_softmax_mscale, m_all * m_all, 1e-15);
  EXPECT_NEAR(t.yarn_attention_factor, m / m_all, 1e-15);

  const ModelConfig p = ModelConfig::from_json_file(preset("proxy-cpu.json"));
  EXPECT_EQ(p.hidden_size, 512);
  EXPECT_EQ(p.num_hidden_layers, 4);
  EXPECT_EQ(p.num_dense_layers(), 1);
  EXPECT_EQ(p.q_lora_rank, 256);
  EXPECT_EQ(p.kv_lora_rank, 128);
  EXPECT_EQ(p.qk_nope_head_dim, 32);
  EXPECT_EQ(p.qk_rope_head_dim, 16);
  EXPECT_EQ(p.v_head_dim, 32);
  EXPECT_EQ(p.num_attention_heads, 8);
  EXPECT_EQ(p.n_routed_experts, 16);
  EXPECT_EQ(p.moe_intermediate_size, 256);
  EXPECT_EQ(p.num_experts_per_tok, 4);
  EXPECT_EQ(p.n_group, 4);
  EXPECT_EQ(p.topk_group, 2);
  EXPECT_EQ(p.n_shared_experts, 1);
  EXPECT_EQ(p.intermediate_size, 1024);
  EXPECT_EQ(p.vocab_size, 8192);
  EXPECT_EQ(p.max_position_embeddings, 256);
  EXPECT_FALSE(p.rope_scaling.has_value());
}

TEST(ModelConfig, ReadsTheConfigTransformersWrote) {
  // tests/golden/hf_tiny/config.json is DeepseekV3Config.save_pretrained's output for tiny.json (it adds
  // dtype, head_dim, qk_head_dim, rope_type, and keeps our extra keys): it must mean exactly the same model.
  const ModelConfig a = ModelConfig::from_json_file(preset("tiny.json"));
  const ModelConfig b =
      ModelConfig::from_json_file((testing::source_dir() / "tests/golden/hf_tiny/config.json").string());
  EXPECT_EQ(a.to_hf_json(), b.to_hf_json());
  // The softmax scale and cos/sin amplitude transformers derived from it (F64 in the fixture).
  SafetensorsReader out((testing::source_dir() / "tests/golden/hf_tiny/outputs.safetensors").string());
  double hf_scale, hf_amp;
  std::memcpy(&hf_scale, out.raw("attn_softmax_scale"), 8);
  std::memcpy(&hf_amp, out.raw("rope_attention_scaling"), 8);
  EXPECT_NEAR(b.softmax_scale(), hf_scale, 1e-15);
  EXPECT_NEAR(b.yarn_attention_factor, hf_amp, 1e-15);
  EXPECT_EQ(out.info("rope_inv_freq").numel, b.qk_rope_head_dim / 2);
}

TEST(ModelConfig, MegatronAndHfSemanticsDiffer) {
  nlohmann::json j = tiny_json();
  j["n_routed_experts"] = 16;
  j["n_group"] = 4;
  j["topk_group"] = 1;
  j["num_experts_per_tok"] = 4;  // Megatron: 4/1 = 4 per group; HF: 2
  j["rms_norm_eps"] = 1e-5;
  j["norm_topk_prob"] = false;
  ModelConfig c = ModelConfig::from_json_string(j.dump());
  EXPECT_EQ(c.group_score_topk, 2);
  EXPECT_EQ(c.latent_norm_eps, 1e-6);
  EXPECT_FALSE(c.always_renormalise);
  const double m_all = 0.1 * 0.8 * std::log(4.0) + 1.0, m = 0.1 * 1.0 * std::log(4.0) + 1.0;
  EXPECT_NEAR(c.yarn_softmax_mscale, m_all * m_all, 1e-15);

  fill_semantics(c, ConfigSource::kMegatron);
  EXPECT_EQ(c.source, ConfigSource::kMegatron);
  EXPECT_EQ(c.group_score_topk, 4);
  EXPECT_EQ(c.latent_norm_eps, 1e-5);
  EXPECT_TRUE(c.always_renormalise);
  EXPECT_NEAR(c.yarn_softmax_mscale, m * m, 1e-15);
  EXPECT_NEAR(c.yarn_attention_factor, m / m_all, 1e-15);
  // norm_topk_prob is written as always_renormalise, so that one is not a difference; the other three are,
  // and the group mask value.
  const auto diffs = semantic_differences_from_hf(c);
  EXPECT_EQ(diffs.size(), 4u);

  // to_hf_json records them, and reading it back restores every semantic field.
  const std::string text = c.to_hf_json();
  const auto w = nlohmann::json::parse(text);
  ASSERT_TRUE(w.contains("dsv3_semantics"));
  EXPECT_EQ(w["dsv3_semantics"]["source"], "megatron");
  const std::string note = w["dsv3_semantics"]["note"];
  EXPECT_NE(note.find("group_score_topk"), std::string::npos);
  EXPECT_NE(note.find("latent_norm_eps"), std::string::npos);
  EXPECT_NE(note.find("yarn_softmax_mscale"), std::string::npos);
  EXPECT_EQ(w["norm_topk_prob"], true);
  const ModelConfig r = ModelConfig::from_json_string(text);
  EXPECT_EQ(r.source, ConfigSource::kMegatron);
  EXPECT_EQ(r.group_score_topk, 4);
  EXPECT_EQ(r.latent_norm_eps, 1e-5);
  EXPECT_TRUE(r.always_renormalise);
  EXPECT_DOUBLE_EQ(r.yarn_softmax_mscale, c.yarn_softmax_mscale);
  EXPECT_EQ(r.to_hf_json(), text);
}

TEST(ModelConfig, HfConfigWritesNoSemanticsBlock) {
  for (const char* name : {"deepseek-v3-671b.json", "tiny.json", "proxy-cpu.json"}) {
    const ModelConfig c = ModelConfig::from_json_file(preset(name));
    const std::string text = c.to_hf_json();
    EXPECT_FALSE(nlohmann::json::parse(text).contains("dsv3_semantics")) << name;
    EXPECT_EQ(ModelConfig::from_json_string(text).to_hf_json(), text) << name;
  }
  // The Megatron-filled seed config keeps its block through a round trip.
  const ModelConfig s = ModelConfig::from_json_file(preset("seed-reduced.json"));
  const std::string text = s.to_hf_json("bfloat16");
  EXPECT_TRUE(nlohmann::json::parse(text).contains("dsv3_semantics"));
  EXPECT_EQ(ModelConfig::from_json_string(text).to_hf_json("bfloat16"), text);
}

TEST(ModelConfig, NoQLoraAndNoRopeScaling) {
  nlohmann::json j = tiny_json();
  j["q_lora_rank"] = nullptr;
  j["rope_scaling"] = nullptr;
  const ModelConfig c = ModelConfig::from_json_string(j.dump());
  EXPECT_FALSE(c.has_q_lora());
  EXPECT_FALSE(c.rope_scaling.has_value());
  EXPECT_DOUBLE_EQ(c.yarn_softmax_mscale, 1.0);
  EXPECT_DOUBLE_EQ(c.yarn_attention_factor, 1.0);
  j["q_lora_rank"] = 0;  // the official code's spelling of "none"
  EXPECT_FALSE(ModelConfig::from_json_string(j.dump()).has_q_lora());
  EXPECT_TRUE(nlohmann::json::parse(c.to_hf_json())["q_lora_rank"].is_null());
}

TEST(ModelConfig, MoeLayerFreq) {
  nlohmann::json j = tiny_json();
  j["num_hidden_layers"] = 6;
  j["moe_layer_freq"] = 2;
  const ModelConfig c = ModelConfig::from_json_string(j.dump());
  const bool want[] = {false, false, true, false, true, false};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(c.is_moe_layer(i), want[i]) << i;
  // transformers ignores moe_layer_freq: never silently.
  const auto w = nlohmann::json::parse(c.to_hf_json());
  ASSERT_TRUE(w.contains("dsv3_semantics"));
  EXPECT_NE(w["dsv3_semantics"]["note"].get<std::string>().find("moe_layer_freq"), std::string::npos);
}

TEST(ModelConfig, RejectsUnsupportedValuesByName) {
  struct Case {
    const char* key;
    nlohmann::json value;
    const char* expect;
  };
  const Case cases[] = {
      {"scoring_func", "softmax", "scoring_func"},
      {"topk_method", "greedy", "topk_method"},
      {"tie_word_embeddings", true, "tie_word_embeddings"},
      {"attention_bias", true, "attention_bias"},
      {"hidden_act", "gelu", "hidden_act"},
      {"num_key_value_heads", 1, "num_key_value_heads"},
      {"n_group", 3, "n_group"},
      {"topk_group", 8, "topk_group"},
      {"num_experts_per_tok", 12, "num_experts_per_tok"},
      {"rope_scaling", {{"type", "linear"}, {"factor", 2.0}}, "rope_scaling type 'linear'"},
      {"rope_scaling", {{"type", "yarn"}}, "'factor' is required"},
      {"rope_interleave", false, "rope_interleave"},
      {"model_type", "llama", "model_type"},
      {"hidden_size", "big", "hidden_size"},
      {"qk_rope_head_dim", 7, "qk_rope_head_dim"},
      {"pad_token_id", 999, "pad_token_id"},
  };
  for (const auto& k : cases) {
    nlohmann::json j = tiny_json();
    j[k.key] = k.value;
    const std::string err = load_error(j);
    EXPECT_NE(err.find(k.expect), std::string::npos) << k.key << " -> '" << err << "'";
    EXPECT_NE(err.find("test.json"), std::string::npos) << err;
  }
  nlohmann::json j = tiny_json();
  j.erase("kv_lora_rank");
  EXPECT_NE(load_error(j).find("'kv_lora_rank' is required"), std::string::npos) << load_error(j);
  EXPECT_NE(load_error(nlohmann::json::array()).find("JSON object"), std::string::npos);
  EXPECT_THROW(ModelConfig::from_json_string("{not json", "x.json"), Error);
  EXPECT_THROW(ModelConfig::from_json_file("/nonexistent/config.json"), Error);
}

// Runs model_info_main and returns what it printed.
std::string run_model_info(std::vector<std::string> args) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  ::testing::internal::CaptureStdout();
  const int rc = cli::model_info_main(static_cast<int>(argv.size()), argv.data());
  std::fflush(stdout);
  std::string out = ::testing::internal::GetCapturedStdout();
  EXPECT_EQ(rc, 0);
  return out;
}

TEST(ModelInfo, PrintsSpecCountsFor671B) {
  const std::string out = run_model_info({"model-info", "--model-config", preset("deepseek-v3-671b.json")});
  // spec §4.7: total main 671,026,419,200; activated 37,552,297,472 (36,625,618,432 excl. embedding);
  // MTP unique 11,610,068,224; hub total 684.49B.
  EXPECT_NE(out.find("671,026,419,200"), std::string::npos) << out;
  EXPECT_NE(out.find("37,552,297,472"), std::string::npos) << out;
  EXPECT_NE(out.find("36,625,618,432"), std::string::npos) << out;
  EXPECT_NE(out.find("11,610,068,224"), std::string::npos) << out;
  EXPECT_NE(out.find("684,489,845,504"), std::string::npos) << out;
  EXPECT_NE(out.find("layers 0-2"), std::string::npos) << out;
  EXPECT_NE(out.find("layers 3-60"), std::string::npos) << out;
  EXPECT_NE(out.find("layer  61"), std::string::npos) << out;
}

TEST(ModelInfo, ListsParamsAndShowsSemantics) {
  const std::string out =
      run_model_info({"model-info", "--model-config", preset("seed-reduced.json"), "--params"});
  EXPECT_NE(out.find("semantics: megatron"), std::string::npos) << out;
  EXPECT_NE(out.find("differs from transformers: latent_norm_eps"), std::string::npos) << out;
  EXPECT_NE(out.find("model.layers.3.mlp.experts.255.down_proj.weight"), std::string::npos);
  EXPECT_NE(out.find("model.layers.0.mlp.down_proj.weight"), std::string::npos);
}

}  // namespace
}  // namespace dsv3

namespace dsv3 {
namespace {

// The layout section: per stage, the parameters one rank holds, counted here straight from the table (layers of the
// printed range, half the routed experts with EP 2, embedding on the first stage and — for MTP — a copy on the last,
// norm/head/MTP on the last), and 8 bytes of fp32 weight + gradient each.
TEST(ModelInfo, LayoutCountsWhatEachStageHolds) {
  const std::string cfg_path = preset("demo-cpu.json");
  const std::string out =
      run_model_info({"model-info", "--model-config", cfg_path, "--pipeline-model-parallel-size", "2",
                      "--expert-model-parallel-size", "2", "--data-parallel-size", "2"});
  const ModelConfig cfg = ModelConfig::from_json_file(cfg_path);
  const ParamTable table(cfg);
  const int64_t L = cfg.num_hidden_layers, half = L / 2, E = cfg.n_routed_experts;
  ASSERT_GT(cfg.num_nextn_predict_layers, 0);
  for (int q = 0; q < 2; ++q) {
    const int64_t first = q * half, last = (q + 1) * half;
    int64_t n = 0;
    for (const auto& p : table.params()) {
      if (!p.tied_to.empty() || (p.is_expert && p.expert >= E / 2)) continue;
      const bool mine = p.layer >= L   ? q == 1
                        : p.layer >= 0 ? p.layer >= first && p.layer < last
                        : p.name == "model.embed_tokens.weight"
                            ? true  // stage 0, and the MTP copy on stage 1
                            : q == 1;
      if (mine) n += p.numel;
    }
    char layers[32];
    std::snprintf(layers, sizeof layers, "%d-%d", static_cast<int>(first), static_cast<int>(last - 1));
    std::string grouped = std::to_string(n);
    for (int i = static_cast<int>(grouped.size()) - 3; i > 0; i -= 3)
      grouped.insert(static_cast<size_t>(i), ",");
    const std::regex row("\n  " + std::to_string(q) + " +" + layers + " +" + grouped + " +([0-9.]+) GiB");
    std::smatch m;
    ASSERT_TRUE(std::regex_search(out, m, row)) << "stage " << q << " should hold " << grouped << ":\n"
                                                << out;
    EXPECT_NEAR(std::stod(m[1]), 8.0 * n / (1 << 30), 0.006) << out;
  }
  EXPECT_NE(out.find("layout: PP 2 x DP 2 (ETP 1, EP 2, expert-DP 1) = 4 ranks"), std::string::npos) << out;
}

}  // namespace
}  // namespace dsv3

namespace dsv3 {
namespace {

// Under TP 2 a rank holds half of every head-, FFN- or vocabulary-split tensor (q_b/kv_b/gate/up rows, o_proj and
// down columns, embedding and head rows) and the rest whole; the routed experts are split too under expert tensor
// parallelism (ETP 2, the default) and whole with ETP 1, whose expert grid then holds the two TP ranks as
// expert-DP.
TEST(ModelInfo, LayoutCountsTheTensorParallelShard) {
  const std::string cfg_path = preset("demo-cpu.json");
  const ParamTable table(ModelConfig::from_json_file(cfg_path));
  auto ends = [](const std::string& s, const std::string& x) {
    return s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0;
  };
  for (const int etp : {2, 1}) {
    std::vector<std::string> args = {"model-info", "--model-config", cfg_path, "--tensor-model-parallel-size",
                                     "2"};
    if (etp == 1) args.insert(args.end(), {"--expert-tensor-parallel-size", "1"});
    const std::string out = run_model_info(args);
    int64_t n = 0;
    for (const auto& p : table.params()) {
      if (!p.tied_to.empty()) continue;
      const bool split = (!p.is_expert || etp == 2) &&
                         (ends(p.name, "q_b_proj.weight") || ends(p.name, "kv_b_proj.weight") ||
                          ends(p.name, "o_proj.weight") || ends(p.name, "gate_proj.weight") ||
                          ends(p.name, "up_proj.weight") || ends(p.name, "down_proj.weight") ||
                          p.name == "model.embed_tokens.weight" || p.name == "lm_head.weight");
      n += split ? p.numel / 2 : p.numel;
    }
    std::string grouped = std::to_string(n);
    for (int i = static_cast<int>(grouped.size()) - 3; i > 0; i -= 3)
      grouped.insert(static_cast<size_t>(i), ",");
    const std::string layout = etp == 2 ? "layout: TP 2 x PP 1 x DP 1 (ETP 2, EP 1, expert-DP 1) = 2 ranks"
                                        : "layout: TP 2 x PP 1 x DP 1 (ETP 1, EP 1, expert-DP 2) = 2 ranks";
    EXPECT_NE(out.find(layout), std::string::npos) << out;
    EXPECT_TRUE(std::regex_search(out, std::regex("\n  0 +0-3 +" + grouped + " "))) << grouped << "\n" << out;
  }
}

}  // namespace
}  // namespace dsv3
