// Optimizer pieces (src/optim/) against the reference code's own numbers (tests/reference/optim_golden.py):
// torch.optim.AdamW, Megatron-Core's OptimizerParamScheduler, numpy norms with Megatron's clip rule, and
// Megatron-Core's get_updated_expert_bias. Plus thread-count independence and the large-buffer paths.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "core/error.h"
#include "optim/adamw.h"
#include "optim/expert_bias.h"
#include "optim/grad_clip.h"
#include "optim/lr_schedule.h"
#include "test_util.h"

namespace dsv3 {
namespace {

using nlohmann::json;

json load_golden(const std::string& name) {
  auto path = testing::source_dir() / "tests" / "golden" / "optim" / name;
  std::ifstream f(path);
  if (!f) throw std::runtime_error("missing golden file " + path.string());
  return json::parse(f);
}

std::vector<float> floats(const json& j) {
  std::vector<float> v;
  v.reserve(j.size());
  for (const auto& x : j) v.push_back(static_cast<float>(x.get<double>()));
  return v;
}

// |a-b| <= rel·|b|, with the elements that are tiny relative to the tensor (|b| < 1e-3·max|b|, where the
// difference of two fp32 computations is dominated by cancellation) held to rel·1e-3·max|b| instead.
void expect_close(const std::vector<float>& a, const std::vector<float>& b, double rel,
                  const std::string& what, double* worst_rel = nullptr) {
  ASSERT_EQ(a.size(), b.size()) << what;
  double amax = 0;
  for (float x : b) amax = std::max(amax, std::fabs(double(x)));
  const double floor = 1e-3 * amax;
  for (size_t i = 0; i < a.size(); ++i) {
    const double d = std::fabs(double(a[i]) - double(b[i]));
    const double ref = std::max(std::fabs(double(b[i])), floor);
    if (worst_rel && ref > 0) *worst_rel = std::max(*worst_rel, d / ref);
    ASSERT_LE(d, rel * ref) << what << " element " << i << ": ours " << a[i] << " reference " << b[i];
  }
}

// ------------------------------------------------------------------------------------------------ AdamW

TEST(OptimAdamW, MatchesTorchAdamWOverSteps) {
  const json g = load_golden("adamw.json");
  const int64_t numel = g["numel"];
  AdamW opt(numel, AdamWConfig{g["beta1"].get<double>(), g["beta2"].get<double>(), g["eps"].get<double>()});
  std::vector<float> p = floats(g["params0"]);
  ASSERT_EQ(int64_t(p.size()), numel);
  const auto& lrs = g["lr"];
  double worst = 0;
  for (size_t s = 0; s < lrs.size(); ++s) {
    const std::vector<float> grad = floats(g["grads"][s]);
    opt.begin_step();
    for (const auto& r : g["ranges"])
      opt.update(p.data(), grad.data(), r["begin"], r["n"], lrs[s].get<double>(), r["wd"].get<double>());
    const auto& want = g["steps"][s];
    const std::string at = "step " + std::to_string(s + 1);
    const std::vector<float> wp = floats(want["params"]), wm = floats(want["exp_avg"]),
                             wv = floats(want["exp_avg_sq"]);
    expect_close(p, wp, 1e-6, at + " params", &worst);
    expect_close(opt.exp_avg(), wm, 1e-6, at + " exp_avg", &worst);
    expect_close(opt.exp_avg_sq(), wv, 1e-6, at + " exp_avg_sq", &worst);
    // Stronger: the same fp32 operations in the same order as torch's CPU kernels give identical bits.
    EXPECT_EQ(p, wp) << at;
    EXPECT_EQ(opt.exp_avg(), wm) << at;
    EXPECT_EQ(opt.exp_avg_sq(), wv) << at;
    if (s == 0) {  // lr 0 on the first step (Megatron warmup): params unchanged, moments updated
      EXPECT_EQ(p, floats(g["params0"]));
    }
  }
  EXPECT_EQ(opt.step(), int64_t(lrs.size()));
  EXPECT_EQ(worst, 0.0);
}

TEST(OptimAdamW, WeightDecayOnlyOnItsRange) {
  // wd acts as p·(1 - lr·wd) on its range only; with zero grads the Adam term is 0 (m = v = 0).
  AdamW opt(8, AdamWConfig{0.9, 0.95, 1e-8});
  std::vector<float> p(8, 2.0f), g(8, 0.0f);
  opt.begin_step();
  opt.update(p.data(), g.data(), 0, 4, 0.01, 0.1);
  opt.update(p.data(), g.data(), 4, 4, 0.01, 0.0);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(p[i], 2.0f * static_cast<float>(1.0 - 0.01 * 0.1));
  for (int i = 4; i < 8; ++i) EXPECT_EQ(p[i], 2.0f);
}

TEST(OptimAdamW, ChecksRangesAndStepOrder) {
  AdamW opt(10, AdamWConfig{});
  std::vector<float> p(10), g(10);
  EXPECT_THROW(opt.update(p.data(), g.data(), 0, 10, 1e-3, 0.0), Error);  // before begin_step
  opt.begin_step();
  EXPECT_THROW(opt.update(p.data(), g.data(), 5, 6, 1e-3, 0.0), Error);
  EXPECT_THROW(opt.update(p.data(), g.data(), -1, 2, 1e-3, 0.0), Error);
  EXPECT_THROW(AdamW(4, AdamWConfig{1.0, 0.95, 1e-8}), Error);
  opt.set_step(41);
  opt.begin_step();
  EXPECT_EQ(opt.step(), 42);
}

// The vectorised multithreaded loop equals a plain scalar loop on a large buffer, independent of thread count;
// resuming from saved moments and step continues identically.
TEST(OptimAdamW, LargeBufferThreadsAndResume) {
  const int64_t n = (1 << 20) + 37;
  std::vector<float> p0(n), g1(n), g2(n);
  uint32_t s = 12345;
  auto rnd = [&] {
    s = s * 1664525u + 1013904223u;
    return (float(s >> 8) / float(1 << 24)) * 2.f - 1.f;
  };
  for (int64_t i = 0; i < n; ++i) {
    p0[i] = rnd();
    g1[i] = rnd() * 1e-2f;
    g2[i] = rnd();
  }
  auto run = [&](int threads, std::vector<float>& p, AdamW& opt, const std::vector<float>& g, double lr) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    opt.begin_step();
    opt.update(p.data(), g.data(), 0, n / 2, lr, 0.1);
    opt.update(p.data(), g.data(), n / 2, n - n / 2, lr, 0.0);
    omp_set_num_threads(saved);
  };
  std::vector<float> pa = p0, pb = p0;
  AdamW a(n, AdamWConfig{0.9, 0.95, 1e-8}), b(n, AdamWConfig{0.9, 0.95, 1e-8});
  run(1, pa, a, g1, 1e-3);
  run(4, pb, b, g1, 1e-3);
  EXPECT_EQ(pa, pb);
  EXPECT_EQ(a.exp_avg(), b.exp_avg());
  EXPECT_EQ(a.exp_avg_sq(), b.exp_avg_sq());
  // resume b's state into a fresh optimizer
  AdamW c(n, AdamWConfig{0.9, 0.95, 1e-8});
  c.exp_avg() = b.exp_avg();
  c.exp_avg_sq() = b.exp_avg_sq();
  c.set_step(b.step());
  std::vector<float> pc = pb;
  run(3, pb, b, g2, 2e-3);
  run(2, pc, c, g2, 2e-3);
  EXPECT_EQ(pb, pc);
  // scalar double-precision oracle for step 1 (a): within fp32 rounding
  double worst = 0;
  for (int64_t i = 0; i < n; i += 997) {
    const double g = g1[i], m = 0.1 * g, v = 0.05 * g * g;
    const double wd = i < n / 2 ? 0.1 : 0.0;
    const double want = p0[i] * (1 - 1e-3 * wd) - 1e-3 * (m / 0.1) / (std::sqrt(v / 0.05) + 1e-8);
    worst = std::max(worst, std::fabs(pa[i] - want) / std::max(std::fabs(want), 1e-3));
  }
  EXPECT_LT(worst, 1e-6);
}

// ------------------------------------------------------------------------------------------------ LR schedule

LrScheduleConfig config_from(const json& c) {
  LrScheduleConfig k;
  k.max_lr = c["max_lr"];
  k.min_lr = c["min_lr"];
  k.init_lr = c["init_lr"];
  k.warmup_steps = c["warmup_steps"];
  k.decay_steps = c["decay_steps"];
  k.decay_style = c["decay_style"];
  return k;
}

TEST(OptimLrSchedule, MatchesMegatronOptimizerParamScheduler) {
  const json g = load_golden("lr_schedule.json");
  int checked = 0;
  for (const auto& cs : g["cases"]) {
    const std::string name = cs["name"];
    LrScheduler sch(config_from(cs["config"]));
    const auto& samples = cs["samples"];
    auto expect_sample = [&](const json& smp) {
      const int64_t n = smp[0];
      const double want = smp[1];
      ASSERT_EQ(sch.num_steps(), n) << name;
      const double got = sch.lr();
      EXPECT_LE(std::fabs(got - want), 1e-12 * std::fabs(want))
          << name << " at num_steps " << n << ": ours " << got << " megatron " << want;
      EXPECT_EQ(sch.lr_at(n), got);
      ++checked;
    };
    expect_sample(samples[0]);
    for (size_t i = 0; i < cs["increments"].size(); ++i) {
      sch.step(cs["increments"][i].get<int64_t>());
      expect_sample(samples[i + 1]);
    }
  }
  EXPECT_GT(checked, 1000);
}

TEST(OptimLrSchedule, SpecExampleGbs3072) {
  // spec §8: GBS 3072, warmup 2000·GBS, cosine to 2.2e-5 at 320000·GBS. Iteration 1 runs at lr 0; the lr logged
  // after iteration 10 (num_steps = 10·GBS, the lr of iteration 11) is 1.1e-6.
  const int64_t gbs = 3072;
  LrScheduler s(LrScheduleConfig{2.2e-4, 2.2e-5, 0.0, 2000 * gbs, 320000 * gbs, "cosine"});
  EXPECT_EQ(s.lr(), 0.0);
  for (int it = 1; it <= 10; ++it) s.step(gbs);
  EXPECT_NEAR(s.lr(), 1.1e-6, 1e-18);
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.6E", s.lr());
  EXPECT_STREQ(buf, "1.100000E-06");
  s.set_num_steps(2000 * gbs);
  EXPECT_EQ(s.lr(), 2.2e-4);
  s.set_num_steps(320000 * gbs);
  EXPECT_NEAR(s.lr(), 2.2e-5, 1e-20);
  s.set_num_steps(320001 * gbs);
  EXPECT_EQ(s.lr(), 2.2e-5);
}

TEST(OptimLrSchedule, RejectsWhatMegatronAsserts) {
  const json g = load_golden("lr_schedule.json");
  ASSERT_FALSE(g["rejected"].empty());
  for (const auto& r : g["rejected"]) {
    EXPECT_THROW(LrScheduler(config_from(r["config"])), Error) << r["name"];
  }
  try {
    LrScheduler(LrScheduleConfig{1e-3, 0, 0, 100, 100, "cosine"});
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("warmup steps (100) must be < decay steps (100)"), std::string::npos)
        << e.what();
  }
  EXPECT_THROW(LrScheduler(LrScheduleConfig{1e-3, 0, 0, 1, 10, "WSD"}), Error);
  LrScheduler ok(LrScheduleConfig{1e-3, 0, 0, 1, 10, "linear"});
  EXPECT_THROW(ok.set_num_steps(-1), Error);
}

