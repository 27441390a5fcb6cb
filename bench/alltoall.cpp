// bench_alltoall: alltoall bandwidth of dsv3's Comm::alltoallv (src/parallel/comm.h, on MPI) against a plain
// MPI_Alltoallv of the same bytes called directly, with messages shaped like an MoE token dispatch: every
// rank sends rows of D floats (hidden states) to every rank of the communicator (MPI_COMM_WORLD), itself
// included.
//
//   mpirun -np 4 ./build/bench_alltoall [--d 512,7168] [--rows 64,512,4096] [--uneven-base 512]
//                                       [--target-s 0.5] [--warmup 2]
//
// Cases: for each D, split=even sends rows_per_peer rows to every rank; split=uneven (skipped with
// --uneven-base 0) has every rank send (q+1)·base rows to rank q, so rank q receives size·(q+1)·base rows and
// the last rank is the busiest (rows_per_peer then prints base).
//
// Per case: the received data of both paths is checked once (a mismatch aborts the job), then `warmup`
// untimed calls of each, then `reps` repetitions, reps chosen (from timing a few) so the case's timed part
// takes about --target-s (3 at least). A repetition is: barrier, time one call of ours; barrier, time one
// plain call (the order alternates between repetitions). Per-call time = max over ranks of that rank's median
// over the repetitions.
//
// Prints one line per case (rank 0 only):
//   alltoall: ranks=<P> split=<even|uneven> d=<D> rows_per_peer=<n> reps=<N>
//     bytes_per_rank=<bytes one rank sends per call, its own block included> dsv3_us=<µs per call>
//     mpi_us=<µs> dsv3_GBps=<x> mpi_GBps=<y> ratio=<dsv3_GBps / mpi_GBps: 1.00 = no overhead, lower = slower>
// GBps is algorithmic bandwidth, 1e9 bytes/s: the bytes the busiest rank sends plus receives per call,
// divided by the per-call time.
#define OMPI_SKIP_MPICXX 1
#include <mpi.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <vector>

#include "parallel/comm.h"

