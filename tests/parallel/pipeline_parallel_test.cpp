// Pipeline parallelism end to end: `mpirun -np 2|4 dsv3 train --pipeline-model-parallel-size N` on the demo
// model (4 layers; with and without its MTP layer) in fp32 reproduces the single-process run — per-iteration
// losses and grad norms, evaluation losses and final weights within 1e-6 relative — for PP2 (1F1B over 4
// micro-batches; even and uneven split), PP3 on 4 layers (auto layout), PP4 (one layer per stage), PP2 × DP2
// (with the distributed optimizer and full recompute) and PP2 × EP2; checkpoints sharded by stage move
// between PP layouts and one process, and a PP2 × EP2 run resumed in its own layout is bit-identical. Skipped
// without mpirun.
#include "parallel/parity_util.h"

namespace dsv3 {
namespace {

class PipelineParallel : public testing::LayoutParity {};

const std::string kNoMtp = "--mtp-num-layers 0";
std::string pp(int n) {
  return "--pipeline-model-parallel-size " + std::to_string(n);
}

// Also with an uneven split: --decoder-first-pipeline-num-layers 1 leaves 3 layers to the last stage.
TEST_F(PipelineParallel, Pp2ReproducesSingleProcess) {
  expect_parity("pp2", 2, 1, 4, 4, pp(2), kNoMtp);
  expect_parity("pp2_uneven", 2, 1, 4, 4, pp(2) + " --decoder-first-pipeline-num-layers 1", kNoMtp);
  // With the demo model's MTP layer: the last stage runs it on its copy of the embedding.
  expect_parity("pp2_mtp", 2, 1, 4, 4, pp(2), "", "single_mtp");
}

TEST_F(PipelineParallel, Pp4ReproducesSingleProcess) {
  expect_parity("pp4", 4, 1, 4, 3, pp(4), kNoMtp);
}

// 4 layers over 3 stages, which Megatron refuses: the first stage takes the extra layer (2 + 1 + 1), with
// MTP.
TEST_F(PipelineParallel, Pp3OnFourLayersReproducesSingleProcess) {
  expect_parity("pp3", 3, 1, 3, 3, pp(3));
  EXPECT_NE(last_out_.find("pipeline stages (decoder layers): [0, 2) [2, 3) [3, 4)"), std::string::npos)
      << last_out_;
}

// With MTP as well: the shared embedding's copy is left out of the distributed optimizer's grad norm.
TEST_F(PipelineParallel, Pp2xDp2ReproducesSingleProcess) {
  expect_parity("pp2dp2", 4, 1, 4, 3, pp(2) + " --use-distributed-optimizer --recompute-granularity full");
}

// And everything at once: PP2 × EP2 with MTP, the allgather dispatcher and the distributed optimizer.
TEST_F(PipelineParallel, Pp2xEp2ReproducesSingleProcess) {
  expect_parity("pp2ep2", 4, 1, 4, 3,
                pp(2) + " --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall", kNoMtp);
  expect_parity("pp2ep2_all", 4, 1, 4, 3,
                pp(2) +
                    " --expert-model-parallel-size 2 --moe-token-dispatcher-type allgather"
                    " --use-distributed-optimizer",
                "", "single_mtp");
}

// With MTP (the last stage's embedding copy is not written; it loads the first stage's): a PP2 checkpoint
// (iteration 3 of 6; one file per stage) continues in one process with PP2's losses and
// weights; that process's checkpoint continues under PP2 × EP2.
TEST_F(PipelineParallel, CheckpointsMoveBetweenLayouts) {
  auto p2 = train("pp2", 2, 1, 4, 6, pp(2) + " --save-interval 3");
  ASSERT_EQ(p2.rc, 0) << p2.out;
  EXPECT_TRUE(std::filesystem::exists(final_weights("pp2", 6) / "model-00002-of-00002.safetensors"));
  auto one = train("one", 1, 1, 4, 6, "--load " + checkpoint_at("pp2", 3, "pp2_at3").string());
  ASSERT_EQ(one.rc, 0) << one.out;
  std::string where;
  EXPECT_LE(testing::scalars_rel_diff(dir_ / "pp2/tb", dir_ / "one/tb", 4, 6, &where), testing::kParityTol)
      << where;
  const auto w = testing::weights_diff(testing::read_weights(final_weights("pp2", 6)),
                                       testing::read_weights(final_weights("one", 6)));
  EXPECT_LE(w.l2_rel, testing::kParityTol) << w.l2_worst;
  // Resumed in the same layout (PP2 × EP2 here: experts sharded too), the run is the uninterrupted one bit
  // for bit.
  const std::string layout = pp(2) + " --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall";
  auto whole = train("pe_whole", 4, 1, 4, 4, layout + " --save-interval 2");
  ASSERT_EQ(whole.rc, 0) << whole.out;
  auto resumed =
      train("pe_resumed", 4, 1, 4, 4, layout + " --load " + checkpoint_at("pe_whole", 2, "pe_at2").string());
  ASSERT_EQ(resumed.rc, 0) << resumed.out;
  EXPECT_EQ(testing::scalars_rel_diff(dir_ / "pe_whole/tb", dir_ / "pe_resumed/tb", 3, 4, &where), 0.0)
      << where;
  const auto wr = testing::weights_diff(testing::read_weights(final_weights("pe_whole", 4)),
                                        testing::read_weights(final_weights("pe_resumed", 4)));
  EXPECT_EQ(wr.max_rel, 0.0) << wr.max_worst;
  const std::string cont = "--load " + (dir_ / "one/ckpt").string();
  auto one_cont = train("one_cont", 1, 1, 4, 8, cont);
  ASSERT_EQ(one_cont.rc, 0) << one_cont.out;
  auto pe = train("pp2ep2_cont", 4, 1, 4, 8, pp(2) + " --expert-model-parallel-size 2 " + cont);
  ASSERT_EQ(pe.rc, 0) << pe.out;
  EXPECT_LE(testing::scalars_rel_diff(dir_ / "one_cont/tb", dir_ / "pp2ep2_cont/tb", 7, 8, &where),
            testing::kParityTol)
      << where;
}

TEST_F(PipelineParallel, RefusesEndStageSizesThatDoNotSplit) {
  const std::string b = testing::tiny_train_args(dir_, data_, 1, 4) + " --train-iters 1 ";
  auto split = testing::run_dsv3_mpi(3, b + pp(3) + " --decoder-last-pipeline-num-layers 1 " + kNoMtp, dir_);
  EXPECT_NE(split.rc, 0);
  EXPECT_NE(
      split.out.find("the 3 layers left by --decoder-first/last-pipeline-num-layers do not split evenly over "
                     "the other 2 pipeline stages"),
      std::string::npos)
      << split.out;
}

}  // namespace
}  // namespace dsv3
