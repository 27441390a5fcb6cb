// Who this process is in the parallel grid. One rank today; the distributed runtime fills the same object from
// (world, tp, cp, ep, dp, pp) in Megatron's order, and every per-rank decision (who logs, who writes TensorBoard,
// who writes which checkpoint shard, which micro-batches a rank reads) is asked of it, never of MPI directly.
#pragma once

namespace dsv3 {

struct ProcessGroups {
  int world = 1, rank = 0;
  int tp = 1, cp = 1, ep = 1, pp = 1, dp = 1;
  int dp_rank = 0;

  bool is_last_rank() const { return rank == world - 1; }  // Megatron's print_rank_last / TensorBoard writer
  bool is_first_rank() const { return rank == 0; }         // tracker file, dataset index builds
};

}  // namespace dsv3
