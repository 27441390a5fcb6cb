// Megatron flag parsing: types, repeated/list flags, --no- negation, refusals by name, --moe-layer-freq forms.
#include "train/args.h"

#include "core/error.h"
#include "test_util.h"
#include "train/model_from_args.h"

namespace dsv3 {
namespace {

TEST(TrainArgs, ParsesMegatronFlags) {
  auto a = TrainArgs::parse({"--micro-batch-size", "2", "--lr=3e-4", "--bf16", "--data-path", "0.3", "a", "0.7", "b",
                             "--no-check-for-nan-in-loss-and-grad", "--data-path", "c"});
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
