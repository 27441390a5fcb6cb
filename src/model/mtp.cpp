// Multi-token prediction depths (see mtp.h): forward after the main head, backward before it.
#include "model/mtp.h"

#include "core/profile.h"

namespace dsv3 {
namespace {

// Megatron's roll_tensor(shifts=-k) within each sequence, with the vacated tail set to `fill` (on the host
// copies of ids and labels, before their upload).
void roll_left(const int32_t* x, int32_t* y, int64_t B, int64_t S, int64_t k, int32_t fill) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s < S; ++s) y[b * S + s] = s + k < S ? x[b * S + s + k] : fill;
}
}  // namespace

void Model::mtp_forward(const int32_t* ids, const int32_t* labels, const float* h_prev, bool training,
                        ForwardStats& st) {
  const int64_t B = B_, S = S_, T = B * S, Tl = opt_.tp.local_tokens(T), D = cfg_.hidden_size;
  const int64_t L = cfg_.num_hidden_layers;
  for (size_t k = 0; k < depths_.size(); ++k) {
    DSV3_PROFILE("fwd.mtp");
    Depth& dp = *depths_[k];
    const int64_t layer = L + static_cast<int64_t>(k);
    const std::string P = layer_prefix(layer);
    dp.ids_host.resize(T), dp.labels_host.resize(T);
    roll_left(ids, dp.ids_host.data(), B, S, k + 1, 0);
    roll_left(labels, dp.labels_host.data(), B, S, k + 1, kIgnoreLabel);
    grow(be(), dp.ids, T), grow(be(), dp.labels, T);
    dp.ids.copy_from_host(dp.ids_host.data(), T), dp.labels.copy_from_host(dp.labels_host.data(), T);
    Backend& b = be();
    grow(b, dp.e_TD, Tl * D), grow(b, dp.rstd_e_T, Tl), grow(b, dp.rstd_h_T, Tl),
        grow(b, dp.cat_T2D, 2 * Tl * D);
    grow(b, dp.z_TD, Tl * D), grow(b, dp.zout_TD, Tl * D), grow(b, dp.h_TD, Tl * D), grow(b, dp.rstd_o_T, Tl);
    grow(b, dp.loss_T, T), grow(b, dp.lse_T, T);
    const float eps = static_cast<float>(cfg_.rms_norm_eps);
    embed(dp.ids.data(), dp.e_TD.data(), T);
    // eh_proj input: [enorm(embedding) | hnorm(hidden)] — embedding first, as the released weights expect.
    // With SP on this rank's positions: eh_proj is replicated over TP (Megatron splits it by columns and
    // gathers its output; dsv3 keeps it whole, its gradient summed over TP like a norm's).
    be().rmsnorm_forward(dp.e_TD.data(), D, param(P + "enorm.weight"), dp.cat_T2D.data(), 2 * D,
                         dp.rstd_e_T.data(), Tl, D, eps);
    be().rmsnorm_forward(h_prev, D, param(P + "hnorm.weight"), dp.cat_T2D.data() + D, 2 * D,
                         dp.rstd_h_T.data(), Tl, D, eps);
    linear_forward(be(), dp.cat_T2D.data(), param(P + "eh_proj.weight"), dp.z_TD.data(), Tl, 2 * D, D,
                   opt_.precision, scratch_.lin);
    run_block(layer, dp.z_TD.data(), dp.zout_TD.data(), dp.acts, training);
    collect_moe_stats(dims_[layer], dp.acts, st);
    be().rmsnorm_forward(dp.zout_TD.data(), D, param(P + "shared_head.norm.weight"), dp.h_TD.data(), D,
                         dp.rstd_o_T.data(), Tl, D, eps);
    head_ce_forward(gather_for_head(dp.h_TD, dp.h_full_TD), dp.labels.data(), dp.loss_T.data(),
                    dp.lse_T.data(), T);
    int64_t slot = -1;
    const HeadLossResult m = loss_sum(dp.loss_T.data(), dp.labels_host.data(), T, &slot);
    st.mtp_loss_sum.push_back(m.loss_sum);
    st.mtp_slots.push_back(slot);
    st.mtp_tokens.push_back(m.n_valid);
    h_prev = dp.h_TD.data();
  }
}

// Last depth to first; dhf_TD_ carries the gradient into the previous depth's output (finally hf, which the
// main head's backward then adds to its own).
void Model::mtp_backward(float aux_scale, const std::vector<float>& mtp_scales) {
  const int64_t T = B_ * S_, Tl = opt_.tp.local_tokens(T), D = cfg_.hidden_size, L = cfg_.num_hidden_layers;
  const Precision prec = opt_.precision;
  auto head_in = [&](const DeviceArray<float>& local, const DeviceArray<float>& full) {
    return opt_.tp.sp() ? full.data() : local.data();  // what the head read in forward
  };
  be().fill_zero(dhf_TD_.data(), Tl * D * sizeof(float));
  for (int64_t k = static_cast<int64_t>(depths_.size()) - 1; k >= 0; --k) {
    DSV3_PROFILE("bwd.mtp");
    Depth& dp = *depths_[k];
    const int64_t layer = L + k;
    const std::string P = layer_prefix(layer);
    const float* h_prev = k == 0 ? hf_TD_.data() : depths_[k - 1]->h_TD.data();
    // dH = head gradient + what the next depth sent back through its hnorm.
    const float mtp_scale = k < static_cast<int64_t>(mtp_scales.size()) ? mtp_scales[k] : 0.f;
    head_ce_backward(head_in(dp.h_TD, dp.h_full_TD), dp.labels.data(), dp.lse_T.data(), mtp_scale,
                     dA_TD_.data(), T);
    be().add(dA_TD_.data(), dA_TD_.data(), dhf_TD_.data(), Tl * D);
    be().rmsnorm_backward(dA_TD_.data(), D, dp.zout_TD.data(), D, param(P + "shared_head.norm.weight"),
                          dp.rstd_o_T.data(), dB_TD_.data(), D, grad(P + "shared_head.norm.weight"), Tl, D,
                          0.f);
    BlockGrads g = block_grads(layer);
    block_backward(be(), dims_[layer], block_params(layer), dp.acts, dB_TD_.data(), aux_scale, dA_TD_.data(),
                   g, scratch_, prec);
    // eh_proj: dz (dA) → dcat [T, 2D]; the cat buffer is reused for its gradient once dW is formed.
    DeviceArray<float>& dcat = scratch_.dh_TF;  // free between blocks
    grow(be(), dcat, 2 * Tl * D);
    linear_backward_weight(be(), dA_TD_.data(), dp.cat_T2D.data(), grad(P + "eh_proj.weight"), Tl, 2 * D, D,
                           prec, scratch_.lin);
    linear_backward_input(be(), dA_TD_.data(), param(P + "eh_proj.weight"), dcat.data(), Tl, 2 * D, D, prec,
                          scratch_.lin);
    be().rmsnorm_backward(dcat.data(), 2 * D, dp.e_TD.data(), D, param(P + "enorm.weight"),
                          dp.rstd_e_T.data(), dB_TD_.data(), D, grad(P + "enorm.weight"), Tl, D, 0.f);
    embed_backward(dB_TD_.data(), dp.ids.data(), T);
    be().rmsnorm_backward(dcat.data() + D, 2 * D, h_prev, D, param(P + "hnorm.weight"), dp.rstd_h_T.data(),
                          dhf_TD_.data(), D, grad(P + "hnorm.weight"), Tl, D, 0.f);
  }
}

}  // namespace dsv3
