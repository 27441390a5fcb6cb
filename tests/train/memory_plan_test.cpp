// The memory plan (train/memory_plan.h) against what a run uses:
//  - its backend part equals the bytes the model allocates on the CPU backend (the backend's own counter), for
//    fp32 and bf16, with and without recompute and token dropping, MTP on: a buffer the model grows that the plan
//    does not know fails here;
//  - the whole prediction dsv3 train prints is within 10% of the peak resident memory it measures (VmHWM) for
//    four layouts of the tiny config (one process with recompute, DP 2 with the distributed optimizer, PP 2 with
//    four micro-batches per iteration, TP 2 with sequence parallelism), bf16: the issue's bound. (fp32 MoE runs add up to kGemmMaxKernels GEMM
//    kernels as expert row counts vary; the plan counts the cap, which a three-iteration run does not reach.)
#include "train/memory_plan.h"

#include <gtest/gtest.h>

#include <cmath>
#include <regex>

#include "kernels/backend.h"
#include "model/model.h"
#include "train_util.h"

namespace dsv3 {
namespace {

ModelConfig tiny_config() {
  return ModelConfig::from_json_file(
      (testing::source_dir() / "examples/deepseek/configs/demo-cpu.json").string());
}

TEST(MemoryPlan, BackendPartIsWhatTheModelAllocates) {
  const ModelConfig cfg = tiny_config();
  ASSERT_GT(cfg.num_nextn_predict_layers, 0);
  const int64_t B = 3, S = 40;
  std::vector<int32_t> ids(B * S), labels(B * S);
  for (int64_t i = 0; i < B * S; ++i)
    ids[i] = static_cast<int32_t>((i * 131 + 7) % cfg.vocab_size),
    labels[i] = static_cast<int32_t>((i * 37 + 3) % cfg.vocab_size);
  for (Precision prec : {Precision::kF32, Precision::kBF16})
    for (bool recompute : {false, true})
      for (double capacity : {-1.0, 1.0}) {
        SCOPED_TRACE(std::string(prec == Precision::kBF16 ? "bf16" : "fp32") +
                     (recompute ? " recompute" : "") + (capacity > 0 ? " token drop" : ""));
        const int64_t before = cpu_backend().bytes_in_use();
        {
          ModelOptions o;
          o.precision = prec, o.recompute = recompute, o.capacity_factor = capacity, o.seq_aux_coeff = 1e-2f;
          Model m(cfg, o);
          m.init(5);
          for (int step = 0; step < 2; ++step) {
            const ForwardStats st = m.forward(ids.data(), labels.data(), B, S, true);
            m.backward(1.f / st.lm_tokens, 1.f, {0.1f / st.mtp_tokens.at(0)});
          }
          MemoryRun run;
          run.micro_batch = B, run.seq = S, run.precision = prec, run.recompute = recompute;
          run.capacity_factor = capacity;
          const auto plan = plan_memory(cfg, MemoryLayout{}, run);
          ASSERT_EQ(plan.size(), 1u);
          const int64_t used = cpu_backend().bytes_in_use() - before;
          // Token dropping keeps a varying number of rows per layer and step: the plan takes the capacity's
          // bound; the run what its routing kept, with the 1.5x headroom of a re-grow where one layer's buffers
          // serve several (recompute). Within 2%.
          if (capacity > 0) {
            EXPECT_LE(std::abs(used - plan[0].backend()), plan[0].backend() / 50);
          } else {
            EXPECT_EQ(used, plan[0].backend());
          }
        }
        EXPECT_EQ(cpu_backend().bytes_in_use(), before) << "the model freed what it allocated";
      }
}

// The pipeline's 1F1B ring: stage q of PP keeps min(PP - q, micro-batches) activation sets, eval one more.
TEST(MemoryPlan, PipelineStagesHoldTheirInFlightMicroBatches) {
  const ModelConfig cfg = tiny_config();
  MemoryLayout lay;
  lay.pp = 2;
  MemoryRun run;
  run.micro_batches = 4;
  const auto plan = plan_memory(cfg, lay, run);
  ASSERT_EQ(plan.size(), 2u);
  EXPECT_EQ(plan[0].sets, 2);
  EXPECT_EQ(plan[1].sets, 1);
  run.micro_batches = 1;
  EXPECT_EQ(plan_memory(cfg, lay, run)[0].sets, 1);
  // Recompute keeps each layer's input and one layer's state: less than every layer's state.
  MemoryRun rc;
  rc.recompute = true;
  EXPECT_LT(plan_memory(cfg, {}, rc)[0].activations, plan_memory(cfg, {}, MemoryRun{})[0].activations);
}

struct Measured {
  double rss = 0, predicted = 0, backend = 0, predicted_backend = 0;
};

// The "(end of training) memory (MB)" lines, by rank.
std::map<int, Measured> memory_lines(const std::string& out) {
  std::map<int, Measured> m;
  const std::regex re(
      R"(\[Rank (\d+)\] \(end of training\) memory \(MB\) \| resident: [0-9.]+ \| max resident: ([0-9.]+) \| )"
      R"(predicted max resident: ([0-9.]+) \| backend allocated: [0-9.]+ \| backend max allocated: ([0-9.]+) \| )"
      R"(predicted backend: ([0-9.]+))");
  for (std::sregex_iterator it(out.begin(), out.end(), re), end; it != end; ++it)
    m[std::stoi((*it)[1])] = {std::stod((*it)[2]), std::stod((*it)[3]), std::stod((*it)[4]),
                              std::stod((*it)[5])};
  return m;
}

TEST(MemoryPlan, PredictedPeakIsWithinTenPercentOfTheMeasuredPeak) {
  const auto dir = testing::scratch_dir();
  const std::string data = testing::make_tiny_data(dir);
  const auto src = testing::source_dir();
  auto args = [&](int gbs) {
    return "train --model-config " + (src / "examples/deepseek/configs/demo-cpu.json").string() +
           " --data-path " + data + " --split 90,5,5 --data-cache-path " + (dir / "cache").string() +
           " --tokenizer-type HuggingFaceTokenizer --tokenizer-model " + (src / "data/tiny-4k").string() +
           " --seq-length 128 --micro-batch-size 8 --global-batch-size " + std::to_string(gbs) +
           " --train-iters 3 --lr 1e-3 --bf16 --log-interval 1 --eval-iters 0 "
           "--moe-router-load-balancing-type "
           "seq_aux_loss --moe-aux-loss-coeff 1e-2 --moe-router-enable-expert-bias ";
  };
  struct Case {
    const char* name;
    int np;
    std::string extra;
    int gbs;
  };
  const std::vector<Case> cases = {
      {"one process, recompute", 1,
       "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1", 8},
      {"DP 2, distributed optimizer", 2, "--use-distributed-optimizer", 16},
      {"PP 2, 4 micro-batches", 2, "--pipeline-model-parallel-size 2", 32},
      {"TP 2 with sequence parallelism", 2, "--tensor-model-parallel-size 2 --sequence-parallel", 8},
      {"TP 2 with sequence parallelism, whole experts (ETP 1)", 2,
       "--tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1", 8},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    if (c.np > 1 && !testing::have_mpirun()) GTEST_FAIL() << "mpirun is missing (make setup installs it)";
    const auto r = c.np == 1 ? testing::run_dsv3_single(args(c.gbs) + c.extra, dir)
                             : testing::run_dsv3_mpi(c.np, args(c.gbs) + c.extra, dir);
    ASSERT_EQ(r.rc, 0) << r.out;
    const auto lines = memory_lines(r.out);
    // Every rank of the first data-parallel replica reports: both stages of PP 2, both ranks of TP 2.
    const bool two =
        c.extra.find("pipeline") != std::string::npos || c.extra.find("tensor") != std::string::npos;
    ASSERT_EQ(lines.size(), two ? 2u : 1u) << r.out;
    for (const auto& [rank, m] : lines) {
      std::printf(
          "%s, rank %d: max resident %.1f MB, predicted %.1f MB (%+.1f%%); backend %.1f MB, predicted %.1f\n",
          c.name, rank, m.rss, m.predicted, (m.predicted - m.rss) / m.rss * 100, m.backend,
          m.predicted_backend);
      EXPECT_LE(std::abs(m.predicted - m.rss), 0.10 * m.rss) << "rank " << rank;
      EXPECT_LE(std::abs(m.predicted_backend - m.backend), 0.01 * m.backend + 0.2) << "rank " << rank;
    }
  }
}

}  // namespace
}  // namespace dsv3
