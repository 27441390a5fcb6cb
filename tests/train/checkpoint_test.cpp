// Checkpoints: bit-exact round trip of weights, Adam moments and progress; Megatron's tracker and directory
// names; crash safety (a save killed at every step leaves a loadable checkpoint); clear errors for another
// model, a missing tracker and damaged files; and transformers loading the iteration directory (when it is
// installed).
#include "train/checkpoint.h"

#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>

#include "core/error.h"
#include "hf_interop.h"
#include "model/model.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using testing::slurp;

void spit(const fs::path& p, const std::string& s) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f << s;
}

ModelConfig tiny_config() {
  return ModelConfig::from_json_file(
      (testing::source_dir() / "examples/deepseek/configs/tiny.json").string());
}

// A model with its Adam moments, filled distinctly per `salt` (weights from init(seed), non-zero expert
// biases, moments random).
struct State {
  Model model;
  std::vector<float> m, v;
  explicit State(const ModelConfig& cfg, uint64_t salt = 1) : model(cfg, ModelOptions{}) {
    model.init(1234 + salt);
    std::mt19937 rng(static_cast<uint32_t>(salt));
    std::normal_distribution<float> nd;
    for (const auto& p : model.table().params())
      if (p.role == ParamRole::kExpertBias)
        for (int64_t i = 0; i < p.numel; ++i) model.param(p.name)[i] = 0.05f * nd(rng);
    m.resize(model.params().size());
    v.resize(model.params().size());
    for (auto& x : m) x = 1e-3f * nd(rng);
    for (auto& x : v) x = std::fabs(1e-6f * nd(rng));
  }
  CheckpointTensors tensors(bool optim = true) const {
    return {&model.table(), &model.store(), model_params(), optim ? m.data() : nullptr,
            optim ? v.data() : nullptr};
  }
  LoadTargets targets(bool optim = true) {
    return {&model.table(), &model.store(), model.params().data(), optim ? m.data() : nullptr,
            optim ? v.data() : nullptr};
  }
  const float* model_params() const { return const_cast<Model&>(model).params().data(); }
};

TrainProgress progress(int64_t it) {
  TrainProgress p;
  p.iteration = it;
  p.consumed_train_samples = it * 16 + 3;
  p.consumed_valid_samples = it * 2;
  p.skipped_train_samples = 1;
  p.optimizer_step = it - 1;
  p.scheduler_num_steps = it * 16;
  p.flops_so_far = 1.2345678901234567e15 * static_cast<double>(it) / 3.0;
  p.seed = 0xFEDCBA9876543210ull;
  return p;
}

const std::map<std::string, std::string> kArgs = {
    {"lr", "0.0003"}, {"micro_batch_size", "2"}, {"seed", "1234"}};

// Whether `a`'s weights (all) and moments (trainable, untied params) equal `b`'s bit for bit.
::testing::AssertionResult same_state(State& a, State& b) {
  for (const auto& p : a.model.table().params()) {
    const int64_t off = a.model.store().offset(p.name);
    if (std::memcmp(a.model.params().data() + off, b.model.params().data() + off, p.numel * 4) != 0)
      return ::testing::AssertionFailure() << "weights of " << p.name << " differ";
    if (!p.trainable) continue;
    if (std::memcmp(a.m.data() + off, b.m.data() + off, p.numel * 4) != 0)
      return ::testing::AssertionFailure() << "exp_avg of " << p.name << " differs";
    if (std::memcmp(a.v.data() + off, b.v.data() + off, p.numel * 4) != 0)
      return ::testing::AssertionFailure() << "exp_avg_sq of " << p.name << " differs";
  }
  return ::testing::AssertionSuccess();
}

bool st_is(const char* a, const char* b) {
  return std::strcmp(a, b) == 0;
}

