// Moving a ParamStore-layout buffer (parameters, or optimizer moments in the same layout) between a TP rank's
// shards and the whole tensors, for checkpoints: they are written in the whole HF layout (gathered over TP on
// save) and each TP rank keeps its block on load, so a checkpoint moves between TP sizes.
#pragma once
#include "model/param_store.h"
#include "model/param_table.h"
#include "parallel/comm.h"

namespace dsv3 {

// `whole` is the store of the same table, EP rank and stage without TP; `local` this rank's. Collective over
// `tp` (every TP rank calls it and receives the whole buffer).
void tp_gather(const ParamTable& table, const ParamStore& local, const ParamStore& whole,
               const float* local_buf, float* whole_buf, Comm& tp);
// This rank's blocks out of a whole-layout buffer (no communication).
void tp_scatter(const ParamTable& table, const ParamStore& local, const ParamStore& whole,
                const float* whole_buf, float* local_buf);

}  // namespace dsv3
