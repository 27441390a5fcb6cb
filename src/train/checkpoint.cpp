// Checkpoint save/load: the layout and the crash-safety protocol are described in checkpoint.h.
#include "train/checkpoint.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "core/error.h"
#include "core/sha256.h"
#include "model/safetensors.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

constexpr const char* kFormatName = "dsv3-checkpoint";
constexpr const char* kTracker = "latest_checkpointed_iteration.txt";
constexpr const char* kModelIndexFile = "model.safetensors.index.json";
constexpr const char* kConfigFile = "config.json";
constexpr const char* kStateFile = "state.json";
constexpr double kMegatronCheckpointVersion = 3.1;

CheckpointTestHooks g_hooks;

void stage(const char* name) {
  if (g_hooks.at_stage) g_hooks.at_stage(name);
}

std::string errno_text(int err) {
  return std::strerror(err);
}

void fsync_path(const std::string& path, bool is_dir) {
  if (g_hooks.no_fsync) return;
  const int fd = ::open(path.c_str(), (is_dir ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  DSV3_CHECK(fd >= 0, "cannot open ", path, " to fsync it: ", errno_text(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  DSV3_CHECK(rc == 0, "cannot fsync ", path, ": ", errno_text(err));
}

// Creates/truncates `path`, writes `content`, fsyncs and closes it.
void write_file_synced(const std::string& path, const std::string& content) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  DSV3_CHECK(fd >= 0, "cannot create ", path, ": ", errno_text(errno));
  const char* c = content.data();
  size_t n = content.size();
  while (n > 0) {
    const ssize_t w = ::write(fd, c, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int err = errno;
      ::close(fd);
      fail("cannot write ", path, ": ", errno_text(err));
    }
    c += w;
    n -= static_cast<size_t>(w);
  }
  const int rc = g_hooks.no_fsync ? 0 : ::fsync(fd);
  const int err = errno;
  if (::close(fd) != 0 || rc != 0) fail("cannot flush ", path, ": ", errno_text(rc != 0 ? err : errno));
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  DSV3_CHECK(in.good(), "cannot open ", path);
  std::ostringstream os;
  os << in.rdbuf();
  DSV3_CHECK(!in.bad(), "cannot read ", path);
  return os.str();
}

struct FileDigest {
  uint64_t bytes = 0;
  std::string sha256;
};

FileDigest digest_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  DSV3_CHECK(fd >= 0, "cannot open ", path, ": ", errno_text(errno));
  Sha256 h;
  FileDigest d;
  std::vector<char> buf(1 << 20);
  for (;;) {
    const ssize_t r = ::read(fd, buf.data(), buf.size());
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      ::close(fd);
      fail("cannot read ", path, ": ", errno_text(err));
    }
    if (r == 0) break;
    h.update(buf.data(), static_cast<size_t>(r));
    d.bytes += static_cast<uint64_t>(r);
  }
  ::close(fd);
  d.sha256 = h.hex_digest();
  return d;
}

std::string iter_dir_name(int64_t iteration) {
  char b[32];
  std::snprintf(b, sizeof b, "iter_%07lld", static_cast<long long>(iteration));
  return b;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

bool process_alive(long pid) {
  if (pid <= 0 || pid > INT32_MAX) return false;
  if (pid == ::getpid()) return false;  // our own leftover from an earlier failed save
  if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno != EPERM) return false;
  // A zombie (killed, not yet reaped: an MPI rank whose launcher died first may stay one for as long as its new
  // parent does not reap it) writes nothing more: its temporaries are stale.
  std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
  std::string line;
  if (stat && std::getline(stat, line)) {
    const size_t close = line.rfind(')');  // "pid (comm) state ...": comm may hold spaces and parentheses
    if (close != std::string::npos && close + 2 < line.size() &&
        (line[close + 2] == 'Z' || line[close + 2] == 'X'))
      return false;
  }
  return true;
}

// Removes the temporaries of dead processes: `X.tmp.<pid>` (incomplete, never referenced) and `X.old.<pid>`
// (a replaced directory). An `X.old.<pid>` whose X is missing is the one window of the non-atomic replacement
// (see replace_dir): it is complete, and the tracker may name X, so it is moved back instead.
void cleanup_stale(const std::string& dir) {
  static const std::regex kStale(
      R"(^(iter_[0-9]{7}|release|latest_checkpointed_iteration\.txt)\.(tmp|old)\.([0-9]{1,10})$)");
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    std::smatch m;
    if (!std::regex_match(name, m, kStale)) continue;
    if (process_alive(std::stol(m[3].str()))) continue;  // someone else's save in progress
    const fs::path base = fs::path(dir) / m[1].str();
    std::error_code ec2;
    if (m[2].str() == "old" && !fs::exists(base, ec2)) {
      fs::rename(e.path(), base, ec2);
      if (!ec2) continue;
    }
    fs::remove_all(e.path(), ec2);
  }
}