std::vector<std::string> dir_entries(const fs::path& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

TEST(Checkpoint, RoundTripIsBitIdentical) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1);
  save_checkpoint(dir.string(), progress(42), a.tensors(), kArgs, cfg, {});

  EXPECT_EQ(slurp(dir / "latest_checkpointed_iteration.txt"), "42");  // Megatron writes str(iteration)
  EXPECT_EQ(dir_entries(dir),
            (std::vector<std::string>{"iter_0000042", "latest_checkpointed_iteration.txt"}));
  EXPECT_EQ(checkpoint_iter_dir(dir.string(), 42), (dir / "iter_0000042").string());
  EXPECT_EQ(
      dir_entries(dir / "iter_0000042"),
      (std::vector<std::string>{"config.json", "model.safetensors", "optimizer.safetensors", "state.json"}));

  State b(cfg, 2);
  ASSERT_FALSE(same_state(a, b));
  std::map<std::string, std::string> args;
  std::string msg;
  auto p = load_checkpoint(dir.string(), b.targets(), cfg, {}, &args, &msg);
  ASSERT_TRUE(p.has_value());
  EXPECT_EQ(*p, progress(42));
  EXPECT_EQ(args, kArgs);
  EXPECT_TRUE(same_state(a, b));
  EXPECT_EQ(msg, "");  // the caller prints Megatron's success line
}

// Megatron pads the vocabulary to a multiple of --make-vocab-size-divisible-by × TP, so a checkpoint can move to a
// layout whose padded size differs. Knowing the tokenizer's size, the load keeps every row both sizes have, leaves
// added rows as this run's model made them (and their moments zero), drops only padding rows, and says so; not
// knowing it, it refuses as before.
TEST(Checkpoint, VocabularyIsRepaddedOnLoad) {
  const ModelConfig small = tiny_config();  // vocab 128
  ModelConfig big = small;
  big.vocab_size = 192;
  const int64_t tokens = 100, D = small.hidden_size;
  const auto dir = testing::scratch_dir();
  State saved(small, 3);
  save_checkpoint(dir.string(), progress(5), saved.tensors(), kArgs, small, {});

  State grown(big, 4);
  const State fresh(big, 4);
  std::fill(grown.m.begin(), grown.m.end(), 0.f), std::fill(grown.v.begin(), grown.v.end(), 0.f);
  LoadTargets t = grown.targets();
  t.real_vocab = tokens;
  std::string msg;
  ASSERT_TRUE(load_checkpoint(dir.string(), t, big, {}, nullptr, &msg));
  EXPECT_NE(msg.find("re-padded from 128 to 192 rows"), std::string::npos) << msg;
  for (const char* name : {"model.embed_tokens.weight", "lm_head.weight"}) {
    SCOPED_TRACE(name);
    const int64_t off_big = grown.model.store().offset(name), off_small = saved.model.store().offset(name);
    const float* got = grown.model.params().data() + off_big;
    EXPECT_EQ(std::memcmp(got, saved.model_params() + off_small, 128 * D * 4), 0) << "the saved rows";
    EXPECT_EQ(std::memcmp(got + 128 * D, fresh.model_params() + off_big + 128 * D, 64 * D * 4), 0)
        << "the added rows are this run's own";
    EXPECT_EQ(std::memcmp(grown.m.data() + off_big, saved.m.data() + off_small, 128 * D * 4), 0);
    for (int64_t i = 128 * D; i < 192 * D; ++i) ASSERT_EQ(grown.m[off_big + i], 0.f);
  }
  // Every other tensor loads as usual.
  const int64_t o = grown.model.store().offset("model.norm.weight");
  EXPECT_EQ(std::memcmp(grown.model.params().data() + o,
                        saved.model_params() + saved.model.store().offset("model.norm.weight"), D * 4),
            0);

  // Back to 128 rows: rows 128..191 are padding (the tokenizer has 100) and are dropped.
  const auto dir2 = dir / "grown";
  save_checkpoint(dir2.string(), progress(6), grown.tensors(), kArgs, big, {});
  State shrunk(small, 5);
  LoadTargets t2 = shrunk.targets();
  t2.real_vocab = tokens;
  ASSERT_TRUE(load_checkpoint(dir2.string(), t2, small, {}, nullptr, &msg));
  EXPECT_NE(msg.find("padding rows dropped"), std::string::npos) << msg;
  const int64_t e = shrunk.model.store().offset("model.embed_tokens.weight");
  EXPECT_EQ(std::memcmp(shrunk.model.params().data() + e,
                        saved.model_params() + saved.model.store().offset("model.embed_tokens.weight"),
                        128 * D * 4),
            0);

  // Rows that carry tokens are never dropped, and without the tokenizer's size the sizes must match.
  t2.real_vocab = 150;
  try {
    load_checkpoint(dir2.string(), t2, small, {});
    ADD_FAILURE() << "dropping rows that carry tokens was accepted";
  } catch (const Error& ex) {
    EXPECT_NE(std::string(ex.what()).find("rows that carry tokens would be dropped"), std::string::npos)
        << ex.what();
  }
  t2.real_vocab = 0;
  try {
    load_checkpoint(dir2.string(), t2, small, {});
    ADD_FAILURE() << "a different vocabulary loaded without the tokenizer's size";
  } catch (const Error& ex) {
    EXPECT_NE(std::string(ex.what()).find("vocab_size: 192 in the checkpoint, 128 in this run"),
              std::string::npos)
        << ex.what();
  }
}

