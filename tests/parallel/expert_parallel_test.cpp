// Expert parallelism end to end: `mpirun -np 2|4 dsv3 train --expert-model-parallel-size N` on the demo model
// (8 experts) in fp32 reproduces the single-process run — per-iteration losses and grad norms, evaluation
// losses and final weights within 1e-6 relative — for EP2 with each dispatcher (and under recompute), DP2×EP2
// (expert-DP 2) and EP4; token dropping (capacity computed per rank's micro-batch, so a single process with
// the same micro-batch size applies the same capacity) with and without pad-to-capacity; and sharded
// checkpoints (one file per EP rank, transformers' index) move between EP layouts and one process, and load
// in transformers with dsv3's numbers. Skipped without mpirun.
#include <fstream>

#include "hf_interop.h"
#include "parallel/parity_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

class ExpertParallel : public testing::LayoutParity {};

const std::string kAllToAll = " --moe-token-dispatcher-type alltoall";
const std::string kAllGather = " --moe-token-dispatcher-type allgather";
std::string ep(int n) {
  return "--expert-model-parallel-size " + std::to_string(n);
}

// 2 ranks: DP 2, EP 2, expert-DP 1 (each rank owns 4 experts); two micro-batches per rank. Also under full
// recompute, whose second forward dispatches again.
TEST_F(ExpertParallel, Ep2AllToAllReproducesSingleProcess) {
  expect_parity("ep2_a2a", 2, 1, 4, 4, ep(2) + kAllToAll);
  expect_parity("ep2_recompute", 2, 1, 4, 3, ep(2) + kAllToAll, "--recompute-granularity full",
                "single_recompute");
}
TEST_F(ExpertParallel, Ep2AllGatherReproducesSingleProcess) {
  expect_parity("ep2_ag", 2, 1, 4, 4, ep(2) + kAllGather);
}
// 4 ranks: DP 4, EP 2, expert-DP 2 (expert gradients also all-reduced over expert-DP).
// And with the distributed optimizer, which shards dense moments over DP 4 and expert moments over
// expert-DP 2.
TEST_F(ExpertParallel, Dp2xEp2ReproducesSingleProcess) {
  expect_parity("dp2ep2", 4, 1, 4, 3, ep(2) + kAllToAll);
  expect_parity("dp2ep2_distopt", 4, 1, 4, 3, ep(2) + kAllToAll + " --use-distributed-optimizer");
}
// 4 ranks: EP 4 (2 experts per rank), the most the machine's oversubscription allows.
TEST_F(ExpertParallel, Ep4ReproducesSingleProcess) {
  expect_parity("ep4_a2a", 4, 1, 4, 3, ep(4) + kAllToAll);
  expect_parity("ep4_ag", 4, 1, 4, 3, ep(4) + kAllGather);
}

// Token dropping as the seed runs it (capacity factor 1, drop by probability, pad to capacity: fixed splits)
// and without padding (variable splits), against one process applying the same per-micro-batch capacity.
TEST_F(ExpertParallel, TokenDropMatchesSingleProcessWithSameCapacity) {
  const std::string drop = kAllToAll + " --moe-expert-capacity-factor 1.0";
  expect_parity("ep2_pad", 2, 2, 8, 3, ep(2), drop + " --moe-pad-expert-input-to-capacity", "single_pad");
  expect_parity("ep2_drop", 2, 2, 8, 3, ep(2), drop + " --moe-token-drop-policy position", "single_drop");
}