// Puts the complete directory `tmp` at `final_path`. An existing `final_path` is swapped out atomically and
// removed afterwards. Where RENAME_EXCHANGE is unsupported, the old directory is first moved aside to
// `<final>.old.<pid>`; a crash between the two renames leaves it there, and both the loader and the next
// save's cleanup find it.
void replace_dir(const std::string& tmp, const std::string& final_path) {
  std::error_code ec;
  if (!fs::exists(final_path, ec)) {
    DSV3_CHECK(::rename(tmp.c_str(), final_path.c_str()) == 0, "cannot rename ", tmp, " to ", final_path,
               ": ", errno_text(errno));
    stage("dir_renamed");
    stage("old_removed");
    return;
  }
  if (!g_hooks.no_rename_exchange &&
      ::renameat2(AT_FDCWD, tmp.c_str(), AT_FDCWD, final_path.c_str(), RENAME_EXCHANGE) == 0) {
    stage("dir_renamed");
    fs::remove_all(tmp, ec);  // now the old directory
    stage("old_removed");
    return;
  }
  if (!g_hooks.no_rename_exchange && errno != EINVAL && errno != ENOSYS && errno != ENOTSUP)
    fail("cannot swap ", tmp, " with ", final_path, ": ", errno_text(errno));
  const std::string old = final_path + ".old." + std::to_string(::getpid());
  fs::remove_all(old, ec);
  DSV3_CHECK(::rename(final_path.c_str(), old.c_str()) == 0, "cannot move ", final_path, " aside to ", old,
             ": ", errno_text(errno));
  stage("old_moved_aside");
  if (::rename(tmp.c_str(), final_path.c_str()) != 0) {
    const int err = errno;
    ::rename(old.c_str(), final_path.c_str());
    fail("cannot rename ", tmp, " to ", final_path, ": ", errno_text(err));
  }
  stage("dir_renamed");
  fs::remove_all(old, ec);
  stage("old_removed");
}

std::vector<int64_t> json_shape(const json& j, const std::string& what, const std::string& origin) {
  DSV3_CHECK(j.is_array(), origin, ": ", what, " must be an array of integers");
  std::vector<int64_t> out;
  for (const auto& d : j) {
    DSV3_CHECK(d.is_number_integer(), origin, ": ", what, " must be an array of integers");
    out.push_back(d.get<int64_t>());
  }
  return out;
}

int64_t json_i64(const json& obj, const char* key, const std::string& origin) {
  DSV3_CHECK(obj.contains(key) && obj.at(key).is_number_integer(), origin, ": '", key,
             "' is missing or not an integer");
  return obj.at(key).get<int64_t>();
}

// The directory the tracker refers to, or a recoverable `.old.<pid>` copy of it (see replace_dir).
std::string resolve_iter_dir(const std::string& dir, const std::string& name, const std::string& tracker,
                             std::string* note) {
  const std::string path = (fs::path(dir) / name).string();
  std::error_code ec;
  if (fs::is_directory(path, ec)) return path;
  const std::string prefix = name + ".old.";
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.rfind(prefix, 0) == 0 && fs::is_regular_file(e.path() / kStateFile)) {
      *note = ": " + path + " is missing; its previous copy " + e.path().string() +
              " (left by an interrupted save) was loaded instead";
      return e.path().string();
    }
  }
  fail("checkpoint directory ", path, " (named by ", tracker, ") does not exist");
}

}  // namespace

std::string checkpoint_iter_dir(const std::string& dir, int64_t iteration) {
  return (fs::path(dir) / iter_dir_name(iteration)).string();
}

std::string checkpoint_tracker_path(const std::string& dir) {
  return (fs::path(dir) / kTracker).string();
}

std::string checkpoint_saving_line(int64_t iteration, const std::string& dir) {
  char b[64];
  std::snprintf(b, sizeof b, "%7lld", static_cast<long long>(iteration));
  return std::string("saving checkpoint at iteration ") + b + " to " + dir + " in safetensors format";
}

std::string checkpoint_saved_line(int64_t iteration, const std::string& dir) {
  char b[64];
  std::snprintf(b, sizeof b, "%7lld", static_cast<long long>(iteration));
  return std::string("  successfully saved checkpoint from iteration ") + b + " to " + dir;
}

void set_checkpoint_test_hooks(CheckpointTestHooks hooks) {
  g_hooks = std::move(hooks);
}

