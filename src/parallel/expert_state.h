// Expert-parallel state as one whole model: every EP rank's local experts gathered over the EP group into the
// EP = 1 ParamStore layout, so that rank 0 writes one checkpoint that every layout (and transformers) loads; each
// rank then loads only its own experts from it (ParamStore holds only those).
#pragma once
#include "model/param_store.h"
#include "model/param_table.h"
#include "parallel/comm.h"

namespace dsv3 {

// full (in `full_store`'s layout, which holds every expert) ← local (in `local_store`'s layout) with each MoE layer's
// expert blocks gathered over `ep` in EP-rank order (= global expert order, experts being split contiguously).
// Collective over `ep`; every rank of it receives the whole state.
void gather_experts(const ParamTable& table, const ParamStore& local_store, const ParamStore& full_store, Comm& ep,
                    const float* local, float* full);

}  // namespace dsv3
