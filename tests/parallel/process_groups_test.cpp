// ProcessGroups against Megatron-Core's RankGenerator (tests/golden/parallel/rank_groups.json, from
// tests/reference/rank_groups_golden.py): every group of every rank of small grids, the README's two layouts,
// the size rules, and the data-parallel gradient buckets.
#include "parallel/process_groups.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "model/config.h"
#include "model/param_store.h"
#include "model/param_table.h"
#include "parallel/data_parallel.h"
#include "test_util.h"

namespace dsv3 {
namespace {

using Groups = std::vector<std::vector<int>>;

const std::vector<std::pair<std::string, Group>> kDense = {
    {"tp", Group::kTp},      {"cp", Group::kCp},      {"dp", Group::kDp},      {"pp", Group::kPp},
    {"dp-cp", Group::kDpCp}, {"tp-cp", Group::kTpCp}, {"tp-pp", Group::kTpPp}, {"tp-dp-cp", Group::kTpDpCp}};
const std::vector<std::pair<std::string, Group>> kExpert = {{"tp", Group::kEtp},
                                                            {"ep", Group::kEp},
                                                            {"dp", Group::kEdp},
                                                            {"tp-ep", Group::kEtpEp},
                                                            {"tp-ep-pp", Group::kEtpEpPp}};

int position(const std::vector<int>& g, int rank) {
  return static_cast<int>(std::find(g.begin(), g.end(), rank) - g.begin());
}

TEST(ProcessGroups, MatchMegatronRankGenerator) {
  std::ifstream f(testing::source_dir() / "tests/golden/parallel/rank_groups.json");
  ASSERT_TRUE(f.good());
  const auto golden = nlohmann::json::parse(f);
  int checked = 0;
  for (const auto& c : golden["cases"]) {
    ParallelSizes s;
    s.tp = c["tp"], s.cp = c["cp"], s.ep = c["ep"], s.pp = c["pp"], s.etp = c["etp"], s.order = c["order"];
    const int world = c["world"];
    const std::string what = c.dump().substr(0, 120);
    if (c.contains("error")) {
      EXPECT_THROW(ProcessGroups::build(world, 0, s), Error) << what;
      continue;
    }
    for (int rank = 0; rank < world; ++rank) {
      const ProcessGroups pg = ProcessGroups::build(world, rank, s);
      ASSERT_EQ(pg.dp, c["dp"].get<int>()) << what;
      ASSERT_EQ(pg.edp, c["edp"].get<int>()) << what;
      for (const auto& [grid, list] : {std::pair{"dense", &kDense}, std::pair{"expert", &kExpert}})
        for (const auto& [token, g] : *list) {
          const Groups want = c[grid][token].get<Groups>();
          if (rank == 0) {
            EXPECT_EQ(pg.all_groups(g), want) << what << " " << grid << " " << token;
          }
          const auto mine = pg.members(g);
          EXPECT_NE(std::find(want.begin(), want.end(), mine), want.end()) << what << " " << token;
          EXPECT_NE(std::find(mine.begin(), mine.end(), rank), mine.end());
        }
      // A rank's coordinate in a one-dimension group is its position in that group.
      EXPECT_EQ(pg.tp_rank, position(pg.members(Group::kTp), rank)) << what;
      EXPECT_EQ(pg.cp_rank, position(pg.members(Group::kCp), rank)) << what;
      EXPECT_EQ(pg.dp_rank, position(pg.members(Group::kDp), rank)) << what;
      EXPECT_EQ(pg.pp_rank, position(pg.members(Group::kPp), rank)) << what;
      EXPECT_EQ(pg.etp_rank, position(pg.members(Group::kEtp), rank)) << what;
      EXPECT_EQ(pg.ep_rank, position(pg.members(Group::kEp), rank)) << what;
      EXPECT_EQ(pg.edp_rank, position(pg.members(Group::kEdp), rank)) << what;
      EXPECT_EQ(pg.members(Group::kPp), pg.expert_grid().group_of(rank, "pp")) << what;
      ++checked;
    }
  }
  EXPECT_GT(checked, 1000);
}

// spec §8: README 8 cards (TP1 PP1 DP8 EP8) → EDP 1, 32 experts/rank of 256; 32 cards (TP1 PP2 DP16 EP16) → EDP 1.
TEST(ProcessGroups, ReadmeLayouts) {
  ParallelSizes s8;
  s8.ep = 8, s8.num_experts = 256;
  for (int r = 0; r < 8; ++r) {
    const auto pg = ProcessGroups::build(8, r, s8);
    EXPECT_EQ(pg.dp, 8);
    EXPECT_EQ(pg.edp, 1);
    EXPECT_EQ(pg.dp_rank, r);
    EXPECT_EQ(pg.ep_rank, r);
    EXPECT_EQ(pg.edp_rank, 0);
    EXPECT_EQ(pg.members(Group::kEp), (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
    EXPECT_EQ(pg.members(Group::kEdp), std::vector<int>{r});
  }
  ParallelSizes s32;
  s32.pp = 2, s32.ep = 16, s32.num_experts = 256;
  const auto pg = ProcessGroups::build(32, 21, s32);
  EXPECT_EQ(pg.dp, 16);
  EXPECT_EQ(pg.edp, 1);
  EXPECT_EQ(pg.pp_rank, 1);
  EXPECT_EQ(pg.dp_rank, 5);
  EXPECT_EQ(pg.ep_rank, 5);
  EXPECT_EQ(pg.members(Group::kPp), (std::vector<int>{5, 21}));
  EXPECT_EQ(pg.members(Group::kEp).front(), 16);
  EXPECT_EQ(pg.members(Group::kEp).back(), 31);
  EXPECT_EQ(pg.is_last_rank(), false);
  EXPECT_EQ(ProcessGroups::build(32, 31, s32).is_last_rank(), true);
  EXPECT_EQ(pg.describe(),
            "world 32 (tp-cp-ep-dp-pp): tp 1, cp 1, dp 16, pp 2; expert grid etp 1, ep 16, edp 1");
}

TEST(ProcessGroups, ImpossibleSizesNameTheRule) {
  auto expect_error = [](int world, ParallelSizes s, const std::string& needle) {
    try {
      ProcessGroups::build(world, 0, s);
      ADD_FAILURE() << "no error for world " << world << ", expected " << needle;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  ParallelSizes a;
  a.tp = 4;
  expect_error(6, a, "world % (TP·PP·CP) == 0");
  ParallelSizes b;
  b.ep = 3, b.num_experts = 8;
  expect_error(3, b, "num_experts % EP == 0");
  ParallelSizes c;
  c.tp = 2, c.ep = 4;
  expect_error(4, c, "world % (ETP·EP·PP) == 0");
  ParallelSizes d;
  d.pp = 0;
  expect_error(4, d, "must be >= 1");
  ParallelSizes e;
  e.ep = 2, e.order = "tp-ep-cp-dp-pp";
  expect_error(4, e, "ep and dp must be adjacent");
  ParallelSizes f;
  f.ep = 2, f.order = "tp-pp-dp";
  expect_error(4, f, "does not name ep");
  // The trainer's single-process message mentions the distributed layout.
  expect_error(1, a, "impossible distributed layout");
}

// Buckets cover every trainable element once, never cross a kind when kinds are kept apart, and respect the size.
TEST(DataParallelBuckets, CoverTrainableParamsOnce) {
  const auto cfg = ModelConfig::from_json_file(
      (testing::source_dir() / "examples/deepseek/configs/demo-cpu.json").string());
  ParamTable table(cfg);
  ParamStore store(table);
  std::vector<int> kind(store.size(), -1);  // -1: not trainable, 0 dense, 1 expert
  for (const auto& p : table.params())
    if (p.tied_to.empty() && p.trainable)
      for (int64_t i = 0; i < p.numel; ++i) kind[store.offset(p.name) + i] = p.is_expert;
  for (bool merge : {false, true})
    for (int64_t size : {int64_t{1000}, int64_t{40'000'000}}) {
      const auto buckets = plan_grad_buckets(table, store, size, merge);
      std::vector<int> seen(store.size(), 0);
      for (const auto& b : buckets) {
        EXPECT_LE(b.numel, size);
        for (int64_t i = b.offset; i < b.offset + b.numel; ++i) {
          seen[i]++;
          ASSERT_GE(kind[i], 0) << "bucket covers a non-trainable element at " << i;
          if (!merge) {
            ASSERT_EQ(kind[i], b.expert ? 1 : 0);
          }
        }
      }
      for (int64_t i = 0; i < store.size(); ++i) ASSERT_EQ(seen[i], kind[i] >= 0 ? 1 : 0) << i;
      if (merge && size == 40'000'000) {
        EXPECT_LE(buckets.size(), 8u);  // a few large contiguous all-reduces
      }
    }
}

}  // namespace
}  // namespace dsv3
