// Multi-token prediction (Megatron-Core's MultiTokenPredictionBlock, spec §7.4): the part of Model that runs the
// D depths after the main model's final norm. Depth k embeds the tokens shifted left by k+1 (Megatron's
// roll_tensor), normalises them and the previous depth's output (enorm, hnorm), projects the concatenation
// (eh_proj [D, 2D]), runs one decoder layer, and predicts through the shared output layer after its own norm;
// its hidden output feeds the next depth. Forward and backward are Model members (model.h) defined in mtp.cpp.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace dsv3 {

// One MTP depth's forward state.
struct Model::Depth {
  std::vector<int32_t> ids_host, labels_host;
  DeviceArray<int32_t> ids, labels;
  // [Tl, ·] (this rank's tokens under sequence parallelism) but the head's: h_full_TD (SP: h gathered), loss, lse.
  DeviceArray<float> e_TD, rstd_e_T, rstd_h_T, cat_T2D, z_TD, zout_TD, h_TD, rstd_o_T, loss_T, lse_T,
      h_full_TD;
  BlockActs acts;
};

}  // namespace dsv3