std::string first_config_math_difference(const ModelConfig& a, const ModelConfig& b) {
  std::string out;
  auto num = [](double v) {
    std::ostringstream os;
    os.precision(17);
    os << v;
    return os.str();
  };
  auto diff = [&](const char* name, const std::string& x, const std::string& y) {
    if (out.empty() && x != y)
      out = std::string(name) + ": " + x + " in the checkpoint, " + y + " in this run";
  };
  auto i64 = [&](const char* name, int64_t x, int64_t y) {
    diff(name, std::to_string(x), std::to_string(y));
  };
  auto dbl = [&](const char* name, double x, double y) {
    if (std::fabs(x - y) > 1e-12 * std::max(std::fabs(x), std::fabs(y))) diff(name, num(x), num(y));
  };
  auto bln = [&](const char* name, bool x, bool y) {
    diff(name, x ? "true" : "false", y ? "true" : "false");
  };
  i64("vocab_size", a.vocab_size, b.vocab_size);
  i64("hidden_size", a.hidden_size, b.hidden_size);
  i64("num_hidden_layers", a.num_hidden_layers, b.num_hidden_layers);
  i64("num_nextn_predict_layers", a.num_nextn_predict_layers, b.num_nextn_predict_layers);
  i64("intermediate_size", a.intermediate_size, b.intermediate_size);
  i64("moe_intermediate_size", a.moe_intermediate_size, b.moe_intermediate_size);
  i64("first_k_dense_replace", a.first_k_dense_replace, b.first_k_dense_replace);
  i64("moe_layer_freq", a.moe_layer_freq, b.moe_layer_freq);
  i64("num_attention_heads", a.num_attention_heads, b.num_attention_heads);
  i64("n_routed_experts", a.n_routed_experts, b.n_routed_experts);
  i64("num_experts_per_tok", a.num_experts_per_tok, b.num_experts_per_tok);
  i64("n_group", a.n_group, b.n_group);
  i64("topk_group", a.topk_group, b.topk_group);
  i64("n_shared_experts", a.n_shared_experts, b.n_shared_experts);
  dbl("routed_scaling_factor", a.routed_scaling_factor, b.routed_scaling_factor);
  diff("scoring_func", a.scoring_func, b.scoring_func);
  diff("topk_method", a.topk_method, b.topk_method);
  i64("q_lora_rank", a.q_lora_rank, b.q_lora_rank);
  i64("kv_lora_rank", a.kv_lora_rank, b.kv_lora_rank);
  i64("qk_nope_head_dim", a.qk_nope_head_dim, b.qk_nope_head_dim);
  i64("qk_rope_head_dim", a.qk_rope_head_dim, b.qk_rope_head_dim);
  i64("v_head_dim", a.v_head_dim, b.v_head_dim);
  dbl("rope_theta", a.rope_theta, b.rope_theta);
  diff("rope_scaling", a.rope_scaling ? "yarn" : "null", b.rope_scaling ? "yarn" : "null");
  if (a.rope_scaling && b.rope_scaling) {
    const YarnScaling &x = *a.rope_scaling, &y = *b.rope_scaling;
    dbl("rope_scaling.factor", x.factor, y.factor);
    i64("rope_scaling.original_max_position_embeddings", a.yarn_original_max_position(),
        b.yarn_original_max_position());
    dbl("rope_scaling.beta_fast", x.beta_fast, y.beta_fast);
    dbl("rope_scaling.beta_slow", x.beta_slow, y.beta_slow);
    dbl("rope_scaling.mscale", x.mscale, y.mscale);
    dbl("rope_scaling.mscale_all_dim", x.mscale_all_dim, y.mscale_all_dim);
    diff("rope_scaling.attention_factor", x.attention_factor ? num(*x.attention_factor) : "absent",
         y.attention_factor ? num(*y.attention_factor) : "absent");
    bln("rope_scaling.truncate", x.truncate, y.truncate);
  }
  dbl("rms_norm_eps", a.rms_norm_eps, b.rms_norm_eps);
  bln("tie_word_embeddings", a.tie_word_embeddings, b.tie_word_embeddings);
  bln("attention_bias", a.attention_bias, b.attention_bias);
  i64("group_score_topk", a.group_score_topk, b.group_score_topk);
  dbl("latent_norm_eps", a.latent_norm_eps, b.latent_norm_eps);
  bln("always_renormalise (norm_topk_prob)", a.always_renormalise, b.always_renormalise);
  dbl("yarn_softmax_mscale", a.yarn_softmax_mscale, b.yarn_softmax_mscale);
  dbl("yarn_attention_factor", a.yarn_attention_factor, b.yarn_attention_factor);
  return out;
}