TEST(Checkpoint, FilesHoldHfNamesCopiesAndSliceMetadata) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 3);
  save_checkpoint(dir.string(), progress(7), a.tensors(), kArgs, cfg, {});
  const auto it = dir / "iter_0000007";

  SafetensorsReader model((it / "model.safetensors").string());
  EXPECT_EQ(model.metadata().at("format"), "pt");
  const ParamTable& table = a.model.table();
  size_t tied = 0, biases = 0;
  for (const auto& p : table.params()) {
    ASSERT_TRUE(model.contains(p.name)) << p.name;
    EXPECT_EQ(model.info(p.name).shape, p.shape) << p.name;
    EXPECT_EQ(model.info(p.name).dtype, StDtype::kF32);
    const auto w = model.read_f32(p.name);
    EXPECT_EQ(std::memcmp(w.data(), a.model.param(p.tied_to.empty() ? p.name : p.tied_to), p.numel * 4), 0)
        << p.name;
    tied += !p.tied_to.empty();
    biases += p.name.ends_with("mlp.gate.e_score_correction_bias");
  }
  EXPECT_EQ(model.names().size(), table.size());
  EXPECT_EQ(tied, 2u);  // the MTP layer's embed_tokens and shared_head.head, stored as copies
  EXPECT_TRUE(model.contains("model.layers.3.embed_tokens.weight"));
  EXPECT_TRUE(model.contains("model.layers.3.shared_head.head.weight"));
  EXPECT_EQ(biases, 3u);  // layers 1, 2 and MTP layer 3

  SafetensorsReader optim((it / "optimizer.safetensors").string());
  size_t trainable = 0;
  for (const auto& p : table.params()) {
    const bool has = p.trainable && p.tied_to.empty();
    trainable += has;
    EXPECT_EQ(optim.contains("exp_avg." + p.name), has) << p.name;
    EXPECT_EQ(optim.contains("exp_avg_sq." + p.name), has) << p.name;
  }
  EXPECT_EQ(optim.names().size(), 2 * trainable);

  EXPECT_EQ(first_config_math_difference(ModelConfig::from_json_file((it / "config.json").string()), cfg),
            "");

  const auto st = nlohmann::json::parse(slurp(it / "state.json"));
  EXPECT_EQ(st["format"], "dsv3-checkpoint");
  EXPECT_EQ(st["version"], kCheckpointFormatVersion);
  EXPECT_EQ(st["rank"], 0);
  EXPECT_EQ(st["world"], 1);
  EXPECT_EQ(st["progress"]["seed"].get<uint64_t>(), 0xFEDCBA9876543210ull);
  const auto& e = st["tensors"]["model.layers.1.mlp.experts.5.gate_proj.weight"];
  EXPECT_EQ(e["file"], "model.safetensors");
  EXPECT_EQ(e["global_shape"], nlohmann::json({14, 32}));
  EXPECT_EQ(e["slice"]["offsets"], nlohmann::json({0, 0}));
  EXPECT_EQ(e["slice"]["lengths"], nlohmann::json({14, 32}));
  EXPECT_EQ(st["tensors"]["model.layers.3.embed_tokens.weight"]["tied_to"], "model.embed_tokens.weight");
  EXPECT_EQ(st["tensors"]["exp_avg_sq.lm_head.weight"]["file"], "optimizer.safetensors");
  EXPECT_FALSE(st["tensors"].contains("exp_avg.model.layers.1.mlp.gate.e_score_correction_bias"));
  for (const char* f : {"model.safetensors", "optimizer.safetensors", "config.json"})
    EXPECT_EQ(st["files"][f]["bytes"].get<uint64_t>(), fs::file_size(it / f)) << f;
}

