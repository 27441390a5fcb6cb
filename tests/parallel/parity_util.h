// Layout parity for `dsv3 train` under mpirun: a fixture that runs the demo model in fp32 on the tiny dataset
// with one layout or another (TensorBoard in dir/<name>/tb, checkpoint in dir/<name>/ckpt) and compares two
// runs — the losses and grad norms of every iteration, the evaluation losses and the final weights. Used by
// the data- and expert-parallel tests. Skipped without mpirun.
#pragma once
#include <cstdio>
#include <iostream>
#include <regex>

#include "train_util.h"

namespace dsv3::testing {

inline constexpr double kParityTol = 1e-6;

// Max relative difference of the per-iteration scalars of steps [from, to] between two TensorBoard dirs (a tag
// present in only one of them counts as infinitely different).
inline double scalars_rel_diff(const std::filesystem::path& a_dir, const std::filesystem::path& b_dir,
                               int64_t from, int64_t to, std::string* where) {
  static const char* const kTags[] = {"lm loss", "load_balancing_loss", "mtp_1 loss", "grad-norm"};
  const auto a = read_scalars(a_dir), b = read_scalars(b_dir);
  double worst = 0;
  for (const char* tag : kTags) {
    if (!a.count(tag) && !b.count(tag)) continue;  // e.g. no MTP loss in either run
    for (int64_t step = from; step <= to; ++step) {
      auto ia = a.find(tag), ib = b.find(tag);
      if (ia == a.end() || ib == b.end() || !ia->second.count(step) || !ib->second.count(step)) {
        *where = std::string("missing ") + tag + " at step " + std::to_string(step);
        return INFINITY;
      }
      const double d = rel_diff(ia->second.at(step), ib->second.at(step));
      if (d >= worst) {
        worst = d;
        *where = std::string(tag) + " step " + std::to_string(step) + ": " +
                 std::to_string(ia->second.at(step)) + " vs " + std::to_string(ib->second.at(step));
      }
    }
  }
  return worst;
}

// "validation loss at iteration N | lm loss value: X" (and the test-set line): the values, in order.
inline std::vector<double> eval_losses(const std::string& out) {
  std::vector<double> v;
  std::regex re(R"(lm loss value: ([0-9.E+-]+))");
  for (std::sregex_iterator it(out.begin(), out.end(), re), end; it != end; ++it)
    v.push_back(std::stod((*it)[1]));
  return v;
}

class LayoutParity : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!have_mpirun()) GTEST_SKIP() << "mpirun is not installed (apt-get install openmpi-bin)";
    dir_ = scratch_dir();
    data_ = make_tiny_data(dir_);
  }
  // A run of `iters` iterations on np ranks (1: no mpirun).
  CmdResult train(const std::string& name, int np, int mbs, int gbs, int iters,
                  const std::string& extra = "") {
    const auto d = dir_ / name;
    std::filesystem::create_directories(d);
    const std::string args = tiny_train_args(dir_, data_, mbs, gbs) + " --train-iters " +
                             std::to_string(iters) + " --tensorboard-dir " + (d / "tb").string() +
                             " --save " + (d / "ckpt").string() + " " + extra;
    return np == 1 ? run_dsv3_single(args, dir_) : run_dsv3_mpi(np, args, dir_);
  }
  std::filesystem::path final_weights(const std::string& name, int iters) {
    char it[32];
    std::snprintf(it, sizeof it, "iter_%07d", iters);
    return dir_ / name / "ckpt" / it;
  }
  // Runs `name` on np ranks with `layout` flags, and (once) "single" on one rank, both with `common` flags;
  // then expects the same per-iteration scalars, evaluation losses and final weights within kParityTol (each
  // tensor's weights within weights_tol, for layouts that add partial sums in another order: tensor parallelism;
  // the whole model's still within kParityTol).
  void expect_parity(const std::string& name, int np, int mbs, int gbs, int iters, const std::string& layout,
                     const std::string& common = "", const std::string& single = "single",
                     double weights_tol = kParityTol) {
    if (!std::filesystem::exists(dir_ / single / "tb")) {
      auto s = train(single, 1, mbs, gbs, iters, common);
      ASSERT_EQ(s.rc, 0) << s.out;
      single_out_[single] = s.out;
    }
    auto p = train(name, np, mbs, gbs, iters, layout + " " + common);
    last_out_ = p.out;
    ASSERT_EQ(p.rc, 0) << p.out;
    // One set of log lines (the last rank's), the same count as the single run's.
    EXPECT_EQ(iteration_log_lines(p.out).size(), static_cast<size_t>(iters)) << p.out;
    std::string where;
    const double loss_diff = scalars_rel_diff(dir_ / single / "tb", dir_ / name / "tb", 1, iters, &where);
    EXPECT_LE(loss_diff, kParityTol) << where;
    const auto ea = eval_losses(single_out_[single]), eb = eval_losses(p.out);
    ASSERT_EQ(ea.size(), 2u) << single_out_[single];
    ASSERT_EQ(eb.size(), 2u) << p.out;
    double eval_diff = 0;
    for (size_t k = 0; k < ea.size(); ++k) eval_diff = std::max(eval_diff, rel_diff(ea[k], eb[k]));
    EXPECT_LE(eval_diff, 2e-6);  // printed with 7 significant digits
    const auto w =
        weights_diff(read_weights(final_weights(single, iters)), read_weights(final_weights(name, iters)));
    EXPECT_LE(w.l2_rel, weights_tol) << w.l2_worst;
    EXPECT_LE(w.model_l2_rel,
              kParityTol);  // a looser per-tensor bound still holds the model as a whole to it
    std::cout << "[ parity  ] " << name << " (np " << np << ", " << layout << ") mbs " << mbs << " GBS "
              << gbs << ", " << iters << " iterations: max rel diff losses/grad norm " << loss_diff << " ("
              << where << "), eval " << eval_diff << "; final weights: model L2 " << w.model_l2_rel
              << ", per-tensor L2 " << w.l2_rel << " (" << w.l2_worst << "), max elementwise " << w.max_rel
              << " of the tensor's max (" << w.max_worst << ")\n";
  }
  // Keeps only iteration `iter` of run `name`'s checkpoint, in dir/<to> (the tracker then names it).
  std::filesystem::path checkpoint_at(const std::string& name, int iter, const std::string& to) {
    char it[32];
    std::snprintf(it, sizeof it, "iter_%07d", iter);
    const auto dst = dir_ / to;
    std::filesystem::create_directories(dst);
    std::filesystem::copy(dir_ / name / "ckpt" / it, dst / it, std::filesystem::copy_options::recursive);
    std::ofstream(dst / "latest_checkpointed_iteration.txt") << iter;
    return dst;
  }

  std::filesystem::path dir_;
  std::string data_;
  std::map<std::string, std::string> single_out_;
  std::string last_out_;  // the layout run's output of the last expect_parity
};

}  // namespace dsv3::testing
