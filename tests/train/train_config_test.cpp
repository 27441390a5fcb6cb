// TrainConfig: the flags read once into typed fields, with the derived values (global batch, micro-batches,
// the sample-based LR schedule) and every start-up refusal coming from TrainConfig::from_args.
#include "train/train_config.h"

#include <sstream>

#include "core/error.h"
#include "test_util.h"

namespace dsv3 {
namespace {

std::vector<std::string> base_flags() {
  std::vector<std::string> v = {"--model-config",
                                (testing::source_dir() / "examples/deepseek/configs/demo-cpu.json").string()};
  std::istringstream in(
      "--data-path 0.3 a 0.7 b --seq-length 32 --train-iters 10 --lr 3e-3 --micro-batch-size 2");
  for (std::string w; in >> w;) v.push_back(w);
  return v;
}

TrainConfig config_of(std::vector<std::string> more, int world = 1) {
  auto flags = base_flags();
  flags.insert(flags.end(), more.begin(), more.end());
  return TrainConfig::from_args(TrainArgs::parse(flags), world);
}

std::string error_of(std::vector<std::string> more, int world = 1) {
  try {
    config_of(std::move(more), world);
  } catch (const Error& e) {
    return e.what();
  }
  return "no error";
}

TEST(TrainConfig, ReadsTypedFieldsAndDerivedValues) {
  const TrainConfig c =
      config_of({"--lr-warmup-iters", "2", "--moe-router-load-balancing-type", "seq_aux_loss",
                 "--moe-aux-loss-coeff", "1e-2", "--bf16", "--save", "/ck", "--save-interval", "5",
                 "--exit-duration-in-mins", "7", "--recompute-granularity", "full"},
                /*world=*/2);
  EXPECT_EQ(c.seq_length, 32);
  EXPECT_EQ(c.micro_batch_size, 2);
  EXPECT_EQ(c.dp, 2);
  EXPECT_EQ(c.global_batch_size, 4);  // Megatron's default: one micro-batch per data-parallel rank
  EXPECT_EQ(c.args.all_map().at("global_batch_size"), "4") << "the arguments block shows the batch used";
  EXPECT_EQ(c.num_micro_batches, 1);
  EXPECT_EQ(c.lr_schedule.warmup_steps, 2 * 4);  // the scheduler counts samples
  EXPECT_EQ(c.lr_schedule.decay_steps, 10 * 4);
  EXPECT_DOUBLE_EQ(c.aux_loss_coeff, 1e-2);
  EXPECT_FLOAT_EQ(c.model_options.seq_aux_coeff, 1e-2f);
  EXPECT_EQ(c.model_options.precision, Precision::kBF16);
  EXPECT_TRUE(c.model_options.recompute);
  EXPECT_EQ(c.data.prefixes, (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(c.save, "/ck");
  EXPECT_EQ(c.save_interval, 5);
  EXPECT_EQ(c.exit_duration_in_mins, 7);
  EXPECT_FALSE(c.load);
  EXPECT_EQ(c.stages.size(), 1u);
  EXPECT_EQ(c.device, "auto");
  EXPECT_EQ(c.no_effect_line, "");
  // The load-balancing coefficient applies only with the sequence aux loss.
  EXPECT_DOUBLE_EQ(
      config_of({"--moe-router-load-balancing-type", "none", "--moe-aux-loss-coeff", "1e-2"}).aux_loss_coeff,
      0.0);
}

TEST(TrainConfig, SelectiveRecomputeIsListedAsNoEffect) {
  const TrainConfig c = config_of({"--recompute-granularity", "selective", "--ckpt-format", "torch_dist"});
  EXPECT_FALSE(c.model_options.recompute);
  EXPECT_NE(c.no_effect_line.find("--ckpt-format torch_dist (checkpoint format"), std::string::npos)
      << c.no_effect_line;
  EXPECT_NE(c.no_effect_line.find("--recompute-granularity selective (selective recompute"),
            std::string::npos)
      << c.no_effect_line;
}

// Every refusal is raised here, at start-up, naming the flag.
TEST(TrainConfig, RefusesAtStartUp) {
  const std::pair<std::vector<std::string>, std::string> cases[] = {
      {{"--global-batch-size", "5"}, "--global-batch-size (5) is not divisible"},
      {{"--device", "cuda"}, "--device cuda: "},  // no GPU here, or the model not yet on the CUDA backend
      {{"--device", "tpu"}, "argument --device: invalid choice: 'tpu'"},
      {{"--optimizer", "sgd"}, "--optimizer sgd is not supported"},
      {{"--recompute-granularity", "block"}, "--recompute-granularity block is not supported"},
      {{"--eval-interval", "0"}, "--eval-interval must be >= 1"},
      {{"--lr-decay-style", "wavy"}, "wavy"},
      {{"--moe-token-drop-policy", "random", "--moe-expert-capacity-factor", "1",
        "--moe-token-dispatcher-type", "alltoall"},
       "--moe-token-drop-policy must be probs or position"},
      {{"--moe-expert-capacity-factor", "1"}, "needs --moe-token-dispatcher-type alltoall"},
      {{"--tensor-model-parallel-size", "2"}, "impossible distributed layout"},
      {{"--seq-length", "100000"}, "exceeds max_position_embeddings"},
      {{"--attention-dropout", "0.1"}, "--attention-dropout 0.1 is not supported"},
      {{"--expert-tensor-parallel-size", "2"}, "rule: world % (ETP·EP·PP) == 0"},
  };
  for (const auto& [flags, needle] : cases)
    EXPECT_NE(error_of(flags).find(needle), std::string::npos) << needle << ": " << error_of(flags);
  // Tensor parallelism runs (world 2: TP 2, DP 1); what it cannot split, or does not run with yet, is refused by
  // name.
  EXPECT_EQ(error_of({"--tensor-model-parallel-size", "2"}, 2), "no error");
  EXPECT_EQ(config_of({"--tensor-model-parallel-size", "2"}, 2).dp, 1);
  // Sequence parallelism runs with TP; a sequence TP cannot split is refused with the rule, and at TP 1 the flag
  // is accepted and reported as having no effect (Megatron turns it off).
  EXPECT_EQ(error_of({"--tensor-model-parallel-size", "2", "--sequence-parallel"}, 2), "no error");
  EXPECT_TRUE(config_of({"--tensor-model-parallel-size", "2", "--sequence-parallel"}, 2)
                  .model_options.tp.sequence_parallel);
  EXPECT_NE(
      error_of({"--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "31"}, 2)
          .find("--seq-length 31 must be divisible by the tensor model parallel size (rule: seq_length % TP "
                "== 0"),
      std::string::npos)
      << error_of({"--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "31"}, 2);
  const TrainConfig tp1 = config_of({"--sequence-parallel"});
  EXPECT_FALSE(tp1.model_options.tp.sequence_parallel);
  EXPECT_NE(tp1.no_effect_line.find("--sequence-parallel"), std::string::npos) << tp1.no_effect_line;
  EXPECT_NE(
      error_of({"--tensor-model-parallel-size", "3"}, 3)
          .find("the number of attention heads (4) must be divisible by the tensor model parallel size"),
      std::string::npos)
      << error_of({"--tensor-model-parallel-size", "3"}, 3);
  // Expert tensor parallelism: TP (the default) or 1, which needs sequence parallelism under TP (its expert grid
  // folds the TP ranks into expert-DP); other sizes are refused by name.
  EXPECT_EQ(error_of({"--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "2"}, 2),
            "no error");
  EXPECT_EQ(error_of({"--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                      "--sequence-parallel"},
                     2),
            "no error");
  EXPECT_NE(error_of({"--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "1"}, 2)
                .find("needs --sequence-parallel"),
            std::string::npos);
  EXPECT_NE(
      error_of({"--tensor-model-parallel-size", "2", "--expert-tensor-parallel-size", "4"}, 4)
          .find("--expert-tensor-parallel-size 4: dsv3 splits routed experts over the tensor-parallel ranks"),
      std::string::npos);
  // Required flags.
  auto a = TrainArgs::parse({"--seq-length", "32", "--train-iters", "1", "--data-path", "x"});
  try {
    TrainConfig::from_args(a, 1);
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("--lr is required"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace dsv3
