// `dsv3 train` end to end (short runs of a small model on real preprocessed text): Megatron's log line and exit
// messages, stop-and-resume reproducing an uninterrupted run bit for bit, the exit controls, NaN detection, and
// clear errors for bad input.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <regex>

#include "data/indexed_dataset.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using testing::slurp;

struct Run {
  int rc = -1;
  std::string out;
};

Run run_dsv3(const std::string& args, const fs::path& dir) {
  const auto log = dir / ("run-" + std::to_string(::getpid()) + "-" + std::to_string(std::rand()) + ".log");
  const int rc =
      std::system((testing::dsv3_binary().string() + " " + args + " >" + log.string() + " 2>&1").c_str());
  return {WEXITSTATUS(rc), slurp(log)};
}

// Preprocesses the golden JSONL fixture with the bundled tiny-4k tokenizer into dir/data_text_document.
std::string make_data(const fs::path& dir) {
  const auto src = testing::source_dir();
  auto r = run_dsv3("preprocess --input " + (src / "tests/golden/preprocess/input.jsonl").string() +
                        " --output-prefix " + (dir / "data").string() +
                        " --tokenizer-type HuggingFaceTokenizer --tokenizer-model " +
                        (src / "data/tiny-4k").string() + " --workers 1 --append-eod",
                    dir);
  EXPECT_EQ(r.rc, 0) << r.out;
  return (dir / "data_text_document").string();
}

std::string base_args(const fs::path& dir, const std::string& data) {
  const auto src = testing::source_dir();
  return "train --model-config " + (src / "examples/deepseek/configs/demo-cpu.json").string() +
         " --data-path " + data + " --split 90,5,5 --data-cache-path " + (dir / "cache").string() +
         " --tokenizer-type HuggingFaceTokenizer --tokenizer-model " + (src / "data/tiny-4k").string() +
         " --seq-length 32 --micro-batch-size 2 --global-batch-size 4 --lr 3e-3 --min-lr 3e-4"
         " --lr-warmup-iters 1 --lr-decay-style cosine --weight-decay 0.1 --adam-beta2 0.95 --clip-grad 1.0"
         " --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-2"
         " --moe-router-enable-expert-bias --log-interval 1 --eval-interval 1000 --eval-iters 1 --seed 7";
}

// The per-iteration lines, with the fields that depend on wall time removed.
std::vector<std::string> iteration_lines(const std::string& out) {
  std::vector<std::string> v;
  std::regex timing(R"(\[[0-9: -]+\]|elapsed time per iteration \(ms\): [0-9.]+|samples per second: [0-9.]+|)"
                    R"(tokens per second: [0-9.]+|throughput per GPU \(TFLOP/s/GPU\): [0-9.]+)");
  std::istringstream in(out);
  for (std::string line; std::getline(in, line);)
    if (line.find("] iteration") != std::string::npos) v.push_back(std::regex_replace(line, timing, ""));
  return v;
}

TEST(Train, LogsMegatronLinesAndLossFalls) {
  const auto dir = testing::scratch_dir();
  const auto data = make_data(dir);
  auto r =
      run_dsv3(base_args(dir, data) + " --train-iters 12 --tensorboard-dir " + (dir / "tb").string(), dir);
  ASSERT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("------------------------ arguments ------------------------"), std::string::npos);
  auto lines = iteration_lines(r.out);
  ASSERT_EQ(lines.size(), 12u) << r.out;
  std::regex fmt(
      R"( iteration +1/ +12 \| actual seqlen: +32 \| consumed samples: +4 \| .*learning rate: )"
      R"([0-9.]+E[-+][0-9]+ \| global batch size: +4 \| lm loss: [0-9.]+E[-+][0-9]+ \| )"
      R"(load_balancing_loss: [0-9.]+E[-+][0-9]+ \| mtp_1 loss: [0-9.]+E[-+][0-9]+ \| loss scale: 1\.0 \| )"
      R"(grad norm: [0-9.]+ \| number of skipped iterations: +0 \| number of nan iterations: +0 \|)");
  EXPECT_TRUE(std::regex_search(lines[0], fmt)) << lines[0];
  auto loss_of = [](const std::string& l) {
    std::smatch m;
    std::regex_search(l, m, std::regex(R"(lm loss: ([0-9.E+-]+))"));
    return std::stod(m[1]);
  };
  EXPECT_LT(loss_of(lines.back()), loss_of(lines.front()) - 0.5) << lines.front() << "\n" << lines.back();
  EXPECT_NE(r.out.find("validation loss at iteration 12 | lm loss value:"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("validation loss at iteration 12 on test set"), std::string::npos) << r.out;
  bool found = false;
  for (auto& e : fs::directory_iterator(dir / "tb"))
    found |= e.path().filename().string().rfind("events.out.tfevents.", 0) == 0 &&
             slurp(e.path()).find("lm loss vs samples") != std::string::npos;
  EXPECT_TRUE(found);
}

