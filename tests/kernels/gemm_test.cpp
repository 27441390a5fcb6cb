// GEMM: oneDNN fast path vs the reference loop, every transpose/dtype/accumulate combination.
#include "kernels/cpu/gemm.h"

#include <cmath>
#include <vector>

#include "core/philox.h"
#include "kernels/grouped_gemm_cases.h"
#include "test_util.h"

namespace dsv3 {
namespace {

struct Case {
  int64_t m, n, k;
  bool ta, tb;
  GemmType ab, c;
  float alpha, beta;
};

TEST(Gemm, MatchesReference) {
  const Case cases[] = {
      {7, 5, 3, false, false, GemmType::kF32, GemmType::kF32, 1.f, 0.f},
      {33, 17, 65, false, true, GemmType::kF32, GemmType::kF32, 1.f, 1.f},
      {16, 40, 24, true, false, GemmType::kF32, GemmType::kF32, 0.5f, 0.f},
      {9, 12, 31, true, true, GemmType::kF32, GemmType::kF32, 1.f, 1.f},
      {64, 48, 96, false, true, GemmType::kBF16, GemmType::kF32, 1.f, 0.f},
      {20, 30, 50, true, false, GemmType::kBF16, GemmType::kF32, 1.f, 1.f},
      {21, 19, 40, false, false, GemmType::kBF16, GemmType::kBF16, 1.f, 0.f},
      {4, 6, 0, false, true, GemmType::kF32, GemmType::kF32, 1.f, 1.f},
  };
  for (const auto& cs : cases) {
    const int64_t lda = (cs.ta ? cs.m : cs.k) + 3, ldb = (cs.tb ? cs.k : cs.n) + 1, ldc = cs.n + 2;
    const int64_t rows_a = cs.ta ? cs.k : cs.m, rows_b = cs.tb ? cs.n : cs.k;
    std::vector<float> a(rows_a * lda), b(rows_b * ldb), c0(cs.m * ldc);
    for (size_t i = 0; i < a.size(); ++i) a[i] = philox_normal(1, 1, i);
    for (size_t i = 0; i < b.size(); ++i) b[i] = philox_normal(1, 2, i);
    for (size_t i = 0; i < c0.size(); ++i) c0[i] = philox_normal(1, 3, i);
    std::vector<bf16> ab(a.size()), bb(b.size()), cb0(c0.size());
    to_bf16(a.data(), ab.data(), a.size());
    to_bf16(b.data(), bb.data(), b.size());
    to_bf16(c0.data(), cb0.data(), c0.size());
    const bool in_bf = cs.ab == GemmType::kBF16, out_bf = cs.c == GemmType::kBF16;
    std::vector<float> cf_fast = c0, cf_ref = c0;
    std::vector<bf16> cb_fast = cb0, cb_ref = cb0;
    GemmArgs g{cs.m,
               cs.n,
               cs.k,
               in_bf ? (void*)ab.data() : (void*)a.data(),
               lda,
               cs.ta,
               in_bf ? (void*)bb.data() : (void*)b.data(),
               ldb,
               cs.tb,
               nullptr,
               ldc,
               cs.ab,
               cs.c,
               cs.alpha,
               cs.beta};
    GemmArgs r = g;
    g.c = out_bf ? (void*)cb_fast.data() : (void*)cf_fast.data();
    r.c = out_bf ? (void*)cb_ref.data() : (void*)cf_ref.data();
    gemm_reference(r);
    // gemm() and, for bf16 operands, the widening path it takes on CPUs without oneDNN bf16 matmul.
    for (bool via_f32 : {false, true}) {
      if (via_f32 && !in_bf) continue;
      cf_fast = c0, cb_fast = cb0;
      via_f32 ? gemm_bf16_via_f32(g) : gemm(g);
      double max_err = 0, max_ref = 0;
      for (int64_t i = 0; i < cs.m; ++i)
        for (int64_t j = 0; j < cs.n; ++j) {
          const float f = out_bf ? to_float(cb_fast[i * ldc + j]) : cf_fast[i * ldc + j];
          const float rr = out_bf ? to_float(cb_ref[i * ldc + j]) : cf_ref[i * ldc + j];
          max_err = std::max(max_err, (double)std::fabs(f - rr));
          max_ref = std::max(max_ref, (double)std::fabs(rr));
        }
      // fp32 accumulation order differs from the double reference; a bf16 output adds one rounding.
      const double tol = out_bf ? 8e-3 : 1e-5;
      EXPECT_LE(max_err, tol * std::max(1.0, max_ref))
          << cs.m << "x" << cs.n << "x" << cs.k << " via_f32=" << via_f32;
      // Padding columns of C are untouched.
      for (int64_t i = 0; i < cs.m; ++i)
        for (int64_t j = cs.n; j < ldc; ++j) {
          if (out_bf)
            EXPECT_EQ(cb_fast[i * ldc + j].bits, cb0[i * ldc + j].bits);
          else
            EXPECT_EQ(cf_fast[i * ldc + j], c0[i * ldc + j]);
        }
    }
  }
}

// More distinct shapes than the per-thread primitive cache holds (MoE row counts vary every step): results stay
// right across the cache being cleared.
TEST(Gemm, ManyShapesStayCorrect) {
  const int64_t n = 3, k = 5;
  std::vector<float> a(2100 * k), b(n * k), c(2100 * n), r(2100 * n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = philox_normal(2, 1, i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = philox_normal(2, 2, i);
  for (int64_t m = 1; m <= 2100; ++m) {
    GemmArgs g{m, n, k, a.data(), k, false, b.data(), k, true, c.data(), n};
    gemm(g);
    if (m % 700 == 0 || m == 1) {
      g.c = r.data();
      gemm_reference(g);
      for (int64_t i = 0; i < m * n; ++i) ASSERT_NEAR(c[i], r[i], 1e-5) << "m=" << m;
    }
  }
}

// GemmVaryingRows (runtime M and K, one primitive per shape class): every size, with transposes and accumulation,
// in fp32 and bf16, against the reference; the guard nests and restores the exact-shape mode.
TEST(Gemm, VaryingRowsMatchReference) {
  const int64_t n = 24, width = 40;  // M or K up to 40
  std::vector<float> a(width * width), b(width * n), r(width * n);
  for (size_t i = 0; i < a.size(); ++i) a[i] = philox_normal(3, 1, i);
  for (size_t i = 0; i < b.size(); ++i) b[i] = philox_normal(3, 2, i);
  std::vector<bf16> ab(a.size()), bb(b.size());
  to_bf16(a.data(), ab.data(), static_cast<int64_t>(a.size()));
  to_bf16(b.data(), bb.data(), static_cast<int64_t>(b.size()));
  for (GemmType t : {GemmType::kF32, GemmType::kBF16}) {
    const void* A = t == GemmType::kF32 ? static_cast<const void*>(a.data()) : ab.data();
    const void* B = t == GemmType::kF32 ? static_cast<const void*>(b.data()) : bb.data();
    for (int64_t v = 1; v <= width; v += 13) {
      // Forward shape (M = v varies; A row-major [v, 40]) and weight-gradient shape (K = v varies; A = [v, 40]ᵀ).
      for (bool wgrad : {false, true}) {
        GemmArgs g;
        g.m = wgrad ? width : v, g.n = n, g.k = wgrad ? v : width;
        g.a = A, g.lda = width, g.trans_a = wgrad, g.b = B, g.ldb = n, g.ab_type = t,
        g.beta = wgrad ? 1.f : 0.f;
        std::vector<float> c(width * n, 0.5f);
        std::fill(r.begin(), r.end(), 0.5f);
        g.c = c.data(), g.ldc = n;
        {
          const GemmVaryingRows outer;
          const GemmVaryingRows inner;
          gemm(g);
        }
        g.c = r.data();
        gemm_reference(g);
        for (int64_t i = 0; i < g.m * n; ++i)
          ASSERT_NEAR(c[i], r[i], 1e-4) << "v=" << v << " wgrad=" << wgrad;
      }
    }
  }
  // Out of the guard again: exact-shape primitives, still correct.
  GemmArgs g{7, n, width, a.data(), width, false, b.data(), n, false, r.data(), n};
  gemm(g);
  std::vector<float> ref(7 * n);
  g.c = ref.data();
  gemm_reference(g);
  for (int64_t i = 0; i < 7 * n; ++i) ASSERT_NEAR(r[i], ref[i], 1e-4);
}

// The CPU's grouped GEMM (the reference the GPU's is tested against) against explicit sums: every kind, skewed
// routings; an expert without rows leaves its weight gradient as it was (bit for bit).
TEST(Gemm, GroupedMatchesExplicitSumsPerGroup) {
  for (const testing::GroupedCase& k : testing::grouped_cases()) {
    SCOPED_TRACE(k.name);
    testing::GroupedData d = testing::grouped_data(k, 41);
    const std::vector<float> want = testing::grouped_expected(d);
    grouped_gemm(d.args);
    // bf16 products are exact in fp32: only the summation order differs from the double sums.
    EXPECT_LE(testing::max_rel(d.c, want), 1e-5);
    for (int64_t e = 0; e < d.args.groups; ++e) {
      if (k.kind != GroupedGemmArgs::Kind::kReduce || k.rows[e] != 0) continue;
      for (int64_t i = 0; i < d.args.c_stride; ++i)
        ASSERT_EQ(d.c[e * d.args.c_stride + i], want[e * d.args.c_stride + i]) << "expert " << e;
    }
  }
}

// Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
TEST(Philox, KnownAnswers) {
  EXPECT_EQ(philox4x32({0, 0, 0, 0}, {0, 0}),
            (std::array<uint32_t, 4>{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(philox4x32({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
            (std::array<uint32_t, 4>{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(philox4x32({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
            (std::array<uint32_t, 4>{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

TEST(Philox, NormalHasUnitMoments) {
  double s = 0, s2 = 0;
  const int n = 200000;
  for (int i = 0; i < n; ++i) {
    const double v = philox_normal(42, name_hash("w"), i);
    s += v;
    s2 += v * v;
  }
  EXPECT_NEAR(s / n, 0.0, 0.01);
  EXPECT_NEAR(s2 / n, 1.0, 0.01);
}

TEST(Bf16, RoundsToNearestEven) {
  EXPECT_EQ(to_bf16(1.0f).bits, 0x3f80);
  EXPECT_EQ(to_bf16(1.00390625f).bits, 0x3f80);  // halfway 1 + 2^-8 rounds to even (down)
  EXPECT_EQ(to_bf16(1.01171875f).bits, 0x3f82);  // halfway 1 + 3*2^-8 rounds to even (up)
  EXPECT_TRUE(std::isnan(to_float(to_bf16(NAN))));
}

}  // namespace
}  // namespace dsv3
