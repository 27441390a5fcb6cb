// MoE layer: backward vs finite differences of a double-precision reference (full routing, capacity dropping
// and sequence aux loss included), forward/backward vs HF transformers 4.57.6 DeepseekV3MoE fixtures
// (tests/reference/moe_golden.py) and vs Megatron-Core 0.16.1 semantics
// (tests/reference/moe_megatron_ref.py), unbalanced routing, and bf16 mode.
#include "moe/moe.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>

#include "core/philox.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace dsv3 {
namespace {

// ---------------- double-precision reference (the oracle; mirrors router.h's documented semantics)
// -------------

struct RefWeights {
  std::vector<double> x, gate_w, gate_proj, up_proj, down_proj, shared_gate, shared_up, shared_down;
  std::vector<float> bias;
  std::vector<std::vector<double>*> all() {
    return {&x, &gate_w, &gate_proj, &up_proj, &down_proj, &shared_gate, &shared_up, &shared_down};
  }
};
const char* kNames[] = {"x",         "gate_w",      "gate_proj", "up_proj",
                        "down_proj", "shared_gate", "shared_up", "shared_down"};

struct RefRouting {
  std::vector<std::vector<int>> idx;   // per token, sorted ascending
  std::vector<std::vector<int>> kept;  // per token, kept experts sorted ascending
};

std::vector<int> topk_desc(const std::vector<double>& v, int k) {
  std::vector<int> o(v.size());
  std::iota(o.begin(), o.end(), 0);
  std::stable_sort(o.begin(), o.end(), [&](int a, int b) { return v[a] > v[b]; });
  o.resize(k);
  return o;
}

double silu(double a) {
  return a / (1.0 + std::exp(-a));
}

// Σ out⊙dout + seq aux loss; also returns out and the routing.
double ref_loss(const MoeConfig& c, int64_t t, int64_t batch, const RefWeights& w,
                const std::vector<double>& dout, std::vector<double>* out_TD = nullptr,
                RefRouting* routing = nullptr) {
  const RouterConfig& rc = c.router;
  const int d = c.hidden, f = c.ffn, e_n = rc.num_experts, k_n = rc.topk, g_n = rc.n_group;
  const int sf = c.shared_ffn();
  std::vector<double> s(t * e_n);
  for (int64_t i = 0; i < t; ++i)
    for (int e = 0; e < e_n; ++e) {
      double l = 0;
      for (int j = 0; j < d; ++j) l += w.x[i * d + j] * w.gate_w[e * d + j];
      s[i * e_n + e] = 1.0 / (1.0 + std::exp(-l));
    }
  std::vector<std::vector<int>> idx(t);
  std::vector<std::vector<double>> wt(t);
  for (int64_t i = 0; i < t; ++i) {
    std::vector<double> ch(e_n);
    for (int e = 0; e < e_n; ++e) ch[e] = s[i * e_n + e] + (w.bias.empty() ? 0.0 : w.bias[e]);
    if (g_n > 1) {
      const int gs = e_n / g_n;
      std::vector<double> gsc(g_n);
      for (int g = 0; g < g_n; ++g) {
        std::vector<double> sub(ch.begin() + g * gs, ch.begin() + (g + 1) * gs);
        for (int j : topk_desc(sub, rc.group_score_topk)) gsc[g] += sub[j];
      }
      std::vector<bool> keep(g_n, false);
      for (int g : topk_desc(gsc, rc.topk_group)) keep[g] = true;
      const double m = rc.group_mask == GroupMaskValue::kNegInf ? -INFINITY : 0.0;
      for (int e = 0; e < e_n; ++e)
        if (!keep[e / gs]) ch[e] = m;
    }
    idx[i] = topk_desc(ch, k_n);
    double sum = 0;
    for (int e : idx[i]) sum += s[i * e_n + e];
    for (int e : idx[i])
      wt[i].push_back((rc.normalise ? s[i * e_n + e] / (sum + 1e-20) : s[i * e_n + e]) *
                      static_cast<double>(rc.scaling_factor));
  }
  std::vector<std::vector<bool>> kept(t, std::vector<bool>(k_n, true));
  if (!rc.dropless()) {
    const int64_t cap = expert_capacity(t, k_n, e_n, rc.capacity_factor);
    if (cap <= t)
      for (int e = 0; e < e_n; ++e) {
        std::vector<std::pair<int64_t, int>> cand;
        for (int64_t i = 0; i < t; ++i)
          for (int j = 0; j < k_n; ++j)
            if (idx[i][j] == e) cand.push_back({i, j});
        // Megatron's token order is [S, B]: position first, then sequence.
        const int64_t seq = t / batch;
        std::stable_sort(cand.begin(), cand.end(), [&](auto a, auto b) {
          return (a.first % seq) * batch + a.first / seq < (b.first % seq) * batch + b.first / seq;
        });
        if (rc.drop_policy == DropPolicy::kProbs)
          std::stable_sort(cand.begin(), cand.end(),
                           [&](auto a, auto b) { return wt[a.first][a.second] > wt[b.first][b.second]; });
        for (size_t q = cap; q < cand.size(); ++q) kept[cand[q].first][cand[q].second] = false;
      }
  }
  std::vector<double> out(t * d, 0.0);
  std::vector<double> h(std::max(f, sf));
  auto swiglu_mlp = [&](const double* xi, const double* wg, const double* wu, const double* wd, int width,
                        double scale, double* o) {
    for (int q = 0; q < width; ++q) {
      double a = 0, b = 0;
      for (int j = 0; j < d; ++j) a += xi[j] * wg[q * d + j], b += xi[j] * wu[q * d + j];
      h[q] = silu(a) * b * scale;
    }
    for (int j = 0; j < d; ++j) {
      double acc = 0;
      for (int q = 0; q < width; ++q) acc += h[q] * wd[j * width + q];
      o[j] += acc;
    }
  };
  for (int64_t i = 0; i < t; ++i) {
    for (int j = 0; j < k_n; ++j) {
      if (!kept[i][j]) continue;
      const int e = idx[i][j];
      swiglu_mlp(&w.x[i * d], &w.gate_proj[e * f * d], &w.up_proj[e * f * d], &w.down_proj[e * d * f], f,
                 wt[i][j], &out[i * d]);
    }
    if (c.n_shared > 0)
      swiglu_mlp(&w.x[i * d], w.shared_gate.data(), w.shared_up.data(), w.shared_down.data(), sf, 1.0,
                 &out[i * d]);
  }
  double loss = 0;
  for (int64_t i = 0; i < t * d; ++i) loss += out[i] * dout[i];
  if (rc.seq_aux_coeff > 0) {
    const int64_t seq = t / batch;
    double aux = 0;
    for (int64_t b = 0; b < batch; ++b) {
      std::vector<double> psum(e_n, 0.0), cnt(e_n, 0.0);
      for (int64_t q = 0; q < seq; ++q) {
        const int64_t i = b * seq + q;
        double z = 1e-20;
        for (int e = 0; e < e_n; ++e) z += s[i * e_n + e];
        std::vector<double> p(e_n);
        for (int e = 0; e < e_n; ++e) psum[e] += (p[e] = s[i * e_n + e] / z);
        for (int e : topk_desc(p, k_n)) cnt[e] += 1;
      }
      for (int e = 0; e < e_n; ++e) aux += psum[e] * cnt[e] * e_n / (double(k_n) * seq * seq);
    }
    loss += rc.seq_aux_coeff * aux / batch;
  }
  if (out_TD) *out_TD = out;
  if (routing) {
    routing->idx.assign(t, {});
    routing->kept.assign(t, {});
    for (int64_t i = 0; i < t; ++i) {
      for (int j = 0; j < k_n; ++j) {
        routing->idx[i].push_back(idx[i][j]);
        if (kept[i][j]) routing->kept[i].push_back(idx[i][j]);
      }
      std::sort(routing->idx[i].begin(), routing->idx[i].end());
      std::sort(routing->kept[i].begin(), routing->kept[i].end());
    }
  }
  return loss;
}

// ---------------- fp32 buffers for the layer under test ----------------

struct Buffers {
  std::vector<float> x, gate_w, bias, gate_proj, up_proj, down_proj, shared_gate, shared_up, shared_down;
  std::vector<float> g_gate_w, g_gate_proj, g_up_proj, g_down_proj, g_shared_gate, g_shared_up, g_shared_down;
  void alloc_grads() {
    g_gate_w.assign(gate_w.size(), 0.f);
    g_gate_proj.assign(gate_proj.size(), 0.f);
    g_up_proj.assign(up_proj.size(), 0.f);
    g_down_proj.assign(down_proj.size(), 0.f);
    g_shared_gate.assign(shared_gate.size(), 0.f);
    g_shared_up.assign(shared_up.size(), 0.f);
    g_shared_down.assign(shared_down.size(), 0.f);
  }
  MoeParams params() const {
    return {gate_w.data(),    bias.empty() ? nullptr : bias.data(),
            gate_proj.data(), up_proj.data(),
            down_proj.data(), shared_gate.data(),
            shared_up.data(), shared_down.data()};
  }
  MoeGrads grads() {
    return {g_gate_w.data(),      g_gate_proj.data(), g_up_proj.data(),    g_down_proj.data(),
            g_shared_gate.data(), g_shared_up.data(), g_shared_down.data()};
  }
  std::vector<const std::vector<float>*> grad_list() const {
    return {nullptr,      &g_gate_w,      &g_gate_proj, &g_up_proj,
            &g_down_proj, &g_shared_gate, &g_shared_up, &g_shared_down};
  }
};

std::vector<float> randn(uint64_t stream, size_t n, float std) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = std * philox_normal(1234, stream, i);
  return v;
}

