// Megatron's stdout formats: every string equals Python's formatting of the same values (fixtures from
// tests/reference/log_format_golden.py, which transcribes Megatron-LM's f-strings), and the FLOPs formula
// equals Megatron's num_floating_point_operations to the last bit and the spec's two computed values.
#include "train/log_format.h"

#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>

#include "test_util.h"

namespace dsv3 {
namespace {

using nlohmann::json;

json golden(const std::string& name) {
  const auto p = testing::source_dir() / "tests" / "golden" / "log" / name;
  std::ifstream in(p);
  EXPECT_TRUE(in) << "missing " << p;
  return json::parse(in);
}
double hexf(const json& j) {
  return std::strtod(j.get<std::string>().c_str(), nullptr);
}

std::vector<std::pair<std::string, double>> losses_of(const json& j) {
  std::vector<std::pair<std::string, double>> v;
  for (const auto& kv : j) v.emplace_back(kv[0].get<std::string>(), hexf(kv[1]));
  return v;
}

TEST(LogFormat, IterationLineMatchesPython) {
  const json cases = golden("iteration_lines.json");
  ASSERT_GT(cases.size(), 300u);
  for (const auto& c : cases) {
    const json& f = c["fields"];
    IterationLogFields x;
    x.timestamp = f["timestamp"];
    x.iteration = f["iteration"];
    x.train_iters = f["train_iters"];
    x.seq_length = f["seq_length"];
    x.consumed_samples = f["consumed_samples"];
    x.skipped_samples = f["skipped_samples"];
    x.elapsed_ms = hexf(f["elapsed_ms"]);
    x.samples_per_s = hexf(f["samples_per_s"]);
    x.tokens_per_s = hexf(f["tokens_per_s"]);
    x.tflops_per_gpu = hexf(f["tflops_per_gpu"]);
    x.learning_rate = hexf(f["learning_rate"]);
    x.global_batch_size = f["global_batch_size"];
    x.losses = losses_of(f["losses"]);
    x.loss_scale = hexf(f["loss_scale"]);
    x.grad_norm = hexf(f["grad_norm"]);
    x.skipped_iterations = f["skipped_iterations"];
    x.nan_iterations = f["nan_iterations"];
    EXPECT_EQ(format_iteration_line(x), c["expected"].get<std::string>());
  }
}

// The spec §5.1 shape, spelled out once by hand as a readable anchor for the fixture.
TEST(LogFormat, IterationLineShape) {
  IterationLogFields x;
  x.timestamp = "2025-01-02 03:04:05";
  x.iteration = 10;
  x.train_iters = 500000;
  x.seq_length = 4096;
  x.consumed_samples = 80;
  x.elapsed_ms = 12345.678;
  x.samples_per_s = 0.648;
  x.tokens_per_s = 2654.2;
  x.tflops_per_gpu = 57.2;
  x.learning_rate = 1.1e-6;
  x.global_batch_size = 8;
  x.losses = {{"lm loss", 11.5}, {"load_balancing_loss", 1.0034}};
  x.grad_norm = 7.25;
  EXPECT_EQ(
      format_iteration_line(x),
      " [2025-01-02 03:04:05] iteration       10/  500000 | actual seqlen:  4096 | consumed samples:        "
      "   80 | elapsed time per iteration (ms): 12345.7 | samples per second: 0.648 | tokens per second: "
      "2654.200 | throughput per GPU (TFLOP/s/GPU): 57.2 | learning rate: 1.100000E-06 | global batch size: "
      "    8 | lm loss: 1.150000E+01 | load_balancing_loss: 1.003400E+00 | loss scale: 1.0 | grad norm: "
      "7.250 "
      "| number of skipped iterations:   0 | number of nan iterations:   0 |");
}

TEST(LogFormat, EvalBlockMatchesPython) {
  const json cases = golden("eval_blocks.json");
  ASSERT_GT(cases.size(), 40u);
  for (const auto& c : cases)
    EXPECT_EQ(format_eval_block(c["label"], losses_of(c["losses"])), c["expected"].get<std::string>());
}

TEST(LogFormat, ArgumentsBlockMatchesPython) {
  for (const auto& c : golden("arguments_block.json")) {
    std::vector<std::pair<std::string, std::string>> args;
    for (const auto& kv : c["args"]) args.emplace_back(kv[0], kv[1]);
    EXPECT_EQ(format_arguments_block(args), c["expected"].get<std::string>());
  }
}

TEST(LogFormat, PythonFloatStrMatchesPython) {
  const json cases = golden("python_float_str.json");
  ASSERT_GT(cases.size(), 300u);
  for (const auto& c : cases)
    EXPECT_EQ(python_float_str(hexf(c["value"])), c["expected"].get<std::string>()) << c["value"];
}

TEST(LogFormat, PythonNumberFormatsEdgeCases) {
  EXPECT_EQ(python_format_e(4.5e-11, 6), "4.500000E-11");
  EXPECT_EQ(python_format_e(1e-300, 6), "1.000000E-300");
  EXPECT_EQ(python_format_e(0.0, 6), "0.000000E+00");
  EXPECT_EQ(python_format_e(-std::nan(""), 6), "NAN");
  EXPECT_EQ(python_format_e(-HUGE_VAL, 6), "-INF");
  EXPECT_EQ(python_format_f(-std::nan(""), 1), "nan");
  EXPECT_EQ(python_format_f(0.25, 1), "0.2");  // ties to even on the exact binary value, as Python
  EXPECT_EQ(python_format_f(0.0625, 3), "0.062");
}

TEST(LogFormat, FlopsMatchMegatronFormula) {
  for (const auto& c : golden("flops.json")) {
    const auto cfg = ModelConfig::from_json_file(
        (testing::source_dir() / "examples" / "deepseek" / "configs" / c["config"].get<std::string>())
            .string());
    const double got = megatron_flops_per_iteration(cfg, c["batch_size"], c["seq_length"], c["padded_vocab"],
                                                    c["mtp_layers"]);
    EXPECT_EQ(got, hexf(c["flops"])) << c;  // same operations in the same order: bit-equal
  }
}

// Spec §5.1's computed checks: ≈2.498e11 FLOPs per token for the 61-layer config and ≈7.06e14 per iteration
// for the README run (HL_NUM_LAYERS=4, HL_MOE_SKIP_FIRST_LAYERS=3, GBS=8, seq 4096), both with vocab 128896.
TEST(LogFormat, FlopsMatchSpecValues) {
  const auto dir = testing::source_dir() / "examples" / "deepseek" / "configs";
  const auto full = ModelConfig::from_json_file((dir / "deepseek-v3-671b.json").string());
  const double per_token = megatron_flops_per_iteration(full, 1, 4096, 128896, 0) / 4096.0;
  EXPECT_NEAR(per_token, 2.498e11, 0.0005e11);
  const auto reduced = ModelConfig::from_json_file((dir / "seed-reduced.json").string());
  EXPECT_NEAR(megatron_flops_per_iteration(reduced, 8, 4096, 128896, 0), 7.06e14, 0.005e14);
  // Linear in the batch size.
  EXPECT_EQ(megatron_flops_per_iteration(reduced, 16, 4096, 128896, 0),
            2 * megatron_flops_per_iteration(reduced, 8, 4096, 128896, 0));
}

TEST(LogFormat, TimestampNowShape) {
  EXPECT_TRUE(std::regex_match(timestamp_now(), std::regex(R"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})")));
}

}  // namespace
}  // namespace dsv3
