// oneDNN matmul behind a small shape-keyed primitive cache. Transposes are expressed through strides, so no
// operand is copied. Thread safety: each thread has its own cache (primitive, memory objects and stream), so
// a call takes no lock and creates nothing once its shape has been seen; only the data handles are rebound.
#include "kernels/cpu/gemm.h"

#include <cstdlib>
#include <map>
#include <oneapi/dnnl/dnnl.hpp>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "core/error.h"

namespace dsv3 {
namespace {

using dt = dnnl::memory::data_type;

dt to_dnnl(GemmType t) {
  return t == GemmType::kF32 ? dt::f32 : dt::bf16;
}

struct Key {
  int64_t m, n, k, lda, ldb, ldc;
  bool ta, tb;
  GemmType ab, c;
  float alpha, beta;
  auto tie() const { return std::tie(m, n, k, lda, ldb, ldc, ta, tb, ab, c, alpha, beta); }
  bool operator<(const Key& o) const { return tie() < o.tie(); }
  bool operator==(const Key& o) const { return tie() == o.tie(); }
};

struct Prim {
  dnnl::matmul matmul;
  dnnl::memory a, b, c;  // bound to the caller's pointers on every call
  std::unordered_map<int, dnnl::memory> args;
};

dnnl::engine& engine() {
  static dnnl::engine e(dnnl::engine::kind::cpu, 0);
  return e;
}

thread_local bool t_varying_rows = false;

using dims = dnnl::memory::dims;

// Row-major A[M,K]: strides {lda, 1}; stored transposed ([K,M]): strides {1, lda}. m or k may be
// DNNL_RUNTIME_DIM_VAL (a primitive for every size).
dnnl::memory::desc a_desc(const Key& key, int64_t m, int64_t k) {
  return dnnl::memory::desc({m, k}, to_dnnl(key.ab), key.ta ? dims{1, key.lda} : dims{key.lda, 1});
}
dnnl::memory::desc b_desc(const Key& key, int64_t k) {
  return dnnl::memory::desc({k, key.n}, to_dnnl(key.ab), key.tb ? dims{1, key.ldb} : dims{key.ldb, 1});
}
dnnl::memory::desc c_desc(const Key& key, int64_t m) {
  return dnnl::memory::desc({m, key.n}, to_dnnl(key.c), dims{key.ldc, 1});
}

Prim make_prim(const Key& key) {
  const dnnl::memory::desc a = a_desc(key, key.m, key.k), b = b_desc(key, key.k), c = c_desc(key, key.m);
  dnnl::primitive_attr attr;
  if (key.alpha != 1.f) attr.set_output_scales(0, {key.alpha});
  if (key.beta != 0.f) {
    dnnl::post_ops po;
    po.append_sum(key.beta);
    attr.set_post_ops(po);
  }
  dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, engine());
  Prim p{dnnl::matmul(pd), {}, {}, {}, {}};
  if (key.m != DNNL_RUNTIME_DIM_VAL) {  // exact shape: memory objects made once, rebound per call
    p.a = dnnl::memory(a, engine(), DNNL_MEMORY_NONE);
    p.b = dnnl::memory(b, engine(), DNNL_MEMORY_NONE);
    p.c = dnnl::memory(c, engine(), DNNL_MEMORY_NONE);
    p.args = {{DNNL_ARG_SRC, p.a}, {DNNL_ARG_WEIGHTS, p.b}, {DNNL_ARG_DST, p.c}};
  }
  return p;
}

// Per-thread: the last shape hit (consecutive calls often repeat it) in front of an ordered map.
struct ThreadCache {
  std::map<Key, Prim> prims;
  const Key* last_key = nullptr;
  Prim* last = nullptr;
  dnnl::stream stream{engine()};
  Prim& get(const Key& key) {
    if (last && *last_key == key) return *last;
    auto it = prims.find(key);
    if (it == prims.end()) {
      // MoE expert GEMMs see a new row count almost every step; bound the cache so a long run neither grows
      // without limit nor keeps stale JIT kernels (a full clear is rare and costs one re-creation per shape).
      if (prims.size() >= static_cast<size_t>(kGemmMaxKernels))
        prims.clear(), last = nullptr, last_key = nullptr;
      it = prims.emplace(key, make_prim(key)).first;
    }
    last_key = &it->first, last = &it->second;
    return it->second;
  }
};

ThreadCache& thread_cache() {
  thread_local ThreadCache tc;
  return tc;
}

template <typename T>
float load(const void* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>)
    return static_cast<const float*>(p)[i];
  else
    return to_float(static_cast<const bf16*>(p)[i]);
}

