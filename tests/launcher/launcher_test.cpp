// examples/deepseek/pretrain_deepseek.sh: the seed's HL_* interface mapped onto `dsv3 train`. Most cases run
// the script with HL_DRY_RUN=1 and check the printed command; one runs a short single-process training
// through it.
#include <sched.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "seed_command.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;
using Env = std::vector<std::pair<std::string, std::string>>;

struct Result {
  int rc = -1;
  std::string out, err;
  std::vector<std::string> argv;  // the printed command, split on blanks (dry runs)
};

std::string read_all(const fs::path& p) {
  std::ifstream f(p);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::string sq(const std::string& v) {
  std::string o = "'";
  for (char c : v) o += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return o + "'";
}

// Runs the script in a clean environment (only PATH, HOME and `env`), from `cwd`.
Result run_script(const Env& env, const fs::path& cwd, bool dry = true) {
  const fs::path script = testing::source_dir() / "examples/deepseek/pretrain_deepseek.sh";
  std::string cmd = "cd " + sq(cwd.string()) +
                    " && env -i PATH=" + sq(std::getenv("PATH") ? std::getenv("PATH") : "/usr/bin:/bin") +
                    " HOME=" + sq(cwd.string()) + " HL_DSV3_BIN=" + sq(testing::dsv3_binary().string());
  if (dry) cmd += " HL_DRY_RUN=1";
  for (const auto& [k, v] : env) cmd += " " + k + "=" + sq(v);
  cmd += " bash " + sq(script.string()) + " >" + sq((cwd / "stdout.txt").string()) + " 2>" +
         sq((cwd / "stderr.txt").string());
  Result r;
  const int st = std::system(cmd.c_str());
  r.rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  r.out = read_all(cwd / "stdout.txt"), r.err = read_all(cwd / "stderr.txt");
  std::istringstream s(r.out);
  for (std::string w; s >> w;) r.argv.push_back(w);
  return r;
}

// The value following `flag` in the command, or "<absent>".
std::string value_of(const Result& r, const std::string& flag) {
  for (size_t k = 0; k + 1 < r.argv.size(); ++k)
    if (r.argv[k] == flag) return r.argv[k + 1];
  return "<absent>";
}
bool has(const Result& r, const std::string& word) {
  for (const auto& w : r.argv)
    if (w == word) return true;
  return false;
}
// Every value given to a repeatable option (mpirun's -x).
std::vector<std::string> values_of(const Result& r, const std::string& flag) {
  std::vector<std::string> v;
  for (size_t k = 0; k + 1 < r.argv.size(); ++k)
    if (r.argv[k] == flag) v.push_back(r.argv[k + 1]);
  return v;
}
bool contains(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) != 0) return 1;
  return CPU_COUNT(&set);
}

// The seed README's "DeepSeek V3 Basic Training" example (8 ranks), as written there.
Env seed_basic_example() {
  return testing::seed_readme_basic_example();
}

Env with(Env e, const Env& more) {
  for (const auto& kv : more) {
    bool replaced = false;
    for (auto& old : e)
      if (old.first == kv.first) old.second = kv.second, replaced = true;
    if (!replaced) e.push_back(kv);
  }
  return e;
}

const Env kWorld1 = {{"HL_NUM_NODES", "1"}, {"HL_DEVICES_PER_NODE", "1"},
                     {"HL_DP", "1"},        {"HL_TP", "1"},
                     {"HL_PP", "1"},        {"HL_EP", "1"}};

