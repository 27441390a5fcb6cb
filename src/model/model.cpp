// Model assembly: parameter layout, the forward over all layers and MTP depths, and the backward in reverse.
#include "model/model.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <numeric>

#include "core/error.h"
#include "core/profile.h"
#include "model/mtp.h"
#include "model/safetensors.h"

namespace dsv3 {
namespace {

MlaDims mla_dims(const ModelConfig& c) {
  MlaDims d;
  d.D = c.hidden_size, d.H = c.num_attention_heads, d.q_lora = c.q_lora_rank, d.kv_lora = c.kv_lora_rank;
  d.dn = c.qk_nope_head_dim, d.dr = c.qk_rope_head_dim, d.dv = c.v_head_dim;
  d.norm_eps = static_cast<float>(c.latent_norm_eps);
  d.softmax_scale = static_cast<float>(c.softmax_scale());
  if (c.rope_scaling) {
    const YarnScaling& y = *c.rope_scaling;
    YarnParams p;
    p.factor = y.factor;
    p.original_max_position_embeddings = y.original_max_position_embeddings;
    p.beta_fast = y.beta_fast, p.beta_slow = y.beta_slow, p.mscale = y.mscale,
    p.mscale_all_dim = y.mscale_all_dim;
    p.attention_factor = c.yarn_attention_factor;
    p.truncate = y.truncate;
    d.rope = rope_inv_freq(c.qk_rope_head_dim, c.rope_theta, &p, c.max_position_embeddings);
  } else {
    d.rope = rope_inv_freq(c.qk_rope_head_dim, c.rope_theta, nullptr, c.max_position_embeddings);
  }
  return d;
}

}  // namespace

Model::Model(const ModelConfig& cfg, const ModelOptions& opt)
    : cfg_(cfg),
      opt_(opt),
      table_(cfg, opt.expert_tensor_parallel && opt.tp.size > 1),
      store_(table_, opt.ep.size(), opt.ep.rank(), opt.stage, opt.tp.size, opt.tp.rank),
      params_(*opt.backend, store_.size()),
      grads_(*opt.backend, store_.size()) {
  cfg_.validate();
  loss_sum_.ensure(be(), sizeof(double));  // before any step: steps allocate nothing on the backend
  const int64_t depths = opt_.mtp ? cfg_.num_nextn_predict_layers : 0;
  const int64_t L = cfg_.num_hidden_layers, first = opt_.stage.first_layer, end = opt_.stage.end(L);
  DSV3_CHECK(first >= 0 && first < end && end <= L && opt_.stage.pre_process == (first == 0) &&
                 opt_.stage.post_process == (end == L),
             "pipeline stage: layers [", first, ", ", end, ") of ", L, " with pre_process ",
             opt_.stage.pre_process, " and post_process ", opt_.stage.post_process, " do not form a stage");
  DSV3_CHECK(depths == 0 || !opt_.stage.post_process || opt_.stage.pre_process || opt_.stage.shared_embedding,
             "pipeline stage: the last stage runs MTP layers and needs the shared embedding");
  const int tp = opt_.tp.size;
  DSV3_CHECK(tp == 1 || be().kind() == DeviceKind::kCpu,
             "model: tensor parallelism runs on the CPU backend only "
             "(its reductions move host memory); ",
             be().name(), " runs one rank");
  DSV3_CHECK(cfg_.num_attention_heads % tp == 0, "num_attention_heads (", cfg_.num_attention_heads,
             ") must be divisible by the tensor model parallel size (", tp, ")");
  DSV3_CHECK(cfg_.intermediate_size % tp == 0, "intermediate_size / --ffn-hidden-size (",
             cfg_.intermediate_size, ") must be divisible by the tensor model parallel size (", tp, ")");
  DSV3_CHECK((cfg_.moe_intermediate_size * cfg_.n_shared_experts) % tp == 0, "the shared experts' width (",
             cfg_.moe_intermediate_size * cfg_.n_shared_experts,
             ") must be divisible by the tensor model parallel size (", tp, ")");
  DSV3_CHECK(!opt_.expert_tensor_parallel || cfg_.moe_intermediate_size % tp == 0,
             "moe_intermediate_size / --moe-ffn-hidden-size (", cfg_.moe_intermediate_size,
             ") must be divisible by the expert tensor parallel size (", tp, ")");
  DSV3_CHECK(cfg_.vocab_size % tp == 0, "vocab_size (", cfg_.vocab_size,
             ") must be divisible by the tensor model parallel size (", tp,
             "): Megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by × TP");
  vocab_ = {cfg_.vocab_size, opt_.tp.rank * (cfg_.vocab_size / tp), cfg_.vocab_size / tp};
  for (int64_t i = 0; i < cfg_.num_hidden_layers + depths; ++i) {
    BlockDims d;
    d.D = cfg_.hidden_size, d.F = cfg_.intermediate_size / tp;
    d.tp = opt_.tp;
    d.norm_eps = static_cast<float>(cfg_.rms_norm_eps);
    d.is_moe = cfg_.is_moe_layer(i);
    d.mla = mla_dims(cfg_);
    d.mla.H /= tp;
    d.mla.tp = opt_.tp;  // sequence parallelism: MLA gathers its latents (its TP reductions are the block's)
    d.mla.validate();
    if (d.is_moe) {
      d.moe = moe_config_from_model(cfg_, opt_.precision);
      d.moe.router.capacity_factor = opt_.capacity_factor;
      d.moe.router.drop_policy = opt_.drop_policy;
      d.moe.router.pad_to_capacity = opt_.pad_to_capacity;
      d.moe.router.seq_aux_coeff = opt_.seq_aux_coeff;
      d.moe.force_load_balancing = opt_.force_load_balancing, d.moe.layer = i;
      d.moe.expert_gemm = opt_.expert_gemm;
      d.moe.ep = opt_.ep;
      d.moe.tp = opt_.tp;
      d.moe.expert_tp = opt_.expert_tensor_parallel && tp > 1;
      d.moe.validate();
    }
    dims_.push_back(d);
  }
  DSV3_CHECK(be().kind() == DeviceKind::kCpu || opt_.ep.size() == 1,
             "model: expert parallelism runs on the CPU "
             "only (its dispatcher moves host memory); ",
             be().name(), " runs one rank");
  acts_.resize(opt_.recompute ? 1 : cfg_.num_hidden_layers);
  // Routed experts are converted by the MoE layer itself (stacked gate|up per expert); the router stays fp32.
  if (opt_.precision == Precision::kBF16)
    for (const auto& p : table_.params())
      if (p.tied_to.empty() && !p.is_expert && store_.contains(p.name) &&
          (p.role == ParamRole::kLinear || p.role == ParamRole::kOutputLinear || p.role == ParamRole::kHead))
        bf16_weights_.add(be(), param(p.name), store_.numel(p));
  for (int64_t k = 0; k < depths; ++k) depths_.push_back(std::make_unique<Depth>());
}

Model::~Model() = default;

void Model::init(uint64_t seed) {
  // Parameters are formed on the host (the init is the CPU's, Megatron's (seed, name, index) streams), then
  // copied to the backend when it is not the host.
  const bool host = be().kind() == DeviceKind::kCpu;
  std::vector<float> staged(host ? 0 : static_cast<size_t>(params_.size()));
  float* base = host ? params_.data() : staged.data();
  for (const auto& p : table_.params())
    if (p.tied_to.empty() && store_.contains(p.name)) {
      const TpShard s = tp_shard(p, opt_.tp.size, opt_.tp.rank);  // the whole tensor without TP
      init_param_block(p, seed, cfg_, s.row0, s.rows, s.col0, s.cols, base + store_.offset(p.name));
    }
  if (!host) params_.copy_from_host(staged.data(), params_.size());
  bf16_stale_ = true;
}

void Model::params_from_host(const std::vector<float>& host) {
  DSV3_CHECK(static_cast<int64_t>(host.size()) == params_.size(), "params_from_host: ", host.size(),
             " values for ", params_.size(), " parameters");
  params_.copy_from_host(host.data(), params_.size());
  bf16_stale_ = true;
}

void Model::load_safetensors(const std::string& path) {
  const bool host = be().kind() == DeviceKind::kCpu;
  std::vector<float> staged = host ? std::vector<float>() : params_.to_host();  // keeps absent MTP tensors
  float* base = host ? params_.data() : staged.data();
  SafetensorsReader r(path);
  for (const auto& p : table_.params()) {
    if (!p.tied_to.empty() || !store_.contains(p.name)) continue;
    if (!r.contains(p.name)) {
      DSV3_CHECK(p.is_mtp, path, ": tensor ", p.name, " is missing");
      continue;
    }
    const auto& info = r.info(p.name);
    DSV3_CHECK(info.shape == p.shape, path, ": tensor ", p.name,
               " has the wrong shape for this model config");
    const TpShard s = tp_shard(p, opt_.tp.size, opt_.tp.rank);
    if (s.numel() == p.numel) {
      r.read_f32(p.name, base + store_.offset(p.name), p.numel);
      continue;
    }
    const std::vector<float> whole = r.read_f32(p.name);  // this TP rank keeps its block
    const int64_t C = p.numel / (p.shape.size() == 2 ? p.shape[0] : 1);
    for (int64_t i = 0; i < s.rows; ++i)
      std::copy_n(whole.data() + (s.row0 + i) * C + s.col0, s.cols,
                  base + store_.offset(p.name) + i * s.cols);
  }
  if (!host) params_.copy_from_host(staged.data(), params_.size());
  bf16_stale_ = true;
}

void Model::zero_grads() {
  if (be().kind() != DeviceKind::kCpu) return be().fill_zero(grads_.data(), grads_.size() * sizeof(float));
  float* g = grads_.data();  // the host: in parallel (memset on one thread is slower for GBs)
  const int64_t n = grads_.size();
#pragma omp parallel for simd schedule(static)
  for (int64_t i = 0; i < n; ++i) g[i] = 0.f;
}

BlockParams Model::block_params(int64_t i) {
  const std::string L = layer_prefix(i), A = L + "self_attn.", M = L + "mlp.";
  BlockParams p;
  p.input_norm_w = param(L + "input_layernorm.weight");
  p.post_norm_w = param(L + "post_attention_layernorm.weight");
  if (cfg_.has_q_lora()) {
    p.mla.q_a_proj_w = param(A + "q_a_proj.weight");
    p.mla.q_a_norm_w = param(A + "q_a_layernorm.weight");
    p.mla.q_b_proj_w = param(A + "q_b_proj.weight");
  } else {
    p.mla.q_proj_w = param(A + "q_proj.weight");
  }
  p.mla.kv_a_proj_w = param(A + "kv_a_proj_with_mqa.weight");
  p.mla.kv_a_norm_w = param(A + "kv_a_layernorm.weight");
  p.mla.kv_b_proj_w = param(A + "kv_b_proj.weight");
  p.mla.o_proj_w = param(A + "o_proj.weight");
  if (dims_[i].is_moe) {
    p.moe.gate_w_ED = param(M + "gate.weight");
    p.moe.expert_bias_E = param(M + "gate.e_score_correction_bias");
    p.moe.gate_proj_EFD = params_.data() + store_.expert_block(i, "gate_proj");
    p.moe.up_proj_EFD = params_.data() + store_.expert_block(i, "up_proj");
    p.moe.down_proj_EDF = params_.data() + store_.expert_block(i, "down_proj");
    if (cfg_.n_shared_experts > 0) {
      p.moe.shared_gate_FsD = param(M + "shared_experts.gate_proj.weight");
      p.moe.shared_up_FsD = param(M + "shared_experts.up_proj.weight");
      p.moe.shared_down_DFs = param(M + "shared_experts.down_proj.weight");
    }
  } else {
    p.gate_FD = param(M + "gate_proj.weight");
    p.up_FD = param(M + "up_proj.weight");
    p.down_DF = param(M + "down_proj.weight");
  }
  p.bf16_weights = p.mla.bf16_weights = p.moe.bf16_weights = &bf16_weights_;
  if (dims_[i].is_moe && static_cast<size_t>(i) < expert_bf16_.size() && !expert_bf16_[i].w_gu.empty())
    p.moe.expert_bf16 = &expert_bf16_[i];
  return p;
}

BlockGrads Model::block_grads(int64_t i) {
  // Same layout as the parameters: translate each pointer by the buffer difference.
  const BlockParams p = block_params(i);
  auto g = [&](const float* x) { return x ? grads_.data() + (x - params_.data()) : nullptr; };
  BlockGrads out;
  out.input_norm_w = g(p.input_norm_w), out.post_norm_w = g(p.post_norm_w);
  out.mla = {g(p.mla.q_a_proj_w),  g(p.mla.q_a_norm_w),  g(p.mla.q_b_proj_w),  g(p.mla.q_proj_w),
             g(p.mla.kv_a_proj_w), g(p.mla.kv_a_norm_w), g(p.mla.kv_b_proj_w), g(p.mla.o_proj_w)};
  out.gate_FD = g(p.gate_FD), out.up_FD = g(p.up_FD), out.down_DF = g(p.down_DF);
  out.moe = {g(p.moe.gate_w_ED),      g(p.moe.gate_proj_EFD),   g(p.moe.up_proj_EFD),
             g(p.moe.down_proj_EDF),  g(p.moe.shared_gate_FsD), g(p.moe.shared_up_FsD),
             g(p.moe.shared_down_DFs)};
  return out;
}

const bf16* Model::head_bf16() {
  return bf16_weights_.find(param("lm_head.weight"), vocab_.rows * cfg_.hidden_size);
}

void Model::embed(const int32_t* ids, float* out, int64_t t) {
  const float* table = param("model.embed_tokens.weight");
  if (!opt_.tp.on()) return be().embedding_forward(ids, table, out, t, cfg_.vocab_size, cfg_.hidden_size);
  if (opt_.tp.sp())
    return vocab_parallel_embedding_forward_sp(opt_.tp, vocab_, ids, table,
                                               grow(be(), full_TD_, t * cfg_.hidden_size), out, B_, S_,
                                               cfg_.hidden_size);
  vocab_parallel_embedding_forward(opt_.tp, vocab_, ids, table, out, t, cfg_.hidden_size);
}

void Model::embed_backward(const float* dout, const int32_t* ids, int64_t t) {
  float* dtable = grad("model.embed_tokens.weight");
  if (!opt_.tp.on()) return be().embedding_backward(dout, ids, dtable, t, cfg_.vocab_size, cfg_.hidden_size);
  if (opt_.tp.sp())
    return vocab_parallel_embedding_backward_sp(opt_.tp, vocab_, dout, ids,
                                                grow(be(), full_TD_, t * cfg_.hidden_size), dtable, B_, S_,
                                                cfg_.hidden_size);
  vocab_parallel_embedding_backward(vocab_, dout, ids, dtable, t, cfg_.hidden_size);
}

void Model::head_ce_forward(const float* h, const int32_t* labels, float* loss, float* lse, int64_t t) {
  const float* head = param("lm_head.weight");
  if (!opt_.tp.on())
    return be().head_cross_entropy_forward(h, head, head_bf16(), labels, loss, lse, t, cfg_.hidden_size,
                                           cfg_.vocab_size, opt_.precision);
  vocab_parallel_head_ce_forward(be(), opt_.tp, vocab_, h, head, labels, loss, lse, t, cfg_.hidden_size,
                                 opt_.precision, vp_scratch_);
}

void Model::head_ce_backward(const float* h, const int32_t* labels, const float* lse, float scale, float* dh,
                             int64_t t) {
  const float* head = param("lm_head.weight");
  float* dhead = grad("lm_head.weight");
  if (!opt_.tp.on())
    return be().head_cross_entropy_backward(h, head, head_bf16(), labels, lse, scale, nullptr, dh, dhead, t,
                                            cfg_.hidden_size, cfg_.vocab_size, opt_.precision);
  // With SP, h is the gathered head input and dh this rank's positions: the partial whole-sequence gradient is
  // reduce-scattered (the backward of the gather).
  float* dh_all = opt_.tp.sp() ? grow(be(), full_TD_, t * cfg_.hidden_size) : dh;
  vocab_parallel_head_ce_backward(be(), opt_.tp, vocab_, h, head, labels, lse, scale, dh_all, dhead, t,
                                  cfg_.hidden_size, opt_.precision, vp_scratch_);
  if (opt_.tp.sp()) opt_.tp.sp_reduce_scatter(dh_all, dh, B_, S_ / opt_.tp.size, cfg_.hidden_size);
}

const float* Model::gather_for_head(const DeviceArray<float>& h_local, DeviceArray<float>& h_full) {
  if (!opt_.tp.sp()) return h_local.data();
  const int64_t T = B_ * S_, D = cfg_.hidden_size;
  opt_.tp.sp_all_gather(h_local.data(), grow(be(), h_full, T * D), B_, S_ / opt_.tp.size, D);
  return h_full.data();
}

HeadLossResult Model::loss_sum(const float* loss_T, const int32_t* host_labels_T, int64_t t, int64_t* slot) {
  HeadLossResult r;
  for (int64_t i = 0; i < t; ++i) r.n_valid += host_labels_T[i] != kIgnoreLabel;
  if (deferred_slots_ > 0) {
    DSV3_CHECK(deferred_used_ < deferred_slots_, "model: more deferred losses (", deferred_used_ + 1,
               ") than slots (", deferred_slots_, ") before resolve_losses");
    *slot = deferred_used_++;
    be().sum(loss_T, t, deferred_.data() + *slot, false);
    r.loss_sum = std::numeric_limits<double>::quiet_NaN();
    return r;
  }
  be().sum(loss_T, t, loss_sum_.as<double>(), false);
  be().copy_to_host(&r.loss_sum, loss_sum_.data(), sizeof(double));
  return r;
}

void Model::defer_losses(int64_t slots) {
  DSV3_CHECK(deferred_used_ == 0, "model: defer_losses with ", deferred_used_, " losses not yet resolved");
  deferred_slots_ = slots;
  if (slots > 0) grow(be(), deferred_, slots);  // sized once: a step allocates nothing
}

void Model::resolve_losses(std::vector<ForwardStats>& stats) {
  if (deferred_used_ == 0) return;
  std::vector<double> v(static_cast<size_t>(deferred_used_));
  be().copy_to_host(v.data(), deferred_.data(), v.size() * sizeof(double));  // the step's one loss read
  for (ForwardStats& st : stats) {
    if (st.lm_slot >= 0) st.lm_loss_sum = v[static_cast<size_t>(st.lm_slot)], st.lm_slot = -1;
    for (size_t k = 0; k < st.mtp_slots.size(); ++k)
      if (st.mtp_slots[k] >= 0) st.mtp_loss_sum[k] = v[static_cast<size_t>(st.mtp_slots[k])];
    st.mtp_slots.clear();
  }
  deferred_used_ = 0;
}

void Model::logits_to_host(const float* h, int64_t t, float* out) {
  DSV3_CHECK(!opt_.tp.on(), "model: the full logits are not gathered under tensor parallelism");
  const int64_t D = cfg_.hidden_size, V = cfg_.vocab_size;
  const int64_t rows = std::max<int64_t>(1, (int64_t{64} << 20) / (V * 4));  // ~64 MiB of logits at a time
  float* chunk = grow(be(), logits_scratch_, std::min(rows, t) * V);
  for (int64_t r0 = 0; r0 < t; r0 += rows) {
    const int64_t n = std::min(rows, t - r0);
    linear_forward(be(), h + r0 * D, param("lm_head.weight"), chunk, n, D, V, opt_.precision, scratch_.lin);
    be().copy_to_host(out + r0 * V, chunk, n * V * sizeof(float));
  }
}

void Model::collect_moe_stats(const BlockDims& d, const BlockActs& a, ForwardStats& st) {
  if (!d.is_moe) return;
  st.moe_layers++;
  st.aux_loss_sum += a.moe.router.seq_aux_loss;
  st.tokens_per_expert.push_back(a.moe.router.tokens_per_expert_E);
  st.layer_aux_loss.push_back(a.moe.router.seq_aux_loss);
  const auto& routed = a.moe.router.routed_per_expert_E;
  st.routed_pairs.push_back(std::accumulate(routed.begin(), routed.end(), int64_t{0}));
  st.kept_pairs.push_back(a.moe.router.kept_pairs);
}

void Model::run_block(int64_t i, const float* x, float* out, BlockActs& acts, bool training) {
  block_forward(be(), dims_[i], block_params(i), x, B_, S_, training, out, acts, scratch_, opt_.precision);
}

ForwardStats Model::forward(const int32_t* ids, const int32_t* labels, int64_t B, int64_t S, bool training,
                            float* logits_out, const float* stage_input) {
  DSV3_CHECK(B > 0 && S > 0, "forward: empty batch");
  DSV3_CHECK(opt_.stage.pre_process || stage_input,
             "forward: a pipeline stage after the first needs its input");
  DSV3_PROFILE("fwd.other");
  DSV3_CHECK(!opt_.tp.sp() || S % opt_.tp.size == 0, "sequence parallelism: the sequence length ", S,
             " must be divisible by the tensor model parallel size ", opt_.tp.size,
             " (rule: seq_length % TP == 0; each TP rank holds S/TP positions of every sequence)");
  // T tokens in the micro-batch; Tl of them on this rank outside the TP regions (T/TP with SP).
  const int64_t T = B * S, Tl = opt_.tp.local_tokens(T), D = cfg_.hidden_size, L = cfg_.num_hidden_layers;
  const int64_t first = opt_.stage.first_layer, end = opt_.stage.end(L);
  B_ = B, S_ = S, training_ = training;
  // The kernels read ids and labels in the backend's memory; the host keeps the labels to count valid tokens.
  grow(be(), ids_, T), grow(be(), labels_, T);
  ids_.copy_from_host(ids, T), labels_.copy_from_host(labels, T);
  labels_host_.assign(labels, labels + T);
  if (opt_.precision == Precision::kBF16 && bf16_stale_) {
    DSV3_PROFILE("fwd.bf16_weights");
    bf16_weights_.refresh();
    expert_bf16_.resize(dims_.size());
    for (size_t i = 0; i < dims_.size(); ++i)
      if (dims_[i].is_moe && store_.contains(layer_prefix(static_cast<int64_t>(i)) + "mlp.gate.weight"))
        refresh_expert_bf16(be(), dims_[i].moe, block_params(static_cast<int64_t>(i)).moe, expert_bf16_[i]);
    bf16_stale_ = false;
  }
  ForwardStats st;

  resid_.resize(L + 1);
  for (int64_t i = first; i <= end; ++i) grow(be(), resid_[i], Tl * D);
  if (opt_.stage.pre_process) {
    DSV3_PROFILE("fwd.embedding");
    embed(ids_.data(), resid_[0].data(), T);
  } else {
    be().copy_to_device(resid_[first].data(), stage_input, Tl * D * sizeof(float));
  }
  for (int64_t i = first; i < end; ++i) {
    BlockActs& a = acts_[opt_.recompute ? 0 : i];
    run_block(i, resid_[i].data(), resid_[i + 1].data(), a, training);
    collect_moe_stats(dims_[i], a, st);
  }
  if (!opt_.stage.post_process) return st;
  grow(be(), hf_TD_, Tl * D), grow(be(), rstd_f_T_, Tl), grow(be(), loss_T_, T), grow(be(), lse_T_, T);
  DSV3_PROFILE_BEGIN(head, "fwd.head_ce");
  be().rmsnorm_forward(resid_[L].data(), D, param("model.norm.weight"), hf_TD_.data(), D, rstd_f_T_.data(),
                       Tl, D, static_cast<float>(cfg_.rms_norm_eps));
  const float* head_in = gather_for_head(hf_TD_, hf_full_TD_);
  head_ce_forward(head_in, labels_.data(), loss_T_.data(), lse_T_.data(), T);
  const HeadLossResult r = loss_sum(loss_T_.data(), labels, T, &st.lm_slot);
  st.lm_loss_sum = r.loss_sum, st.lm_tokens = r.n_valid;
  if (logits_out) logits_to_host(head_in, T, logits_out);
  DSV3_PROFILE_END(head);

  const float* h_prev = hf_TD_.data();
  mtp_forward(ids, labels, h_prev, training, st);
  return st;
}

void Model::swap_activations(Activations& a) {
  if (a.acts.size() != acts_.size()) a.acts.resize(acts_.size());  // a fresh set
  std::swap(a.B, B_), std::swap(a.S, S_), std::swap(a.training, training_);
  std::swap(a.ids, ids_), std::swap(a.labels, labels_), a.labels_host.swap(labels_host_);
  a.resid.swap(resid_), a.acts.swap(acts_);
  std::swap(a.hf_TD, hf_TD_), std::swap(a.rstd_f_T, rstd_f_T_), std::swap(a.loss_T, loss_T_),
      std::swap(a.lse_T, lse_T_), std::swap(a.hf_full_TD, hf_full_TD_);
}

const float* Model::stage_output() const {
  return resid_.at(opt_.stage.end(cfg_.num_hidden_layers)).data();
}

const float* Model::stage_input_grad() const {
  return dB_TD_.data();
}

void Model::backward(float lm_scale, float aux_scale, const std::vector<float>& mtp_scales,
                     const float* doutput) {
  const int64_t T = B_ * S_, Tl = opt_.tp.local_tokens(T), D = cfg_.hidden_size, L = cfg_.num_hidden_layers;
  DSV3_CHECK(T > 0, "backward without forward");
  DSV3_CHECK(opt_.stage.post_process || doutput,
             "backward: a pipeline stage before the last needs its output's "
             "gradient");
  DSV3_PROFILE("bwd.other");
  const Precision prec = opt_.precision;
  const int64_t first = opt_.stage.first_layer, end = opt_.stage.end(L);
  grow(be(), dA_TD_, Tl * D), grow(be(), dB_TD_, Tl * D), grow(be(), dhf_TD_, Tl * D);
  if (opt_.stage.post_process)
    head_backward(lm_scale, aux_scale, mtp_scales);
  else
    be().copy_to_device(dB_TD_.data(), doutput, Tl * D * sizeof(float));

  // Layers in reverse; dB holds d(layer output), dA receives d(layer input).
  for (int64_t i = end - 1; i >= first; --i) {
    BlockActs& a = acts_[opt_.recompute ? 0 : i];
    if (opt_.recompute) run_block(i, resid_[i].data(), dA_TD_.data(), a, training_);  // dA is free here
    BlockGrads g = block_grads(i);
    block_backward(be(), dims_[i], block_params(i), a, dB_TD_.data(), aux_scale, dA_TD_.data(), g, scratch_,
                   prec);
    std::swap(dA_TD_, dB_TD_);
  }
  if (opt_.stage.pre_process) {
    DSV3_PROFILE("bwd.embedding");
    embed_backward(dB_TD_.data(), ids_.data(), T);
  }
}

// The last stage's part of the backward: MTP depths, the head and the final norm; leaves d(final hidden) in dB.
void Model::head_backward(float lm_scale, float aux_scale, const std::vector<float>& mtp_scales) {
  const int64_t T = B_ * S_, Tl = opt_.tp.local_tokens(T), D = cfg_.hidden_size, L = cfg_.num_hidden_layers;
  mtp_backward(aux_scale, mtp_scales);

  // Main head and final norm.
  DSV3_PROFILE_BEGIN(head, "bwd.head_ce");
  head_ce_backward(opt_.tp.sp() ? hf_full_TD_.data() : hf_TD_.data(), labels_.data(), lse_T_.data(), lm_scale,
                   dA_TD_.data(), T);
  if (!depths_.empty()) be().add(dA_TD_.data(), dA_TD_.data(), dhf_TD_.data(), Tl * D);
  be().rmsnorm_backward(dA_TD_.data(), D, resid_[L].data(), D, param("model.norm.weight"), rstd_f_T_.data(),
                        dB_TD_.data(), D, grad("model.norm.weight"), Tl, D, 0.f);
  DSV3_PROFILE_END(head);
}

}  // namespace dsv3
