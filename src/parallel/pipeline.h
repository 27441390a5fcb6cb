// Pipeline parallelism's schedule (Megatron's forward_backward_pipelining_without_interleaving, spec §8):
// 1F1B. Stage s of P first runs min(P−s−1, M) warm-up forwards, then alternates one forward and one backward,
// then drains the remaining backwards; activations cross stages by point-to-point messages over the PP group,
// paired exactly as Megatron pairs them (send_forward_recv_backward on one side meets
// send_backward_recv_forward on the other), so blocking MPI_Sendrecv calls cannot deadlock. At most P−s
// micro-batches are in flight on stage s.
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "parallel/comm.h"

namespace dsv3 {

struct PipelineSteps {
  // Micro-batch m's forward on this stage from the previous stage's output (nullptr on the first stage);
  // returns this stage's output [numel] (ignored on the last stage), valid until the next call.
  std::function<const float*(int64_t m, const float* input)> forward;
  // Micro-batch m's backward from the gradient of this stage's output (nullptr on the last stage); returns
  // the gradient of this stage's input (ignored on the first stage), valid until the next call.
  std::function<const float*(int64_t m, const float* output_grad)> backward;
};

// The receive buffers (kept by the caller, so that a training step allocates nothing).
struct PipelineBuffers {
  std::vector<float> input, output_grad;
};

// Runs `micro` micro-batches through the stages of `pp` (this rank is stage pp.rank()); numel: the elements
// of one stage output (B·S·D). Collective over the PP group.
void run_1f1b(Comm& pp, int64_t micro, int64_t numel, const PipelineSteps& steps, PipelineBuffers& buf);

// Forward only (evaluation): each micro-batch through the stages in turn.
void run_forward_only(Comm& pp, int64_t micro, int64_t numel, const PipelineSteps& steps,
                      PipelineBuffers& buf);

}  // namespace dsv3