// An EP2 checkpoint (iteration 3 of 6) continues under EP4 with the allgather dispatcher and in one process,
// each with EP2's losses; a single-process checkpoint continues under EP2.
TEST_F(ExpertParallel, CheckpointsMoveBetweenLayouts) {
  auto ep2 = train("ep2", 2, 1, 4, 6, ep(2) + kAllToAll + " --save-interval 3");
  ASSERT_EQ(ep2.rc, 0) << ep2.out;
  // Sharded as transformers shards: one model and one optimizer file per EP rank, and the index.
  const auto it6 = final_weights("ep2", 6);
  for (const char* f : {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                        "optimizer-00001-of-00002.safetensors", "optimizer-00002-of-00002.safetensors",
                        "model.safetensors.index.json", "config.json", "state.json"})
    EXPECT_TRUE(fs::exists(it6 / f)) << f;
  EXPECT_FALSE(fs::exists(it6 / "model.safetensors"));
  const std::string load3 = "--load " + checkpoint_at("ep2", 3, "ep2_at3").string();
  auto ep4 = train("ep4", 4, 1, 4, 6, ep(4) + kAllGather + " " + load3);
  ASSERT_EQ(ep4.rc, 0) << ep4.out;
  auto one = train("one", 1, 1, 4, 6, load3);
  ASSERT_EQ(one.rc, 0) << one.out;
  for (const char* run : {"ep4", "one"}) {
    std::string where;
    EXPECT_LE(testing::scalars_rel_diff(dir_ / "ep2/tb", dir_ / run / "tb", 4, 6, &where),
              testing::kParityTol)
        << run << ": " << where;
    const auto w = testing::weights_diff(testing::read_weights(final_weights("ep2", 6)),
                                         testing::read_weights(final_weights(run, 6)));
    EXPECT_LE(w.l2_rel, testing::kParityTol) << run << ": " << w.l2_worst;
  }
  EXPECT_NE(
      ep4.out.find("successfully loaded checkpoint from " + (dir_ / "ep2_at3").string() + " at iteration 3"),
      std::string::npos)
      << ep4.out;
  // transformers loads the sharded directory and computes what dsv3 computes with its weights
  // (tests/hf_interop.h); skipped where $DSV3_PYTHON (python3) has no torch, as in CI.
  {
    ModelOptions opt;
    opt.mtp = false;  // transformers' class has no MTP layer
    Model model(ModelConfig::from_json_file(
                    (testing::source_dir() / "examples/deepseek/configs/demo-cpu.json").string()),
                opt);
    const auto w = testing::read_weights(it6);
    for (const auto& p : model.table().params()) {
      if (p.is_mtp || !p.tied_to.empty()) continue;
      ASSERT_TRUE(w.count(p.name) && static_cast<int64_t>(w.at(p.name).size()) == p.numel) << p.name;
      std::copy(w.at(p.name).begin(), w.at(p.name).end(), model.param(p.name));
    }
    std::string skipped;
    if (!testing::expect_transformers_computes_dsv3(model, it6, dir_, &skipped))
      std::printf("[ SKIPPED  ] transformers sub-check: %s\n", skipped.c_str());
  }
  // One process's checkpoint (iteration 6) continued to 8 by EP2 and by one process.
  const std::string cont = "--load " + (dir_ / "one/ckpt").string();
  auto one_cont = train("one_cont", 1, 1, 4, 8, cont);
  ASSERT_EQ(one_cont.rc, 0) << one_cont.out;
  auto ep2_cont = train("ep2_cont", 2, 1, 4, 8, ep(2) + kAllToAll + " " + cont);
  ASSERT_EQ(ep2_cont.rc, 0) << ep2_cont.out;
  std::string where;
  EXPECT_LE(testing::scalars_rel_diff(dir_ / "one_cont/tb", dir_ / "ep2_cont/tb", 7, 8, &where),
            testing::kParityTol)
      << where;
}

// A corrupt shard that only EP rank 1 reads: that rank stops with the file named and ends the job (MPI_Abort)
// instead of leaving rank 0 waiting in a collective; the run exits non-zero and nothing is trained.
TEST_F(ExpertParallel, CorruptShardStopsEveryRank) {
  auto ep2 = train("ep2", 2, 1, 4, 2, ep(2) + kAllToAll);
  ASSERT_EQ(ep2.rc, 0) << ep2.out;
  const auto shard = dir_ / "ep2/ckpt/iter_0000002/model-00002-of-00002.safetensors";
  {
    std::fstream f(shard, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-4, std::ios::end);
    f.write("\x7f\x7f\x7f\x7f", 4);
  }
  auto bad = train("bad", 2, 1, 4, 4, ep(2) + kAllToAll + " --load " + (dir_ / "ep2/ckpt").string());
  EXPECT_NE(bad.rc, 0) << bad.out;
  EXPECT_NE(bad.out.find(shard.string() + ": corrupt"), std::string::npos) << bad.out;
  EXPECT_TRUE(testing::iteration_log_lines(bad.out).empty()) << bad.out;
}

// Fault injection: rank 1 is killed (SIGKILL) a few seconds into a long EP2 run, while rank 0 is inside or
// about to enter an alltoall with it. The job must end, non-zero and naming the dead rank, instead of rank 0
// waiting in the collective (`timeout` turns a hang into exit 124, which fails the test).
TEST_F(ExpertParallel, KilledRankEndsTheJob) {
  const std::string args = testing::tiny_train_args(dir_, data_, 1, 4) +
                           " --train-iters 1000000 --log-interval 1000 " + ep(2) + kAllToAll;
  const std::string cmd =
      "timeout 300 " + testing::mpirun_prefix(2) +
      "sh -c 'if [ \"$OMPI_COMM_WORLD_RANK\" = 1 ]; then (sleep 3; kill -9 $$) & fi; exec " +
      testing::dsv3_binary().string() + " " + args + "'";
  const auto r = testing::run_shell(cmd, dir_);
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.rc, 124) << "the job hung after a rank died:\n" << r.out;
  EXPECT_NE(r.out.find("rank 1"), std::string::npos) << r.out;
}

// Megatron's rules: token dropping needs the alltoall dispatcher; unknown dispatchers are refused by name.
TEST_F(ExpertParallel, RefusesWhatMegatronRefuses) {
  const std::string b = testing::tiny_train_args(dir_, data_, 1, 4) + " --train-iters 1 " + ep(2);
  auto drop = testing::run_dsv3_mpi(2, b + kAllGather + " --moe-expert-capacity-factor 1.0", dir_);
  EXPECT_NE(drop.rc, 0);
  EXPECT_NE(drop.out.find("needs --moe-token-dispatcher-type alltoall"), std::string::npos) << drop.out;
  auto flex = testing::run_dsv3_mpi(2, b + " --moe-token-dispatcher-type flex", dir_);
  EXPECT_NE(flex.rc, 0);
  EXPECT_NE(flex.out.find("--moe-token-dispatcher-type flex is not supported"), std::string::npos)
      << flex.out;
}

}  // namespace
}  // namespace dsv3
