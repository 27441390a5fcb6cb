// transformers against dsv3 on a dsv3 checkpoint: tests/reference/ckpt_load_hf.py loads the iteration
// directory as DeepseekV3ForCausalLM and runs a fixed batch; dsv3 runs the same batch on the weights it
// saved; logits and loss must agree. The numbers, not parameter names, are compared: transformers 5 renames
// and fuses the experts on load, 4.57 does not, and either way what a user needs is that the model
// transformers builds computes ours.
#pragma once
#include <cmath>
#include <cstdio>

#include "model/model.h"
#include "model/safetensors.h"
#include "python_peer.h"
#include "train_util.h"

namespace dsv3::testing {

// Both sides are fp32 and differ only in summation order; the same bound as ModelHf.Fp32MatchesTransformers
// (tests/golden/hf_tiny), applied to max |Δlogit| / max |logit| and to the relative loss difference. Measured
// with transformers 4.57.6 and 5.25.0: logits 2e-7 to 3e-7, loss 2e-8 to 6e-8. Weights in the wrong place show
// far above it: on CheckpointHf's checkpoint, two experts' down_proj swapped move the logits by 9e-3, zeroed
// expert biases by 2e-2 (the loss moves by only 2e-5, hence the logits bound).
inline constexpr double kHfTol = 1e-5;

// Runs the comparison with EXPECTs. Returns false, with the reason in *skipped, when the Python peer cannot
// run here (no torch/transformers) and DSV3_REQUIRE_PYTHON_PEERS is not set; then nothing was checked.
inline bool expect_transformers_computes_dsv3(Model& model, const std::filesystem::path& iter_dir,
                                              const std::filesystem::path& scratch, std::string* skipped) {
  // Two sequences of 16 tokens spread over the vocabulary, so that routing reaches most experts.
  const int64_t B = 2, S = 16, V = model.config().vocab_size;
  std::vector<int64_t> ids(B * S);
  for (int64_t i = 0; i < B * S; ++i) ids[i] = (37 * i + 11) % V;
  const auto inputs = scratch / "hf_inputs.safetensors", outputs = scratch / "hf_outputs.safetensors";
  {
    SafetensorsWriter w;
    w.add("input_ids", {B, S}, ids.data());
    w.write(inputs.string());
  }
  const auto script = source_dir() / "tests/reference/ckpt_load_hf.py";
  const auto hf = run_shell(python_interpreter() + " " + script.string() + " " + iter_dir.string() + " " +
                                inputs.string() + " " + outputs.string(),
                            scratch);
  if (python_peer_unavailable(hf.rc) && !python_peers_required()) {
    *skipped = python_interpreter() + " cannot import torch, transformers and safetensors; " + hf.out;
    return false;
  }
  EXPECT_EQ(hf.rc, 0) << hf.out;
  if (hf.rc != 0) return true;

  // dsv3's forward on the same batch; labels in dsv3's next-token form (transformers shifts internally).
  std::vector<int32_t> ids32(ids.begin(), ids.end()), labels(B * S, -100);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t s = 0; s + 1 < S; ++s) labels[b * S + s] = ids32[b * S + s + 1];
  std::vector<float> logits(B * S * V);
  const auto st = model.forward(ids32.data(), labels.data(), B, S, /*training=*/false, logits.data());
  const double loss = st.lm_loss_sum / st.lm_tokens;

  SafetensorsReader out(outputs.string());
  const auto hf_logits = out.read_f32("logits");
  const double hf_loss = out.read_f32("loss")[0];
  EXPECT_EQ(hf_logits.size(), logits.size());
  if (hf_logits.size() != logits.size()) return true;
  double diff = 0, ref = 0;
  for (size_t i = 0; i < logits.size(); ++i) {
    diff = std::max(diff, std::fabs(double(hf_logits[i]) - logits[i]));
    ref = std::max(ref, std::fabs(double(logits[i])));
  }
  const double logits_rel = diff / ref, loss_rel = std::fabs(hf_loss - loss) / std::fabs(loss);
  EXPECT_LE(logits_rel, kHfTol) << hf.out;
  EXPECT_LE(loss_rel, kHfTol) << "transformers " << hf_loss << ", dsv3 " << loss << "\n" << hf.out;
  std::printf("%s[ hf      ] loss transformers %.7f, dsv3 %.7f (rel diff %.2e); logits max rel diff %.2e\n",
              hf.out.c_str(), hf_loss, loss, loss_rel, logits_rel);
  return true;
}

}  // namespace dsv3::testing