// ------------------------------------------------------------------------------------------------ grad clip

TEST(OptimGradClip, NormAndCoefficientMatchNumpyAndMegatron) {
  const json g = load_golden("grad_clip.json");
  for (const auto& cs : g["cases"]) {
    const std::string name = cs["name"];
    std::vector<float> grads = floats(cs["grads"]);
    const double norm = l2_norm(grads.data(), int64_t(grads.size()));
    const double want = cs["norm"];
    EXPECT_LE(std::fabs(norm - want), 1e-12 * want) << name << ": ours " << norm << " numpy " << want;
    const double coeff = clip_coefficient(norm, cs["max_norm"].get<double>());
    EXPECT_LE(std::fabs(coeff - cs["clip_coeff"].get<double>()), 1e-12) << name;
    if (cs.contains("clipped")) {
      if (coeff < 1.0) scale_inplace(grads.data(), int64_t(grads.size()), static_cast<float>(coeff));
      // coefficient differs from numpy's only at 1e-12 relative, so the fp32 products agree to 1 ulp
      expect_close(grads, floats(cs["clipped"]), 2e-7, name + " clipped");
    }
  }
}

TEST(OptimGradClip, ClipCoefficientRule) {
  EXPECT_EQ(clip_coefficient(0.5, 1.0), 1.0);
  EXPECT_EQ(clip_coefficient(1.0, 1.0), 1.0 / (1.0 + 1e-6));  // Megatron clips at exactly max_norm too
  EXPECT_EQ(clip_coefficient(4.0, 1.0), 1.0 / (4.0 + 1e-6));
  EXPECT_EQ(clip_coefficient(std::numeric_limits<double>::quiet_NaN(), 1.0), 1.0);
  EXPECT_EQ(clip_coefficient(std::numeric_limits<double>::infinity(), 1.0), 0.0);
}

