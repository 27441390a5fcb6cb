// Grouped expert GEMM cases (cpu/gemm.h GroupedGemmArgs) shared by the CPU test (against explicit sums) and the
// CUDA test (against the CPU): the MoE's three kinds, skewed routings (empty experts, a one-row expert, every row
// on one expert, no rows at all), partial tiles, a strided operand (the gate|up gradient's halves), and a shape
// the GPU kernel's alignment rules refuse.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/bf16.h"
#include "kernels/cpu/gemm.h"
#include "kernels/kernel_test_util.h"

namespace dsv3::testing {

struct GroupedCase {
  std::string name;
  GroupedGemmArgs::Kind kind;
  bool trans_b;
  int64_t m, n, k;            // kRows: n, k; kReduce: m, n
  std::vector<int64_t> rows;  // per group
  int64_t lda_pad = 0;        // extra elements per row of A (a strided view)
  bool gpu_aligned = true;    // whether the shapes meet the GPU kernel's alignment (grouped_gemm.cuh)
};

inline std::vector<GroupedCase> grouped_cases() {
  using K = GroupedGemmArgs::Kind;
  const std::vector<int64_t> skewed = {37, 0, 1, 128, 5, 64, 0, 200, 3};
  return {
      {"forward x·Wᵀ", K::kRows, true, 0, 96, 64, skewed},
      {"input gradient dy·W", K::kRows, false, 0, 64, 96, skewed},
      {"weight gradient dyᵀ·x", K::kReduce, false, 96, 64, 0, skewed},
      {"weight gradient, strided dy", K::kReduce, false, 64, 96, 0, skewed, 64},
      {"every row on one expert", K::kRows, true, 0, 96, 64, {0, 0, 300, 0, 0, 0, 0, 0}},
      {"one expert, weight gradient", K::kReduce, false, 96, 64, 0, {0, 0, 300, 0, 0, 0, 0, 0}},
      {"no rows", K::kReduce, false, 64, 64, 0, {0, 0, 0}},
      {"partial tiles", K::kRows, true, 0, 256, 192, {300, 129, 0, 257}},
      {"partial tiles, weight gradient", K::kReduce, false, 256, 136, 0, {300, 129, 0, 257}},
      {"unaligned", K::kRows, true, 0, 36, 20, {5, 0, 9}, 0, false},
  };
}

// A case's operands in host memory and its arguments (pointers into them; rebase for other memory).
struct GroupedData {
  std::vector<bf16> a, b;
  std::vector<float> c;  // the initial output: normals (kReduce accumulates into them) or a sentinel
  std::vector<int32_t> offsets;
  GroupedGemmArgs args;
};

inline GroupedData grouped_data(const GroupedCase& k, uint64_t seed) {
  GroupedData d;
  const bool rows_kind = k.kind == GroupedGemmArgs::Kind::kRows;
  const int64_t groups = static_cast<int64_t>(k.rows.size());
  d.offsets.assign(1, 0);
  for (int64_t r : k.rows) d.offsets.push_back(d.offsets.back() + static_cast<int32_t>(r));
  const int64_t total = d.offsets.back();
  GroupedGemmArgs& g = d.args;
  g.kind = k.kind, g.groups = groups, g.m = k.m, g.n = k.n, g.k = k.k, g.trans_b = k.trans_b;
  g.lda = (rows_kind ? k.k : k.m) + k.lda_pad;
  g.ldb = rows_kind ? (k.trans_b ? k.k : k.n) : k.n;
  g.b_stride = rows_kind ? k.n * k.k : 0;
  g.ldc = k.n, g.c_stride = rows_kind ? 0 : k.m * k.n;
  const int64_t a_n = total * g.lda, b_n = rows_kind ? groups * g.b_stride : total * g.ldb;
  const int64_t c_n = rows_kind ? total * g.ldc : groups * g.c_stride;
  auto bf = [](const std::vector<float>& x) {
    std::vector<bf16> y(x.size());
    to_bf16(x.data(), y.data(), static_cast<int64_t>(x.size()));
    return y;
  };
  d.a = bf(philox_normals(seed, a_n, 1)), d.b = bf(philox_normals(seed, b_n, 2));
  d.c = rows_kind ? std::vector<float>(c_n, 3.25f) : philox_normals(seed, c_n, 3);
  g.a = d.a.data(), g.b = d.b.data(), g.c = d.c.data(), g.offsets_G1 = d.offsets.data();
  return d;
}

// What the case must produce from d's initial output, by explicit sums in double.
inline std::vector<float> grouped_expected(const GroupedData& d) {
  const GroupedGemmArgs& g = d.args;
  std::vector<float> c = d.c;
  auto at = [](const std::vector<bf16>& v, int64_t i) { return static_cast<double>(to_float(v[i])); };
  for (int64_t e = 0; e < g.groups; ++e) {
    const int64_t o = d.offsets[e], rows = d.offsets[e + 1] - o;
    if (g.kind == GroupedGemmArgs::Kind::kRows) {
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < g.n; ++j) {
          double s = 0;
          for (int64_t p = 0; p < g.k; ++p)
            s += at(d.a, (o + i) * g.lda + p) *
                 at(d.b, e * g.b_stride + (g.trans_b ? j * g.ldb + p : p * g.ldb + j));
          c[(o + i) * g.ldc + j] = static_cast<float>(s);
        }
    } else {
      for (int64_t i = 0; i < g.m; ++i)
        for (int64_t j = 0; j < g.n; ++j) {
          double s = 0;
          for (int64_t r = 0; r < rows; ++r) s += at(d.a, (o + r) * g.lda + i) * at(d.b, (o + r) * g.ldb + j);
          float& out = c[e * g.c_stride + i * g.ldc + j];
          if (rows > 0) out = static_cast<float>(out + s);
        }
    }
  }
  return c;
}

}  // namespace dsv3::testing
