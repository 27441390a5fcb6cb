// Megatron flag parsing: types, repeated/list flags, --no- negation, refusals by name, --moe-layer-freq forms.
#include "train/args.h"

#include "core/error.h"
#include "test_util.h"
#include "train/model_from_args.h"

namespace dsv3 {
namespace {

TEST(TrainArgs, ParsesMegatronFlags) {
  auto a = TrainArgs::parse({"--micro-batch-size", "2", "--lr=3e-4", "--bf16", "--data-path", "0.3", "a",
                             "0.7", "b", "--no-check-for-nan-in-loss-and-grad", "--data-path", "c"});
  EXPECT_EQ(a.i("micro_batch_size"), 2);
  EXPECT_DOUBLE_EQ(a.f("lr"), 3e-4);
  EXPECT_TRUE(a.b("bf16"));
  EXPECT_FALSE(a.b("check_for_nan_in_loss_and_grad"));
  EXPECT_EQ(a.list("data_path"), (std::vector<std::string>{"0.3", "a", "0.7", "b", "c"}));
  EXPECT_EQ(a.i("seed"), 1234);  // Megatron's default
  EXPECT_FALSE(a.given("seed"));
  const auto all = a.all_map();
  EXPECT_EQ(all.at("lr"), "0.0003");  // Python's str(float), as Megatron's arguments block prints it
  EXPECT_EQ(all.at("bf16"), "True");
  EXPECT_EQ(all.at("save"), "None");
}

TEST(TrainArgs, RefusesByName) {
  auto msg = [](std::vector<std::string> v) {
    try {
      TrainArgs::parse(v);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  EXPECT_NE(msg({"--fp16"}).find("--fp16 is not supported"), std::string::npos);
  EXPECT_NE(msg({"--bogus", "1"}).find("unrecognized arguments: --bogus 1"), std::string::npos);
  EXPECT_NE(msg({"--lr", "fast"}).find("invalid float value: 'fast'"), std::string::npos);
  EXPECT_NE(msg({"--seed"}).find("expected one argument"), std::string::npos);
}

// One flag of each kind: applied (stored, not in the arguments block), no effect (accepted with its argument,
// listed with the reason), refused by name or by value, and the architecture flags a flag-built model must name.
TEST(TrainArgs, OneFlagOfEachKind) {
  auto error_of = [](const std::vector<std::string>& v) {
    try {
      check_architecture_flags(TrainArgs::parse(v));
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string("no error");
  };
  const std::vector<std::string> base = {"--model-config", "c.json", "--lr", "1e-3"};
  auto plus = [&](std::vector<std::string> more) {
    more.insert(more.begin(), base.begin(), base.end());
    return more;
  };
  // Applies: given, checked, and the arguments block (and so the checkpoint's args) is the same as without it.
  const auto applied =
      TrainArgs::parse(plus({"--swiglu", "--normalization", "RMSNorm", "--moe-grouped-gemm"}));
  EXPECT_TRUE(applied.b("swiglu"));
  EXPECT_EQ(applied.s("normalization"), "RMSNorm");
  EXPECT_EQ(applied.all(), TrainArgs::parse(base).all());
  EXPECT_TRUE(applied.no_effect().empty());
  // No effect: accepted with its argument (also inline), listed once with the reason, block unchanged.
  const auto none =
      TrainArgs::parse(plus({"--ckpt-format", "torch_dist", "--use-torch-compile=0", "--no-rope-fusion"}));
  ASSERT_EQ(none.no_effect().size(), 3u);
  EXPECT_EQ(none.no_effect()[0].first, "--ckpt-format torch_dist");
  EXPECT_EQ(none.no_effect()[1].first, "--use-torch-compile 0");
  EXPECT_EQ(none.all(), TrainArgs::parse(base).all());
  const std::string line = format_no_effect_line(none.no_effect());
  EXPECT_EQ(
      line.rfind("note: these flags have no effect in dsv3: --ckpt-format torch_dist (checkpoint format", 0),
      0u)
      << line;
  EXPECT_NE(line.find("--use-torch-compile 0 (PyTorch compilation"), std::string::npos) << line;
  EXPECT_EQ(line.find('\n'), std::string::npos);
  EXPECT_EQ(format_no_effect_line(applied.no_effect()), "");
  EXPECT_THROW(TrainArgs::parse(plus({"--ckpt-format"})), Error);  // its argument is required, as in Megatron
  // Refused: other numbers than dsv3 computes, by name or by value.
  EXPECT_NE(error_of(plus({"--group-query-attention"})).find("--group-query-attention is not supported"),
            std::string::npos);
  EXPECT_NE(error_of(plus({"--attention-dropout", "0.1"})).find("--attention-dropout 0.1 is not supported"),
            std::string::npos);
  EXPECT_NE(
      error_of(plus({"--normalization", "LayerNorm"})).find("--normalization LayerNorm is not supported"),
      std::string::npos);
  EXPECT_EQ(error_of(plus({"--attention-dropout", "0.0", "--hidden-dropout", "0"})), "no error");
  // A flag-built model must name DeepSeek-V3's architecture; the refusal lists every missing flag.
  const std::vector<std::string> arch = {"--multi-latent-attention",
                                         "--qk-layernorm",
                                         "--swiglu",
                                         "--normalization",
                                         "RMSNorm",
                                         "--position-embedding-type",
                                         "rope",
                                         "--untie-embeddings-and-output-weights",
                                         "--disable-bias-linear",
                                         "--attention-dropout",
                                         "0",
                                         "--hidden-dropout",
                                         "0",
                                         "--moe-router-score-function",
                                         "sigmoid"};
  EXPECT_EQ(error_of(arch), "no error");
  std::vector<std::string> partial(arch.begin() + 3, arch.end());  // without MLA, its latent norms and SwiGLU
  EXPECT_NE(error_of(partial).find("missing: --multi-latent-attention --qk-layernorm --swiglu"),
            std::string::npos)
      << error_of(partial);
  EXPECT_NE(
      error_of({}).find("missing: --multi-latent-attention --qk-layernorm --swiglu --normalization RMSNorm "
                        "--position-embedding-type rope --untie-embeddings-and-output-weights "
                        "--disable-bias-linear --attention-dropout 0 --hidden-dropout 0 "
                        "--moe-router-score-function sigmoid"),
      std::string::npos)
      << error_of({});
}

TEST(TrainArgs, MoeLayerFreqForms) {
  int64_t k = -1, f = -1;
  parse_moe_layer_freq("1", 4, k, f);
  EXPECT_EQ(k, 0);
  EXPECT_EQ(f, 1);
  parse_moe_layer_freq("[0]*3+[1]*58", 61, k, f);
  EXPECT_EQ(k, 3);
  EXPECT_EQ(f, 1);
  parse_moe_layer_freq("([0]*3+[1]*1)", 4, k, f);  // the seed script's spelling
  EXPECT_EQ(k, 3);
  parse_moe_layer_freq("[0, 0, 1, 1]", 4, k, f);
  EXPECT_EQ(k, 2);
  EXPECT_THROW(parse_moe_layer_freq("[0]*3+[1]*2", 4, k, f), Error);   // wrong length
  EXPECT_THROW(parse_moe_layer_freq("[1, 0, 1, 1]", 4, k, f), Error);  // dense after MoE
}

}  // namespace
}  // namespace dsv3