// A run stopped at iteration 3 (exit interval, which saves) and resumed with --load reproduces the losses and
// grad norms of an uninterrupted run exactly, in fp32 and in bf16.
void expect_resume_is_exact(const std::string& precision) {
  const auto dir = testing::scratch_dir();
  const auto data = make_data(dir);
  const std::string args = base_args(dir, data) + " --train-iters 6 " + precision;
  auto full = run_dsv3(args, dir);
  ASSERT_EQ(full.rc, 0) << full.out;
  auto first = run_dsv3(args + " --save " + (dir / "ckpt").string() + " --exit-interval 3", dir);
  ASSERT_EQ(first.rc, 0) << first.out;
  EXPECT_NE(first.out.find("exiting program at iteration 3"), std::string::npos) << first.out;
  EXPECT_EQ(slurp(dir / "ckpt/latest_checkpointed_iteration.txt").substr(0, 1), "3");
  auto second = run_dsv3(args + " --load " + (dir / "ckpt").string(), dir);
  ASSERT_EQ(second.rc, 0) << second.out;
  auto a = iteration_lines(full.out), b = iteration_lines(first.out), c = iteration_lines(second.out);
  ASSERT_EQ(a.size(), 6u);
  ASSERT_EQ(b.size(), 3u);
  ASSERT_EQ(c.size(), 3u) << second.out;
  for (int k = 0; k < 3; ++k) EXPECT_EQ(a[k], b[k]);
  for (int k = 0; k < 3; ++k) EXPECT_EQ(a[3 + k], c[k]);
}

TEST(Train, ResumeIsBitIdenticalFp32) {
  expect_resume_is_exact("");
}
TEST(Train, ResumeIsBitIdenticalBf16) {
  expect_resume_is_exact("--bf16");
}

TEST(Train, KillSwitchSavesAndExits) {
  const auto dir = testing::scratch_dir();
  const auto data = make_data(dir);
  const auto ks = dir / "stop-now";
  std::ofstream(ks) << "";
  auto r0 = run_dsv3(base_args(dir, data) + " --train-iters 8 --kill-switch-file " + ks.string(), dir);
  EXPECT_EQ(r0.rc, 0);
  EXPECT_NE(r0.out.find("Detected kill switch at " + ks.string() + ". Exiting"), std::string::npos) << r0.out;
  EXPECT_TRUE(iteration_lines(r0.out).empty());
}

// The kill switch appearing mid-run, and the duration limit: both save, print Megatron's message and exit 0.
TEST(Train, KillSwitchMidRunAndDurationLimitSave) {
  const auto dir = testing::scratch_dir();
  const auto data = make_data(dir);
  const auto ks = dir / "stop-later";
  const auto log = dir / "ks.log";
  const std::string cmd = testing::dsv3_binary().string() + " " + base_args(dir, data) +
                          " --train-iters 100000 --kill-switch-file " + ks.string() + " --save " +
                          (dir / "ckpt").string() + " >" + log.string() + " 2>&1";
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), (char*)nullptr);
    _exit(127);
  }
  for (int k = 0; k < 600 && iteration_lines(slurp(log)).size() < 2; ++k) usleep(100000);
  std::ofstream(ks) << "";
  int status = 0;
  waitpid(pid, &status, 0);
  const std::string out = slurp(log);
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  std::smatch m;
  ASSERT_TRUE(std::regex_search(
      out, m, std::regex("Detected kill switch at " + ks.string() + ", iteration=([0-9]+). Exiting")))
      << out;
  EXPECT_EQ(slurp(dir / "ckpt/latest_checkpointed_iteration.txt"), m[1].str());

  auto r = run_dsv3(base_args(dir, data) + " --train-iters 100 --exit-duration-in-mins 0 --save " +
                        (dir / "ckpt2").string(),
                    dir);
  EXPECT_EQ(r.rc, 0) << r.out;
  EXPECT_NE(r.out.find("exiting program after "), std::string::npos) << r.out;
  EXPECT_EQ(iteration_lines(r.out).size(), 1u);
  EXPECT_EQ(slurp(dir / "ckpt2/latest_checkpointed_iteration.txt"), "1");
}