TEST(OptimGradClip, DeterministicAcrossThreadsAndPropagatesNonFinite) {
  const int64_t n = 3'000'017;
  std::vector<float> g(n);
  uint32_t s = 7;
  for (auto& x : g) {
    s = s * 1664525u + 1013904223u;
    x = (float(s >> 8) / float(1 << 24) - 0.5f) * 3.f;
  }
  const int saved = omp_get_max_threads();
  std::vector<double> r;
  for (int t : {1, 2, 3, 8}) {
    omp_set_num_threads(t);
    r.push_back(l2_norm(g.data(), n));
  }
  omp_set_num_threads(saved);
  for (double x : r) EXPECT_EQ(x, r[0]);
  long double exact = 0;
  for (float x : g) exact += (long double)x * x;
  EXPECT_NEAR(r[0], std::sqrt(double(exact)), 1e-12 * r[0]);
  // a norm over two ranges = sqrt of summed squares
  EXPECT_NEAR(std::sqrt(sum_of_squares(g.data(), 1000) + sum_of_squares(g.data() + 1000, n - 1000)), r[0],
              1e-12 * r[0]);
  g[n - 5] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(std::isinf(l2_norm(g.data(), n)));
  g[17] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(std::isnan(l2_norm(g.data(), n)));
  EXPECT_EQ(l2_norm(g.data(), 0), 0.0);
  std::vector<float> h = {3.f, -4.f};
  scale_inplace(h.data(), 2, 0.5f);
  EXPECT_EQ(h, (std::vector<float>{1.5f, -2.f}));
}

