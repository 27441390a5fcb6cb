// Tensor parallelism end to end: `mpirun -np 2|4 dsv3 train --tensor-model-parallel-size 2` on the demo model
// (4 heads, dense FFN 320, shared expert 64, vocabulary 4352, one MTP depth) in fp32 reproduces the
// single-process run — per-iteration losses and grad norms within 1e-6 relative, evaluation losses, and final
// weights within 1e-5 (see kTpWeightsTol) — alone, under full recompute with token dropping, with DP2 (also with the distributed optimizer),
// with EP2 and with PP2; with sequence parallelism likewise (TP2 with and without q_lora, TP2 under recompute
// with token dropping, TP2 × EP2 with both dispatchers and padded token dropping, TP2 × DP2 with the distributed
// optimizer, TP2 × PP2); routed experts split over TP (ETP 2, Megatron's default) and whole (ETP 1, with EP
// folded over the TP ranks);
// checkpoints are written whole (HF layout) and continue in another layout with the same losses; sizes TP cannot
// split, and a sequence length sequence parallelism cannot split, are refused by name. Skipped without mpirun.
#include "parallel/parity_util.h"

namespace dsv3 {
namespace {

// Losses and grad norms agree within kParityTol (measured: ≤ 1.2e-7), and so do the final weights of the model as a
// whole (L2 over every tensor: ≤ 1e-7). Each tensor's weights are held to 1e-5 (L2) instead: row-parallel layers
// and the vocab-parallel loss add their partial sums over the TP ranks, an order one GEMM does not use, so inputs
// differ by about an ulp — and an element whose gradient is a near-cancellation of such inputs (a rarely routed
// expert) gets a gradient with a large relative error, which Adam, dividing by the gradient's own scale, turns
// into an update error of lr × that error. Measured (tp2, 4 iterations): layer 2's expert 0 down_proj element
// 7853 has gradient 5.1e-7 (the tensor's median 5e-5); TP's differs by 5e-4 relative, its second-step Adam
// moment is a further cancellation (0.9·m1 + 0.1·g2 = 7e-9), and its weight moves 9.6e-7 apart: per-tensor L2
// 1.4e-6, all other tensors ≤ 8e-7; gradients of every tensor agree to ≤ 7.4e-7 (L2). Elements whose gradient
// falls near Adam's eps (1e-8) are worse still (update ≈ lr·g/eps): after a checkpoint moves from ETP 1 × EP 2 to
// one process, an embedding row first seen after the resume had one element with gradient -2.5e-8 whose two
// computations differ by 1%, and the model as a whole ended 1.1e-6 apart (the continuation test asserts the
// per-tensor bound only). No order of TP's sums avoids this short of reproducing one GEMM's rounding.
constexpr double kTpWeightsTol = 1e-5;

class TensorParallel : public testing::LayoutParity {
 protected:
  void expect_tp_parity(const std::string& name, int np, int iters, const std::string& layout,
                        const std::string& common = "", const std::string& single = "single") {
    expect_parity(name, np, 1, 4, iters, layout, common, single, kTpWeightsTol);
  }
};

const std::string kTp2 = "--tensor-model-parallel-size 2";
const std::string kTp2Sp = kTp2 + " --sequence-parallel";
const std::string kRecomputeDrop =
    "--recompute-granularity full --recompute-method uniform --recompute-num-layers 1"
    " --moe-expert-capacity-factor 1.0 --moe-token-dispatcher-type alltoall";

TEST_F(TensorParallel, Tp2ReproducesSingleProcess) {
  expect_tp_parity("tp2", 2, 4, kTp2);
  EXPECT_NE(last_out_.find("[ t 2/2, p 1/1 ]"), std::string::npos) << last_out_;
}

TEST_F(TensorParallel, Tp2WithRecomputeAndTokenDropReproducesSingleProcess) {
  expect_tp_parity("tp2_recompute_drop", 2, 3, kTp2, kRecomputeDrop, "single_recompute_drop");
}

// Sequence parallelism: the residual stream, norms, MoE layers and MTP's norms hold 16 of the 32 positions of
// each sequence on each TP rank. Two sequences per micro-batch, so every gather and reduce-scatter interleaves
// the ranks' shards per sequence.
TEST_F(TensorParallel, Tp2SequenceParallelReproducesSingleProcess) {
  expect_parity("tp2_sp", 2, 2, 4, 4, kTp2Sp, "", "single_mbs2", kTpWeightsTol);
}

// Without q_lora (q_lora_rank null) MLA gathers x for q_proj under SP and reduce-scatters its input gradient.
TEST_F(TensorParallel, Tp2SequenceParallelWithoutQLoraReproducesSingleProcess) {
  std::ifstream in(testing::source_dir() / "examples/deepseek/configs/demo-cpu.json");
  std::string cfg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string key = "\"q_lora_rank\": 64";
  ASSERT_NE(cfg.find(key), std::string::npos) << cfg;
  cfg.replace(cfg.find(key), key.size(), "\"q_lora_rank\": null");
  std::ofstream(dir_ / "no_q_lora.json") << cfg;
  const std::string common = "--model-config " + (dir_ / "no_q_lora.json").string();
  expect_parity("tp2_sp_no_q_lora", 2, 2, 4, 3, kTp2Sp, common, "single_no_q_lora", kTpWeightsTol);
}

// The router decides on the whole micro-batch (its logits gathered over TP), so the capacity rule drops the
// one-process run's pairs; full recompute replays the layer's collectives in its backward.
TEST_F(TensorParallel, Tp2SequenceParallelWithRecomputeAndTokenDropReproducesSingleProcess) {
  expect_tp_parity("tp2_sp_recompute_drop", 2, 3, kTp2Sp, kRecomputeDrop, "single_recompute_drop");
}

// 4 ranks: TP 2 × EP 2 with SP: each TP rank dispatches only its own positions' tokens (both dispatchers), and
// with padded token dropping each rank's pairs fill part of the whole micro-batch's capacity blocks.
TEST_F(TensorParallel, Tp2SequenceParallelxEp2ReproducesSingleProcess) {
  const std::string ep2 = kTp2Sp + " --expert-model-parallel-size 2";
  expect_parity("tp2_sp_ep2_a2a", 4, 2, 4, 3, ep2 + " --moe-token-dispatcher-type alltoall", "",
                "single_mbs2", kTpWeightsTol);
  expect_parity("tp2_sp_ep2_ag", 4, 2, 4, 3, ep2 + " --moe-token-dispatcher-type allgather", "",
                "single_mbs2", kTpWeightsTol);
  expect_parity("tp2_sp_ep2_pad", 4, 2, 4, 3, ep2,
                "--moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity "
                "--moe-token-dispatcher-type alltoall",
                "single_pad_mbs2", kTpWeightsTol);
}

// 4 ranks: TP 2 × DP 2 with SP and the distributed optimizer (the TP-summed replicated gradients are then
// reduce-scattered over DP), and TP 2 × PP 2 with SP (stages exchange their TP rank's [B·S/TP, D] shard).
TEST_F(TensorParallel, Tp2SequenceParallelxDp2AndPp2ReproduceSingleProcess) {
  expect_tp_parity("tp2_sp_dp2_dopt", 4, 3, kTp2Sp + " --use-distributed-optimizer");
  expect_tp_parity("tp2_sp_pp2", 4, 3, kTp2Sp + " --pipeline-model-parallel-size 2");
}

// 4 ranks: TP 2 × DP 2 (each TP pair reads its own micro-batches; gradients reduced over DP per TP shard), with
// the replicated optimizer and with the distributed one (Adam state sharded over DP per TP rank), whose
// checkpoint (moments gathered over DP, then over TP) continues in one process with the same losses.
TEST_F(TensorParallel, Tp2xDp2ReproducesSingleProcess) {
  expect_tp_parity("tp2_dp2", 4, 3, kTp2);
  expect_tp_parity("tp2_dp2_dopt", 4, 3, kTp2 + " --use-distributed-optimizer --save-interval 2");
  const std::string load2 = "--load " + checkpoint_at("tp2_dp2_dopt", 2, "tp2_dp2_dopt_at2").string();
  auto one = train("one_from_dopt", 1, 1, 4, 3, load2);
  ASSERT_EQ(one.rc, 0) << one.out;
  std::string where;
  EXPECT_LE(testing::scalars_rel_diff(dir_ / "tp2_dp2_dopt/tb", dir_ / "one_from_dopt/tb", 3, 3, &where),
            testing::kParityTol)
      << where;
}

// 4 ranks: TP 2 × EP 2 (DP 2): routed experts are split over EP, and each over the TP ranks (ETP 2, the default),
// whose ranks route the same tokens; both dispatchers.
TEST_F(TensorParallel, Tp2xEp2ReproducesSingleProcess) {
  expect_tp_parity("tp2_ep2_a2a", 4, 3,
                   kTp2 + " --expert-model-parallel-size 2 --moe-token-dispatcher-type alltoall");
  expect_tp_parity("tp2_ep2_ag", 4, 3,
                   kTp2 + " --expert-model-parallel-size 2 --moe-token-dispatcher-type allgather");
}

// Expert tensor parallelism. Megatron's default, ETP = TP (every test above), splits each routed expert's FFN
// over the TP ranks; ETP 1 (DeepSeek-V3's recipes) keeps the experts whole and folds the TP ranks into the expert
// grid: on 2 ranks they are expert-DP 2 (each runs every expert on its own sequence shard, the expert gradients
// summed over expert-DP), or with EP 2 they hold different experts and send each other their shards' tokens
// (both dispatchers); on 4 ranks TP 2 × EP 2 with ETP 1 gives EP 2 × expert-DP 2. Expert tensor parallelism
// needs sequence parallelism with ETP 1 (below), so these run with SP; ETP 2 on the same layouts for comparison.
TEST_F(TensorParallel, Tp2WithEtp1AndEtp2ReproduceSingleProcess) {
  const std::string etp1 = kTp2Sp + " --expert-tensor-parallel-size 1";
  const std::string etp2 = kTp2Sp + " --expert-tensor-parallel-size 2";
  expect_parity("tp2_sp_etp1", 2, 2, 4, 3, etp1, "", "single_mbs2", kTpWeightsTol);
  EXPECT_NE(last_out_.find("expert_tensor_parallel_size ..................... 1"), std::string::npos)
      << last_out_;
  expect_parity("tp2_sp_etp2", 2, 2, 4, 3, etp2, "", "single_mbs2", kTpWeightsTol);
  EXPECT_NE(last_out_.find("expert_tensor_parallel_size ..................... 2"), std::string::npos)
      << last_out_;
  const std::string ep2 = " --expert-model-parallel-size 2 --moe-token-dispatcher-type ";
  expect_parity("tp2_sp_etp1_ep2_a2a", 2, 2, 4, 3, etp1 + ep2 + "alltoall", "", "single_mbs2", kTpWeightsTol);
  expect_parity("tp2_sp_etp1_ep2_ag", 2, 2, 4, 3, etp1 + ep2 + "allgather", "", "single_mbs2", kTpWeightsTol);
  expect_parity("tp2_sp_etp1_ep2_np4", 4, 2, 4, 3, etp1 + ep2 + "alltoall", "", "single_mbs2", kTpWeightsTol);
  expect_parity("tp2_sp_etp2_ep2_np4", 4, 2, 4, 3, etp2 + ep2 + "alltoall", "", "single_mbs2", kTpWeightsTol);
}

// 4 ranks: TP 4 (one head, a quarter of every FFN width and of the vocabulary per rank) with SP (8 of the 32
// positions), routed experts split four ways (ETP 4); and with ETP 1 and EP 4, which folds the four TP ranks into
// expert parallelism: two whole experts per rank, each TP rank sending its positions' tokens to the others.
TEST_F(TensorParallel, Tp4SequenceParallelReproducesSingleProcess) {
  const std::string tp4 = "--tensor-model-parallel-size 4 --sequence-parallel";
  expect_parity("tp4_sp", 4, 2, 4, 3, tp4, "", "single_mbs2", kTpWeightsTol);
  expect_parity(
      "tp4_sp_etp1_ep4", 4, 2, 4, 3,
      tp4 +
          " --expert-tensor-parallel-size 1 --expert-model-parallel-size 4 --moe-token-dispatcher-type "
          "alltoall",
      "", "single_mbs2", kTpWeightsTol);
}

// 4 ranks: TP 2 × PP 2 (two stages of two layers; MTP on the last, with its copy of the vocab-parallel
// embedding summed with the first stage's per TP rank).
TEST_F(TensorParallel, Tp2xPp2ReproducesSingleProcess) {
  expect_tp_parity("tp2_pp2", 4, 3, kTp2 + " --pipeline-model-parallel-size 2");
}

// A TP2 checkpoint is whole tensors (one model.safetensors that any layout reads); iteration 3 of 6 continues in
// one process with TP2's losses and weights, and a single-process checkpoint continues under TP2 × EP2.
TEST_F(TensorParallel, CheckpointsMoveBetweenLayouts) {
  auto tp2 = train("tp2", 2, 1, 4, 6, kTp2 + " --save-interval 3");
  ASSERT_EQ(tp2.rc, 0) << tp2.out;
  const auto w6 = testing::read_weights(final_weights("tp2", 6));
  ASSERT_TRUE(w6.count("model.embed_tokens.weight"));
  EXPECT_EQ(w6.at("model.embed_tokens.weight").size(), 4352u * 128u);  // whole, not a vocabulary shard
  const std::string load3 = "--load " + checkpoint_at("tp2", 3, "tp2_at3").string();
  auto one = train("one", 1, 1, 4, 6, load3);
  ASSERT_EQ(one.rc, 0) << one.out;
  std::string where;
  EXPECT_LE(testing::scalars_rel_diff(dir_ / "tp2/tb", dir_ / "one/tb", 4, 6, &where), testing::kParityTol)
      << where;
  const auto w = testing::weights_diff(w6, testing::read_weights(final_weights("one", 6)));
  EXPECT_LE(w.l2_rel, kTpWeightsTol) << w.l2_worst;
  std::cout << "[ parity  ] TP2 checkpoint continued in one process: final weights per-tensor L2 " << w.l2_rel
            << " (" << w.l2_worst << ")\n";

  const std::string cont = "--load " + (dir_ / "one/ckpt").string();
  auto one_cont = train("one_cont", 1, 1, 4, 8, cont);
  ASSERT_EQ(one_cont.rc, 0) << one_cont.out;
  auto tp_ep = train("tp2_ep2_cont", 4, 1, 4, 8, kTp2 + " --expert-model-parallel-size 2 " + cont);
  ASSERT_EQ(tp_ep.rc, 0) << tp_ep.out;
  EXPECT_LE(testing::scalars_rel_diff(dir_ / "one_cont/tb", dir_ / "tp2_ep2_cont/tb", 7, 8, &where),
            testing::kParityTol)
      << where;
  const auto w8 = testing::weights_diff(testing::read_weights(final_weights("one_cont", 8)),
                                        testing::read_weights(final_weights("tp2_ep2_cont", 8)));
  EXPECT_LE(w8.l2_rel, kTpWeightsTol) << w8.l2_worst;
  std::cout << "[ parity  ] one-process checkpoint continued under TP2 x EP2: final weights per-tensor L2 "
            << w8.l2_rel << " (" << w8.l2_worst << ")\n";
}

// With ETP 1 and EP 2 on the two TP ranks each rank holds other experts: each writes its experts' shard (it is
// expert-DP rank 0), the dense tensors gathered over TP; iteration 3 of 6 continues in one process.
TEST_F(TensorParallel, Etp1CheckpointContinuesInOneProcess) {
  auto etp1 =
      train("etp1", 2, 1, 4, 6,
            kTp2Sp + " --expert-tensor-parallel-size 1 --expert-model-parallel-size 2 --save-interval 3");
  ASSERT_EQ(etp1.rc, 0) << etp1.out;
  const std::string load3 = "--load " + checkpoint_at("etp1", 3, "etp1_at3").string();
  auto one = train("one", 1, 1, 4, 6, load3);
  ASSERT_EQ(one.rc, 0) << one.out;
  std::string where;
  EXPECT_LE(testing::scalars_rel_diff(dir_ / "etp1/tb", dir_ / "one/tb", 4, 6, &where), testing::kParityTol)
      << where;
  const auto w = testing::weights_diff(testing::read_weights(final_weights("etp1", 6)),
                                       testing::read_weights(final_weights("one", 6)));
  EXPECT_LE(w.l2_rel, kTpWeightsTol) << w.l2_worst;
  std::cout << "[ parity  ] ETP1 x EP2 checkpoint continued in one process: final weights model L2 "
            << w.model_l2_rel << ", per-tensor L2 " << w.l2_rel << " (" << w.l2_worst << ")\n";
}

TEST_F(TensorParallel, RefusesWhatItCannotSplit) {
  const std::string b = testing::tiny_train_args(dir_, data_, 1, 3) + " --train-iters 1 ";
  auto refused = [&](int np, const std::string& flags, const std::string& rule) {
    auto r = testing::run_dsv3_mpi(np, b + flags, dir_);
    EXPECT_NE(r.rc, 0) << flags;
    EXPECT_NE(r.out.find(rule), std::string::npos) << r.out;
  };
  refused(3, "--tensor-model-parallel-size 3",
          "the number of attention heads (4) must be divisible by the tensor model parallel size");
  refused(2, kTp2Sp + " --global-batch-size 2 --seq-length 31",
          "--sequence-parallel with --tensor-model-parallel-size 2: --seq-length 31 must be divisible by the "
          "tensor "
          "model parallel size (rule: seq_length % TP == 0");
  // Expert tensor parallelism: 1 or TP; ETP 1 under TP needs SP; ETP × EP × PP must divide the world.
  refused(2, kTp2 + " --expert-tensor-parallel-size 4", "rule: world % (ETP·EP·PP) == 0");
  refused(4, kTp2 + " --expert-tensor-parallel-size 4",
          "--expert-tensor-parallel-size 4: dsv3 splits routed experts over the tensor-parallel ranks");
  refused(2, kTp2 + " --expert-tensor-parallel-size 1",
          "--expert-tensor-parallel-size 1 with --tensor-model-parallel-size 2 needs --sequence-parallel");
  // A world TP does not divide: Megatron's rule, from the process groups.
  refused(3, kTp2, "rule: world % (TP·PP·CP) == 0");
}

}  // namespace
}  // namespace dsv3