Buffers random_buffers(const MoeConfig& c, int64_t t, uint64_t seed_stream) {
  const int64_t d = c.hidden, f = c.ffn, e = c.router.num_experts, sf = c.shared_ffn();
  Buffers b;
  b.x = randn(seed_stream + 0, t * d, 1.f);
  b.gate_w = randn(seed_stream + 1, e * d, 0.3f);
  b.bias = randn(seed_stream + 2, e, 0.15f);
  b.gate_proj = randn(seed_stream + 3, e * f * d, 0.2f);
  b.up_proj = randn(seed_stream + 4, e * f * d, 0.2f);
  b.down_proj = randn(seed_stream + 5, e * d * f, 0.2f);
  b.shared_gate = randn(seed_stream + 6, sf * d, 0.2f);
  b.shared_up = randn(seed_stream + 7, sf * d, 0.2f);
  b.shared_down = randn(seed_stream + 8, d * sf, 0.2f);
  return b;
}

RefWeights to_ref(const Buffers& b) {
  auto dbl = [](const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); };
  return {dbl(b.x),           dbl(b.gate_w),    dbl(b.gate_proj),   dbl(b.up_proj), dbl(b.down_proj),
          dbl(b.shared_gate), dbl(b.shared_up), dbl(b.shared_down), b.bias};
}

