// The 1F1B pipeline schedule (see pipeline.h).
#include "parallel/pipeline.h"

#include <algorithm>

#include "core/error.h"

namespace dsv3 {
namespace {

// The p2p operations of Megatron's p2p_communication, each a no-op where the peer does not exist.
struct P2p {
  Comm& pp;
  int stage, stages;
  int64_t n;
  std::vector<float>&in, &grad;  // received input / received output gradient (the caller's buffers)
  bool first() const { return stage == 0; }
  bool last() const { return stage == stages - 1; }
  const float* recv_forward() {
    if (first()) return nullptr;
    pp.recv(in.data(), n, stage - 1);
    return in.data();
  }
  void send_forward(const float* y) {
    if (!last()) pp.send(y, n, stage + 1);
  }
  const float* recv_backward() {
    if (last()) return nullptr;
    pp.recv(grad.data(), n, stage + 1);
    return grad.data();
  }
  void send_backward(const float* g) {
    if (!first()) pp.send(g, n, stage - 1);
  }
  const float* send_forward_recv_backward(const float* y) {
    if (last()) return nullptr;
    pp.sendrecv(y, n, stage + 1, grad.data(), n, stage + 1);
    return grad.data();
  }
  const float* send_backward_recv_forward(const float* g) {
    if (first()) return nullptr;
    pp.sendrecv(g, n, stage - 1, in.data(), n, stage - 1);
    return in.data();
  }
};

P2p make_p2p(Comm& pp, int64_t numel, PipelineBuffers& buf) {
  if (static_cast<int64_t>(buf.input.size()) < numel) buf.input.resize(numel), buf.output_grad.resize(numel);
  return P2p{pp, pp.rank(), pp.size(), numel, buf.input, buf.output_grad};
}

}  // namespace

void run_1f1b(Comm& pp, int64_t micro, int64_t numel, const PipelineSteps& steps, PipelineBuffers& buf) {
  DSV3_CHECK(micro >= 1, "pipeline schedule: no micro-batches");
  P2p p = make_p2p(pp, numel, buf);
  const int64_t warmup = std::min<int64_t>(p.stages - p.stage - 1, micro), remaining = micro - warmup;
  int64_t fwd = 0, bwd = 0;
  for (int64_t i = 0; i < warmup; ++i) p.send_forward(steps.forward(fwd++, p.recv_forward()));
  const float* input = remaining > 0 ? p.recv_forward() : nullptr;
  for (int64_t i = 0; i < remaining; ++i) {
    const float* out_grad = p.send_forward_recv_backward(steps.forward(fwd++, input));
    const float* in_grad = steps.backward(bwd++, out_grad);
    if (i == remaining - 1)
      p.send_backward(in_grad);
    else
      input = p.send_backward_recv_forward(in_grad);
  }
  for (int64_t i = 0; i < warmup; ++i) p.send_backward(steps.backward(bwd++, p.recv_backward()));
}

void run_forward_only(Comm& pp, int64_t micro, int64_t numel, const PipelineSteps& steps,
                      PipelineBuffers& buf) {
  P2p p = make_p2p(pp, numel, buf);
  for (int64_t m = 0; m < micro; ++m) p.send_forward(steps.forward(m, p.recv_forward()));
}

}  // namespace dsv3
