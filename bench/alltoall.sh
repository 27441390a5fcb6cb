#!/usr/bin/env bash
# `make bench-alltoall`: alltoall bandwidth of dsv3's Comm::alltoallv against a plain MPI_Alltoallv of the same
# bytes (bench_alltoall), on MoE-dispatch-shaped messages (rows of D floats to every rank; D=512 and 7168, 64, 512
# and 4096 rows per peer, plus an uneven split with (q+1)·512 rows to rank q), with 2 and then 4 ranks. One line
# per case; dsv3_us / mpi_us are the per-call times (median over repetitions, max over ranks), *_GBps the
# busiest rank's sent+received bytes per second, ratio = dsv3_GBps / mpi_GBps (1.00: Comm adds nothing).
# Builds nothing: BUILD must already hold bench_alltoall. Extra arguments go to bench_alltoall (e.g. --d 512).
#   BUILD=build-a2a bash bench/alltoall.sh
# On a 2-core machine the 4-rank run oversubscribes the cores (ranks time-share them), so its absolute figures
# say little about a real EP group; the ratio is what to read.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
NPS=${NPS:-"2 4"}
MPIRUN="mpirun --allow-run-as-root --oversubscribe --bind-to none"
echo "alltoall: nproc=$(nproc) load=$(cut -d' ' -f1 /proc/loadavg)"
for np in $NPS; do
  $MPIRUN -np "$np" -x OMP_NUM_THREADS=1 "$BUILD/bench_alltoall" "$@"
done