namespace {

// File names: one file of each kind, or HF's sharded names with shard s of n ("model-00001-of-00004.safetensors").
std::string shard_file(const char* kind, int shard, int shards) {
  if (shards == 1) return std::string(kind) + ".safetensors";
  char b[96];
  std::snprintf(b, sizeof b, "%s-%05d-of-%05d.safetensors", kind, shard + 1, shards);
  return b;
}

// The shard that holds a tensor: its pipeline stage's, and within it routed experts by their EP rank (contiguous
// blocks of E/EP), the stage's other tensors in EP rank 0's.
int shard_of(const ParamInfo& pi, const ParamTable& table, const RankInfo& r) {
  const int stages = std::max<int>(1, static_cast<int>(r.stages.size())), ep = std::max(1, r.shards) / stages;
  int stage = 0;  // the first stage that holds it (a shared embedding is written by the first stage only)
  while (stage + 1 < stages && !r.stages[stage].holds(pi, table.config().num_hidden_layers)) ++stage;
  const int64_t experts = table.config().n_routed_experts;
  return stage * ep + (ep == 1 || !pi.is_expert ? 0 : static_cast<int>(pi.expert / (experts / ep)));
}

// Writes this shard's model file (and optimizer file) into tmp and returns their digests, in that order.
std::vector<std::pair<std::string, FileDigest>> write_shard(const std::string& tmp,
                                                            const CheckpointTensors& t, const RankInfo& r,
                                                            int shard) {
  const int shards = std::max(1, r.shards);
  std::vector<std::pair<std::string, FileDigest>> out;
  SafetensorsWriter model;
  model.set_metadata("format", "pt");
  for (const auto& pi : t.table->params())
    if (shard_of(pi, *t.table, r) == shard) model.add(pi.name, pi.shape, t.params + t.store->offset(pi.name));
  const std::string mf = shard_file("model", shard, shards);
  model.write((fs::path(tmp) / mf).string());
  out.emplace_back(mf, digest_file((fs::path(tmp) / mf).string()));
  stage("model_written");
  if (t.exp_avg) {
    SafetensorsWriter optim;
    optim.set_metadata("format", "pt");
    for (const auto& pi : t.table->params()) {
      if (!pi.trainable || !pi.tied_to.empty() || shard_of(pi, *t.table, r) != shard) continue;
      const int64_t off = t.store->offset(pi.name);
      optim.add("exp_avg." + pi.name, pi.shape, t.exp_avg + off);
      optim.add("exp_avg_sq." + pi.name, pi.shape, t.exp_avg_sq + off);
    }
    const std::string of = shard_file("optimizer", shard, shards);
    optim.write((fs::path(tmp) / of).string());
    out.emplace_back(of, digest_file((fs::path(tmp) / of).string()));
    stage("optimizer_written");
  }
  return out;
}

// What one rank tells rank 0 after writing (one fixed-size record per rank, for an allgather): whether it
// succeeded, which shard it wrote (-1: none), and its files' sizes and sha256 (model, then optimizer).
// A failed rank's error travels with it (truncated to kWhy bytes), so that every rank's message names the cause
// (a full disk), not only "failed on rank q".
struct ShardReport {
  static constexpr int64_t kWhy = 384;
  static constexpr int64_t kBytes = 1 + 4 + 2 * (8 + 64) + kWhy;
  bool ok = false;
  int32_t shard = -1;
  FileDigest digest[2];
  std::string why;
  void pack(uint8_t* out) const {
    std::memset(out, 0, kBytes);
    out[0] = ok;
    std::memcpy(out + 1, &shard, 4);
    for (int f = 0; f < 2; ++f) {
      uint8_t* d = out + 5 + f * 72;
      std::memcpy(d, &digest[f].bytes, 8);
      std::memcpy(d + 8, digest[f].sha256.data(), std::min<size_t>(64, digest[f].sha256.size()));
    }
    std::memcpy(out + 5 + 2 * 72, why.data(), std::min<size_t>(kWhy - 1, why.size()));
  }
  static ShardReport unpack(const uint8_t* in) {
    ShardReport r;
    r.ok = in[0] != 0;
    std::memcpy(&r.shard, in + 1, 4);
    for (int f = 0; f < 2; ++f) {
      const uint8_t* d = in + 5 + f * 72;
      std::memcpy(&r.digest[f].bytes, d, 8);
      r.digest[f].sha256.assign(reinterpret_cast<const char*>(d + 8), 64);
    }
    const char* w = reinterpret_cast<const char*>(in + 5 + 2 * 72);
    r.why.assign(w, strnlen(w, kWhy));
    return r;
  }
};

// Rank 0's part after every file is written: config.json, the HF shard index, state.json (last inside the
// directory), then the directory takes its final name and the tracker is replaced.
void commit_checkpoint(const std::string& dir, const std::string& tmp, const std::string& final_dir,
                       const TrainProgress& p, const CheckpointTensors& t,
                       const std::map<std::string, std::string>& args, const ModelConfig& cfg,
                       const RankInfo& r, const std::vector<std::pair<std::string, FileDigest>>& written) {
  const int shards = std::max(1, r.shards);
  const bool has_optim = t.exp_avg != nullptr;
  ojson tensors = ojson::object();
  auto record = [&](const std::string& name, const std::string& file, const std::vector<int64_t>& shape,
                    const std::string& tied_to) {
    ojson e;
    e["file"] = file;
    e["global_shape"] = shape;
    e["slice"] = {{"offsets", std::vector<int64_t>(shape.size(), 0)}, {"lengths", shape}};
    if (!tied_to.empty()) e["tied_to"] = tied_to;
    tensors[name] = std::move(e);
  };
  ojson weight_map = ojson::object();
  int64_t total_bytes = 0;
  for (const auto& pi : t.table->params()) {
    const int sh = shard_of(pi, *t.table, r);
    record(pi.name, shard_file("model", sh, shards), pi.shape, pi.tied_to);
    weight_map[pi.name] = shard_file("model", sh, shards);
    total_bytes += pi.numel * 4;
  }
  if (has_optim)
    for (const auto& pi : t.table->params()) {
      if (!pi.trainable || !pi.tied_to.empty()) continue;
      const std::string f = shard_file("optimizer", shard_of(pi, *t.table, r), shards);
      record("exp_avg." + pi.name, f, pi.shape, "");
      record("exp_avg_sq." + pi.name, f, pi.shape, "");
    }

  write_file_synced((fs::path(tmp) / kConfigFile).string(), cfg.to_hf_json("float32"));
  stage("config_written");
  std::vector<std::pair<std::string, FileDigest>> files = written;
  if (shards > 1) {  // transformers' sharded-checkpoint index
    const ojson index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", std::move(weight_map)}};
    write_file_synced((fs::path(tmp) / kModelIndexFile).string(), index.dump(2) + "\n");
    files.emplace_back(kModelIndexFile, digest_file((fs::path(tmp) / kModelIndexFile).string()));
  }
  files.emplace_back(kConfigFile, digest_file((fs::path(tmp) / kConfigFile).string()));
  ojson fj = ojson::object();
  for (const auto& [name, d] : files) fj[name] = {{"bytes", d.bytes}, {"sha256", d.sha256}};

  ojson st;
  st["format"] = kFormatName;
  st["version"] = kCheckpointFormatVersion;
  st["megatron_checkpoint_version"] = kMegatronCheckpointVersion;
  st["rank"] = r.rank;
  st["world"] = r.world;
  st["shards"] = shards;
  st["progress"] = {{"iteration", p.iteration},
                    {"consumed_train_samples", p.consumed_train_samples},
                    {"consumed_valid_samples", p.consumed_valid_samples},
                    {"skipped_train_samples", p.skipped_train_samples},
                    {"optimizer_step", p.optimizer_step},
                    {"scheduler_num_steps", p.scheduler_num_steps},
                    {"flops_so_far", p.flops_so_far},
                    {"seed", p.seed}};
  st["args"] = args;
  st["has_optimizer"] = has_optim;
  st["files"] = std::move(fj);
  st["tensors"] = std::move(tensors);
  write_file_synced((fs::path(tmp) / kStateFile).string(), st.dump(1) + "\n");
  stage("tmp_dir_written");

  fsync_path(tmp, true);
  stage("dir_synced");
  replace_dir(tmp, final_dir);
  fsync_path(dir, true);
  stage("dir_parent_synced");

  const std::string tracker = checkpoint_tracker_path(dir);
  const std::string tracker_tmp = tracker + ".tmp." + std::to_string(::getpid());
  write_file_synced(tracker_tmp, std::to_string(p.iteration));  // Megatron: f.write(str(iteration))
  stage("tracker_tmp_written");
  if (::rename(tracker_tmp.c_str(), tracker.c_str()) != 0) {
    const int err = errno;
    std::remove(tracker_tmp.c_str());
    fail("cannot rename ", tracker_tmp, " to ", tracker, ": ", errno_text(err));
  }
  stage("tracker_renamed");
  fsync_path(dir, true);
}

}  // namespace

