// One training iteration (Megatron's train_step): num_micro = GBS / (mbs · DP) micro-batches on each
// data-parallel rank (its slice of the global sample order, spec §4.8), each forward + backward with the loss
// scaled as Megatron scales it (Σ(loss·mask)/Σmask / num_micro, aux and MTP gradients / num_micro), then the
// data-parallel gradient reduction (parallel/data_parallel.h: all-reduce, so every rank holds the global
// batch's gradient; or, with --use-distributed-optimizer, reduce-scatter to shards:
// parallel/distributed_optimizer.h), the loss sums and expert counts all-reduced, NaN checks, the global
// grad-norm (before clipping) and clipping, AdamW at the scheduler's current lr (replicated state, or sharded
// and then all-gathered), the expert-bias update from the global expert counts, and the scheduler stepped by
// GBS samples. Under expert parallelism each rank holds and updates only its experts (model/param_store.h,
// moe/ep_dispatcher.h).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"
#include "moe/ep_dispatcher.h"
#include "optim/expert_bias.h"
#include "optim/grad_clip.h"
#include "train/trainer_impl.h"

namespace dsv3::train_detail {

void IterStats::add(const ForwardStats& st) {
  lm_loss_sum += st.lm_loss_sum, lm_tokens += st.lm_tokens, aux_sum += st.aux_loss_sum;
  moe_layers = st.moe_layers;
  mtp_sum.resize(st.mtp_loss_sum.size()), mtp_tokens.resize(st.mtp_tokens.size());
  for (size_t k = 0; k < st.mtp_loss_sum.size(); ++k)
    mtp_sum[k] += st.mtp_loss_sum[k], mtp_tokens[k] += st.mtp_tokens[k];
  counts.resize(st.tokens_per_expert.size());
  for (size_t l = 0; l < st.tokens_per_expert.size(); ++l) {
    counts[l].resize(st.tokens_per_expert[l].size());
    for (size_t e = 0; e < counts[l].size(); ++e) counts[l][e] += st.tokens_per_expert[l][e];
  }
  const size_t layers = st.layer_aux_loss.size();
  layer_aux.resize(layers), routed.resize(layers), kept.resize(layers);
  for (size_t l = 0; l < layers; ++l)
    layer_aux[l] += st.layer_aux_loss[l], routed[l] += st.routed_pairs[l], kept[l] += st.kept_pairs[l];
}

void Timers::add(const std::string& name, double s) {
  for (auto& [k, v] : t)
    if (k == name) {
      v += s;
      return;
    }
  t.emplace_back(name, s);
}

void Trainer::fill_batch(const SampleDataset& ds, int64_t first, int64_t count) {
  const int64_t S = c_.seq_length;
  ids_.resize(count * S), labels_.resize(count * S);
  for (int64_t b = 0; b < count; ++b) {
    const auto x = ds.sample(first + b);
    DSV3_CHECK(static_cast<int64_t>(x.size()) == S + 1, "sample ", first + b, " has ", x.size(), " tokens");
    for (int64_t s = 0; s < S; ++s) {
      ids_[b * S + s] = static_cast<int32_t>(x[s]);
      labels_[b * S + s] = static_cast<int32_t>(x[s + 1]);
    }
  }
}

// One micro-batch's backward with Megatron's loss scaling: lm loss 1/(tokens·num_micro), aux losses
// 1/num_micro, MTP depth k mtp_loss_scaling_factor / D / tokens_k / num_micro.
void Trainer::backward_micro(int64_t m, int64_t lm_tokens, const std::vector<int64_t>& mtp_tokens,
                             const float* output_grad) {
  const int64_t depths = static_cast<int64_t>(mtp_tokens.size()), num_micro = c_.num_micro_batches;
  mtp_scales_.resize(depths);
  for (int64_t k = 0; k < depths; ++k)
    mtp_scales_[k] = mtp_tokens[k]
                         ? static_cast<float>(c_.mtp_loss_scaling_factor / depths / mtp_tokens[k] / num_micro)
                         : 0.f;
  const float lm_scale = lm_tokens ? 1.f / static_cast<float>(lm_tokens * num_micro) : 0.f;
  model_->backward(lm_scale, 1.f / static_cast<float>(num_micro), mtp_scales_, output_grad);
  if (nonfinite_.scan && nonfinite_.micro < 0)
    if (std::string p = first_nonfinite_grad(); !p.empty())
      nonfinite_.micro = m, nonfinite_.param = std::move(p);
}

// From the output back: the order the backward reaches the parameters, so that a NaN born in the backward is named
// where it starts (everything before it in the model then turns NaN too).
std::string Trainer::first_nonfinite_grad() {
  std::vector<float> staged;
  const float* g = model_->grads().data();
  if (model_->backend().kind() != DeviceKind::kCpu) staged = model_->grads_to_host(), g = staged.data();
  const auto& store = model_->store();
  const auto& params = model_->table().params();
  for (auto p = params.rbegin(); p != params.rend(); ++p) {
    if (!p->tied_to.empty() || !store.contains(p->name)) continue;
    const float* x = g + store.offset(p->name);
    for (int64_t i = 0; i < p->numel; ++i)
      if (!std::isfinite(x[i])) return p->name;
  }
  return "";
}

std::string Trainer::nonfinite_culprit(int64_t micro, const std::string& param) {
  // One record per rank: int64 micro-batch, then the gradient's and a non-finite weight's names (HF names are far
  // shorter than their fields).
  constexpr int64_t kRec = 8 + 2 * 124;
  const std::string weight = micro >= 0 ? first_nonfinite_param() : "";
  std::vector<uint8_t> mine(kRec, 0), all(kRec * world_.size());
  std::memcpy(mine.data(), &micro, sizeof micro);
  std::memcpy(mine.data() + 8, param.data(), std::min<size_t>(param.size(), 123));
  std::memcpy(mine.data() + 8 + 124, weight.data(), std::min<size_t>(weight.size(), 123));
  world_.allgather(mine.data(), kRec, all.data());
  for (int r = 0; r < world_.size(); ++r) {
    const uint8_t* rec = all.data() + r * kRec;
    int64_t m = -1;
    std::memcpy(&m, rec, sizeof m);
    if (m < 0) continue;
    const std::string g(reinterpret_cast<const char*>(rec + 8)),
        w(reinterpret_cast<const char*>(rec + 8 + 124));
    return "rank " + std::to_string(r) + ", micro-batch " + std::to_string(m) + " of " +
           std::to_string(c_.num_micro_batches) +
           "; first parameter with a non-finite gradient (from the output " +
           "back): " + (g.empty() ? "none" : g) + (w.empty() ? "" : "; non-finite weight: " + w);
  }
  return "";
}

std::string Trainer::replay_for_nonfinite() {
  nonfinite_ = NonFinite{};
  nonfinite_.scan = true;
  micro_batches();
  nonfinite_.scan = false;
  return nonfinite_culprit(nonfinite_.micro, nonfinite_.param);
}

// One iteration's micro-batches through the pipeline (parallel/pipeline.h: 1F1B). Each micro-batch's forward
// state waits in a slot until its backward; the loss scaling is the single-stage loop's. Stage s holds at most
// PP - s micro-batches at once (its warm-up forwards and one more), and in 1F1B micro-batch m's forward comes after
// the backward of m - (PP - s): a ring of that many slots, so later stages keep fewer activation sets.
void Trainer::pipeline_step(std::vector<ForwardStats>& stats) {
  const int64_t mbs = c_.micro_batch_size;
  const size_t slots = static_cast<size_t>(std::min<int64_t>(pg_.pp - pg_.pp_rank, c_.num_micro_batches));
  in_flight_.resize(slots);
  PipelineSteps steps;
  steps.forward = [&](int64_t m, const float* input) -> const float* {
    fill_batch(*train_ds_, prog_.consumed_train_samples + m * mbs * pg_.dp + pg_.dp_rank * mbs, mbs);
    InFlight& slot = in_flight_[static_cast<size_t>(m) % slots];
    current_micro_ = m;
    model_->swap_activations(slot.acts);
    ForwardStats& st = stats[static_cast<size_t>(m)];
    st = model_->forward(ids_.data(), labels_.data(), mbs, c_.seq_length, true, nullptr, input);
    const float* out = model_->options().stage.post_process ? nullptr : model_->stage_output();
    model_->swap_activations(slot.acts);  // `out` stays valid: the slot now owns that buffer
    slot.lm_tokens = st.lm_tokens;
    slot.mtp_tokens = st.mtp_tokens;
    return out;
  };
  steps.backward = [&](int64_t m, const float* output_grad) -> const float* {
    InFlight& slot = in_flight_[static_cast<size_t>(m) % slots];
    current_micro_ = m;
    model_->swap_activations(slot.acts);
    backward_micro(m, slot.lm_tokens, slot.mtp_tokens, output_grad);
    model_->swap_activations(slot.acts);
    return model_->stage_input_grad();
  };
  // With sequence parallelism a stage's output is its TP rank's shard of the sequence (Model::stage_output).
  const int64_t tokens = model_->options().tp.local_tokens(mbs * c_.seq_length);
  run_1f1b((*comms_)[Group::kPp], c_.num_micro_batches, tokens * c_.model.hidden_size, steps,
           pipeline_buffers_);
}

// An error inside the step names the rank and iteration (unless it already does), the micro-batch it was in and a
// weight that is not finite if one is (a NaN the model's own checks met first, as the router's), and says the
// checkpoint is intact.
IterStats Trainer::train_step() {
  try {
    return micro_batches();
  } catch (const Error& e) {
    const std::string what = e.what();
    if (what.rfind("Rank ", 0) == 0) throw;  // already names rank and iteration
    std::string where;
    if (current_micro_ >= 0)
      where = "; in micro-batch " + std::to_string(current_micro_) + " of " +
              std::to_string(c_.num_micro_batches);
    if (const std::string w = first_nonfinite_param(); !w.empty()) where += "; non-finite weight: " + w;
    fail("Rank ", pg_.rank, ", iteration ", prog_.iteration + 1, ": ", what, where,
         "; the last checkpoint is left as it was");
  }
}

// Forward and backward over this rank's micro-batches, then the gradients and statistics reduced over the
// ranks.
IterStats Trainer::micro_batches() {
  IterStats it;
  model_->zero_grads();
  const int64_t mbs = c_.micro_batch_size;
  const auto t0 = Clock::now();
  ep_dispatch_seconds_reset();
  // The losses stay in backend memory until every micro-batch has run: one read per step (Model::defer_losses).
  std::vector<ForwardStats> stats(static_cast<size_t>(c_.num_micro_batches));
  model_->defer_losses(c_.num_micro_batches * (1 + c_.model.num_nextn_predict_layers));
  if (pg_.pp > 1) pipeline_step(stats);
  for (int64_t m = 0; m < c_.num_micro_batches && pg_.pp == 1; ++m) {
    // MegatronPretrainingSampler: this rank's slice of the chunk of mbs·DP samples.
    const int64_t first = prog_.consumed_train_samples + m * mbs * pg_.dp + pg_.dp_rank * mbs;
    current_micro_ = m;
    fill_batch(*train_ds_, first, mbs);
    ForwardStats& st = stats[static_cast<size_t>(m)];
    st = model_->forward(ids_.data(), labels_.data(), mbs, c_.seq_length, true);
    // No early exit on a NaN: under expert parallelism the other ranks wait for this one in the backward's
    // collectives. The loss is checked below, once it is read.
    backward_micro(m, st.lm_tokens, st.mtp_tokens, nullptr);
  }
  current_micro_ = -1;
  model_->resolve_losses(stats);
  model_->defer_losses(0);
  bool nan_here = false;
  double nan_value = 0;
  int64_t nan_micro = -1;
  for (size_t m = 0; m < stats.size(); ++m) {
    if (c_.check_nan && !nan_here && !std::isfinite(stats[m].lm_loss_sum))
      nan_here = true, nan_value = stats[m].lm_loss_sum, nan_micro = static_cast<int64_t>(m);
    it.add(stats[m]);
  }
  const double fb = seconds_since(t0);
  timers_.add("forward-backward", fb);
  if (pg_.ep >
      1) {  // forward-backward split into the MoE token exchange (with its waits) and the rest, per rank
    timers_.add("moe-dispatch-combine", ep_dispatch_seconds());
    timers_.add("forward-backward-compute", fb - ep_dispatch_seconds());
  }
  if (c_.check_nan) {
    int64_t worst = nan_here ? pg_.world - pg_.rank : 0;  // the max names the lowest rank that saw NaN
    world_.allreduce(&worst, 1, ReduceOp::kMax);
    if (worst) {
      // Every rank is here: name where it happened (the lowest rank's first non-finite micro-batch loss and the
      // first parameter whose accumulated gradient is not finite there).
      const std::string where = nonfinite_culprit(nan_micro, nan_here ? first_nonfinite_grad() : "");
      const std::string tail = "; " + where + "; the last checkpoint is left as it was";
      if (nan_here)
        fail("Rank ", pg_.rank, ", iteration ", prog_.iteration + 1, ": Unexpected result ", nan_value,
             " (message='found NaN in local forward loss calculation')", tail);
      fail("Rank ", pg_.rank, ", iteration ", prog_.iteration + 1, ": stopping: rank ", pg_.world - worst,
           " found NaN in its local forward loss", tail);
    }
  }
  const auto t1 = Clock::now();
  if (embedding_group_ && embedding_group_->size() > 1)
    embedding_group_->allreduce(model_->grad("model.embed_tokens.weight"),
                                model_->store().numel(model_->table().at("model.embed_tokens.weight")));
  tp_grad_sum();
  if (dopt_)
    dopt_->reduce_scatter(model_->grads().data());
  else
    ddp_->reduce(model_->grads().data());
  reduce_stats(it);
  timers_.add("all-grads-sync", seconds_since(t1));
  return it;
}

// Tensor parallelism: the replicated parameters fed by partial gradients (MLA's latent path,
// ParamInfo::tp_grad_sum) get their gradient summed over TP, once per step (the sum is linear in the
// micro-batches), before the data-parallel reduction. With sequence parallelism every replicated trainable
// parameter is fed by partial gradients: the norms, the router and MTP's eh_proj see only this rank's positions
// (Megatron all-reduces the sequence-parallel parameters' gradients over TP likewise). Routed experts are not
// summed here: split over TP (expert tensor parallelism) each rank's slice saw the whole TP group's tokens, and
// whole (ETP 1) they are reduced over expert-DP, which then holds the TP ranks.
void Trainer::tp_grad_sum() {
  if (pg_.tp == 1) return;
  Comm& tp = (*comms_)[Group::kTp];
  const auto& store = model_->store();
  const bool sp = model_->options().tp.sp();
  // Tensors are packed into buckets of up to kBucket floats and reduced together: a few collectives per step
  // rather than one per tensor (with SP ~35 tensors per MoE layer); larger ones in place. The sum per element is
  // the same either way. Measured on the proxy model, TP2+SP, 2 cores under load ~4.5: the sync took 171 ms a
  // step packed, 1205 ms with the tensors over 64K floats (experts) reduced one by one — on an oversubscribed
  // machine each collective waits for its peer to be scheduled, so their count matters more than two copies.
  constexpr int64_t kBucket = int64_t{4} << 20;  // 16 MiB of staging at most
  std::vector<std::pair<float*, int64_t>> parts;
  int64_t n = 0;
  auto flush = [&] {
    tp_grad_staging_.resize(static_cast<size_t>(n));
    float* at = tp_grad_staging_.data();
    for (const auto& [g, k] : parts) at = std::copy(g, g + k, at);
    tp.allreduce(tp_grad_staging_.data(), n);
    at = tp_grad_staging_.data();
    for (const auto& [g, k] : parts) std::copy(at, at + k, g), at += k;
    parts.clear(), n = 0;
  };
  for (const auto& p : model_->table().params()) {
    if (!(p.tp_grad_sum || (sp && p.trainable && !p.is_expert && p.tp_split == TpSplit::kReplicated)) ||
        !p.tied_to.empty() || !store.contains(p.name))
      continue;
    const int64_t k = store.numel(p);
    if (k >= kBucket) {
      tp.allreduce(model_->grad(p.name), k);
      continue;
    }
    if (n + k > kBucket) flush();
    parts.emplace_back(model_->grad(p.name), k), n += k;
  }
  if (n > 0) flush();
}

// The iteration's sums over the data-parallel ranks (losses and token counts over DP×CP; the router's expert
// counts over TP×DP×CP, as Megatron sums them for the bias update), so every rank logs and updates from the
// global batch.
void Trainer::reduce_stats(IterStats& s) {
  Comm& dp = (*comms_)[Group::kDpCp];
  if (dp.size() > 1) {
    std::vector<double> d{s.lm_loss_sum, s.aux_sum};
    d.insert(d.end(), s.mtp_sum.begin(), s.mtp_sum.end());
    dp.allreduce(d.data(), static_cast<int64_t>(d.size()), ReduceOp::kSum);
    s.lm_loss_sum = d[0], s.aux_sum = d[1];
    std::copy(d.begin() + 2, d.end(), s.mtp_sum.begin());
    std::vector<int64_t> n{s.lm_tokens};
    n.insert(n.end(), s.mtp_tokens.begin(), s.mtp_tokens.end());
    dp.allreduce(n.data(), static_cast<int64_t>(n.size()), ReduceOp::kSum);
    s.lm_tokens = n[0];
    std::copy(n.begin() + 1, n.end(), s.mtp_tokens.begin());
  }
  // Pipeline stages: the loss lives on the last stage, aux losses and MoE layer counts on every stage.
  if (Comm& pp = (*comms_)[Group::kPp]; pp.size() > 1) {
    const size_t depths = model_->options().mtp ? c_.model.num_nextn_predict_layers : 0;
    s.mtp_sum.resize(depths), s.mtp_tokens.resize(depths);  // only the last stage ran them
    std::vector<double> d{s.lm_loss_sum, s.aux_sum};
    d.insert(d.end(), s.mtp_sum.begin(), s.mtp_sum.end());
    pp.allreduce(d.data(), static_cast<int64_t>(d.size()), ReduceOp::kSum);
    s.lm_loss_sum = d[0], s.aux_sum = d[1];
    std::copy(d.begin() + 2, d.end(), s.mtp_sum.begin());
    std::vector<int64_t> n{s.lm_tokens, s.moe_layers};
    n.insert(n.end(), s.mtp_tokens.begin(), s.mtp_tokens.end());
    pp.allreduce(n.data(), static_cast<int64_t>(n.size()), ReduceOp::kSum);
    s.lm_tokens = n[0], s.moe_layers = n[1];
    std::copy(n.begin() + 2, n.end(), s.mtp_tokens.begin());
  }
  // Every TP rank routes the same tokens (with sequence parallelism too: the router decides on the whole
  // micro-batch, moe.h), so their counts are summed over DP only.
  Comm& cnt = (*comms_)[pg_.tp > 1 ? Group::kDpCp : Group::kTpDpCp];
  if (cnt.size() > 1 && !s.counts.empty()) {
    std::vector<int64_t> flat;
    for (const auto& c : s.counts) flat.insert(flat.end(), c.begin(), c.end());
    flat.insert(flat.end(), s.routed.begin(), s.routed.end());
    flat.insert(flat.end(), s.kept.begin(), s.kept.end());
    cnt.allreduce(flat.data(), static_cast<int64_t>(flat.size()), ReduceOp::kSum);
    size_t k = 0;
    for (auto& c : s.counts)
      for (auto& v : c) v = flat[k++];
    for (auto& v : s.routed) v = flat[k++];
    for (auto& v : s.kept) v = flat[k++];
  }
  if (dp.size() > 1 && !s.layer_aux.empty())
    dp.allreduce(s.layer_aux.data(), static_cast<int64_t>(s.layer_aux.size()), ReduceOp::kSum);
}

std::string Trainer::expert_bias_name(int64_t layer) {
  return "model.layers." + std::to_string(layer) + ".mlp.gate.e_score_correction_bias";
}

float* Trainer::expert_bias_on_host(int64_t layer, std::vector<float>& staged) {
  float* bias = model_->param(expert_bias_name(layer));
  if (model_->backend().kind() == DeviceKind::kCpu) return bias;
  staged.resize(static_cast<size_t>(c_.model.n_routed_experts));
  model_->backend().copy_to_host(staged.data(), bias, staged.size() * sizeof(float));
  return staged.data();
}

// The global L2 norm of the gradient. After the data-parallel reduce the dense gradients are the same on
// every rank of a stage and each EP rank holds its own experts' (identical across expert-DP): dense squares
// summed over the stages, expert squares over the stages and EP ranks.
double Trainer::grad_norm() {
  const auto& g = model_->grads();
  // The last stage's copy of a shared embedding is not counted (the first stage's is the same gradient).
  const auto& store = model_->store();
  const bool skip_embedding =
      !model_->options().stage.pre_process && store.contains("model.embed_tokens.weight");
  const int64_t skip0 = skip_embedding ? store.offset("model.embed_tokens.weight") : 0;
  const int64_t skip1 =
      skip_embedding ? skip0 + store.numel(model_->table().at("model.embed_tokens.weight")) : 0;
  if (dopt_) {  // each rank holds the reduced gradient of its shards only; together they cover every element
                // once
    double sq = 0;
    if (pg_.tp == 1) {
      sq = dopt_->shard_sum_of_squares(g.data(), skip0, skip1);
    } else {  // TP ranks other than 0 leave out what is replicated over TP (and the embedding copy, as above)
      std::vector<std::pair<int64_t, int64_t>> skip;
      if (skip1 > skip0) skip.emplace_back(skip0, skip1);
      for (const auto& p : model_->table().params())
        if (pg_.tp_rank != 0 && p.tied_to.empty() && store.contains(p.name) && !p.is_expert &&
            p.tp_split == TpSplit::kReplicated)
          skip.emplace_back(store.offset(p.name), store.offset(p.name) + store.numel(p));
      std::sort(skip.begin(), skip.end());
      sq = dopt_->shard_sum_of_squares(g.data(), skip);
    }
    world_.allreduce(&sq, 1, ReduceOp::kSum);
    return std::sqrt(sq);
  }
  if (bopt_) return bopt_->grad_norm(g.data());  // one process (train_config.cpp read_device)
  if (pg_.ep == 1 && pg_.pp == 1 && pg_.tp == 1) return l2_norm(g.data(), static_cast<int64_t>(g.size()));
  // Under TP a dense parameter split over TP counts on every TP rank (its block), a replicated one (the same
  // gradient on every TP rank) on TP rank 0 only. Routed experts count on every rank: their group (expert TP ×
  // EP × PP) holds each expert block once, the TP ranks only when the experts are split over them.
  double sq[2] = {0, 0};  // dense, expert
  for (const auto& p : model_->table().params())
    if (p.tied_to.empty() && p.trainable && store.contains(p.name) &&
        !(skip_embedding && store.offset(p.name) == skip0) &&
        (pg_.tp_rank == 0 || p.is_expert || p.tp_split != TpSplit::kReplicated))
      sq[p.is_expert] += sum_of_squares(g.data() + store.offset(p.name), store.numel(p));
  (*comms_)[Group::kTpPp].allreduce(&sq[0], 1, ReduceOp::kSum);     // each stage's dense parameters
  (*comms_)[Group::kEtpEpPp].allreduce(&sq[1], 1, ReduceOp::kSum);  // each (stage, EP rank)'s experts
  return std::sqrt(sq[0] + sq[1]);
}

// The update that ends the iteration: the global grad norm (the same on every rank, and so is the NaN check
// on it), clipping, AdamW at the scheduler's lr, the expert-bias update from the global expert counts, then
// the scheduler and the progress counters advance by one global batch. Returns the grad norm before clipping.
double Trainer::optimizer_step(const IterStats& st) {
  const auto t0 = Clock::now();
  auto& grads = model_->grads();
  const double norm = grad_norm();
  if (c_.check_nan && !std::isfinite(norm)) {
    const std::string where = replay_for_nonfinite();
    fail("Rank ", pg_.rank, ", iteration ", prog_.iteration + 1,
         ": found NaN/Inf in the gradient (grad norm ", norm,
         ") before the optimizer step; first non-finite gradient: ",
         where.empty() ? std::string("not reproduced by a replay of the micro-batches") : where,
         "; the last checkpoint is left as it was");
  }
  const double coeff = c_.clip_grad > 0 ? clip_coefficient(norm, c_.clip_grad) : 1.0;
  const double lr = sched_->lr(), wd = c_.weight_decay;
  float* params = model_->params().data();
  if (dopt_) {
    if (coeff < 1.0) dopt_->scale_shards(grads.data(), static_cast<float>(coeff));
    dopt_->step(params, grads.data(), lr, wd);
  } else if (bopt_) {
    if (coeff < 1.0) bopt_->scale(grads.data(), static_cast<float>(coeff));
    opt_->begin_step();
    bopt_->step(params, grads.data(), opt_->step(), lr, wd);
  } else {
    if (coeff < 1.0)
      scale_inplace(grads.data(), static_cast<int64_t>(grads.size()), static_cast<float>(coeff));
    opt_->begin_step();
    const auto& store = model_->store();
    for (const auto& p : model_->table().params()) {
      if (!p.tied_to.empty() || !p.trainable || !store.contains(p.name)) continue;  // other EP ranks' experts
      opt_->update(params, grads.data(), store.offset(p.name), store.numel(p), lr, p.weight_decay ? wd : 0.0);
    }
  }
  if (c_.expert_bias_update)
    for (size_t l = 0; l < st.counts.size() && l < moe_layer_ids_.size(); ++l) {
      // On a GPU: E floats down, updated on the host, and back up.
      std::vector<float> staged;
      float* bias = expert_bias_on_host(moe_layer_ids_[l], staged);
      update_expert_bias(bias, st.counts[l].data(), static_cast<int64_t>(st.counts[l].size()),
                         c_.expert_bias_rate);
      if (bias == staged.data())
        model_->backend().copy_to_device(model_->param(expert_bias_name(moe_layer_ids_[l])), bias,
                                         staged.size() * sizeof(float));
    }
  timers_.add("optimizer", seconds_since(t0));
  sched_->step(c_.global_batch_size);
  prog_.iteration++;
  prog_.consumed_train_samples += c_.global_batch_size;
  prog_.flops_so_far += flops_per_iteration_;
  return norm;
}

}  // namespace dsv3::train_detail
