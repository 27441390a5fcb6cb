// `dsv3 train`: Megatron-LM's pretrain_gpt.py flags; see src/train/trainer.h. Under mpirun every rank runs this
// with MPI (parallel/comm.h); started directly it is one plain process and MPI is never initialised.
#include <malloc.h>

#include <cstdio>
#include <cstdlib>
#include <exception>

#include "cli/commands.h"
#include "core/error.h"
#include "parallel/comm.h"
#include "train/trainer.h"

namespace dsv3::cli {

int train_main(int argc, char** argv) {
  // Large buffers (>= 1 MiB: parameters, activations, a buffer that grows) are mapped and unmapped whole instead of
  // coming from the heap, whose threshold glibc otherwise raises after the first free: freed large blocks then
  // stay in the heap around small live ones, and a rank's resident memory drifted 5-10% above its live bytes over
  // the first steps. The step itself allocates nothing, so the mapping costs nothing per step. A user's
  // MALLOC_MMAP_THRESHOLD_ wins.
  if (!std::getenv("MALLOC_MMAP_THRESHOLD_")) mallopt(M_MMAP_THRESHOLD, 1 << 20);
  Runtime rt(&argc, &argv);
  Comm& world = rt.world();
  if (world.size() == 1) return run_training(argc, argv, world);
  // Several ranks: a rank that fails may leave the others waiting in a collective, so it prints its error and
  // ends the whole job (MPI_Abort) instead of returning.
  try {
    return run_training(argc, argv, world);
  } catch (const Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "internal error: %s\n", e.what());
  }
  world.abort(1);
  return 1;  // not reached: abort ends the process (the virtual call hides [[noreturn]] from the compiler)
}

}  // namespace dsv3::cli