// Normwise comparison: max |got − ref| ≤ rtol · max |ref| (+ a tiny floor for all-zero tensors).
template <typename A, typename B>
void expect_close(const std::string& what, const A& got, const B& ref, double rtol) {
  ASSERT_EQ(got.size(), ref.size()) << what;
  double scale = 0, err = 0;
  size_t worst = 0;
  for (size_t i = 0; i < ref.size(); ++i) scale = std::max(scale, std::abs(double(ref[i])));
  for (size_t i = 0; i < ref.size(); ++i) {
    const double e = std::abs(double(got[i]) - double(ref[i]));
    if (e > err) err = e, worst = i;
  }
  EXPECT_LE(err, rtol * scale + 1e-9) << what << ": worst element " << worst << " got " << got[worst]
                                      << " ref " << ref[worst] << " (max |ref| " << scale << ")";
}

// One scratch for every layer call of this file, as a model shares one between its MoE layers.
MoeScratch& scratch() {
  static MoeScratch s;
  return s;
}

MoeConfig tiny_config() {
  MoeConfig c;
  c.hidden = 16, c.ffn = 12, c.n_shared = 1;
  c.router = RouterConfig::megatron(8, 3, 4, 2, 2.5f);  // group score = top-1
  return c;
}

// Backward (fp32) against central differences of the double reference, every parameter element and the input.
// Returns the number of dropped (token, k) pairs, so callers can assert the capacity rule was exercised.
int64_t check_fd(const MoeConfig& c, int64_t t, int64_t batch, uint64_t stream, float aux_grad = 1.f) {
  Buffers b = random_buffers(c, t, stream);
  b.alloc_grads();
  const auto dout = randn(stream + 9, t * c.hidden, 1.f);
  MoeActs acts;
  std::vector<float> out(t * c.hidden), dx(t * c.hidden);
  moe_forward(cpu_backend(), c, b.params(), b.x.data(), t, batch, /*training=*/true, out.data(), acts,
              scratch());
  MoeGrads g = b.grads();
  moe_backward(cpu_backend(), c, b.params(), acts, dout.data(), aux_grad, dx.data(), g, 0.f, scratch());
  int64_t dropped = 0;
  for (uint8_t k : acts.router.kept_TK) dropped += k == 0;

  RefWeights w = to_ref(b);
  const std::vector<double> dd(dout.begin(), dout.end());
  std::vector<double> ref_out;
  RefRouting routing;
  ref_loss(c, t, batch, w, dd, &ref_out, &routing);
  expect_close("forward out", out, ref_out, 1e-5);
  for (int64_t i = 0; i < t; ++i) {
    std::vector<int> got, kept;
    for (int64_t j = 0; j < c.router.topk; ++j) {
      got.push_back(acts.router.idx_TK[i * c.router.topk + j]);
      if (acts.router.kept_TK[i * c.router.topk + j]) kept.push_back(got.back());
    }
    std::sort(got.begin(), got.end());
    std::sort(kept.begin(), kept.end());
    EXPECT_EQ(got, routing.idx[i]) << "token " << i;
    EXPECT_EQ(kept, routing.kept[i]) << "token " << i;
  }

  const auto grads = b.grad_list();
  auto params = w.all();
  const double eps = 1e-6;
  for (size_t p = 0; p < params.size(); ++p) {
    std::vector<double>& v = *params[p];
    std::vector<double> fd(v.size());
    for (size_t i = 0; i < v.size(); ++i) {
      const double keep = v[i];
      v[i] = keep + eps;
      const double lp = ref_loss(c, t, batch, w, dd);
      v[i] = keep - eps;
      const double lm = ref_loss(c, t, batch, w, dd);
      v[i] = keep;
      fd[i] = (lp - lm) / (2 * eps);
    }
    if (p == 0)
      expect_close("dx", dx, fd, 1e-4);
    else
      expect_close(std::string("d_") + kNames[p], *grads[p], fd, 1e-4);
  }
  return dropped;
}

