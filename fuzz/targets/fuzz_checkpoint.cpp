// The checkpoint reader: latest_checkpointed_iteration.txt, state.json and optimizer.safetensors ->
// load_checkpoint (the tracker parse, the state file's structure and tensor records, the digest check and the
// optimizer file's tensors). A valid checkpoint of a one-layer model is saved once at start; each input then
// replaces those three files. Input: tracker, separator, state.json, separator, optimizer.safetensors.
// DSV3_FUZZ_WRITE_SEED=<file> writes the saved checkpoint as such an input (the seed in fuzz/corpus), with
// the optimizer file's digest record removed from state.json so that mutated optimizer files reach the
// safetensors reader (the loader skips the digest of a file without a record, as documented).
#include <cstdio>
#include <cstdlib>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "fuzz_common.h"
#include "model/config.h"
#include "model/param_store.h"
#include "model/param_table.h"
#include "train/checkpoint.h"

namespace {

// The smallest model with every kind of tensor (MLA with q LoRA, one MoE layer with a shared expert and
// the expert bias), so the seed stays a few KB.
constexpr const char* kConfig = R"({
  "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "vocab_size": 8,
  "hidden_size": 4, "intermediate_size": 4, "moe_intermediate_size": 2, "num_hidden_layers": 1,
  "first_k_dense_replace": 0, "moe_layer_freq": 1, "num_attention_heads": 1, "num_key_value_heads": 1,
  "n_routed_experts": 2, "num_experts_per_tok": 1, "n_group": 1, "topk_group": 1, "n_shared_experts": 1,
  "routed_scaling_factor": 1.0, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
  "q_lora_rank": 2, "kv_lora_rank": 2, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2, "v_head_dim": 2,
  "hidden_act": "silu", "rope_theta": 10000.0, "rope_scaling": null, "max_position_embeddings": 16,
  "rms_norm_eps": 1e-06, "initializer_range": 0.02, "num_nextn_predict_layers": 0, "attention_bias": false,
  "tie_word_embeddings": false, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32"})";

struct Fixture {
  dsv3::ModelConfig cfg = dsv3::ModelConfig::from_json_string(kConfig, "fuzz_checkpoint config");
  dsv3::ParamTable table{cfg};
  dsv3::ParamStore store{table};
  std::vector<float> params, m, v;
  std::string dir = (dsv3_fuzz::scratch_dir() / "ckpt").string();
  std::string iter_dir = dsv3::checkpoint_iter_dir(dir, 5);
  Fixture() : params(store.size()), m(store.size()), v(store.size()) {
    for (size_t i = 0; i < params.size(); ++i) {
      params[i] = 0.01f * static_cast<float>(i % 17);
      m[i] = 1e-3f * static_cast<float>(i % 5);
      v[i] = 1e-6f * static_cast<float>(i % 3);
    }
    dsv3::set_checkpoint_test_hooks({.at_stage = {}, .no_rename_exchange = false, .no_fsync = true});
    dsv3::TrainProgress p;
    p.iteration = 5;
    p.consumed_train_samples = 40;
    p.seed = 1234;
    dsv3::save_checkpoint(dir, p, {&table, &store, params.data(), m.data(), v.data()}, {{"lr", "0.001"}}, cfg,
                          {});
  }
};

Fixture& fixture() {
  static Fixture f;
  return f;
}

std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  Fixture& f = fixture();
  if (const char* seed = std::getenv("DSV3_FUZZ_WRITE_SEED")) {
    nlohmann::ordered_json st = nlohmann::ordered_json::parse(read_all(f.iter_dir + "/state.json"));
    st["files"].erase("optimizer.safetensors");
    std::string out = read_all(dsv3::checkpoint_tracker_path(f.dir));
    out += dsv3_fuzz::kPartSeparator;
    out += st.dump(1);
    out += dsv3_fuzz::kPartSeparator;
    out += read_all(f.iter_dir + "/optimizer.safetensors");
    dsv3_fuzz::write_file(seed, out);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Fixture& f = fixture();
  const auto parts = dsv3_fuzz::split_parts(data, size, 3);
  dsv3_fuzz::write_file(dsv3::checkpoint_tracker_path(f.dir), parts[0]);
  dsv3_fuzz::write_file(f.iter_dir + "/state.json", parts[1]);
  dsv3_fuzz::write_file(f.iter_dir + "/optimizer.safetensors", parts[2]);
  std::vector<float> params(f.params.size()), m(f.m.size()), v(f.v.size());
  try {
    std::map<std::string, std::string> args;
    std::string message;
    (void)dsv3::load_checkpoint(f.dir, {&f.table, &f.store, params.data(), m.data(), v.data()}, f.cfg, {},
                                &args, &message);
  } catch (const dsv3::Error&) {
  }
  return 0;
}