void save_checkpoint(const std::string& dir, const TrainProgress& p, const CheckpointTensors& t,
                     const std::map<std::string, std::string>& args, const ModelConfig& cfg,
                     const RankInfo& r) {
  DSV3_CHECK(t.table && t.store && t.params, "save_checkpoint: table, store and params are required");
  DSV3_CHECK((t.exp_avg == nullptr) == (t.exp_avg_sq == nullptr),
             "save_checkpoint: exp_avg and exp_avg_sq must be given together");
  const bool sharded = r.shards > 1;
  DSV3_CHECK(sharded ? r.comm != nullptr : (r.rank == 0 && (r.world == 1 || r.replicated)),
             "save_checkpoint: rank ", r.rank, " of ", r.world,
             ": a multi-rank save is either rank 0's of replicated state or sharded");
  const int ep_shards = std::max(1, r.shards) / std::max<int>(1, static_cast<int>(r.stages.size()));
  DSV3_CHECK(!sharded || (ep_shards >= 1 && t.table->config().n_routed_experts % ep_shards == 0),
             "save_checkpoint: ", t.table->config().n_routed_experts, " experts do not split into ",
             ep_shards, " EP shards");
  DSV3_CHECK(p.iteration >= 0, "save_checkpoint: negative iteration ", p.iteration);
  const std::string mismatch = first_config_math_difference(t.table->config(), cfg);
  DSV3_CHECK(mismatch.empty(), "save_checkpoint: the parameter table was built for another config (",
             mismatch, ")");
  const bool lead = r.rank == 0;
  const std::string final_dir = checkpoint_iter_dir(dir, p.iteration);

  // Rank 0 prepares DIR and the temporary directory, named by its pid, which the writers learn by broadcast (a
  // negative pid tells them rank 0 failed).
  int64_t pid = ::getpid();
  std::error_code ec;
  std::string failure;
  if (lead) {
    try {
      fs::create_directories(dir, ec);
      DSV3_CHECK(!ec && fs::is_directory(dir), "cannot create checkpoint directory ", dir,
                 ec ? ": " + ec.message() : std::string());
      cleanup_stale(dir);
      const std::string tmp = final_dir + ".tmp." + std::to_string(pid);
      fs::remove_all(tmp, ec);
      DSV3_CHECK(fs::create_directory(tmp, ec) && !ec, "cannot create ", tmp, ": ", ec.message());
    } catch (const Error& e) {
      if (!sharded) throw;
      failure = e.what(), pid = -1;
    }
  }
  if (sharded) r.comm->broadcast(&pid, 1, 0);
  if (pid < 0) {
    std::vector<uint8_t> why(ShardReport::kWhy, 0);  // rank 0's reason, for every rank's message
    if (lead) std::memcpy(why.data(), failure.data(), std::min<size_t>(why.size() - 1, failure.size()));
    r.comm->broadcast(why.data(), static_cast<int64_t>(why.size()), 0);
    fail(lead ? failure
              : "checkpoint save to " + dir +
                    " failed on rank 0: " + reinterpret_cast<const char*>(why.data()));
  }
  const std::string tmp = final_dir + ".tmp." + std::to_string(pid);

  try {
    std::vector<std::pair<std::string, FileDigest>> written;
    if (!sharded) {
      written = write_shard(tmp, t, r, 0);
    } else {
      // Each writer writes its shard; every rank then learns whether all of them succeeded before anything is
      // renamed, and rank 0 their files' digests.
      ShardReport mine;
      try {
        if (r.shard >= 0) {
          const auto f = write_shard(tmp, t, r, r.shard);
          mine.shard = r.shard;
          for (size_t i = 0; i < f.size(); ++i) mine.digest[i] = f[i].second;
        }
        mine.ok = true;
      } catch (const Error& e) {
        failure = e.what();
        mine.why = failure;
      }
      std::vector<uint8_t> bytes(ShardReport::kBytes), all(ShardReport::kBytes * r.comm->size());
      mine.pack(bytes.data());
      r.comm->allgather(bytes.data(), ShardReport::kBytes, all.data());
      std::vector<bool> seen(r.shards, false);
      for (int q = 0; q < r.comm->size(); ++q) {
        const ShardReport rep = ShardReport::unpack(&all[q * ShardReport::kBytes]);
        if (!rep.ok)
          fail(q == r.rank
                   ? failure
                   : "checkpoint save to " + dir + " failed on rank " + std::to_string(q) + ": " + rep.why);
        if (rep.shard < 0 || seen.at(rep.shard)) continue;
        seen[rep.shard] = true;
        written.emplace_back(shard_file("model", rep.shard, r.shards), rep.digest[0]);
        if (t.exp_avg) written.emplace_back(shard_file("optimizer", rep.shard, r.shards), rep.digest[1]);
      }
      for (int sh = 0; sh < r.shards; ++sh)
        DSV3_CHECK(seen[sh], "save_checkpoint: no rank wrote shard ", sh, " of ", r.shards);
      if (!lead) return;
    }
    commit_checkpoint(dir, tmp, final_dir, p, t, args, cfg, r, written);
  } catch (...) {
    if (lead) fs::remove_all(tmp, ec);
    throw;
  }
}