TEST(Moe, BackwardMatchesFiniteDifferencesDropless) {
  MoeConfig c = tiny_config();
  c.router.seq_aux_coeff = 0.05f;  // large enough that its gradient is visible against the main term
  EXPECT_EQ(check_fd(c, 10, 2, 100), 0);
}

TEST(Moe, BackwardMatchesFiniteDifferencesCapacityProbs) {
  MoeConfig c = tiny_config();
  c.router.capacity_factor = 1.0;  // capacity ceil(10·3/8) = 4
  c.router.seq_aux_coeff = 0.05f;
  EXPECT_GT(check_fd(c, 10, 2, 200), 0);
}

TEST(Moe, BackwardMatchesFiniteDifferencesHfSemanticsTop2) {
  MoeConfig c = tiny_config();
  c.router = RouterConfig::hf(8, 2, 4, 2, /*norm_topk_prob=*/false, 1.f);
  c.router.capacity_factor = 1.0;
  c.router.drop_policy = DropPolicy::kPosition;
  c.router.pad_to_capacity = true;
  c.n_shared = 2;
  EXPECT_GT(check_fd(c, 10, 1, 300), 0);
}

// ---------------- HF transformers fixtures ----------------

Buffers load_buffers(const SafetensorsReader& f) {
  Buffers b;
  b.x = f.read_f32("x");
  b.gate_w = f.read_f32("gate_w");
  b.bias = f.contains("expert_bias") ? f.read_f32("expert_bias") : f.read_f32("bias");
  b.gate_proj = f.read_f32("gate_proj");
  b.up_proj = f.read_f32("up_proj");
  b.down_proj = f.read_f32("down_proj");
  b.shared_gate = f.read_f32("shared_gate");
  b.shared_up = f.read_f32("shared_up");
  b.shared_down = f.read_f32("shared_down");
  b.alloc_grads();
  return b;
}