// oneDNN 2.6 has bf16 matmul only on AVX-512 (avx512_core and up); on an AVX2-only CPU primitive creation
// fails. Asked once per process with a tiny primitive.
bool bf16_matmul_native() {
  static const bool ok = [] {
    if (const char* e = std::getenv("DSV3_GEMM_BF16_VIA_F32"); e && std::string(e) == "1") return false;
    try {
      const Key key{16, 16, 16, 16, 16, 16, false, false, GemmType::kBF16, GemmType::kF32, 1.f, 0.f};
      make_prim(key);
      return true;
    } catch (const dnnl::error&) {
      return false;
    }
  }();
  return ok;
}

// Copies a stored rows x cols operand (leading dimension ld) to a dense fp32 buffer.
void widen(const bf16* src, int64_t rows, int64_t cols, int64_t ld, std::vector<float>& dst) {
  dst.resize(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[static_cast<size_t>(r * cols + c)] = to_float(src[r * ld + c]);
}

}  // namespace

bool gemm_bf16_native() {
  return bf16_matmul_native();
}

void gemm_bf16_via_f32(const GemmArgs& g) {
  DSV3_CHECK(g.ab_type == GemmType::kBF16, "gemm_bf16_via_f32: operands must be bf16");
  thread_local std::vector<float> a32, b32, c32;  // grow-only per thread
  GemmArgs f = g;
  f.ab_type = GemmType::kF32;
  const int64_t a_rows = g.trans_a ? g.k : g.m, a_cols = g.trans_a ? g.m : g.k;
  const int64_t b_rows = g.trans_b ? g.n : g.k, b_cols = g.trans_b ? g.k : g.n;
  widen(static_cast<const bf16*>(g.a), a_rows, a_cols, g.lda, a32);
  widen(static_cast<const bf16*>(g.b), b_rows, b_cols, g.ldb, b32);
  f.a = a32.data(), f.lda = a_cols;
  f.b = b32.data(), f.ldb = b_cols;
  if (g.c_type == GemmType::kF32) {
    gemm(f);
    return;
  }
  // bf16 output: accumulate in fp32 (beta reads the old bf16 C), round once at the end as oneDNN does.
  bf16* c = static_cast<bf16*>(g.c);
  c32.resize(static_cast<size_t>(g.m * g.n));
  if (g.beta != 0.f)
    for (int64_t i = 0; i < g.m; ++i)
      for (int64_t j = 0; j < g.n; ++j) c32[static_cast<size_t>(i * g.n + j)] = to_float(c[i * g.ldc + j]);
  f.c = c32.data(), f.ldc = g.n, f.c_type = GemmType::kF32;
  gemm(f);
  for (int64_t i = 0; i < g.m; ++i)
    for (int64_t j = 0; j < g.n; ++j) c[i * g.ldc + j] = to_bf16(c32[static_cast<size_t>(i * g.n + j)]);
}

void gemm(const GemmArgs& g) {
  DSV3_CHECK(g.m >= 0 && g.n >= 0 && g.k >= 0, "gemm: negative size");
  if (g.m == 0 || g.n == 0) return;
  if (g.k == 0) {  // oneDNN rejects K = 0; the product is empty, so C = beta * C
    gemm_reference(g);
    return;
  }
  if (g.ab_type == GemmType::kBF16 && !bf16_matmul_native()) {
    gemm_bf16_via_f32(g);
    return;
  }
  ThreadCache& tc = thread_cache();
  if (t_varying_rows) {
    // One primitive for every M and K of this class; the memory objects carry this call's sizes.
    const int64_t rt = DNNL_RUNTIME_DIM_VAL;
    const Key key{rt,        g.n,       rt,        g.lda,    g.ldb,   g.ldc,
                  g.trans_a, g.trans_b, g.ab_type, g.c_type, g.alpha, g.beta};
    Prim& p = tc.get(key);
    const Key sized{g.m,       g.n,       g.k,       g.lda,    g.ldb,   g.ldc,
                    g.trans_a, g.trans_b, g.ab_type, g.c_type, g.alpha, g.beta};
    dnnl::memory a(a_desc(sized, g.m, g.k), engine(), const_cast<void*>(g.a));
    dnnl::memory b(b_desc(sized, g.k), engine(), const_cast<void*>(g.b));
    dnnl::memory c(c_desc(sized, g.m), engine(), g.c);
    p.matmul.execute(tc.stream, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, b}, {DNNL_ARG_DST, c}});
    tc.stream.wait();
    return;
  }
  const Key key{g.m,       g.n,       g.k,       g.lda,    g.ldb,   g.ldc,
                g.trans_a, g.trans_b, g.ab_type, g.c_type, g.alpha, g.beta};
  Prim& p = tc.get(key);
  p.a.set_data_handle(const_cast<void*>(g.a));
  p.b.set_data_handle(const_cast<void*>(g.b));
  p.c.set_data_handle(g.c);
  p.matmul.execute(tc.stream, p.args);
  tc.stream.wait();
}