TEST(Checkpoint, LaterSaveKeepsBothAndTrackerFollows) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1), b(cfg, 2);
  save_checkpoint(dir.string(), progress(10), a.tensors(), kArgs, cfg, {});
  save_checkpoint(dir.string(), progress(20), b.tensors(), kArgs, cfg, {});
  EXPECT_EQ(slurp(dir / "latest_checkpointed_iteration.txt"), "20");
  EXPECT_EQ(dir_entries(dir),
            (std::vector<std::string>{"iter_0000010", "iter_0000020", "latest_checkpointed_iteration.txt"}));
  State c(cfg, 3);
  EXPECT_EQ(load_checkpoint(dir.string(), c.targets(), cfg, {})->iteration, 20);
  EXPECT_TRUE(same_state(b, c));
  // The earlier one is still complete: point the tracker back at it (as a user would to roll back).
  spit(dir / "latest_checkpointed_iteration.txt", "10\n");
  EXPECT_EQ(load_checkpoint(dir.string(), c.targets(), cfg, {})->iteration, 10);
  EXPECT_TRUE(same_state(a, c));
}

TEST(Checkpoint, SameIterationIsReplaced) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1), b(cfg, 2), c(cfg, 3);
  save_checkpoint(dir.string(), progress(10), a.tensors(), kArgs, cfg, {});
  save_checkpoint(dir.string(), progress(10), b.tensors(), kArgs, cfg, {});
  EXPECT_EQ(load_checkpoint(dir.string(), c.targets(), cfg, {})->iteration, 10);
  EXPECT_TRUE(same_state(b, c));
  EXPECT_EQ(dir_entries(dir),
            (std::vector<std::string>{"iter_0000010", "latest_checkpointed_iteration.txt"}));
  // The same through the non-atomic fallback (filesystems without RENAME_EXCHANGE).
  set_checkpoint_test_hooks({nullptr, true});
  save_checkpoint(dir.string(), progress(10), a.tensors(), kArgs, cfg, {});
  set_checkpoint_test_hooks({});
  EXPECT_EQ(load_checkpoint(dir.string(), c.targets(), cfg, {})->iteration, 10);
  EXPECT_TRUE(same_state(a, c));
  EXPECT_EQ(dir_entries(dir),
            (std::vector<std::string>{"iter_0000010", "latest_checkpointed_iteration.txt"}));
}

TEST(Checkpoint, LeftoversAreIgnoredAndCleaned) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1), b(cfg, 2), c(cfg, 3);
  save_checkpoint(dir.string(), progress(10), a.tensors(), kArgs, cfg, {});
  // What crashed saves leave: a temporary directory of a dead process (pid beyond pid_max), an iteration
  // directory without its files, a tracker temporary.
  fs::create_directories(dir / "iter_0000020.tmp.999999999");
  spit(dir / "iter_0000020.tmp.999999999" / "model.safetensors", "partial");
  fs::create_directories(dir / "iter_0000030");
  spit(dir / "latest_checkpointed_iteration.txt.tmp.999999999", "30");
  auto p = load_checkpoint(dir.string(), c.targets(), cfg, {});
  ASSERT_TRUE(p);
  EXPECT_EQ(p->iteration, 10);
  EXPECT_TRUE(same_state(a, c));

  save_checkpoint(dir.string(), progress(20), b.tensors(), kArgs, cfg, {});
  EXPECT_EQ(dir_entries(dir), (std::vector<std::string>{"iter_0000010", "iter_0000020", "iter_0000030",
                                                        "latest_checkpointed_iteration.txt"}));
  EXPECT_EQ(load_checkpoint(dir.string(), c.targets(), cfg, {})->iteration, 20);
  EXPECT_TRUE(same_state(b, c));
  // An incomplete iteration directory is replaced whole by a save of that iteration.
  save_checkpoint(dir.string(), progress(30), a.tensors(), kArgs, cfg, {});
  EXPECT_EQ(load_checkpoint(dir.string(), c.targets(), cfg, {})->iteration, 30);
  EXPECT_TRUE(same_state(a, c));
}