namespace {

using dsv3::Comm;

// The value rank `src` puts in column `col` of row `row` of its block for rank `dst`: an integer below 2^24,
// so exact as a float.
float cell(int64_t src, int64_t dst, int64_t row, int64_t col) {
  return static_cast<float>((src * 7919 + dst * 104729 + row * 131 + col) % 1000003);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double max_over_ranks(double x) {
  MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return x;
}

struct Case {
  bool uneven;
  int64_t d;
  int64_t rows;  // rows per peer (even), or base (uneven: (q+1)·base rows to rank q)
};

// Rows that rank `src` sends to rank `dst`.
int64_t rows_between(const Case& c, int src, int dst) {
  return c.uneven ? (dst + 1) * c.rows : c.rows;
}

// Checks `recv` (packed by source rank) against what every rank sent this one; the number of wrong elements.
int64_t count_wrong(const Case& c, int rank, int size, const std::vector<float>& recv) {
  int64_t wrong = 0, off = 0;
  for (int src = 0; src < size; ++src) {
    const int64_t n = rows_between(c, src, rank);
    for (int64_t row = 0; row < n; ++row)
      for (int64_t col = 0; col < c.d; ++col, ++off)
        if (recv[off] != cell(src, rank, row, col)) ++wrong;
  }
  if (off != static_cast<int64_t>(recv.size())) ++wrong;
  return wrong;
}

void run_case(Comm& w, const Case& c, double target_s, int warmup) {
  const int size = w.size(), rank = w.rank();
  std::vector<int64_t> send_counts(size), recv_counts(size);
  int64_t send_total = 0, recv_total = 0;
  for (int q = 0; q < size; ++q) {
    send_counts[q] = rows_between(c, rank, q) * c.d;
    recv_counts[q] = rows_between(c, q, rank) * c.d;
    send_total += send_counts[q], recv_total += recv_counts[q];
  }
  if (std::max(send_total, recv_total) > std::numeric_limits<int>::max()) {
    if (rank == 0)
      std::fprintf(stderr, "alltoall: skipping d=%lld rows_per_peer=%lld: over MPI's int counts\n",
                   static_cast<long long>(c.d), static_cast<long long>(c.rows));
    return;
  }
  // The plain call's int counts and displacements, built once outside the timed region.
  std::vector<int> sc(size), sd(size), rc(size), rd(size);
  for (int q = 0, so = 0, ro = 0; q < size; ++q) {
    sc[q] = static_cast<int>(send_counts[q]), sd[q] = so, so += sc[q];
    rc[q] = static_cast<int>(recv_counts[q]), rd[q] = ro, ro += rc[q];
  }

  std::vector<float> send(send_total), recv_ours(recv_total), recv_mpi(recv_total);
  int64_t off = 0;
  for (int q = 0; q < size; ++q)
    for (int64_t row = 0; row < rows_between(c, rank, q); ++row)
      for (int64_t col = 0; col < c.d; ++col) send[off++] = cell(rank, q, row, col);

  auto ours = [&] { w.alltoallv(send.data(), send_counts.data(), recv_ours.data(), recv_counts.data()); };
  auto plain = [&] {
    MPI_Alltoallv(send.data(), sc.data(), sd.data(), MPI_FLOAT, recv_mpi.data(), rc.data(), rd.data(),
                  MPI_FLOAT, MPI_COMM_WORLD);
  };

  // Correctness, once per case: both paths into buffers poisoned with NaN.
  std::fill(recv_ours.begin(), recv_ours.end(), std::nanf(""));
  std::fill(recv_mpi.begin(), recv_mpi.end(), std::nanf(""));
  ours();
  plain();
  int64_t wrong[2] = {count_wrong(c, rank, size, recv_ours), count_wrong(c, rank, size, recv_mpi)};
  MPI_Allreduce(MPI_IN_PLACE, wrong, 2, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  if (wrong[0] || wrong[1]) {
    if (rank == 0)
      std::fprintf(stderr,
                   "alltoall: WRONG DATA split=%s d=%lld rows_per_peer=%lld: %lld wrong elements from "
                   "Comm::alltoallv, %lld from MPI_Alltoallv (summed over ranks)\n",
                   c.uneven ? "uneven" : "even", static_cast<long long>(c.d), static_cast<long long>(c.rows),
                   static_cast<long long>(wrong[0]), static_cast<long long>(wrong[1]));
    std::fflush(stderr);
    w.abort(1);
  }

  for (int i = 0; i < warmup; ++i) ours(), plain();

  auto timed = [&](auto&& call) {
    w.barrier();
    const double t0 = MPI_Wtime();
    call();
    return MPI_Wtime() - t0;
  };
  // The repetition count (the same on every rank): time batches of 1, 2, 4, ... repetitions, barriers
  // included, until one takes 50 ms (a tenth of target_s if that is less), and scale to target_s.
  double per_rep = 0;
  for (int64_t n = 1;; n *= 2) {
    w.barrier();
    const double t0 = MPI_Wtime();
    for (int64_t i = 0; i < n; ++i) timed(ours), timed(plain);
    per_rep = max_over_ranks(MPI_Wtime() - t0) / n;
    if (per_rep * n >= std::min(0.05, 0.1 * target_s) || n >= (1 << 16)) break;
  }
  const int reps =
      static_cast<int>(std::clamp(std::lround(target_s / std::max(per_rep, 1e-9)), 3L, 1L << 20));

  std::vector<double> t_ours, t_mpi;
  t_ours.reserve(reps), t_mpi.reserve(reps);
  for (int i = 0; i < reps; ++i) {
    if (i % 2 == 0) {
      t_ours.push_back(timed(ours));
      t_mpi.push_back(timed(plain));
    } else {
      t_mpi.push_back(timed(plain));
      t_ours.push_back(timed(ours));
    }
  }
  const double s_ours = max_over_ranks(median(t_ours)), s_mpi = max_over_ranks(median(t_mpi));
  const double moved = max_over_ranks(static_cast<double>((send_total + recv_total) * sizeof(float)));
  const double gb_ours = moved / s_ours / 1e9, gb_mpi = moved / s_mpi / 1e9;
  if (rank == 0) {
    std::printf(
        "alltoall: ranks=%d split=%s d=%lld rows_per_peer=%lld reps=%d bytes_per_rank=%lld dsv3_us=%.1f "
        "mpi_us=%.1f dsv3_GBps=%.3f mpi_GBps=%.3f ratio=%.3f\n",
        size, c.uneven ? "uneven" : "even", static_cast<long long>(c.d), static_cast<long long>(c.rows), reps,
        static_cast<long long>(send_total * sizeof(float)), s_ours * 1e6, s_mpi * 1e6, gb_ours, gb_mpi,
        gb_ours / gb_mpi);
    std::fflush(stdout);
  }
}

}  // namespace

int main(int argc, char** argv) {
  dsv3::MpiSession mpi(&argc, &argv);
  Comm& w = mpi.world();

  std::vector<int64_t> ds{512, 7168}, rows{64, 512, 4096};
  int64_t uneven_base = 512;
  double target_s = 0.5;
  int warmup = 2;
  CLI::App app{"dsv3 alltoallv benchmark (Comm::alltoallv against plain MPI_Alltoallv)"};
  app.add_option("--d", ds, "hidden sizes (floats per row), comma-separated")->delimiter(',');
  app.add_option("--rows", rows, "rows per peer for the even cases, comma-separated")->delimiter(',');
  app.add_option("--uneven-base", uneven_base, "uneven case: (q+1)*base rows to rank q; 0 skips it");
  app.add_option("--target-s", target_s, "timed seconds per case (both paths together)");
  app.add_option("--warmup", warmup, "untimed calls of each path per case");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // Every rank parses the same arguments, so every rank leaves here; only rank 0 speaks.
    if (w.rank() == 0) return app.exit(e);
    return e.get_exit_code();
  }

  std::vector<Case> cases;
  for (int64_t d : ds) {
    for (int64_t r : rows) cases.push_back({false, d, r});
    if (uneven_base > 0) cases.push_back({true, d, uneven_base});
  }
  try {
    for (const Case& c : cases) run_case(w, c, target_s, warmup);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "alltoall: rank %d: %s\n", w.rank(), e.what());
    std::fflush(stderr);
    w.abort(1);
  }
  return 0;
}
