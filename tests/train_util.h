// Helpers for tests that run the `dsv3` binary end to end: running it (directly or under mpirun) with its output
// captured, preprocessing the golden JSONL into a tiny dataset, the tiny-model training flags, and reading the
// iteration lines, TensorBoard scalars and checkpoint weights back.
#pragma once
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <map>
#include <regex>
#include <sstream>
#include <string>
#include <vector>

#include "model/safetensors.h"
#include "test_util.h"
#include "train/tensorboard.h"

namespace dsv3::testing {

struct CmdResult {
  int rc = -1;
  std::string out;  // stdout and stderr together
};

// Runs `cmd` through the shell with its output captured in a file under dir.
inline CmdResult run_shell(const std::string& cmd, const std::filesystem::path& dir) {
  static int counter = 0;
  const auto log = dir / ("cmd-" + std::to_string(::getpid()) + "-" + std::to_string(counter++) + ".log");
  const int rc = std::system((cmd + " >" + log.string() + " 2>&1").c_str());
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : 128, slurp(log)};
}

// `dsv3 ARGS`, one plain process (one OpenMP thread, so that its arithmetic is the per-rank arithmetic of the
// mpirun runs it is compared with).
inline CmdResult run_dsv3_single(const std::string& args, const std::filesystem::path& dir) {
  return run_shell("OMP_NUM_THREADS=1 " + dsv3_binary().string() + " " + args, dir);
}

inline bool have_mpirun() {
  return std::system("command -v mpirun >/dev/null 2>&1") == 0;
}

// mpirun as root on a machine with fewer cores than ranks, one OpenMP thread per rank.
inline std::string mpirun_prefix(int np) {
  return "mpirun --allow-run-as-root --oversubscribe --bind-to none -np " + std::to_string(np) +
         " -x OMP_NUM_THREADS=1 ";
}

// `mpirun -np N dsv3 ARGS`.
inline CmdResult run_dsv3_mpi(int np, const std::string& args, const std::filesystem::path& dir) {
  return run_shell(mpirun_prefix(np) + dsv3_binary().string() + " " + args, dir);
}

// Preprocesses tests/golden/preprocess/input.jsonl with the bundled tiny-4k tokenizer into dir/data_text_document
// and returns that prefix.
inline std::string make_tiny_data(const std::filesystem::path& dir) {
  const auto src = source_dir();
  auto r =
      run_shell(dsv3_binary().string() + " preprocess --input " +
                    (src / "tests/golden/preprocess/input.jsonl").string() + " --output-prefix " +
                    (dir / "data").string() + " --tokenizer-type HuggingFaceTokenizer --tokenizer-model " +
                    (src / "data/tiny-4k").string() + " --workers 1 --append-eod",
                dir);
  EXPECT_EQ(r.rc, 0) << r.out;
  return (dir / "data_text_document").string();
}

// `train` flags for the demo-cpu model in fp32 on the tiny dataset (without --train-iters).
inline std::string tiny_train_args(const std::filesystem::path& dir, const std::string& data, int mbs,
                                   int gbs) {
  const auto src = source_dir();
  return "train --model-config " + (src / "examples/deepseek/configs/demo-cpu.json").string() +
         " --data-path " + data + " --split 90,5,5 --data-cache-path " + (dir / "cache").string() +
         " --tokenizer-type HuggingFaceTokenizer --tokenizer-model " + (src / "data/tiny-4k").string() +
         " --seq-length 32 --micro-batch-size " + std::to_string(mbs) + " --global-batch-size " +
         std::to_string(gbs) +
         " --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 1 --lr-decay-style cosine --weight-decay 0.1"
         " --adam-beta2 0.95 --clip-grad 1.0 --moe-router-load-balancing-type seq_aux_loss "
         "--moe-aux-loss-coeff 1e-2"
         " --moe-router-enable-expert-bias --log-interval 1 --eval-interval 1000 --eval-iters 1 --seed 7";
}

// The per-iteration log lines.
inline std::vector<std::string> iteration_log_lines(const std::string& out) {
  std::vector<std::string> v;
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);)
    if (line.find("] iteration") != std::string::npos) v.push_back(line);
  return v;
}

// tag -> step -> value, from every event file in dir.
using Scalars = std::map<std::string, std::map<int64_t, double>>;
inline Scalars read_scalars(const std::filesystem::path& dir) {
  Scalars out;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    if (e.path().filename().string().find("tfevents") == std::string::npos) continue;
    for (const auto& ev : read_event_file(e.path().string()))
      for (const auto& v : ev.values)
        if (v.simple_value) out[v.tag][ev.step] = *v.simple_value;
  }
  return out;
}

inline double rel_diff(double a, double b) {
  const double d = std::fabs(a - b), m = std::max(std::fabs(a), std::fabs(b));
  return m == 0 ? d : d / m;
}

// Every tensor of a checkpoint iteration directory's model file(s): model.safetensors, or the shards
// model-*-of-*.safetensors of an expert-parallel save.
inline std::map<std::string, std::vector<float>> read_weights(const std::filesystem::path& iter_dir) {
  std::map<std::string, std::vector<float>> t;
  for (const auto& e : std::filesystem::directory_iterator(iter_dir)) {
    const std::string f = e.path().filename().string();
    if (f != "model.safetensors" &&
        !(f.rfind("model-", 0) == 0 && f.size() > 12 && f.compare(f.size() - 12, 12, ".safetensors") == 0))
      continue;
    SafetensorsReader rd(e.path().string());
    for (const auto& n : rd.names()) t[n] = rd.read_f32(n);
  }
  return t;
}

// How far two checkpoints' weights are apart: per tensor ‖a − b‖₂ / ‖a‖₂ (the parity criterion; elementwise
// differences of single elements can be larger, where Adam divides a near-zero gradient by its own tiny scale), and
// per tensor max|a − b| / max|a|; each the maximum over tensors, with the tensor that reaches it; and the whole
// model's ‖a − b‖₂ / ‖a‖₂. NaN if the names or sizes differ.
struct WeightDiff {
  double l2_rel = 0, max_rel = 0;
  std::string l2_worst, max_worst;
  double model_l2_rel = 0;
};
inline WeightDiff weights_diff(const std::map<std::string, std::vector<float>>& a,
                               const std::map<std::string, std::vector<float>>& b) {
  WeightDiff out;
  if (a.size() != b.size()) return {NAN, NAN, "tensor count differs", "", NAN};
  double all_n2 = 0, all_d2 = 0;
  for (const auto& [name, va] : a) {
    auto it = b.find(name);
    if (it == b.end() || it->second.size() != va.size())
      return {NAN, NAN, name + " missing or of another size", "", NAN};
    double scale = 0, diff = 0, n2 = 0, d2 = 0;
    for (size_t i = 0; i < va.size(); ++i) {
      const double x = va[i], d = x - double(it->second[i]);
      scale = std::max(scale, std::fabs(x)), diff = std::max(diff, std::fabs(d));
      n2 += x * x, d2 += d * d;
    }
    const double l2 = n2 == 0 ? std::sqrt(d2) : std::sqrt(d2 / n2), mx = scale == 0 ? diff : diff / scale;
    if (l2 >= out.l2_rel) out.l2_rel = l2, out.l2_worst = name;
    if (mx >= out.max_rel) out.max_rel = mx, out.max_worst = name;
    all_n2 += n2, all_d2 += d2;
  }
  out.model_l2_rel = all_n2 == 0 ? std::sqrt(all_d2) : std::sqrt(all_d2 / all_n2);
  return out;
}

}  // namespace dsv3::testing