TEST(Train, SigtermSavesAndExits) {
  const auto dir = testing::scratch_dir();
  const auto data = make_data(dir);
  const auto log = dir / "sigterm.log";
  // A log left by an earlier run would already hold iteration lines: the signal would then come before the
  // child's shell has truncated it, i.e. before the handler exists (the cause of this test's rare failures).
  fs::remove(log);
  const std::string cmd = testing::dsv3_binary().string() + " " + base_args(dir, data) +
                          " --train-iters 100000 --exit-signal-handler --save " + (dir / "ckpt").string() +
                          " >" + log.string() + " 2>&1";
  pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    execl("/bin/sh", "sh", "-c", ("exec " + cmd).c_str(), (char*)nullptr);
    _exit(127);
  }
  // Wait for training to be under way (the signal handler is installed before the first iteration), then ask it
  // to stop. The wait ends at the second iteration line; its bound only matters on a machine loaded by other tests
  // (a SIGTERM before the handler exists kills the process, which once made this test fail under load).
  for (int k = 0; k < 3000 && iteration_lines(slurp(log)).size() < 2; ++k) usleep(100000);
  const bool under_way = iteration_lines(slurp(log)).size() >= 2;
  kill(pid, SIGTERM);
  int status = 0;
  waitpid(pid, &status, 0);
  const std::string out = slurp(log);
  ASSERT_TRUE(under_way) << "no two iterations in 300 s:\n" << out;
  ASSERT_TRUE(WIFEXITED(status)) << out;
  EXPECT_EQ(WEXITSTATUS(status), 0) << out;
  EXPECT_NE(out.find("exiting program after receiving SIGTERM."), std::string::npos) << out;
  const int saved = std::atoi(slurp(dir / "ckpt/latest_checkpointed_iteration.txt").c_str());
  EXPECT_GE(saved, 2);
  char name[32];
  std::snprintf(name, sizeof name, "iter_%07d", saved);
  EXPECT_TRUE(fs::exists(dir / "ckpt" / name / "model.safetensors")) << name;
}

TEST(Train, NanInWeightsStopsNamingTheIteration) {
  const auto dir = testing::scratch_dir();
  const auto data = make_data(dir);
  auto r = run_dsv3(base_args(dir, data) + " --train-iters 2 --save " + (dir / "ckpt").string(), dir);
  ASSERT_EQ(r.rc, 0) << r.out;
  // Poison one weight of the saved checkpoint (a copy of it), then resume from it.
  auto poisoned = [&](const std::string& name, const std::string& to) {
    std::filesystem::remove_all(dir / to);
    std::filesystem::copy(dir / "ckpt", dir / to, std::filesystem::copy_options::recursive);
    const auto model = dir / to / "iter_0000002/model.safetensors";
    std::map<std::string, std::vector<float>> tensors;
    std::map<std::string, std::vector<int64_t>> shapes;
    {
      SafetensorsReader rd(model.string());
      for (const auto& n : rd.names()) tensors[n] = rd.read_f32(n), shapes[n] = rd.info(n).shape;
    }
    tensors[name][0] = NAN;
    SafetensorsWriter w;
    for (auto& [n, v] : tensors) w.add(n, shapes[n], v.data());
    w.write(model.string());
    // The checkpoint lists each file's sha256; drop this file's entry so the edit is loaded, not refused.
    const auto state_path = dir / to / "iter_0000002/state.json";
    auto state = nlohmann::json::parse(slurp(state_path));
    state["files"].erase("model.safetensors");
    std::ofstream(state_path) << state.dump(1);
    return (dir / to).string();
  };
  // A NaN in an attention weight: the router's own check meets it first; the message adds the micro-batch and
  // the weight.
  const std::string ck1 = poisoned("model.layers.0.self_attn.o_proj.weight", "ckpt-attn");
  auto bad = run_dsv3(base_args(dir, data) + " --train-iters 4 --load " + ck1 + " --save " + ck1, dir);
  EXPECT_NE(bad.rc, 0);
  EXPECT_NE(bad.out.find("iteration 3"), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("NaN"), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("in micro-batch 0 of "), std::string::npos) << bad.out;
  EXPECT_NE(bad.out.find("non-finite weight: model.layers.0.self_attn.o_proj.weight"), std::string::npos)
      << bad.out;
  EXPECT_EQ(slurp(std::filesystem::path(ck1) / "latest_checkpointed_iteration.txt").substr(0, 1), "2");

  // A NaN in the output layer: the forward loss is NaN. The message names the micro-batch, a parameter whose
  // gradient is not finite, and the poisoned weight by its HF name.
  const std::string ck2 = poisoned("lm_head.weight", "ckpt-head");
  auto loss = run_dsv3(base_args(dir, data) + " --train-iters 4 --load " + ck2 + " --save " + ck2, dir);
  EXPECT_NE(loss.rc, 0);
  EXPECT_NE(loss.out.find("found NaN in local forward loss calculation"), std::string::npos) << loss.out;
  EXPECT_NE(loss.out.find("rank 0, micro-batch 0 of "), std::string::npos) << loss.out;
  EXPECT_NE(loss.out.find("first parameter with a non-finite gradient (from the output back): "),
            std::string::npos)
      << loss.out;
  EXPECT_NE(loss.out.find("non-finite weight: lm_head.weight"), std::string::npos) << loss.out;
  EXPECT_EQ(slurp(std::filesystem::path(ck2) / "latest_checkpointed_iteration.txt").substr(0, 1), "2");

  // With the check off the NaN reaches every weight through the update; the save refuses that state and the good
  // checkpoint stays the newest.
  auto off = run_dsv3(base_args(dir, data) + " --train-iters 3 --no-check-for-nan-in-loss-and-grad --load " +
                          ck2 + " --save " + ck2,
                      dir);
  EXPECT_NE(off.rc, 0);
  EXPECT_NE(off.out.find("not saving: parameter "), std::string::npos) << off.out;
  EXPECT_NE(off.out.find("the last checkpoint (iteration 2) is left as it was"), std::string::npos)
      << off.out;
  EXPECT_EQ(slurp(std::filesystem::path(ck2) / "latest_checkpointed_iteration.txt").substr(0, 1), "2");
  EXPECT_FALSE(std::filesystem::exists(std::filesystem::path(ck2) / "iter_0000003"));
}