std::optional<TrainProgress> load_checkpoint(const std::string& dir, const LoadTargets& t,
                                             const ModelConfig& cfg, const RankInfo& r,
                                             std::map<std::string, std::string>* saved_args,
                                             std::string* message) {
  DSV3_CHECK(t.table && t.store && t.params, "load_checkpoint: table, store and params are required");
  DSV3_CHECK((t.exp_avg == nullptr) == (t.exp_avg_sq == nullptr),
             "load_checkpoint: exp_avg and exp_avg_sq must be given together");
  {
    const std::string m = first_config_math_difference(t.table->config(), cfg);
    DSV3_CHECK(m.empty(), "load_checkpoint: the parameter table was built for another config (", m, ")");
  }
  const std::string tracker = checkpoint_tracker_path(dir);
  std::error_code ec;
  if (!fs::is_regular_file(tracker, ec)) {
    if (message)
      *message = "WARNING: could not find the metadata file " + tracker +
                 " \n    will not load any checkpoints and will start from random";
    return std::nullopt;
  }

  // Megatron's read_metadata: an integer or 'release', surrounding whitespace ignored.
  std::string meta = read_file(tracker);
  const auto b = meta.find_first_not_of(" \t\r\n");
  const auto e = meta.find_last_not_of(" \t\r\n");
  meta = b == std::string::npos ? "" : meta.substr(b, e - b + 1);
  bool release = false;
  int64_t tracker_iteration = 0;
  if (meta == "release") {
    release = true;
  } else {
    DSV3_CHECK(
        !meta.empty() && meta.size() <= 18 && meta.find_first_not_of("0123456789") == std::string::npos,
        "ERROR: Invalid metadata file ", tracker, ": expected an iteration number or 'release', found '",
        meta.substr(0, 40), "'");
    tracker_iteration = std::stoll(meta);
  }
  std::string note;
  const std::string iter_dir =
      resolve_iter_dir(dir, release ? "release" : iter_dir_name(tracker_iteration), tracker, &note);
  auto in_dir = [&](const char* f) { return (fs::path(iter_dir) / f).string(); };

  // state.json
  const std::string state_path = in_dir(kStateFile);
  DSV3_CHECK(fs::is_regular_file(state_path, ec), "checkpoint ", iter_dir, " is incomplete: ", state_path,
             " is missing");
  json st;
  try {
    st = json::parse(read_file(state_path));
  } catch (const json::exception& ex) {
    fail(state_path, ": not valid JSON (corrupt checkpoint metadata): ", ex.what());
  }
  DSV3_CHECK(st.is_object() && st.value("format", "") == kFormatName, state_path,
             ": not a dsv3 checkpoint state file (format '", st.is_object() ? st.value("format", "") : "",
             "')");
  const int64_t version = json_i64(st, "version", state_path);
  DSV3_CHECK(version == kCheckpointFormatVersion, state_path, ": checkpoint format version ", version,
             "; this build reads version ", kCheckpointFormatVersion);
  DSV3_CHECK(st.contains("progress") && st["progress"].is_object() && st.contains("tensors") &&
                 st["tensors"].is_object() && st.contains("files") && st["files"].is_object(),
             state_path, ": 'progress', 'tensors' or 'files' is missing");
  const int64_t saved_iteration = json_i64(st["progress"], "iteration", state_path);
  DSV3_CHECK(release || saved_iteration == tracker_iteration, state_path, ": holds iteration ",
             saved_iteration, " but sits in ", iter_dir);

  // The model: config.json math fields first (the clearest message), then every tensor's shape.
  const std::string config_path = in_dir(kConfigFile);
  DSV3_CHECK(fs::is_regular_file(config_path, ec), "checkpoint ", iter_dir, " is incomplete: ", config_path,
             " is missing");
  const ModelConfig saved_cfg = ModelConfig::from_json_file(config_path);
  // A padded vocabulary of another size is the same model when the rows that carry tokens are all kept.
  const int64_t saved_vocab = saved_cfg.vocab_size;
  const bool repad = t.real_vocab > 0 && saved_vocab != cfg.vocab_size;
  ModelConfig compared = saved_cfg;
  if (repad) {
    DSV3_CHECK(std::min(saved_vocab, cfg.vocab_size) >= t.real_vocab, "checkpoint ", iter_dir, " has ",
               saved_vocab, " vocabulary rows and this run ", cfg.vocab_size, ", but the tokenizer has ",
               t.real_vocab, " tokens: rows that carry tokens would be dropped");
    compared.vocab_size = cfg.vocab_size;
    note += " with its vocabulary re-padded from " + std::to_string(saved_vocab) + " to " +
            std::to_string(cfg.vocab_size) +
            " rows (Megatron pads to a multiple of --make-vocab-size-divisible-by" +
            " x TP; the tokenizer's " + std::to_string(t.real_vocab) + " rows are kept; " +
            (cfg.vocab_size > saved_vocab ? "the added padding rows start as a fresh model's)"
                                          : "padding rows dropped)");
  }
  if (const std::string d = first_config_math_difference(compared, cfg); !d.empty())
    fail("checkpoint ", iter_dir, " is of a different model than this run: ", d, " (", config_path, ")");
  // The embedding and output-layer tensors have one row per (padded) vocabulary entry.
  auto saved_shape = [&](const ParamInfo& pi) {
    std::vector<int64_t> s = pi.shape;
    if (repad && (pi.role == ParamRole::kEmbedding || pi.role == ParamRole::kHead)) s[0] = saved_vocab;
    return s;
  };

  const json& tensors = st["tensors"];
  auto check_entry = [&](const std::string& name, const std::vector<int64_t>& shape) {
    DSV3_CHECK(tensors.contains(name), "checkpoint ", iter_dir, " has no tensor ", name, " (", state_path,
               ")");
    const json& te = tensors[name];
    DSV3_CHECK(
        te.is_object() && te.contains("global_shape") && te.contains("slice") && te["slice"].is_object(),
        state_path, ": tensor ", name, " lacks global_shape or slice");
    const auto g = json_shape(te["global_shape"], name + " global_shape", state_path);
    DSV3_CHECK(g == shape, "checkpoint ", iter_dir, " is of a different model than this run: tensor ", name,
               " has shape ", shape_str(g), " in the checkpoint, ", shape_str(shape), " in this run");
    const auto off = json_shape(te["slice"].value("offsets", json()), name + " slice.offsets", state_path);
    const auto len = json_shape(te["slice"].value("lengths", json()), name + " slice.lengths", state_path);
    DSV3_CHECK(off == std::vector<int64_t>(shape.size(), 0) && len == shape, state_path, ": tensor ", name,
               " is stored as the slice at ", shape_str(off), " of size ", shape_str(len),
               "; loading a sharded checkpoint (saved by several ranks) is not implemented yet");
  };
  const bool has_optim = st.value("has_optimizer", false);
  for (const auto& pi : t.table->params()) {
    check_entry(pi.name, saved_shape(pi));
    if (has_optim && pi.trainable && pi.tied_to.empty()) {
      check_entry("exp_avg." + pi.name, saved_shape(pi));
      check_entry("exp_avg_sq." + pi.name, saved_shape(pi));
    }
  }
  for (auto it = tensors.begin(); it != tensors.end(); ++it) {
    std::string base = it.key();
    for (const char* pre : {"exp_avg_sq.", "exp_avg."})
      if (base.rfind(pre, 0) == 0) {
        base = base.substr(std::strlen(pre));
        break;
      }
    DSV3_CHECK(t.table->contains(base), "checkpoint ", iter_dir,
               " is of a different model than this run: it has tensor ", it.key(), ", this model has no ",
               base);
  }

  // The files this rank reads (its tensors' files and config.json), each exactly as written (size first, so
  // truncation says so) unless its entry was removed from "files" (a file replaced on purpose).
  const bool load_optim = t.exp_avg && !release;
  DSV3_CHECK(!load_optim || has_optim, "checkpoint ", iter_dir,
             " holds no optimizer state (it was saved without one); load it without optimizer state "
             "(--no-load-optim or --finetune)");
  auto file_of = [&](const std::string& name) {
    const json& te = tensors[name];
    DSV3_CHECK(te.contains("file") && te["file"].is_string(), state_path, ": tensor ", name,
               " names no file");
    const std::string f = te["file"].get<std::string>();
    DSV3_CHECK(!f.empty() && f.find('/') == std::string::npos, state_path, ": tensor ", name, " is in '", f,
               "', which is not a file name");
    return f;
  };
  std::map<std::string, std::vector<std::pair<std::string, float*>>> reads;  // file -> (tensor, destination)
  for (const auto& pi : t.table->params()) {
    if (!pi.tied_to.empty() || !t.store->contains(pi.name)) continue;  // copies; other EP ranks' experts
    float* at = t.params + t.store->offset(pi.name);
    reads[file_of(pi.name)].emplace_back(pi.name, at);
    if (load_optim && pi.trainable)
      for (auto [prefix, dst] : {std::pair{"exp_avg.", t.exp_avg}, std::pair{"exp_avg_sq.", t.exp_avg_sq}})
        reads[file_of(prefix + pi.name)].emplace_back(prefix + pi.name, dst + t.store->offset(pi.name));
  }
  std::vector<std::string> check{kConfigFile};
  for (const auto& [f, _] : reads) check.push_back(f);
  for (const std::string& f : check) {
    const std::string path = in_dir(f.c_str());
    DSV3_CHECK(fs::is_regular_file(path, ec), "checkpoint ", iter_dir, " is incomplete: ", path,
               " is missing");
    if (!st["files"].contains(f)) continue;
    const json& rec = st["files"][f];
    const uint64_t want = rec.value("bytes", uint64_t(0));
    const uint64_t have = fs::file_size(path, ec);
    DSV3_CHECK(have == want, path, ": truncated or corrupt: ", have, " bytes, but ", state_path, " records ",
               want);
    const FileDigest d = digest_file(path);
    DSV3_CHECK(d.sha256 == rec.value("sha256", ""), path, ": corrupt: its sha256 ", d.sha256,
               " differs from the one recorded in ", state_path,
               " (if the file was replaced on purpose, delete its entry under \"files\" there)");
  }

  // Weights and moments (tied copies alias their source in the store and are not read).
  for (const auto& [f, list] : reads) {
    const std::string path = in_dir(f.c_str());
    SafetensorsReader rd(path);
    for (const auto& [name, dst] : list) {
      DSV3_CHECK(rd.contains(name), path, ": tensor ", name, " is missing");
      const auto& info = rd.info(name);
      const std::string base = name.substr(name.rfind("exp_avg", 0) == 0 ? name.find('.') + 1 : 0);
      const ParamInfo& pi = t.table->at(base);
      const std::vector<int64_t> want = saved_shape(pi);
      DSV3_CHECK(info.dtype == StDtype::kF32 && info.shape == want, path, ": tensor ", name, " is ",
                 st_dtype_name(info.dtype), " ", shape_str(info.shape), ", expected F32 ", shape_str(want));
      if (want == pi.shape) {
        rd.read_f32(name, dst, pi.numel);
      } else {  // re-padded vocabulary: the rows both sizes have; the others keep what dst holds
        const std::vector<float> saved = rd.read_f32(name);
        std::copy_n(saved.data(), std::min(want[0], pi.shape[0]) * pi.shape[1], dst);
      }
    }
  }

  TrainProgress p;
  if (!release) {  // Megatron: a release checkpoint starts at iteration 0 with nothing consumed
    const json& pj = st["progress"];
    p.iteration = saved_iteration;
    p.consumed_train_samples = json_i64(pj, "consumed_train_samples", state_path);
    p.consumed_valid_samples = json_i64(pj, "consumed_valid_samples", state_path);
    p.skipped_train_samples = json_i64(pj, "skipped_train_samples", state_path);
    p.optimizer_step = json_i64(pj, "optimizer_step", state_path);
    p.scheduler_num_steps = json_i64(pj, "scheduler_num_steps", state_path);
    DSV3_CHECK(pj.contains("flops_so_far") && pj["flops_so_far"].is_number(), state_path,
               ": 'flops_so_far' is missing");
    p.flops_so_far = pj["flops_so_far"].get<double>();
    DSV3_CHECK(pj.contains("seed") && pj["seed"].is_number_integer(), state_path, ": 'seed' is missing");
    p.seed = pj["seed"].get<uint64_t>();
  }
  if (saved_args) {
    saved_args->clear();
    if (st.contains("args") && st["args"].is_object())
      for (auto it = st["args"].begin(); it != st["args"].end(); ++it)
        if (it.value().is_string()) (*saved_args)[it.key()] = it.value().get<std::string>();
  }
  if (message) *message = note.empty() ? std::string() : "NOTE: loaded " + iter_dir + note;
  (void)r;
  return p;
}

}  // namespace dsv3
