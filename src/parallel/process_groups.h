// Who this process is in the parallel grid (spec §8), built once from (world, tp, cp, ep, pp) in Megatron's order
// `tp-cp-ep-dp-pp` and passed explicitly (DESIGN principle 3): every per-rank decision (who logs, who writes
// TensorBoard and checkpoints, which micro-batches a rank reads, which ranks a collective spans) is asked of it,
// never of MPI. It holds no communicators; parallel/comm.h builds those from its member lists.
//
// Two grids share the ranks, as in Megatron-Core ≥ 0.10 (MoE parallel folding):
//   dense:  tp, cp, dp, pp          dp  = world / (tp·cp·pp)      rank = tp + TP·(cp + CP·(dp + DP·pp))
//   expert: etp, ep, edp, pp       edp = world / (etp·ep·pp)     rank = etp + ETP·(ep + EP·(edp + EDP·pp))
// (with the default order; RankGrid takes any order). The pipeline groups of the two grids must coincide.
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace dsv3 {

// Megatron-Core's RankGenerator for one grid: dimensions listed fastest-varying first, each with its size; a
// rank's coordinate along dimension i is (rank / Π_{j<i} size_j) % size_i.
class RankGrid {
 public:
  explicit RankGrid(std::vector<std::pair<std::string, int>> dims);

  int world() const { return world_; }
  int size(const std::string& dim) const;
  int coord(int rank, const std::string& dim) const;
  // Megatron's get_ranks(token) (generate_masked_orthogonal_rank_groups): every group spanned by the '-'-joined
  // dimensions of `token` ("dp", "dp-cp", "tp-pp", ...; their order in the token does not matter), groups ordered
  // by the combined index of the other dimensions, members by the combined index of the token's dimensions.
  std::vector<std::vector<int>> groups(const std::string& token) const;
  // The group of `token` that contains `rank`.
  std::vector<int> group_of(int rank, const std::string& token) const;

 private:
  std::vector<bool> mask(const std::string& token) const;
  std::vector<std::pair<std::string, int>> dims_;
  int world_ = 1;
};

// The groups a rank belongs to. Dense-grid groups first, then the expert grid's.
enum class Group {
  kWorld,
  kTp,    // tensor parallel
  kCp,    // context parallel
  kDp,    // data parallel (without cp)
  kPp,    // pipeline
  kDpCp,  // data × context: where dense gradients are reduced (Megatron's data_parallel_group with cp)
  kTpCp,
  kTpPp,    // model parallel (tp × pp)
  kTpDpCp,  // where the router's per-expert token counts are summed (spec §9 item 7)
  kEtp,     // expert tensor parallel
  kEp,      // expert parallel
  kEdp,     // expert data parallel: where expert gradients are reduced
  kEtpEp,   // expert model parallel (etp × ep)
  kEtpEpPp,
};
const char* group_name(Group g);

struct ParallelSizes {
  int tp = 1, cp = 1, ep = 1, pp = 1;
  int etp = -1;                          // --expert-tensor-parallel-size; < 0: tp (Megatron's default)
  int64_t num_experts = -1;              // < 0: not checked (a dense model, or not known yet)
  std::string order = "tp-cp-ep-dp-pp";  // Megatron's default; --use-tp-pp-dp-mapping gives tp-cp-ep-pp-dp
};

struct ProcessGroups {
  int world = 1, rank = 0;
  // dense grid
  int tp = 1, cp = 1, dp = 1, pp = 1;
  int tp_rank = 0, cp_rank = 0, dp_rank = 0, pp_rank = 0;
  // expert grid (same pp and pp_rank)
  int etp = 1, ep = 1, edp = 1;
  int etp_rank = 0, ep_rank = 0, edp_rank = 0;
  std::string order = "tp-cp-ep-dp-pp";

  // Throws dsv3::Error naming the rule an impossible layout breaks: sizes ≥ 1, world % (tp·pp·cp) == 0,
  // num_experts % ep == 0, world % (etp·ep·pp) == 0, an order naming each of tp, cp, ep, dp, pp once with ep
  // next to dp, and matching pipeline groups.
  static ProcessGroups build(int world, int rank, const ParallelSizes& s);

  RankGrid dense_grid() const;   // dims of `order` without ep
  RankGrid expert_grid() const;  // dims of `order` with tp → etp, cp → 1, dp → edp
  // This rank's group (global ranks; the rank's position in it is its coordinate in the group).
  std::vector<int> members(Group g) const;
  // Every group of kind g (the whole partition of the ranks), as RankGrid::groups.
  std::vector<std::vector<int>> all_groups(Group g) const;

  bool is_last_rank() const { return rank == world - 1; }  // Megatron's print_rank_last / TensorBoard writer
  bool is_first_rank() const { return rank == 0; }         // tracker file, dataset index builds
  // "world 8: tp 1, cp 1, dp 8, pp 1; expert grid etp 1, ep 8, edp 1"
  std::string describe() const;
};

}  // namespace dsv3