TEST(Train, BadInputIsAClearError) {
  const auto dir = testing::scratch_dir();
  const auto data = make_data(dir);
  const auto src = testing::source_dir();
  auto expect_error = [&](const std::string& args, const std::string& needle) {
    auto r = run_dsv3(args, dir);
    EXPECT_EQ(r.rc, 1) << args << "\n" << r.out;
    EXPECT_NE(r.out.find(needle), std::string::npos) << "expected '" << needle << "' in:\n" << r.out;
  };
  const std::string b = base_args(dir, data) + " --train-iters 2";
  expect_error(b + " --global-batch-size 5", "not divisible");
  expect_error(base_args(dir, (dir / "missing").string()) + " --train-iters 2", "missing");
  expect_error(b + " --seq-length 100000", "exceeds max_position_embeddings");
  {
    IndexedDatasetBuilder bld((dir / "short").string(), DType::kUInt16);
    std::vector<int32_t> ids(10, 7), lens{10};
    bld.add_document(ids, lens);
    bld.finalize();
  }
  expect_error(base_args(dir, (dir / "short").string()) + " --train-iters 2", "too few for one sample");
  expect_error(b + " --no-such-flag 3", "unrecognized arguments: --no-such-flag");
  expect_error(b + " --fp16", "--fp16 is not supported");
  expect_error(b + " --tensor-model-parallel-size 2", "distributed");
  // Token ids beyond the model's vocabulary (4352 rows): a dataset written directly with id 5000 in it.
  {
    IndexedDatasetBuilder bld((dir / "bigids").string(), DType::kInt32);
    std::vector<int32_t> ids(400, 7), lens{400};
    ids[123] = 5000;
    for (int d = 0; d < 20; ++d) bld.add_document(ids, lens);
    bld.finalize();
  }
  expect_error(base_args(dir, (dir / "bigids").string()) + " --train-iters 2",
               "token id 5000 in sequence 0 is outside the model's vocabulary [0, 4352)");
  // A checkpoint of another model shape.
  auto r = run_dsv3(b + " --save " + (dir / "ckpt").string(), dir);
  ASSERT_EQ(r.rc, 0) << r.out;
  expect_error(b + " --moe-ffn-hidden-size 32 --load " + (dir / "ckpt").string(), "different model");
}

}  // namespace
}  // namespace dsv3