// ------------------------------------------------------------------------------------------------ expert bias

TEST(OptimExpertBias, MatchesMegatronGetUpdatedExpertBias) {
  const json g = load_golden("expert_bias.json");
  for (const auto& cs : g["cases"]) {
    const std::string name = cs["name"];
    const double rate = cs["rate"];
    for (size_t l = 0; l < cs["counts"].size(); ++l) {
      std::vector<int64_t> counts = cs["counts"][l].get<std::vector<int64_t>>();
      std::vector<float> bias = floats(cs["bias"][l]);
      update_expert_bias(bias.data(), counts.data(), int64_t(counts.size()), rate);
      const std::vector<float> want = floats(cs["updated"][l]);
      for (size_t e = 0; e < bias.size(); ++e)
        ASSERT_EQ(bias[e], want[e]) << name << " layer " << l << " expert " << e;  // bit-exact
    }
  }
}

TEST(OptimExpertBias, EqualCountsLeaveBiasUnchanged) {
  // spec §7.1.8 quirk: with pad-to-capacity every expert's count is the capacity, so the bias never moves.
  std::vector<int64_t> counts(256, 96);
  std::vector<float> bias(256);
  for (int i = 0; i < 256; ++i) bias[i] = 0.001f * float(i % 7) - 0.003f;
  const std::vector<float> before = bias;
  for (int it = 0; it < 5; ++it) update_expert_bias(bias.data(), counts.data(), 256, 1e-3);
  EXPECT_EQ(bias, before);
  std::vector<int64_t> c2 = {0, 10, 5, 5};
  std::vector<float> b2(4, 0.f);
  update_expert_bias(b2.data(), c2.data(), 4, 1e-3);
  EXPECT_EQ(b2, (std::vector<float>{0.001f, -0.001f, 0.f, 0.f}));
  EXPECT_THROW(update_expert_bias(b2.data(), c2.data(), 0, 1e-3), Error);
}

}  // namespace
}  // namespace dsv3
