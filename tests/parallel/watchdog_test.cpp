// The collective watchdog (parallel/comm.h, --distributed-timeout-minutes): a rank that stops making progress while
// the others wait in a collective ends the whole job, every rank, with a message naming the op, the group, the
// iteration and the ranks that did not arrive. Under mpirun: the Comm alone (a rank stopped with SIGSTOP, a rank
// looping outside communication), and `dsv3 train` with one rank stopped from outside mid-run. The only time bound
// is a hang guard (`timeout`); the measured time to exit is printed for the record.
#include <gtest/gtest.h>
#include <signal.h>

#include <chrono>
#include <csignal>
#include <cstdio>

#include "parallel/comm.h"
#include "parallel/mpi_children.h"
#include "test_util.h"
#include "train_util.h"

namespace dsv3 {
namespace {

using testing::is_mpi_child;
using testing::self_exe;

// Runs `cmd` (a shell command line) under a hang guard and returns its result and wall time.
testing::CmdResult run_guarded(const std::string& cmd, const std::filesystem::path& dir, double& seconds) {
  const auto t0 = std::chrono::steady_clock::now();
  auto r = testing::run_shell("timeout -s KILL 120 " + cmd, dir);
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

// Child side: 3 ranks, 1 s timeout. One collective that every rank reaches, then rank 2 stops (SIGSTOP, or a loop
// that never calls MPI on its training thread, as DSV3_WATCHDOG_STUCK says) and ranks 0 and 1 wait in an
// all-reduce.
void stuck_child() {
  MpiSession mpi(nullptr, nullptr);
  Comm& w = mpi.world();
  set_collective_timeout(1.0);
  set_collective_iteration(7);
  int64_t v = 1;
  w.allreduce(&v, 1);
  ASSERT_EQ(v, 3);
  if (w.rank() == 2) {
    if (std::string(std::getenv("DSV3_WATCHDOG_STUCK")) == "stop") {
      std::raise(SIGSTOP);
    } else {
      volatile uint64_t spin = 0;
      for (;;) spin = spin + 1;  // busy, never in MPI
    }
  }
  w.allreduce(&v, 1);
  ADD_FAILURE() << "the all-reduce without rank 2 returned";
}

void expect_named_timeout(const char* mode, const std::string& test) {
  if (!testing::have_mpirun()) GTEST_SKIP() << "mpirun is not installed";
  double s = 0;
  const auto r =
      run_guarded(testing::mpirun_prefix(3) + "-x DSV3_MPI_CHILD=1 -x DSV3_WATCHDOG_STUCK=" + mode + " " +
                      self_exe() + " --gtest_color=no --gtest_filter=CommWatchdog." + test,
                  testing::scratch_dir(), s);
  std::printf("stuck rank (%s): mpirun exited after %.1f s (timeout 1 s, grace %.2f s), status %d\n", mode, s,
              0.25, r.rc);
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.rc, 137) << "the hang guard had to kill the job\n" << r.out;
  EXPECT_NE(r.out.find("collective watchdog: timed out"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("waiting in allreduce #2 on group world (ranks 0,1,2) at iteration 7"),
            std::string::npos)
      << r.out;
  EXPECT_NE(r.out.find("rank(s) that did not arrive: 2\n"), std::string::npos) << r.out;
  // A stopped process cannot answer; a looping one answers from its watchdog thread that it is outside
  // communication.
  EXPECT_NE(
      r.out.find(std::string(mode) == "stop" ? "rank 2: no answer" : "rank 2: outside communication for"),
      std::string::npos)
      << r.out;
}

TEST(CommWatchdog, StuckRankStoppedEndsTheJob) {
  if (is_mpi_child()) return stuck_child();
  expect_named_timeout("stop", "StuckRankStoppedEndsTheJob");
}

TEST(CommWatchdog, StuckRankLoopingEndsTheJob) {
  if (is_mpi_child()) return stuck_child();
  expect_named_timeout("loop", "StuckRankLoopingEndsTheJob");
}

// Child side: ranks of two groups ({0,1} and {2,3}); rank 3 stops, so rank 2 waits on group b for it while ranks 0
// and 1 wait on the world for rank 2 and 3. The message of rank 0 or 1 names rank 2 as waiting elsewhere and rank 3
// as silent.
TEST(CommWatchdog, WaitingElsewhereIsNamed) {
  if (!is_mpi_child()) {
    if (!testing::have_mpirun()) GTEST_SKIP() << "mpirun is not installed";
    double s = 0;
    const auto r = run_guarded(testing::mpirun_prefix(4) + "-x DSV3_MPI_CHILD=1 " + self_exe() +
                                   " --gtest_color=no --gtest_filter=CommWatchdog.WaitingElsewhereIsNamed",
                               testing::scratch_dir(), s);
    std::printf("two groups: mpirun exited after %.1f s, status %d\n", s, r.rc);
    EXPECT_NE(r.rc, 0) << r.out;
    EXPECT_NE(r.rc, 137) << r.out;
    EXPECT_NE(r.out.find("rank 3: no answer"), std::string::npos) << r.out;
    // Whoever reports first: rank 2 (waiting on half b for 3) or rank 0/1 (waiting on the world for 2 and 3).
    const bool from_world = r.out.find("on group world (ranks 0,1,2,3)") != std::string::npos;
    const bool from_half = r.out.find("on group half b (ranks 2,3)") != std::string::npos;
    EXPECT_TRUE(from_world || from_half) << r.out;
    return;
  }
  MpiSession mpi(nullptr, nullptr);
  Comm& w = mpi.world();
  auto half = w.split(w.rank() / 2, w.rank());
  half->set_name(w.rank() < 2 ? "half a" : "half b");
  set_collective_timeout(1.0);
  if (w.rank() == 3) std::raise(SIGSTOP);
  int64_t v = 1;
  if (w.rank() >= 2) half->allreduce(&v, 1);
  w.allreduce(&v, 1);
  ADD_FAILURE() << "returned without rank 3";
}

// The watchdog off (timeout 0) and on (its thread running beside the calls): the same results.
TEST(CommWatchdog, CollectivesGiveTheSameResultsWatched) {
  if (!is_mpi_child())
    return testing::run_mpi_children("CommWatchdog.CollectivesGiveTheSameResultsWatched", 2);
  MpiSession mpi(nullptr, nullptr);
  Comm& w = mpi.world();
  const int r = w.rank();
  for (double timeout : {0.0, 30.0}) {
    set_collective_timeout(timeout);
    std::vector<float> a{1.f + r, 2.f};
    w.allreduce(a.data(), 2);
    EXPECT_EQ(a, (std::vector<float>{3.f, 4.f}));
    std::vector<int32_t> g(2);
    const int32_t mine = 10 + r;
    w.allgather(&mine, 1, g.data());
    EXPECT_EQ(g, (std::vector<int32_t>{10, 11}));
    std::vector<double> b{r == 1 ? 5.0 : 0.0};
    w.broadcast(b.data(), 1, 1);
    EXPECT_EQ(b[0], 5.0);
    std::vector<float> x(3, static_cast<float>(r)), y(3, -1.f);
    w.sendrecv(x.data(), 3, 1 - r, y.data(), 3, 1 - r);
    EXPECT_EQ(y, std::vector<float>(3, static_cast<float>(1 - r)));
    std::vector<float> rs{1.f, 2.f, 3.f, 4.f}, out(2);
    w.reduce_scatter(rs.data(), out.data(), 2);
    EXPECT_EQ(out, r == 0 ? (std::vector<float>{2.f, 4.f}) : (std::vector<float>{6.f, 8.f}));
    const int64_t counts[2] = {1, 2};
    std::vector<int64_t> s{r == 0 ? 7 : 0, r == 1 ? 8 : 0, r == 1 ? 9 : 0};
    w.allgather_v(s.data(), counts);
    EXPECT_EQ(s, (std::vector<int64_t>{7, 8, 9}));
    const int64_t sc[2] = {1, 1}, rc[2] = {1, 1};
    const float send[2] = {static_cast<float>(10 * r), static_cast<float>(10 * r + 1)};
    float recv[2];
    w.alltoallv(send, sc, recv, rc);
    EXPECT_EQ(recv[0], static_cast<float>(r));
    EXPECT_EQ(recv[1], static_cast<float>(10 + r));
    w.barrier();
  }
  set_collective_timeout(0);
}

// What the watchdog costs per collective (printed, not asserted: timing on shared machines is noise): 2 ranks,
// all-reduces of 1 and 2^20 floats, without (timeout 0) and with it (timeout 600 s), interleaved rounds.
TEST(CommWatchdog, OverheadPerCollectiveIsPrinted) {
  if (!is_mpi_child()) return testing::run_mpi_children("CommWatchdog.OverheadPerCollectiveIsPrinted", 2);
  MpiSession mpi(nullptr, nullptr);
  Comm& w = mpi.world();
  std::vector<float> small(1, 1.f), big(1 << 20, 1.f);
  double us[2][2] = {};  // [watched][small/big]
  const int rounds = 5, n_small = 2000, n_big = 10;
  for (int round = 0; round < rounds; ++round)
    for (int watched = 0; watched < 2; ++watched) {
      set_collective_timeout(watched ? 600.0 : 0.0);
      w.barrier();
      auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < n_small; ++i) w.allreduce(small.data(), 1);
      auto t1 = std::chrono::steady_clock::now();
      for (int i = 0; i < n_big; ++i) w.allreduce(big.data(), static_cast<int64_t>(big.size()));
      auto t2 = std::chrono::steady_clock::now();
      us[watched][0] += std::chrono::duration<double, std::micro>(t1 - t0).count() / n_small / rounds;
      us[watched][1] += std::chrono::duration<double, std::micro>(t2 - t1).count() / n_big / rounds;
    }
  set_collective_timeout(0);
  if (w.rank() == 0)
    std::printf(
        "allreduce of 1 float: %.2f us blocking, %.2f us watched; of 2^20 floats: %.0f us blocking, %.0f us "
        "watched\n",
        us[0][0], us[1][0], us[0][1], us[1][1]);
}

// `dsv3 train` on 2 ranks with --distributed-timeout-seconds 3: rank 1 stopped from outside after iteration 2;
// rank 0, waiting for it in a collective, ends the job naming rank 1 and the iteration.
TEST(CommWatchdog, TrainWithAStoppedRankEnds) {
  if (!testing::have_mpirun()) GTEST_SKIP() << "mpirun is not installed";
  const auto dir = testing::scratch_dir();
  const std::string data = testing::make_tiny_data(dir);
  const std::string log = (dir / "train.log").string();
  // The job in the background; once its log shows iteration 2, SIGSTOP the rank whose environment says rank 1
  // (mpirun's own child); then wait for mpirun. A process left behind alive (it should not be) is
  // killed.
  const std::string script =
      "set -u; " + testing::mpirun_prefix(2) + testing::dsv3_binary().string() + " " +
      testing::tiny_train_args(dir, data, 1, 2) +
      " --train-iters 400 --eval-iters 0 --distributed-timeout-seconds 3 >" + log +
      " 2>&1 & mp=$!; "
      "for i in $(seq 600); do grep -Eq ' iteration +2/' " +
      log +
      " && break; sleep 0.1; done; "
      "victim=''; for p in $(pgrep -P $mp); do "
      "  tr '\\0' '\\n' </proc/$p/environ 2>/dev/null | grep -qx OMPI_COMM_WORLD_RANK=1 && victim=$p; done; "
      "[ -n \"$victim\" ] || { echo 'no rank 1 found'; kill $mp; exit 90; }; "
      "kill -STOP $victim; t0=$(date +%s.%N); wait $mp; rc=$?; t1=$(date +%s.%N); "
      "echo \"mpirun status $rc after $(echo \"$t1 - $t0\" | bc) s from SIGSTOP\"; "
      "sleep 1; st=$(ps -o stat= -p $victim); "  // Z: dead, waiting to be reaped by init
      "case \"$st\" in \"\"|Z*) ;; *) echo \"rank 1 left behind: state $st\"; kill -KILL $victim;; esac; "
      "cat " +
      log + "; exit $rc";
  double s = 0;
  const auto r = run_guarded(
      "bash -c '" +
          [&] {
            std::string q;
            for (char ch : script) q += ch == '\'' ? std::string("'\\''") : std::string(1, ch);
            return q;
          }() +
          "'",
      dir, s);
  const auto at = r.out.find("mpirun status");
  std::printf("%s\n", r.out.substr(at, r.out.find('\n', at) - at).c_str());
  EXPECT_NE(r.rc, 0) << r.out;
  EXPECT_NE(r.rc, 90) << r.out;
  EXPECT_NE(r.rc, 137) << r.out;
  EXPECT_EQ(r.out.find("rank 1 left behind"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("Rank 0: collective watchdog: timed out"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("rank(s) that did not arrive: 1\n"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find(" at iteration "), std::string::npos) << r.out;
}

}  // namespace
}  // namespace dsv3