void run_and_compare(const MoeConfig& c, const SafetensorsReader& f, int64_t t, int64_t batch, Buffers& b,
                     MoeActs& acts) {
  const auto dout = f.read_f32("dout");
  std::vector<float> out(t * c.hidden), dx(t * c.hidden);
  moe_forward(cpu_backend(), c, b.params(), b.x.data(), t, batch, true, out.data(), acts, scratch());
  MoeGrads g = b.grads();
  moe_backward(cpu_backend(), c, b.params(), acts, dout.data(), 1.f, dx.data(), g, 0.f, scratch());
  expect_close("out", out, f.read_f32("out"), 1e-5);
  expect_close("dx", dx, f.read_f32("dx"), 1e-5);
  expect_close("d_gate_w", b.g_gate_w, f.read_f32("d_gate_w"), 1e-5);
  expect_close("d_gate_proj", b.g_gate_proj, f.read_f32("d_gate_proj"), 1e-5);
  expect_close("d_up_proj", b.g_up_proj, f.read_f32("d_up_proj"), 1e-5);
  expect_close("d_down_proj", b.g_down_proj, f.read_f32("d_down_proj"), 1e-5);
  expect_close("d_shared_gate", b.g_shared_gate, f.read_f32("d_shared_gate"), 1e-5);
  expect_close("d_shared_up", b.g_shared_up, f.read_f32("d_shared_up"), 1e-5);
  expect_close("d_shared_down", b.g_shared_down, f.read_f32("d_shared_down"), 1e-5);
}

class MoeHf : public ::testing::TestWithParam<std::string> {};

