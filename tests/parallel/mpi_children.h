// Tests that need several MPI ranks: the test binary re-launches itself under `mpirun -np N` with
// DSV3_MPI_CHILD set and a filter for the one test, each child runs it as a rank (constructing an
// MpiSession), and the parent expects every rank to pass. Skipped without mpirun.
#pragma once
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

#include "train_util.h"

namespace dsv3::testing {

inline std::string self_exe() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof buf - 1);
  return n > 0 ? std::string(buf, n) : std::string();
}

// True in a re-launched child.
inline bool is_mpi_child() {
  return std::getenv("DSV3_MPI_CHILD") != nullptr;
}

// Runs test `test` ("Suite.Name") on np ranks and expects it to pass on each.
inline void run_mpi_children(const std::string& test, int np) {
  if (!have_mpirun()) GTEST_SKIP() << "mpirun is not installed (apt-get install openmpi-bin)";
  const auto dir = scratch_dir();
  auto r = run_shell(
      mpirun_prefix(np) + "-x DSV3_MPI_CHILD=1 " + self_exe() + " --gtest_color=no --gtest_filter=" + test,
      dir);
  EXPECT_EQ(r.rc, 0) << r.out;
  size_t passed = 0;
  const std::string mark = "[  PASSED  ] 1 test";
  for (size_t p = r.out.find(mark); p != std::string::npos; p = r.out.find(mark, p + 1)) ++passed;
  EXPECT_EQ(passed, static_cast<size_t>(np)) << r.out;
}

}  // namespace dsv3::testing
