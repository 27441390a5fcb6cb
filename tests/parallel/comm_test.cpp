// The MPI Comm under mpirun: this test binary re-launches itself with `mpirun -np 4` (DSV3_MPI_CHILD set), and
// each rank checks every collective, the per-group communicators of a tp 2 layout, and the data-parallel
// gradient reduction of the demo model's buffer against the mean computed locally. Skipped without mpirun.
#include "parallel/comm.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <numeric>

#include "core/error.h"
#include "kernels/backend.h"
#include "model/config.h"
#include "model/param_store.h"
#include "model/param_table.h"
#include "parallel/data_parallel.h"
#include "parallel/mpi_children.h"
#include "parallel/process_groups.h"
#include "parallel/staged_comm.h"

namespace dsv3 {
namespace {

using testing::is_mpi_child;
using testing::run_mpi_children;

// Every collective on 4 ranks (w may stage through a backend: the same results are expected).
void check_collectives(Comm& w) {
  const int r = w.rank(), n = w.size();

  std::vector<float> f{float(r), 1.f, float(-r)};
  w.allreduce(f.data(), 3);
  EXPECT_EQ(f, (std::vector<float>{6.f, 4.f, -6.f}));
  std::vector<double> d{double(r) + 0.5};
  w.allreduce(d.data(), 1, ReduceOp::kMax);
  EXPECT_EQ(d[0], 3.5);
  std::vector<int64_t> i{int64_t(r) << 40};
  w.allreduce(i.data(), 1, ReduceOp::kMin);
  EXPECT_EQ(i[0], 0);
  i[0] = int64_t(r + 1) << 40;
  w.allreduce(i.data(), 1, ReduceOp::kSum);
  EXPECT_EQ(i[0], int64_t(10) << 40);

  std::vector<int64_t> mine{r, 10 * r}, all(2 * n);
  w.allgather(mine.data(), 2, all.data());
  for (int q = 0; q < n; ++q) {
    EXPECT_EQ(all[2 * q], q);
    EXPECT_EQ(all[2 * q + 1], 10 * q);
  }

  // alltoallv: rank r sends q+1 copies of 100·r+q to rank q, so it receives r+1 values from each rank.
  std::vector<int64_t> sc(n), rc(n, r + 1);
  std::vector<float> send, recv((r + 1) * n);
  for (int q = 0; q < n; ++q) {
    sc[q] = q + 1;
    for (int k = 0; k <= q; ++k) send.push_back(float(100 * r + q));
  }
  w.alltoallv(send.data(), sc.data(), recv.data(), rc.data());
  for (int q = 0; q < n; ++q)
    for (int k = 0; k <= r; ++k) EXPECT_EQ(recv[q * (r + 1) + k], float(100 * q + r));

  // reduce_scatter: rank r contributes (r+1)·(10·q + j) to element j of rank q's block of 3 int32 values.
  std::vector<int32_t> contrib(3 * n), mine_sum(3);
  for (int q = 0; q < n; ++q)
    for (int j = 0; j < 3; ++j) contrib[q * 3 + j] = (r + 1) * (10 * q + j);
  w.reduce_scatter(contrib.data(), mine_sum.data(), 3);
  for (int j = 0; j < 3; ++j)
    EXPECT_EQ(mine_sum[j], 10 * (10 * r + j)) << j;  // Σ_{r'} (r'+1) = 10 on 4 ranks

  // Uneven blocks of 3, 2, 1, 0 elements: rank r's block of the sum holds (its value) × 4 ranks, and the in-place
  // allgather_v brings every rank's block back.
  const std::vector<int64_t> counts{3, 2, 1, 0};
  std::vector<double> buf(6), part(counts[r]);
  for (int i = 0; i < 6; ++i) buf[i] = 100.0 * i + r;
  w.reduce_scatter_v(buf.data(), counts.data(), part.data());
  const int first = r == 0 ? 0 : r == 1 ? 3 : r == 2 ? 5 : 6;
  for (int64_t i = 0; i < counts[r]; ++i) EXPECT_EQ(part[i], 4 * 100.0 * (first + i) + 6) << i;  // Σ r' = 6
  for (int i = 0; i < 6; ++i) buf[i] = -1;
  for (int64_t i = 0; i < counts[r]; ++i) buf[first + i] = 10.0 * r + i;
  w.allgather_v(buf.data(), counts.data());
  EXPECT_EQ(buf, (std::vector<double>{0, 1, 2, 10, 11, 20}));

  std::vector<uint8_t> bytes(5, uint8_t(r));
  w.broadcast(bytes.data(), 5, 2);
  EXPECT_EQ(bytes, std::vector<uint8_t>(5, 2));
  w.barrier();

  // bf16 elements move as bits; a bf16 reduction is refused by name.
  std::vector<bf16> hb{bf16{uint16_t(0x3f80 + r)}}, allb(n);
  w.allgather(hb.data(), 1, allb.data());
  for (int q = 0; q < n; ++q) EXPECT_EQ(allb[q].bits, 0x3f80 + q);
  EXPECT_THROW(w.allreduce(hb.data(), 1), Error);
}

TEST(CommMpi, CollectivesOnFourRanks) {
  if (!is_mpi_child()) return run_mpi_children("CommMpi.CollectivesOnFourRanks", 4);
  MpiSession mpi(nullptr, nullptr);
  Comm& w = mpi.world();
  ASSERT_EQ(w.size(), 4);
  check_collectives(w);
  {
    StagedComm staged(cpu_backend(), w);
    check_collectives(staged);
    auto half = staged.split(w.rank() % 2, w.rank());  // a split of a staged Comm stages too
    int64_t v = 1;
    half->allreduce(&v, 1);
    EXPECT_EQ(v, 2);
  }
  const int r = w.rank(), n = w.size();

  // Per-group communicators of a tp 2 × dp 2 layout: a sum over each group counts only its members.
  ParallelSizes s;
  s.tp = 2;
  const auto pg = ProcessGroups::build(n, r, s);
  GroupComms gc(pg, w);
  for (Group g : {Group::kTp, Group::kDp, Group::kDpCp, Group::kEdp, Group::kWorld, Group::kTpDpCp}) {
    const auto members = pg.members(g);
    Comm& c = gc[g];
    ASSERT_EQ(c.size(), static_cast<int>(members.size())) << group_name(g);
    EXPECT_EQ(members[c.rank()], r) << group_name(g);
    int64_t v = r;
    c.allreduce(&v, 1);
    EXPECT_EQ(v, std::accumulate(members.begin(), members.end(), int64_t{0})) << group_name(g);
  }
  EXPECT_TRUE(gc.same(Group::kDp, Group::kDpCp));
  EXPECT_TRUE(gc.same(Group::kDpCp, Group::kEdp));  // ep 1: the expert-DP group is the DP group

  // Data-parallel gradient reduction over 4 ranks, small buckets: every element becomes the mean over ranks.
  const auto cfg = ModelConfig::from_json_file(
      (testing::source_dir() / "examples/deepseek/configs/demo-cpu.json").string());
  ParamTable table(cfg);
  ParamStore store(table);
  const auto pg4 = ProcessGroups::build(n, r, ParallelSizes{});
  GroupComms gc4(pg4, w);
  DataParallelGrads ddp(table, store, pg4, gc4, 4096);
  EXPECT_TRUE(ddp.active());
  EXPECT_GT(ddp.buckets().size(), 10u);
  std::vector<float> g(store.size());
  for (int64_t k = 0; k < store.size(); ++k) g[k] = float((k % 97) * (r + 1));
  ddp.reduce(g.data());
  std::vector<bool> trainable(store.size(), false);
  for (const auto& p : table.params())
    if (p.tied_to.empty() && p.trainable)
      for (int64_t k = 0; k < p.numel; ++k) trainable[store.offset(p.name) + k] = true;
  int64_t bad = 0;
  for (int64_t k = 0; k < store.size(); ++k) {
    const float want = trainable[k] ? float(k % 97) * 10.f / 4.f : float((k % 97) * (r + 1));
    bad += std::fabs(g[k] - want) > 1e-6f * std::fabs(want);
  }
  EXPECT_EQ(bad, 0);
  // Identical on every rank (replicated parameters stay replicated).
  double sum = 0;
  for (int64_t k = 0; k < store.size(); ++k)
    if (trainable[k]) sum += g[k];
  double mx = sum, mn = sum;
  w.allreduce(&mx, 1, ReduceOp::kMax);
  w.allreduce(&mn, 1, ReduceOp::kMin);
  EXPECT_EQ(mx, mn);
}

}  // namespace
}  // namespace dsv3

namespace dsv3 {
namespace {

// One rank: a staged Comm copies through the backend and stages nothing.
TEST(CommStaged, OneRankCopiesThroughTheBackend) {
  SingleComm single;
  StagedComm c(cpu_backend(), single);
  std::vector<float> send{1, 2, 3}, recv(3);
  c.allgather(send.data(), 3, recv.data());
  EXPECT_EQ(recv, send);
  const int64_t counts[1] = {3};
  std::vector<float> r2(3);
  c.alltoallv(send.data(), counts, r2.data(), counts);
  EXPECT_EQ(r2, send);
  std::vector<float> part(3);
  c.reduce_scatter_v(send.data(), counts, part.data());
  EXPECT_EQ(part, send);
  c.allreduce(send.data(), 3);
  EXPECT_EQ(send, (std::vector<float>{1, 2, 3}));
}

}  // namespace
}  // namespace dsv3