// Kills a forked save at every step of the protocol; the directory must then load either the previous
// checkpoint or the new one, complete, and the next save must leave no debris. The fsyncs are skipped (they
// matter for power loss, not for a killed process) and /dev/shm is used where it exists, so the 44 cases take
// about a second.
TEST(Checkpoint, CrashAtAnyStepLeavesALoadableCheckpoint) {
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1), b(cfg, 2), c(cfg, 3);
  fs::path root = testing::scratch_dir();
  std::error_code ec;
  if (fs::is_directory("/dev/shm", ec) && ::access("/dev/shm", W_OK) == 0) {
    root = fs::path("/dev/shm") / ("dsv3-ckpt-crash-" + std::to_string(::getpid()));
    fs::remove_all(root, ec);
    fs::create_directories(root);
  }
  struct ResetHooks {
    ~ResetHooks() { set_checkpoint_test_hooks({}); }
  } reset_hooks;
  set_checkpoint_test_hooks({nullptr, false, /*no_fsync=*/true});
  const auto tmpl = root / "template";
  save_checkpoint(tmpl.string(), progress(10), a.tensors(), kArgs, cfg, {});

  const char* stages[] = {"model_written",     "optimizer_written",   "config_written", "tmp_dir_written",
                          "dir_synced",        "old_moved_aside",     "dir_renamed",    "old_removed",
                          "dir_parent_synced", "tracker_tmp_written", "tracker_renamed"};
  int cases = 0;
  for (bool fallback : {false, true}) {
    for (int64_t next_iteration : {10, 20}) {  // replacing the same iteration, or adding a later one
      for (const char* crash_at : stages) {
        const auto dir =
            root / (std::string(crash_at) + (fallback ? "-fallback-" : "-") + std::to_string(next_iteration));
        fs::copy(tmpl, dir, fs::copy_options::recursive);
        const pid_t pid = ::fork();
        ASSERT_GE(pid, 0);
        if (pid == 0) {
          set_checkpoint_test_hooks({[crash_at](const char* s) {
                                       if (std::strcmp(s, crash_at) == 0) ::_exit(0);
                                     },
                                     fallback, true});
          try {
            save_checkpoint(dir.string(), progress(next_iteration), b.tensors(), kArgs, cfg, {});
          } catch (...) {
            ::_exit(3);
          }
          ::_exit(0);
        }
        int status = 0;
        ASSERT_EQ(::waitpid(pid, &status, 0), pid);
        ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << crash_at;
        ++cases;

        std::string msg;
        auto p = load_checkpoint(dir.string(), c.targets(), cfg, {}, nullptr, &msg);
        ASSERT_TRUE(p) << crash_at;
        // Only the non-atomic fallback's window leaves the directory under its .old name.
        EXPECT_EQ(msg.find(".old.") != std::string::npos,
                  fallback && st_is(crash_at, "old_moved_aside") && next_iteration == 10)
            << msg;
        // Which checkpoint the directory must hold now: the new one once its directory has its final name
        // (same iteration) or once the tracker names it (later iteration); a stage the save never reaches
        // means it completed.
        const std::string st = crash_at;
        const bool reached = st != "old_moved_aside" || (fallback && next_iteration == 10);
        const bool after_rename = st == "dir_renamed" || st == "old_removed" || st == "dir_parent_synced" ||
                                  st.starts_with("tracker_");
        const bool want_new = !reached || (next_iteration == 10 ? after_rename : st == "tracker_renamed");
        EXPECT_TRUE(want_new ? same_state(b, c) : same_state(a, c))
            << crash_at << " (fallback " << fallback << ", iteration " << next_iteration << ")";
        EXPECT_EQ(*p, progress(want_new ? next_iteration : 10)) << crash_at;

        // Saving again (as the resumed run will) cleans up after the dead process.
        save_checkpoint(dir.string(), progress(30), a.tensors(), kArgs, cfg, {});
        for (const auto& n : dir_entries(dir))
          EXPECT_TRUE(n.find(".tmp.") == std::string::npos && n.find(".old.") == std::string::npos)
              << crash_at << ": leftover " << n;
        EXPECT_EQ(load_checkpoint(dir.string(), c.targets(), cfg, {})->iteration, 30) << crash_at;
      }
    }
  }
  EXPECT_EQ(cases, 44);
  if (root.string().starts_with("/dev/shm/")) fs::remove_all(root, ec);
}

