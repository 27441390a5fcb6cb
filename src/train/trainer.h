// `dsv3 train`: Megatron's training loop (spec §4.8, §5, §6, §8) over a Model — sampler from consumed_samples,
// micro-batches accumulated into the global batch, AdamW with the sample-based LR schedule, global-norm clipping,
// the aux-loss-free expert-bias update, Megatron's log line and TensorBoard scalars, evaluation, checkpoints, and
// the exit controls (exit interval, duration, SIGTERM, kill switch, NaN checks).
#pragma once
#include <string>

namespace dsv3 {

class Comm;

// Runs a whole training job from Megatron-style flags; returns the process exit code. Errors (bad flags, bad data,
// NaN loss) throw dsv3::Error with a message naming the iteration, file or flag.
int run_training(int argc, char** argv);
// The same on `world`'s ranks (data parallelism over MPI; see parallel/comm.h). Collective: every rank calls it
// with the same flags.
int run_training(int argc, char** argv, Comm& world);

}  // namespace dsv3
