// Peak memory of one training rank, predicted before the run (`dsv3 model-info`, the start of `dsv3 train`).
//
// dsv3 allocates every parameter, gradient, activation and scratch buffer through its backend as a grow-only
// DeviceArray (kernels/device_array.h) sized by the first step, so the steady-state footprint is a sum of known
// shapes. The plan walks the same shapes the model code grows (model.cpp, block.cpp, mla.cpp, mlp.cpp, moe.cpp)
// for one rank of each pipeline stage (EP rank 0, TP rank 0), in four parts:
//   state        fp32 weights and gradients, bf16 weight copies (bf16), Adam moments (host memory on the CPU;
//                sharded over DP with the distributed optimizer)
//   activations  what one micro-batch's forward keeps for its backward, times the micro-batches a stage holds
//                at once (1F1B: PP - stage); under full recompute only each layer's input, plus one layer's set
//   scratch      backward temporaries shared by the layers, the head's cross-entropy chunk, the MoE's per-layer
//                buffers, the router's host maps
//   runtime      the process itself (program, libraries, MPI, OpenMP): measured by `dsv3 train` at start; for
//                model-info an estimate (kRuntimeEstimate)
// The backend part is checked against the CPU backend's byte counter, the total against the measured peak RSS
// (tests/train/memory_plan_test.cpp, docs/operations.md).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/precision.h"
#include "model/config.h"
#include "model/param_store.h"

namespace dsv3 {

struct MemoryLayout {
  int tp = 1, pp = 1, ep = 1, dp = 1;
  int etp = -1;  // expert tensor parallel size; < 0: tp (Megatron's default)
  int expert_tp() const { return etp < 0 ? tp : etp; }
  int expert_dp() const { return tp * dp / (expert_tp() * ep); }  // world / (ETP·EP·PP)
  int64_t first_layers = 0, last_layers = 0;                      // --decoder-first/last-pipeline-num-layers
  bool dist_opt = false;
  std::vector<PipelineStage> stages;  // the run's stages when known (else planned from the sizes above)
};

struct MemoryRun {
  int64_t micro_batch = 1, seq = 4096;
  int64_t micro_batches = 1;  // per iteration and DP rank (global batch / (micro batch x DP))
  Precision precision = Precision::kF32;
  bool recompute = false;
  bool mtp = true;              // the config's MTP depths run (on the last stage)
  double capacity_factor = -1;  // < 0: dropless
  bool eval = false;            // evaluation runs (under PP it grows one more activation set)
  int64_t samples = 0;          // samples the datasets index (train iterations x global batch, + evaluation)
  bool cpu = true;        // host terms of the CPU kernels (cross-entropy chunk, GEMM copies and kernels)
  bool alltoall = false;  // the EP token dispatcher: --moe-token-dispatcher-type alltoall (else allgather)
  bool sequence_parallel =
      false;  // --sequence-parallel (with TP > 1): the residual stream holds S/TP positions
};

// Bytes, for one rank of a stage.
struct StageMemory {
  int64_t first_layer = 0, end_layer = 0;
  int64_t params = 0;  // elements this rank holds
  int64_t weights_grads = 0, bf16_copies = 0, adam = 0, optimizer_buffers = 0;
  int64_t activations = 0;  // one micro-batch's saved state
  int64_t sets = 1;         // activation sets held at once
  int64_t scratch = 0;      // backend-memory temporaries (shared by layers, or per MoE layer)
  int64_t host = 0;         // host-memory per-step buffers (router maps, cross-entropy chunk, batch)
  int64_t kernels = 0;      // CPU GEMM kernels: fp32 MoE experts JIT one per row count, up to a cap (gemm.h)
  bool gpu = false;         // a GPU rank: the backend part and the Adam moments are device memory
  int64_t device_extras = 0;  // GPU: CUDA context, cuBLASLt workspace, the head's logits chunk (an estimate)
  // What the backend allocates (its byte counter's peak): weights, grads, bf16 copies, activations, scratch.
  int64_t backend() const { return weights_grads + bf16_copies + activations * sets + scratch; }
  // Everything but the runtime: on the CPU, where the Adam moments and host buffers are host memory too.
  int64_t total() const { return backend() + adam + optimizer_buffers + host + kernels; }
  // GPU: what the device holds (the backend's buffers, the Adam moments, the CUDA runtime's own).
  int64_t device() const { return backend() + adam + device_extras; }
};

// The runtime's own resident memory on a CPU rank: what the process holds before the model is built (program,
// libraries, MPI, OpenMP; 15-25 MB measured on this build), which dsv3 train measures and model-info estimates,
// and what the first steps add to it (oneDNN's JIT-compiled kernels, library pages first touched: ~8 MB).
constexpr int64_t kRuntimeEstimate = int64_t{24} << 20;
constexpr int64_t kRuntimeGrowth = int64_t{8} << 20;

std::vector<StageMemory> plan_memory(const ModelConfig& cfg, const MemoryLayout& layout,
                                     const MemoryRun& run);

// The table model-info prints (and dsv3 train, for its own layout): one row per stage.
std::string format_memory_plan(const std::vector<StageMemory>& stages, int64_t runtime_bytes,
                               const std::string& runtime_note);

// This process's resident memory now and at its peak (VmRSS / VmHWM), in bytes; -1 where /proc is missing.
int64_t resident_bytes();
int64_t peak_resident_bytes();

}  // namespace dsv3