TEST(Checkpoint, OtherModelShapeIsAClearError) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1);
  save_checkpoint(dir.string(), progress(5), a.tensors(), kArgs, cfg, {});

  auto expect_error = [&](const ModelConfig& other, const std::vector<std::string>& needles) {
    State o(other, 9);
    try {
      load_checkpoint(dir.string(), o.targets(), other, {});
      ADD_FAILURE() << "no error for " << needles[0];
    } catch (const Error& e) {
      for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
    }
  };
  ModelConfig wide = cfg;
  wide.hidden_size = 48;
  expect_error(wide, {"iter_0000005", "hidden_size: 32 in the checkpoint, 48 in this run"});
  ModelConfig experts = cfg;
  experts.n_routed_experts = 8;
  expect_error(experts, {"n_routed_experts: 16 in the checkpoint, 8 in this run"});
  ModelConfig layers = cfg;
  layers.num_hidden_layers = 4;
  expect_error(layers, {"num_hidden_layers: 3 in the checkpoint, 4 in this run"});

  // A config.json edited to match while the tensors do not: the first tensor whose shape differs is named.
  const auto cj = dir / "iter_0000005" / "config.json";
  spit(cj, wide.to_hf_json("float32"));
  expect_error(
      wide,
      {"tensor model.embed_tokens.weight has shape [128, 32] in the checkpoint, [128, 48] in this run"});
}

// A config filled Megatron-style (as `dsv3 train` builds it from flags) survives config.json: its semantic
// fields travel in dsv3_semantics, so the checkpoint loads back into the same run.
TEST(Checkpoint, MegatronStyleConfigRoundTrips) {
  const auto dir = testing::scratch_dir();
  ModelConfig cfg = tiny_config();
  cfg.rms_norm_eps = 1e-5;
  fill_semantics(cfg, ConfigSource::kMegatron);
  State a(cfg, 1), c(cfg, 2);
  save_checkpoint(dir.string(), progress(8), a.tensors(), kArgs, cfg, {});
  EXPECT_EQ(load_checkpoint(dir.string(), c.targets(), cfg, {})->iteration, 8);
  EXPECT_TRUE(same_state(a, c));
  // The HF-style reading of the same sizes differs in the latent-norm eps: a different model.
  ModelConfig hf = tiny_config();
  hf.rms_norm_eps = 1e-5;
  State h(hf, 3);
  try {
    load_checkpoint(dir.string(), h.targets(), hf, {});
    ADD_FAILURE() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("latent_norm_eps"), std::string::npos) << e.what();
  }
}

// Megatron's 'release' tracker: weights from DIR/release, no optimizer state, progress from zero.
TEST(Checkpoint, ReleaseTracker) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1), c(cfg, 2);
  save_checkpoint(dir.string(), progress(5), a.tensors(), kArgs, cfg, {});
  fs::rename(dir / "iter_0000005", dir / "release");
  spit(dir / "latest_checkpointed_iteration.txt", "release");
  const std::vector<float> m_before = c.m;
  auto p = load_checkpoint(dir.string(), c.targets(), cfg, {});
  ASSERT_TRUE(p);
  EXPECT_EQ(*p, TrainProgress{});
  EXPECT_EQ(std::memcmp(a.model.params().data(), c.model.params().data(), a.model.params().size() * 4), 0);
  EXPECT_EQ(c.m, m_before);
}

TEST(Checkpoint, MissingTrackerIsMegatronsWarning) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1);
  std::string msg;
  EXPECT_FALSE(load_checkpoint(dir.string(), a.targets(), cfg, {}, nullptr, &msg));
  const std::string tracker = (dir / "latest_checkpointed_iteration.txt").string();
  EXPECT_EQ(msg, "WARNING: could not find the metadata file " + tracker +
                     " \n    will not load any checkpoints and will start from random");
  EXPECT_FALSE(load_checkpoint((dir / "absent").string(), a.targets(), cfg, {}));
}