GemmVaryingRows::GemmVaryingRows() : was_(t_varying_rows) {
  t_varying_rows = true;
}
GemmVaryingRows::~GemmVaryingRows() {
  t_varying_rows = was_;
}
GemmArgs grouped_gemm_group(const GroupedGemmArgs& g, int64_t group, int64_t o, int64_t rows) {
  GemmArgs a;
  a.ab_type = GemmType::kBF16;
  a.a = g.a + o * g.lda, a.lda = g.lda;
  a.ldb = g.ldb, a.ldc = g.ldc;
  if (g.kind == GroupedGemmArgs::Kind::kRows) {
    a.m = rows, a.n = g.n, a.k = g.k;
    a.b = g.b + group * g.b_stride, a.trans_b = g.trans_b;
    a.c = g.c + o * g.ldc;
  } else {
    a.m = g.m, a.n = g.n, a.k = rows;
    a.trans_a = true;
    a.b = g.b + o * g.ldb;
    a.c = g.c + group * g.c_stride, a.beta = 1.f;
  }
  return a;
}

void grouped_gemm(const GroupedGemmArgs& g) {
  DSV3_CHECK(g.groups >= 0 && g.offsets_G1, "grouped_gemm: no offsets");
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t e = 0; e < g.groups; ++e) {
    const int64_t o = g.offsets_G1[e], rows = g.offsets_G1[e + 1] - o;
    if (rows == 0) continue;
    const GemmVaryingRows varying;  // the row count changes every step (see GemmVaryingRows)
    gemm(grouped_gemm_group(g, e, o, rows));
  }
}

void gemm_reference(const GemmArgs& g) {
  for (int64_t i = 0; i < g.m; ++i) {
    for (int64_t j = 0; j < g.n; ++j) {
      double acc = 0;
      for (int64_t p = 0; p < g.k; ++p) {
        const int64_t ai = g.trans_a ? p * g.lda + i : i * g.lda + p;
        const int64_t bi = g.trans_b ? j * g.ldb + p : p * g.ldb + j;
        const double av = g.ab_type == GemmType::kF32 ? load<float>(g.a, ai) : load<bf16>(g.a, ai);
        const double bv = g.ab_type == GemmType::kF32 ? load<float>(g.b, bi) : load<bf16>(g.b, bi);
        acc += av * bv;
      }
      const int64_t ci = i * g.ldc + j;
      if (g.c_type == GemmType::kF32) {
        float* c = static_cast<float*>(g.c);
        c[ci] = static_cast<float>(g.alpha * acc + (g.beta != 0.f ? g.beta * c[ci] : 0.0));
      } else {
        bf16* c = static_cast<bf16*>(g.c);
        c[ci] = to_bf16(static_cast<float>(g.alpha * acc + (g.beta != 0.f ? g.beta * to_float(c[ci]) : 0.0)));
      }
    }
  }
}

void linear_f32(const float* x, const float* w, float* y, int64_t m, int64_t n, int64_t k, float beta) {
  GemmArgs g;
  g.m = m, g.n = n, g.k = k;
  g.a = x, g.lda = k;
  g.b = w, g.ldb = k, g.trans_b = true;
  g.c = y, g.ldc = n;
  g.beta = beta;
  gemm(g);
}

}  // namespace dsv3