TEST_P(MoeHf, MatchesTransformersDeepseekV3MoE) {
  const auto path = testing::source_dir() / "tests/golden/moe" / ("hf_" + GetParam() + ".safetensors");
  SafetensorsReader f(path.string());
  const auto cf = f.read_i64("config");  // D E G TG K F NS B S norm
  MoeConfig c;
  c.hidden = cf[0], c.ffn = cf[5], c.n_shared = cf[6];
  c.router = RouterConfig::hf(cf[1], cf[4], cf[2], cf[3], cf[9] != 0, f.read_f32("scaling")[0]);
  const int64_t t = cf[7] * cf[8], k_n = cf[4];
  Buffers b = load_buffers(f);
  MoeActs acts;
  run_and_compare(c, f, t, cf[7], b, acts);
  // The routing HF chose: indices (sorted per token) and their weights.
  const auto idx_ref = f.read_i64("idx_sorted");
  const auto w_ref = f.read_f32("weight_sorted");
  for (int64_t i = 0; i < t; ++i) {
    std::vector<std::pair<int, float>> got;
    for (int64_t j = 0; j < k_n; ++j)
      got.push_back({acts.router.idx_TK[i * k_n + j], acts.router.weight_TK[i * k_n + j]});
    std::sort(got.begin(), got.end());
    for (int64_t j = 0; j < k_n; ++j) {
      ASSERT_EQ(got[j].first, idx_ref[i * k_n + j]) << "token " << i;
      EXPECT_NEAR(got[j].second, w_ref[i * k_n + j], 1e-6f) << "token " << i;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, MoeHf, ::testing::Values("main", "nonorm_k2", "e16_g8"));

// ---------------- Megatron-Core semantics fixtures ----------------

class MoeMegatron : public ::testing::TestWithParam<std::string> {};

TEST_P(MoeMegatron, MatchesMegatronCoreSemantics) {
  const auto path = testing::source_dir() / "tests/golden/moe" / ("mcore_moe_" + GetParam() + ".safetensors");
  SafetensorsReader f(path.string());
  const auto ints = f.read_i64("ints");  // E K G TG B S capacity? position? pad?
  const auto floats = f.read_f32("floats");
  const auto dims = f.read_i64("dims");  // D F NS
  MoeConfig c;
  c.hidden = dims[0], c.ffn = dims[1], c.n_shared = dims[2];
  c.router = RouterConfig::megatron(ints[0], ints[1], ints[2], ints[3], floats[0]);
  if (ints[6]) {
    c.router.capacity_factor = floats[1];
    c.router.drop_policy = ints[7] ? DropPolicy::kPosition : DropPolicy::kProbs;
    c.router.pad_to_capacity = ints[8] != 0;
  }
  c.router.seq_aux_coeff = floats[2];
  const int64_t t = ints[4] * ints[5];
  Buffers b = load_buffers(f);
  MoeActs acts;
  run_and_compare(c, f, t, ints[4], b, acts);
  EXPECT_EQ(acts.router.tokens_per_expert_E, f.read_i64("tokens_per_expert"));
  const float aux = f.read_f32("aux_loss")[0];
  EXPECT_NEAR(acts.router.seq_aux_loss, aux, 1e-5f * std::abs(aux) + 1e-9f);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, MoeMegatron, ::testing::Values("probs_aux", "dropless"));

// ---------------- unbalanced routing ----------------

// Megatron's --moe-router-force-load-balancing (benchmarks): the routing comes from fixed normals, not from the
// weights (two different gate weights route alike), it is balanced (every expert within 10% of T·K/E here), and
// the gate weight still gets a gradient (the straight-through estimator).
TEST(Moe, ForcedLoadBalancingRoutesOnNormals) {
  MoeConfig c = tiny_config();
  c.force_load_balancing = true;
  const int64_t t = 2400;
  Buffers b = random_buffers(c, t, 500);
  std::fill(b.bias.begin(), b.bias.end(), 0.f);
  b.alloc_grads();
  std::vector<float> out(t * c.hidden), dx(t * c.hidden);
  MoeActs a1, a2;
  moe_forward(cpu_backend(), c, b.params(), b.x.data(), t, 1, true, out.data(), a1, scratch());
  const auto dout = randn(509, t * c.hidden, 1.f);
  MoeGrads g = b.grads();
  moe_backward(cpu_backend(), c, b.params(), a1, dout.data(), 1.f, dx.data(), g, 0.f, scratch());
  double gate_grad = 0;
  for (float v : b.g_gate_w) gate_grad += std::abs(v);
  EXPECT_GT(gate_grad, 0.0);
  for (float& w : b.gate_w) w = -3.f * w;
  moe_forward(cpu_backend(), c, b.params(), b.x.data(), t, 1, true, out.data(), a2, scratch());
  EXPECT_EQ(a1.router.idx_TK, a2.router.idx_TK);
  const double mean = static_cast<double>(t * c.router.topk) / c.router.num_experts;
  for (int64_t n : a1.router.tokens_per_expert_E) EXPECT_NEAR(n, mean, 0.1 * mean);
  // Without it, these weights route far from balance (the comparison that makes the bound above mean something).
  c.force_load_balancing = false;
  MoeActs a3;
  moe_forward(cpu_backend(), c, b.params(), b.x.data(), t, 1, true, out.data(), a3, scratch());
  const auto& n3 = a3.router.tokens_per_expert_E;
  EXPECT_GT(*std::max_element(n3.begin(), n3.end()) - *std::min_element(n3.begin(), n3.end()), 0.2 * mean);
}

// Expert 5's bias wins every token: dropless gives it all T rows; with capacity it keeps exactly `capacity`.
TEST(Moe, AllTokensToOneExpert) {
  MoeConfig c = tiny_config();
  const int64_t t = 24;
  Buffers b = random_buffers(c, t, 400);
  std::fill(b.bias.begin(), b.bias.end(), 0.f);
  b.bias[5] = 10.f;
  const auto dout = randn(409, t * c.hidden, 1.f);
  const std::vector<double> dd(dout.begin(), dout.end());
  for (bool capacity : {false, true}) {
    c.router.capacity_factor = capacity ? 1.0 : -1.0;
    MoeActs acts;
    std::vector<float> out(t * c.hidden);
    moe_forward(cpu_backend(), c, b.params(), b.x.data(), t, 1, false, out.data(), acts, scratch());
    std::vector<double> ref_out;
    ref_loss(c, t, 1, to_ref(b), dd, &ref_out);
    expect_close(capacity ? "out (capacity)" : "out (dropless)", out, ref_out, 1e-5);
    EXPECT_EQ(acts.router.routed_per_expert_E[5], t);
    const int64_t cap = expert_capacity(t, 3, 8, 1.0);  // 9
    EXPECT_EQ(acts.router.tokens_per_expert_E[5], capacity ? cap : t);
    EXPECT_EQ(acts.dispatch.offsets_L1[6] - acts.dispatch.offsets_L1[5], capacity ? cap : t);
  }
}

// One token: its top-k experts get one row each, every other expert none. Their gradients match finite
// differences, and the empty experts' weight gradients are exactly zero in fp32 and bf16 (empty experts turning
// NaN is a bug users report in several stacks).
TEST(Moe, EmptyAndOneRowExperts) {
  const MoeConfig base = tiny_config();
  check_fd(base, 1, 1, 700);
  for (Precision prec : {Precision::kF32, Precision::kBF16}) {
    MoeConfig c = base;
    c.precision = prec;
    Buffers b = random_buffers(c, 1, 710);
    b.alloc_grads();
    const auto dout = randn(719, c.hidden, 1.f);
    MoeActs acts;
    std::vector<float> out(c.hidden), dx(c.hidden);
    moe_forward(cpu_backend(), c, b.params(), b.x.data(), 1, 1, true, out.data(), acts, scratch());
    MoeGrads g = b.grads();
    moe_backward(cpu_backend(), c, b.params(), acts, dout.data(), 1.f, dx.data(), g, 0.f, scratch());
    const int64_t per_expert = c.ffn * c.hidden;
    int64_t empty = 0;
    for (int64_t e = 0; e < c.router.num_experts; ++e) {
      const bool has_row = acts.dispatch.offsets_L1[e + 1] > acts.dispatch.offsets_L1[e];
      empty += !has_row;
      for (const auto* grad : {&b.g_gate_proj, &b.g_up_proj, &b.g_down_proj})
        for (int64_t i = 0; i < per_expert; ++i) {
          const float v = (*grad)[e * per_expert + i];
          ASSERT_TRUE(std::isfinite(v)) << "expert " << e;
          if (!has_row) {
            ASSERT_EQ(v, 0.f) << "expert " << e << " has no row but a gradient";
          }
        }
    }
    EXPECT_EQ(empty, c.router.num_experts - c.router.topk);
    for (float v : dx) EXPECT_TRUE(std::isfinite(v));
  }
}

TEST(Moe, Bf16ModeStaysCloseToFp32) {
  MoeConfig c = tiny_config();
  const int64_t t = 10;
  Buffers b = random_buffers(c, t, 500);
  std::vector<float> o32(t * c.hidden), o16(t * c.hidden);
  MoeActs a32, a16;
  moe_forward(cpu_backend(), c, b.params(), b.x.data(), t, 1, false, o32.data(), a32, scratch());
  c.precision = Precision::kBF16;
  moe_forward(cpu_backend(), c, b.params(), b.x.data(), t, 1, false, o16.data(), a16, scratch());
  EXPECT_EQ(a32.router.idx_TK, a16.router.idx_TK);  // the router stays fp32
  expect_close("bf16 out", o16, o32, 2e-2);
}

}  // namespace
}  // namespace dsv3