// Runs load_checkpoint expecting a dsv3::Error whose message contains every needle.
void expect_load_error(const fs::path& dir, State& s, const ModelConfig& cfg,
                       const std::vector<std::string>& needles, bool optim = true) {
  try {
    load_checkpoint(dir.string(), s.targets(optim), cfg, {});
    ADD_FAILURE() << "no error; expected " << needles[0];
  } catch (const Error& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

TEST(Checkpoint, DamagedFilesNameTheFile) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1), c(cfg, 2);
  save_checkpoint(dir.string(), progress(3), a.tensors(), kArgs, cfg, {});
  const auto it = dir / "iter_0000003";
  const auto model = it / "model.safetensors";
  const std::string good = slurp(model);

  spit(model, good.substr(0, good.size() / 2));  // truncated
  expect_load_error(dir, c, cfg, {model.string(), "truncated"});

  std::string flipped = good;
  flipped[flipped.size() - 5] ^= 0x10;  // one bit in the data
  spit(model, flipped);
  expect_load_error(dir, c, cfg, {model.string(), "corrupt", "sha256"});

  spit(model, good);
  fs::remove(it / "optimizer.safetensors");
  expect_load_error(dir, c, cfg, {(it / "optimizer.safetensors").string(), "missing"});

  spit(it / "state.json", "{\"format\": \"dsv3-checkpoint\", ");
  expect_load_error(dir, c, cfg, {(it / "state.json").string(), "JSON"});

  fs::remove(it / "state.json");
  expect_load_error(dir, c, cfg, {(it / "state.json").string(), "incomplete"});

  spit(dir / "latest_checkpointed_iteration.txt", "banana");
  expect_load_error(dir, c, cfg,
                    {"Invalid metadata file", (dir / "latest_checkpointed_iteration.txt").string()});

  spit(dir / "latest_checkpointed_iteration.txt", "99");
  expect_load_error(dir, c, cfg, {(dir / "iter_0000099").string(), "does not exist"});
}

// A file replaced on purpose (e.g. weights edited with HF tools) is refused until its entry under "files" in
// state.json is removed; then it loads as it is.
TEST(Checkpoint, ReplacedFileLoadsOnceUnlisted) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1), b(cfg, 2), c(cfg, 3);
  save_checkpoint(dir.string(), progress(6), a.tensors(), kArgs, cfg, {});
  const auto it = dir / "iter_0000006";
  {
    SafetensorsWriter w;
    w.set_metadata("format", "pt");
    for (const auto& p : b.model.table().params()) w.add(p.name, p.shape, b.model.param(p.name));
    w.write((it / "model.safetensors").string());
  }
  expect_load_error(dir, c, cfg, {(it / "model.safetensors").string(), "delete its entry"});
  auto st = nlohmann::json::parse(slurp(it / "state.json"));
  st["files"].erase("model.safetensors");
  spit(it / "state.json", st.dump());
  EXPECT_EQ(load_checkpoint(dir.string(), c.targets(), cfg, {})->iteration, 6);
  EXPECT_EQ(std::memcmp(b.model.params().data(), c.model.params().data(), b.model.params().size() * 4), 0);
}

TEST(Checkpoint, WithoutOptimizerState) {
  const auto dir = testing::scratch_dir();
  const ModelConfig cfg = tiny_config();
  State a(cfg, 1), c(cfg, 2);
  save_checkpoint(dir.string(), progress(4), a.tensors(/*optim=*/false), kArgs, cfg, {});
  EXPECT_FALSE(fs::exists(dir / "iter_0000004" / "optimizer.safetensors"));
  const std::vector<float> m_before = c.m;
  EXPECT_EQ(load_checkpoint(dir.string(), c.targets(/*optim=*/false), cfg, {})->iteration, 4);
  EXPECT_EQ(std::memcmp(a.model.params().data(), c.model.params().data(), a.model.params().size() * 4), 0);
  EXPECT_EQ(c.m, m_before);
  expect_load_error(dir, c, cfg, {"holds no optimizer state", "--no-load-optim"});
}

// transformers' DeepseekV3ForCausalLM.from_pretrained(iter_dir) loads the directory and computes dsv3's
// logits and loss on it (tests/hf_interop.h, tests/reference/ckpt_load_hf.py). Experts 16 wide instead of
// tiny.json's 14: transformers 5's default grouped-expert path (torch._grouped_mm) needs 16-byte strides
// ("strides should be multiple of 16 bytes" at 14 fp32); we keep the path a user gets rather than asking for
// the eager one. Skipped where $DSV3_PYTHON (python3) cannot import torch and transformers, as in CI.
TEST(CheckpointHf, TransformersLoadsTheIterationDirectory) {
  const auto dir = testing::scratch_dir();
  ModelConfig cfg = tiny_config();
  cfg.moe_intermediate_size = 16;
  State a(cfg, 1);  // non-zero expert biases: they change which experts the batch reaches
  save_checkpoint(dir.string(), progress(42), a.tensors(), kArgs, cfg, {});
  std::string skipped;
  if (!testing::expect_transformers_computes_dsv3(a.model, dir / "iter_0000042", dir, &skipped))
    GTEST_SKIP() << skipped;
}

}  // namespace
}  // namespace dsv3