TEST(Launcher, SeedBasicExampleBuildsMpirunCommand) {
  const auto dir = testing::scratch_dir();
  const Result r = run_script(seed_basic_example(), dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  ASSERT_FALSE(r.argv.empty());
  // More ranks than cores: oversubscription is allowed through OpenMPI's environment, not a flag.
  const bool over = available_cores() < 8;
  EXPECT_EQ(r.argv[0], over ? "OMPI_MCA_rmaps_base_oversubscribe=1" : "mpirun");
  EXPECT_EQ(r.argv[over ? 1 : 0], "mpirun");
  EXPECT_FALSE(has(r, "--oversubscribe"));
  EXPECT_EQ(value_of(r, "-n"), "8");
  EXPECT_EQ(value_of(r, "--mca"), "plm_rsh_args");
  EXPECT_TRUE(has(r, "-p22"));
  EXPECT_EQ(value_of(r, "--bind-to"), "none");
  const auto x = values_of(r, "-x");
  EXPECT_TRUE(contains(x, "MASTER_ADDR=localhost"));
  EXPECT_TRUE(contains(x, "MASTER_PORT=12345"));
  EXPECT_TRUE(contains(x, "PT_HPU_LAZY_MODE=1"));
  EXPECT_TRUE(contains(x, "OMP_NUM_THREADS=" + std::to_string(std::max(1, available_cores() / 8))));
  EXPECT_EQ(value_of(r, "-hostfile"), "<absent>");
  EXPECT_TRUE(has(r, "--allow-run-as-root"));  // as the seed passes it
  EXPECT_EQ(value_of(r, testing::dsv3_binary().string()), "train");
  // The seed's mapping of its variables and its hard-coded hyperparameters.
  EXPECT_EQ(value_of(r, "--tensor-model-parallel-size"), "1");
  EXPECT_EQ(value_of(r, "--pipeline-model-parallel-size"), "1");
  EXPECT_EQ(value_of(r, "--expert-model-parallel-size"), "8");
  EXPECT_EQ(value_of(r, "--global-batch-size"), "8");
  EXPECT_EQ(value_of(r, "--micro-batch-size"), "1");
  EXPECT_EQ(value_of(r, "--seq-length"), "4096");
  EXPECT_EQ(value_of(r, "--max-position-embeddings"), "4096");
  EXPECT_EQ(value_of(r, "--num-layers"), "4");
  EXPECT_EQ(value_of(r, "--hidden-size"), "7168");
  EXPECT_EQ(value_of(r, "--ffn-hidden-size"), "18432");
  EXPECT_EQ(value_of(r, "--num-attention-heads"), "128");
  EXPECT_EQ(value_of(r, "--num-experts"), "256");
  EXPECT_EQ(value_of(r, "--moe-router-topk"), "8");
  EXPECT_EQ(value_of(r, "--moe-router-num-groups"), "8");
  EXPECT_EQ(value_of(r, "--moe-router-group-topk"), "4");
  EXPECT_EQ(value_of(r, "--moe-router-topk-scaling-factor"), "2.5");
  EXPECT_EQ(value_of(r, "--moe-router-score-function"), "sigmoid");
  EXPECT_EQ(value_of(r, "--moe-router-load-balancing-type"), "seq_aux_loss");
  EXPECT_EQ(value_of(r, "--moe-router-bias-update-rate"), "0.001");
  EXPECT_TRUE(has(r, "--moe-router-enable-expert-bias"));
  EXPECT_EQ(value_of(r, "--moe-aux-loss-coeff"), "1e-4");
  EXPECT_EQ(value_of(r, "--moe-ffn-hidden-size"), "2048");
  EXPECT_EQ(value_of(r, "--moe-shared-expert-intermediate-size"), "2048");
  EXPECT_EQ(value_of(r, "--moe-layer-freq"), "'([0]*3+[1]*1)'");
  EXPECT_EQ(value_of(r, "--q-lora-rank"), "1536");
  EXPECT_EQ(value_of(r, "--kv-lora-rank"), "512");
  EXPECT_EQ(value_of(r, "--qk-head-dim"), "128");
  EXPECT_EQ(value_of(r, "--qk-pos-emb-head-dim"), "64");
  EXPECT_EQ(value_of(r, "--v-head-dim"), "128");
  EXPECT_EQ(value_of(r, "--lr"), "2.2e-4");
  EXPECT_EQ(value_of(r, "--min-lr"), "2.2e-5");
  EXPECT_EQ(value_of(r, "--lr-warmup-iters"), "2000");
  EXPECT_EQ(value_of(r, "--lr-decay-style"), "cosine");
  EXPECT_EQ(value_of(r, "--lr-decay-iters"), "320000");
  EXPECT_EQ(value_of(r, "--train-iters"), "500000");
  EXPECT_EQ(value_of(r, "--adam-beta1"), "0.9");
  EXPECT_EQ(value_of(r, "--adam-beta2"), "0.95");
  EXPECT_EQ(value_of(r, "--adam-eps"), "1e-8");
  EXPECT_EQ(value_of(r, "--weight-decay"), "1e-1");
  EXPECT_EQ(value_of(r, "--clip-grad"), "1.0");
  EXPECT_EQ(value_of(r, "--init-method-std"), "6e-3");
  EXPECT_EQ(value_of(r, "--norm-epsilon"), "<absent>");  // the seed leaves Megatron's default
  EXPECT_EQ(value_of(r, "--rotary-base"), "10000");
  EXPECT_TRUE(has(r, "--bf16"));
  EXPECT_EQ(value_of(r, "--log-interval"), "10");
  EXPECT_EQ(value_of(r, "--eval-interval"), "1000");
  EXPECT_EQ(value_of(r, "--eval-iters"), "10");
  EXPECT_EQ(value_of(r, "--save-interval"), "2000");
  EXPECT_EQ(value_of(r, "--exit-interval"), "0");
  EXPECT_EQ(value_of(r, "--data-path"), "/data/deepseek_preprocessed/rp_wiki_24B_deepseek_tok_text_document");
  EXPECT_EQ(value_of(r, "--tokenizer-type"), "HuggingFaceTokenizer");
  EXPECT_EQ(value_of(r, "--tokenizer-model"), "/data/deepseek_tokenizer");
  EXPECT_TRUE(has(r, "--use-distributed-optimizer"));
  EXPECT_TRUE(has(r, "--sequence-parallel"));
  EXPECT_TRUE(has(r, "--use-checkpoint-args"));
  // Token drop: capacity 1.0, probs, padded, with the alltoall dispatcher.
  EXPECT_EQ(value_of(r, "--moe-expert-capacity-factor"), "1.0");
  EXPECT_EQ(value_of(r, "--moe-token-drop-policy"), "probs");
  EXPECT_TRUE(has(r, "--moe-pad-expert-input-to-capacity"));
  EXPECT_EQ(value_of(r, "--moe-token-dispatcher-type"), "alltoall");
  // Output directories per the seed's naming.
  const std::string tb = value_of(r, "--tensorboard-dir");
  EXPECT_EQ(
      tb.rfind("./out/deepseek_v3/bf16_transformer_engine_default_nl4_gb8_mb1_sp1_D8_T1_P1_E8_devices8_", 0),
      0u)
      << tb;
  EXPECT_EQ(tb.substr(tb.size() - 12), "/tensorboard");
  const std::string ck = value_of(r, "--save");
  EXPECT_EQ(ck, tb.substr(0, tb.size() - 12) + "/checkpoints");
  EXPECT_EQ(value_of(r, "--load"), ck);
  EXPECT_FALSE(fs::exists(dir / "out")) << "a dry run creates nothing";
  // Gaudi settings that reach no flag are reported; the seed's flags are all passed (dsv3 train takes them).
  EXPECT_NE(r.err.find("not applicable on dsv3 (CPU), ignored: HL_USE_LAZY_MODE=1"), std::string::npos)
      << r.err;
  for (const char* f : {"--swiglu", "--moe-grouped-gemm", "--ckpt-format", "--use-fused-sdpa", "--optimizer",
                        "--transformer-impl", "--qk-layernorm", "--multi-latent-attention"})
    EXPECT_TRUE(has(r, f)) << f;
}

// The words of a dry run after `<dsv3> train`.
std::vector<std::string> train_args_of(const Result& r) {
  const auto w = testing::shell_words(r.out);
  const auto bin = std::find(w.begin(), w.end(), testing::dsv3_binary().string());
  EXPECT_TRUE(bin != w.end() && bin + 1 != w.end() && bin[1] == "train") << r.out;
  return bin == w.end() ? std::vector<std::string>{} : std::vector<std::string>(bin + 2, w.end());
}

// The dry run is the seed's command with `dsv3 train` in place of `python pretrain_gpt.py`: the seed's mpirun words
// (OMP_NUM_THREADS as an ENV_FLAGS item), then the seed's arguments in its order, flag for flag (both README
// examples, and every optional flag of the seed switched on).
TEST(Launcher, DryRunIsTheSeedCommand) {
  const auto dir = testing::scratch_dir();
  const std::string out = (dir / "run").string();
  const Env basic = with(seed_basic_example(), {{"HL_RESULTS_DIR", out}});
  Result r = run_script(basic, dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  std::vector<std::string> expected;
  if (available_cores() < 8) expected.push_back("OMPI_MCA_rmaps_base_oversubscribe=1");
  for (const auto& w : testing::seed_mpirun_words(
           basic, {"OMP_NUM_THREADS=" + std::to_string(std::max(1, available_cores() / 8))}))
    expected.push_back(w);
  expected.push_back(testing::dsv3_binary().string());
  expected.push_back("train");
  for (const auto& w : testing::seed_pretrain_args(basic)) expected.push_back(w);
  EXPECT_EQ(testing::shell_words(r.out), expected) << r.out;

  // The multi-node example (4 nodes of 8, PP 2, recompute) from a hostfile.
  const fs::path hosts = dir / "hosts";
  std::ofstream(hosts) << "10.0.0.7 slots=8\n10.0.0.8 slots=8\n10.0.0.9 slots=8\n10.0.0.10 slots=8\n";
  const Env multi = with(testing::seed_readme_multinode_example(),
                         {{"HL_RESULTS_DIR", out}, {"HL_HOSTSFILE", hosts.string()}});
  r = run_script(multi, dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(train_args_of(r), testing::seed_pretrain_args(multi)) << r.out;
  EXPECT_EQ(value_of(r, "-hostfile"), hosts.string());

  // Every optional flag of the seed, on one process (run directly) and with an uneven pipeline split.
  const Env every =
      with(with(with(basic, kWorld1), testing::seed_every_optional_flag(dir.string())),
           {{"HL_CKP_ACT", "2"}, {"HL_FISRT_PP_STAGE_LAYERS", "1"}, {"HL_LAST_PP_STAGE_LAYERS", "1"}});
  r = run_script(every, dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(testing::shell_words(r.out).at(0), testing::dsv3_binary().string());
  EXPECT_EQ(train_args_of(r), testing::seed_pretrain_args(every)) << r.out;

  // The launcher's size variables replace the seed's hard-coded sizes in place.
  const Env small = with(basic, testing::seed_small_sizes());
  r = run_script(small, dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(train_args_of(r), testing::seed_pretrain_args(small)) << r.out;
}

TEST(Launcher, TokenDropAuxCoeffAndDispatcher) {
  const auto dir = testing::scratch_dir();
  Result r =
      run_script(with(seed_basic_example(), {{"HL_TOKEN_DROP", "0"}, {"HL_AUX_LOSS_COEFF", "3e-3"}}), dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--moe-aux-loss-coeff"), "3e-3");
  EXPECT_EQ(value_of(r, "--moe-expert-capacity-factor"), "<absent>");
  EXPECT_FALSE(has(r, "--moe-pad-expert-input-to-capacity"));
  // The seed's defaults: dropless with the allgather dispatcher.
  r = run_script(
      with(seed_basic_example(), {{"HL_TOKEN_DROP", "0"}, {"HL_TOKEN_DISPATCHER_TYPE", "allgather"}}), dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--moe-token-dispatcher-type"), "allgather");
  // Token drop needs alltoall (Megatron-Core's message).
  r = run_script(with(seed_basic_example(), {{"HL_TOKEN_DISPATCHER_TYPE", "allgather"}}), dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.err.find("moe_expert_capacity_factor only works with alltoall token dispatcher"),
            std::string::npos)
      << r.err;
}

// HL_TP passes --tensor-model-parallel-size, and HL_SEQ_PARALLEL (on by default, as in the seed) turns on
// sequence parallelism with it; HL_SEQ_PARALLEL=0 leaves the flag out.
TEST(Launcher, TensorAndSequenceParallel) {
  const auto dir = testing::scratch_dir();
  Result r = run_script(with(seed_basic_example(), {{"HL_TP", "2"}, {"HL_DP", "4"}}), dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--tensor-model-parallel-size"), "2");
  EXPECT_TRUE(has(r, "--sequence-parallel"));
  EXPECT_NE(value_of(r, "--tensorboard-dir").find("_sp1_D4_T2_P1_"), std::string::npos);
  r = run_script(with(seed_basic_example(), {{"HL_TP", "2"}, {"HL_DP", "4"}, {"HL_SEQ_PARALLEL", "0"}}), dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--tensor-model-parallel-size"), "2");
  EXPECT_FALSE(has(r, "--sequence-parallel"));
}

TEST(Launcher, KillSwitchAliasAndRecompute) {
  const auto dir = testing::scratch_dir();
  Result r =
      run_script(with(seed_basic_example(), {{"HL_KILL_SWITCH", "/tmp/ks"}, {"HL_CKP_ACT", "1"}}), dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--kill-switch-file"), "/tmp/ks");
  EXPECT_TRUE(has(r, "--recompute-granularity=full"));
  EXPECT_EQ(value_of(r, "--recompute-method"), "uniform");
  EXPECT_EQ(value_of(r, "--recompute-num-layers"), "1");
  r = run_script(with(seed_basic_example(), {{"HL_KILL_SWITCH_FILE", "/tmp/ks2"}}), dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--kill-switch-file"), "/tmp/ks2");
  EXPECT_EQ(value_of(r, "--recompute-method"), "<absent>");
  r = run_script(with(seed_basic_example(), {{"HL_KILL_SWITCH_FILE", "/a"}, {"HL_KILL_SWITCH", "/b"}}), dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.err.find("differ"), std::string::npos) << r.err;
  // Selective recompute (HL_CKP_ACT=2) is passed as the seed passes it; dsv3 train lists it as having no effect.
  r = run_script(with(seed_basic_example(), {{"HL_CKP_ACT", "2"}}), dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--recompute-granularity"), "selective");
}

TEST(Launcher, ModelConfigKeepsFileShapesUnlessSetExplicitly) {
  const auto dir = testing::scratch_dir();
  const std::string cfg = (testing::source_dir() / "examples/deepseek/configs/demo-cpu.json").string();
  const Env base = {{"HL_MODEL_CONFIG", cfg}, {"HL_SEQ_LEN", "64"}};
  Result r = run_script(with(kWorld1, base), dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(r.argv.at(0), testing::dsv3_binary().string()) << "world 1 runs dsv3 directly";
  EXPECT_EQ(value_of(r, "--model-config"), cfg);
  for (const char* f : {"--num-layers",
                        "--hidden-size",
                        "--ffn-hidden-size",
                        "--num-attention-heads",
                        "--num-experts",
                        "--moe-router-topk",
                        "--moe-router-num-groups",
                        "--moe-router-group-topk",
                        "--moe-router-topk-scaling-factor",
                        "--moe-ffn-hidden-size",
                        "--moe-shared-expert-intermediate-size",
                        "--q-lora-rank",
                        "--kv-lora-rank",
                        "--qk-head-dim",
                        "--qk-pos-emb-head-dim",
                        "--v-head-dim",
                        "--moe-layer-freq",
                        "--max-position-embeddings",
                        "--init-method-std",
                        "--rotary-base",
                        "--norm-epsilon"})
    EXPECT_EQ(value_of(r, f), "<absent>") << f;
  // Training flags still come from the seed.
  EXPECT_EQ(value_of(r, "--seq-length"), "64");
  EXPECT_EQ(value_of(r, "--moe-aux-loss-coeff"), "1e-4");
  EXPECT_NE(value_of(r, "--tensorboard-dir").find("_nl4_gb3072_mb1_sp1_D1_T1_P1_E1_devices1_"),
            std::string::npos)
      << "layer count read from the config";
  // Explicit HL_* shape variables override the file.
  r = run_script(with(kWorld1, with(base, {{"HL_NUM_EXPERTS", "4"},
                                           {"HL_MOE_ROUTER_TOPK", "1"},
                                           {"HL_MOE_ROUTER_NUM_GROUPS", "2"},
                                           {"HL_MOE_ROUTER_GROUP_TOPK", "1"},
                                           {"HL_HIDDEN_SIZE", "96"},
                                           {"HL_MOE_SKIP_FIRST_LAYERS", "2"},
                                           {"HL_MTP_NUM_LAYERS", "0"}})),
                 dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--num-experts"), "4");
  EXPECT_EQ(value_of(r, "--moe-router-topk"), "1");
  EXPECT_EQ(value_of(r, "--moe-router-num-groups"), "2");
  EXPECT_EQ(value_of(r, "--moe-router-group-topk"), "1");
  EXPECT_EQ(value_of(r, "--hidden-size"), "96");
  EXPECT_EQ(value_of(r, "--mtp-num-layers"), "0");
  EXPECT_EQ(value_of(r, "--moe-layer-freq"), "'([0]*2+[1]*2)'");
  EXPECT_EQ(value_of(r, "--num-layers"), "<absent>");
}

TEST(Launcher, SmallShapesWithoutConfig) {
  const auto dir = testing::scratch_dir();
  const Result r = run_script(with(kWorld1, {{"HL_HIDDEN_SIZE", "64"},
                                             {"HL_FFN_HIDDEN_SIZE", "160"},
                                             {"HL_NUM_HEADS", "2"},
                                             {"HL_NUM_EXPERTS", "4"},
                                             {"HL_MOE_FFN_HIDDEN_SIZE", "32"},
                                             {"HL_Q_LORA_RANK", "32"},
                                             {"HL_KV_LORA_RANK", "16"},
                                             {"HL_QK_HEAD_DIM", "16"},
                                             {"HL_QK_POS_EMB_HEAD_DIM", "8"},
                                             {"HL_V_HEAD_DIM", "16"},
                                             {"HL_MOE_ROUTER_TOPK", "2"},
                                             {"HL_MOE_ROUTER_NUM_GROUPS", "2"},
                                             {"HL_MOE_ROUTER_GROUP_TOPK", "1"},
                                             {"HL_NUM_LAYERS", "4"},
                                             {"HL_SHARED_EXPERT_FFN_HIDDEN_SIZE", "32"}}),
                              dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--hidden-size"), "64");
  EXPECT_EQ(value_of(r, "--ffn-hidden-size"), "160");
  EXPECT_EQ(value_of(r, "--num-attention-heads"), "2");
  EXPECT_EQ(value_of(r, "--num-experts"), "4");
  EXPECT_EQ(value_of(r, "--moe-ffn-hidden-size"), "32");
  EXPECT_EQ(value_of(r, "--moe-shared-expert-intermediate-size"), "32");
  EXPECT_EQ(value_of(r, "--q-lora-rank"), "32");
  EXPECT_EQ(value_of(r, "--kv-lora-rank"), "16");
  EXPECT_EQ(value_of(r, "--qk-head-dim"), "16");
  EXPECT_EQ(value_of(r, "--qk-pos-emb-head-dim"), "8");
  EXPECT_EQ(value_of(r, "--v-head-dim"), "16");
  EXPECT_EQ(value_of(r, "--moe-router-topk"), "2");
  EXPECT_EQ(value_of(r, "--moe-router-num-groups"), "2");
  EXPECT_EQ(value_of(r, "--moe-router-group-topk"), "1");
  EXPECT_EQ(value_of(r, "--moe-layer-freq"), "'([0]*3+[1]*1)'");
}

TEST(Launcher, MultiNodeHostfileAndBinding) {
  const auto dir = testing::scratch_dir();
  const fs::path hosts = dir / "hosts";
  std::ofstream(hosts) << "10.0.0.7 slots=8\n10.0.0.8 slots=8\n";
  Result r = run_script({{"HL_NUM_NODES", "2"},
                         {"HL_DEVICES_PER_NODE", "8"},
                         {"HL_DP", "16"},
                         {"HL_TP", "1"},
                         {"HL_PP", "1"},
                         {"HL_EP", "16"},
                         {"HL_NUM_LAYERS", "4"},
                         {"HL_HOSTSFILE", hosts.string()},
                         {"HL_PE", "13"},
                         {"HL_PPR", "4"},
                         {"HL_SSH_PORT", "3022"},
                         {"MPI_ROOT", "/opt/mpi"},
                         {"ENV_FLAGS", "FOO=1,BAR"}},
                        dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "-n"), "16");
  EXPECT_EQ(value_of(r, "-hostfile"), hosts.string());
  EXPECT_TRUE(has(r, "-p3022"));
  EXPECT_EQ(value_of(r, "--prefix"), "/opt/mpi");
  EXPECT_EQ(value_of(r, "--bind-to"), "core");
  EXPECT_EQ(value_of(r, "--rank-by"), "slot");
  EXPECT_TRUE(has(r, "--report-bindings"));
  EXPECT_EQ(value_of(r, "--map-by"), "ppr:4:socket:PE=13");
  EXPECT_FALSE(has(r, "--oversubscribe")) << "only checked on one node";
  const auto x = values_of(r, "-x");
  EXPECT_TRUE(contains(x, "MASTER_ADDR=10.0.0.7"));
  EXPECT_TRUE(contains(x, "MASTER_PORT=12345"));
  EXPECT_TRUE(contains(x, "OMP_NUM_THREADS=13"));
  EXPECT_TRUE(contains(x, "FOO=1"));
  EXPECT_TRUE(contains(x, "BAR"));
  // HL_PE alone maps by socket.
  r = run_script({{"HL_NUM_NODES", "1"},
                  {"HL_DEVICES_PER_NODE", "2"},
                  {"HL_DP", "2"},
                  {"HL_TP", "1"},
                  {"HL_PP", "1"},
                  {"HL_EP", "1"},
                  {"HL_NUM_LAYERS", "4"},
                  {"HL_PE", "1"}},
                 dir);
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_EQ(value_of(r, "--map-by"), "socket:PE=1");
  // Several nodes without a hostfile: the seed reads /etc/mpi/hostfile.
  if (!fs::exists("/etc/mpi/hostfile")) {
    r = run_script(
        {{"HL_NUM_NODES", "2"}, {"HL_DP", "16"}, {"HL_TP", "1"}, {"HL_PP", "1"}, {"HL_NUM_LAYERS", "4"}},
        dir);
    EXPECT_EQ(r.rc, 1);
    EXPECT_EQ(r.out, "/etc/mpi/hostfile not available, set HL_HOSTSFILE\n");
  }
}

TEST(Launcher, SeedChecksAndMessages) {
  const auto dir = testing::scratch_dir();
  // Pure defaults: 61 layers with PP=2 fail the seed's own check.
  Result r = run_script({}, dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_EQ(r.out, "HL_NUM_LAYERS must be divisible by PP\n");
  r = run_script(with(seed_basic_example(), {{"HL_DP", "4"}}), dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_EQ(r.out, "NUM_NODES*DEVICES_PER_NODE != DP*TP*PP\n");
  r = run_script(with(seed_basic_example(), {{"HL_LAUNCHER_TYPE", "srun"}}), dir);
  EXPECT_EQ(r.rc, 2);
  EXPECT_EQ(r.out, "Unsupported launcher type = srun\n");
  r = run_script(with(seed_basic_example(), {{"HL_TOKENIZER_TYPE", "Foo"}}), dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_EQ(r.out, "incorrect HL_TOKENIZER_TYPE=Foo is set\n");
  r = run_script(with(seed_basic_example(), {{"HL_TOKENIZER_TYPE", "GPT2BPETokenizer"}}), dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.err.find("use HL_TOKENIZER_TYPE=HuggingFaceTokenizer"), std::string::npos) << r.err;
  r = run_script(with(seed_basic_example(), {{"HL_HNIC", "1"}}), dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_EQ(r.out, "Exiting: Host NIC is enabled and NUM_NODES is not greater than 1\n");
  r = run_script(with(seed_basic_example(), {{"HL_DROPOUT", "0.1"}}), dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.err.find("dsv3 has no dropout"), std::string::npos) << r.err;
  // torchrun: the seed's multi-node refusal, then dsv3's pointer to mpirun.
  r = run_script(
      with(seed_basic_example(), {{"HL_LAUNCHER_TYPE", "torchrun"}, {"HL_NUM_NODES", "2"}, {"HL_DP", "16"}}),
      dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_EQ(r.out, "NUM_NODES greater than 1 not supported by torchrun\n");
  r = run_script(with(seed_basic_example(), {{"HL_LAUNCHER_TYPE", "torchrun"}}), dir);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.err.find("Use HL_LAUNCHER_TYPE=mpirun"), std::string::npos) << r.err;
  // A real (not dry) run of several ranks with a binary that has no MPI runtime is refused before launching.
  r = run_script(with(seed_basic_example(), {{"HL_DSV3_BIN", "/bin/true"}}), dir, /*dry=*/false);
  EXPECT_EQ(r.rc, 1);
  EXPECT_NE(r.err.find("world size 8 needs dsv3's distributed runtime"), std::string::npos) << r.err;
  EXPECT_FALSE(fs::exists(dir / "out"));
}

// Preprocesses the tiny corpus into dir/tiny_text_document; the environment for a short real run on it (demo-cpu
// config, seq 32, GBS 4 in micro-batches of 2, 3 iterations, token drop with the alltoall dispatcher).
Env tiny_run_env(const fs::path& dir) {
  const std::string tok = (testing::source_dir() / "data/tiny-4k").string();
  const std::string pre = testing::dsv3_binary().string() + " preprocess --input " +
                          sq((testing::source_dir() / "tests/golden/preprocess/input.jsonl").string()) +
                          " --output-prefix " + sq((dir / "tiny").string()) +
                          " --tokenizer-type HuggingFaceTokenizer --tokenizer-model " + sq(tok) +
                          " --workers 1 --append-eod >/dev/null 2>&1";
  EXPECT_EQ(std::system(pre.c_str()), 0);
  return {{"HL_MODEL_CONFIG", (testing::source_dir() / "examples/deepseek/configs/demo-cpu.json").string()},
          {"HL_DATA_DIR_ROOT", dir.string()},
          {"HL_DATA_FILE_PREFIX", "tiny_text_document"},
          {"HL_TOKENIZER_MODEL", tok},
          {"HL_DATA_CACHE_DIR", (dir / "cache").string()},
          {"HL_SPLIT", "90,10,0"},
          {"HL_SEQ_LEN", "32"},
          {"HL_GBS", "4"},
          {"HL_MICRO_BATCH", "2"},
          {"HL_TRAIN_ITERS", "3"},
          {"HL_LOG_INTERVAL", "1"},
          {"HL_EVAL_INTERVAL", "2"},
          {"HL_EVAL_ITERS", "1"},
          {"HL_SAVE_INTERVAL", "2"},
          {"HL_TOKEN_DROP", "1"},
          {"HL_TOKEN_DISPATCHER_TYPE", "alltoall"},
          {"HL_RESULTS_DIR_PREFIX", dir.string()},
          {"OMP_NUM_THREADS", "1"}};
}

// A few real iterations through the script: world 1.
TEST(Launcher, SingleProcessRunPrintsMegatronIterationLines) {
  const auto dir = testing::scratch_dir();
  const Env env = with(with(kWorld1, tiny_run_env(dir)), {{"HL_KILL_SWITCH", (dir / "kill").string()}});
  Result r = run_script(env, dir, /*dry=*/false);
  ASSERT_EQ(r.rc, 0) << r.out << r.err;
  for (const char* line :
       {" iteration        1/       3 |", " iteration        2/       3 |", " iteration        3/       3 |",
        "| lm loss: ", "| grad norm: ", "validation loss at iteration 2",
        "successfully saved checkpoint from iteration 2", " layers | max/mean load "})
    EXPECT_NE(r.out.find(line), std::string::npos) << line << "\n" << r.out;
  // The run used the seed's output-directory layout.
  fs::path run_dir;
  for (const auto& e : fs::directory_iterator(dir / "out/deepseek_v3")) run_dir = e.path();
  ASSERT_FALSE(run_dir.empty());
  EXPECT_EQ(run_dir.filename().string().rfind(
                "bf16_transformer_engine_default_nl4_gb4_mb2_sp1_D1_T1_P1_E1_devices1_", 0),
            0u)
      << run_dir;
  EXPECT_TRUE(fs::exists(run_dir / "checkpoints/latest_checkpointed_iteration.txt"));
  EXPECT_FALSE(fs::is_empty(run_dir / "tensorboard"));
  // The kill switch (given as HL_KILL_SWITCH) stops the next run before training.
  std::ofstream(dir / "kill") << "";
  r = run_script(env, dir, /*dry=*/false);
  ASSERT_EQ(r.rc, 0) << r.out << r.err;
  EXPECT_NE(r.out.find("Detected kill switch at " + (dir / "kill").string() + ". Exiting"), std::string::npos)
      << r.out;
  EXPECT_EQ(r.out.find(" iteration        1/"), std::string::npos);
}

// The seed's basic example layout for real: 8 ranks (oversubscribed), DP 8 × EP 8 with one expert per rank, token
// drop with the alltoall dispatcher, micro-batches of 1 — through mpirun as the script builds it.
TEST(Launcher, SeedEightRankExpertParallelRun) {
  if (std::system("command -v mpirun >/dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun is not installed";
  const auto dir = testing::scratch_dir();
  const Env env = with(tiny_run_env(dir), {{"HL_NUM_NODES", "1"},
                                           {"HL_DEVICES_PER_NODE", "8"},
                                           {"HL_DP", "8"},
                                           {"HL_TP", "1"},
                                           {"HL_PP", "1"},
                                           {"HL_EP", "8"},
                                           {"HL_GBS", "8"},
                                           {"HL_MICRO_BATCH", "1"},
                                           {"HL_TRAIN_ITERS", "2"}});
  Result r = run_script(env, dir, /*dry=*/false);
  ASSERT_EQ(r.rc, 0) << r.out << r.err;
  EXPECT_NE(r.err.find("mpirun --allow-run-as-root "), std::string::npos) << r.err;
  for (const char* line :
       {"  expert_model_parallel_size ...................... 8", " iteration        2/       2 |",
        "| lm loss: ", "validation loss at iteration 2", "successfully saved checkpoint from iteration 2"})
    EXPECT_NE(r.out.find(line), std::string::npos) << line << "\n" << r.out;
  // One set of lines: only the last rank logs.
  size_t n = 0;
  for (size_t p = r.out.find(" iteration        2/"); p != std::string::npos;
       p = r.out.find(" iteration        2/", p + 1))
    ++n;
  EXPECT_EQ(n, 1u) << r.out;
}

// The seed's multi-node layout, scaled to 4 ranks: PP 2 × DP 2 × EP 2 with full recompute (HL_CKP_ACT=1), and the
// demo config's MTP layer on the last stage.
TEST(Launcher, PipelineExpertDataParallelRun) {
  if (std::system("command -v mpirun >/dev/null 2>&1") != 0) GTEST_SKIP() << "mpirun is not installed";
  const auto dir = testing::scratch_dir();
  const Env env = with(tiny_run_env(dir), {{"HL_NUM_NODES", "1"},
                                           {"HL_DEVICES_PER_NODE", "4"},
                                           {"HL_DP", "2"},
                                           {"HL_TP", "1"},
                                           {"HL_PP", "2"},
                                           {"HL_EP", "2"},
                                           {"HL_CKP_ACT", "1"},
                                           {"HL_MICRO_BATCH", "1"},
                                           {"HL_TRAIN_ITERS", "2"}});
  // HL_FISRT_PP_STAGE_LAYERS (sic) becomes --decoder-first-pipeline-num-layers: here 1 of the 4 layers on stage 0.
  Result r = run_script(with(env, {{"HL_FISRT_PP_STAGE_LAYERS", "1"}}), dir, /*dry=*/false);
  ASSERT_EQ(r.rc, 0) << r.out << r.err;
  for (const char* line :
       {"  decoder_first_pipeline_num_layers ............... 1",
        "  pipeline_model_parallel_size .................... 2", " iteration        2/       2 |",
        "| mtp_1 loss: ", "validation loss at iteration 2", "successfully saved checkpoint from iteration 2",
        " layers | max/mean load "})
    EXPECT_NE(r.out.find(line), std::string::npos) << line << "\n" << r.out;
}

}  // namespace
}  // namespace dsv3
