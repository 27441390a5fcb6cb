// Every CUDA backend op against the CPU backend's op on the same inputs, in one process (DESIGN principle 2).
// Inputs are Philox normals; shapes include odd sizes, strided views and partial tiles. Tolerances:
//  - fp32: max|gpu − cpu| / max|cpu| ≤ 1e-5 (only the accumulation order differs);
//  - bf16 GEMM operands: the products of bf16 values are exact in fp32, so fp32 outputs also meet 1e-5; a bf16
//    output adds one rounding (≤ 2^-8 relative);
//  - AdamW and the sum of squares: bit-identical (same operations, same order).
// These tests need a GPU: `make test` runs this binary (label `cuda`) only where one is visible.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <numeric>

#include "core/bf16.h"
#include "core/error.h"
#include "kernels/backend.h"
#include "kernels/cpu/adamw.h"
#include "kernels/cpu/attention.h"
#include "kernels/cpu/rope.h"
#include "kernels/cuda/grouped_gemm.cuh"
#include "kernels/cuda/kernels.cuh"
#include "kernels/grouped_gemm_cases.h"
#include "kernels/kernel_test_util.h"
#include "moe/permute.h"

namespace dsv3 {
namespace {

using testing::max_rel;
using testing::philox_normals;

class CudaOps : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    gpu_ = make_cuda_backend(0, &why);
    if (!gpu_) GTEST_SKIP() << "CUDA tests need a GPU: " << why;
  }
  template <typename T>
  DeviceBuffer up(const std::vector<T>& v) {
    DeviceBuffer b(*gpu_, v.size() * sizeof(T));
    gpu_->copy_to_device(b.data(), v.data(), v.size() * sizeof(T));
    return b;
  }
  template <typename T>
  std::vector<T> down(const DeviceBuffer& b, size_t n) {
    std::vector<T> v(n);
    gpu_->copy_to_host(v.data(), b.data(), n * sizeof(T));
    return v;
  }
  Backend& cpu() { return cpu_backend(); }
  std::unique_ptr<Backend> gpu_;
};

std::vector<bf16> rounded(const std::vector<float>& x) {
  std::vector<bf16> y(x.size());
  to_bf16(x.data(), y.data(), static_cast<int64_t>(x.size()));
  return y;
}
std::vector<float> widened(const std::vector<bf16>& x) {
  std::vector<float> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = to_float(x[i]);
  return y;
}

TEST_F(CudaOps, BackendNamesTheGpu) {
  EXPECT_EQ(gpu_->name().rfind("cuda:0 ", 0), 0u) << gpu_->name();
}

TEST_F(CudaOps, GemmMatchesCpuForEveryLayoutAndType) {
  struct Case {
    int64_t m, n, k;
    bool ta, tb;
    GemmType ab, c;
    float beta;
  };
  const Case cases[] = {
      {7, 5, 3, false, false, GemmType::kF32, GemmType::kF32, 0.f},
      {33, 17, 65, false, true, GemmType::kF32, GemmType::kF32, 1.f},
      {16, 40, 24, true, false, GemmType::kF32, GemmType::kF32, 0.f},
      {9, 12, 31, true, true, GemmType::kF32, GemmType::kF32, 1.f},
      {256, 192, 512, false, true, GemmType::kF32, GemmType::kF32, 0.f},
      {64, 48, 96, false, true, GemmType::kBF16, GemmType::kF32, 0.f},
      {20, 30, 50, true, false, GemmType::kBF16, GemmType::kF32, 1.f},
      {21, 19, 40, false, false, GemmType::kBF16, GemmType::kBF16, 0.f},
      {130, 70, 200, true, true, GemmType::kBF16, GemmType::kF32, 1.f},
      {4, 6, 0, false, true, GemmType::kF32, GemmType::kF32, 0.f},
  };
  for (const auto& cs : cases) {
    SCOPED_TRACE(::testing::Message()
                 << cs.m << "x" << cs.n << "x" << cs.k << " ta=" << cs.ta << " tb=" << cs.tb
                 << " bf16=" << (cs.ab == GemmType::kBF16) << " beta=" << cs.beta);
    const int64_t lda = (cs.ta ? cs.m : cs.k) + 8, ldb = (cs.tb ? cs.k : cs.n) + 8, ldc = cs.n + 8;
    const auto a = philox_normals(11, (cs.ta ? cs.k : cs.m) * lda, 1),
               b = philox_normals(11, (cs.tb ? cs.n : cs.k) * ldb, 2);
    const auto c0 = philox_normals(11, cs.m * ldc, 3);
    const bool in_bf = cs.ab == GemmType::kBF16, out_bf = cs.c == GemmType::kBF16;
    const auto ab = rounded(a), bb = rounded(b), cb0 = rounded(c0);
    DeviceBuffer da = in_bf ? up(ab) : up(a), db = in_bf ? up(bb) : up(b), dc = out_bf ? up(cb0) : up(c0);
    std::vector<float> cf = c0;
    std::vector<bf16> cbf = cb0;
    GemmArgs g{cs.m,  cs.n,    cs.k, nullptr, lda,  cs.ta, nullptr, ldb,
               cs.tb, nullptr, ldc,  cs.ab,   cs.c, 1.f,   cs.beta};
    GemmArgs h = g;
    g.a = in_bf ? (const void*)ab.data() : a.data(), g.b = in_bf ? (const void*)bb.data() : b.data();
    g.c = out_bf ? (void*)cbf.data() : cf.data();
    cpu().gemm(g);
    h.a = da.data(), h.b = db.data(), h.c = dc.data();
    gpu_->gemm(h);
    const std::vector<float> want = out_bf ? widened(cbf) : cf;
    const std::vector<float> got = out_bf ? widened(down<bf16>(dc, cb0.size())) : down<float>(dc, c0.size());
    EXPECT_LE(max_rel(got, want), out_bf ? 8e-3 : 1e-5);
    for (int64_t i = 0; i < cs.m; ++i)  // padding columns untouched
      for (int64_t j = cs.n; j < ldc; ++j) ASSERT_EQ(got[i * ldc + j], want[i * ldc + j]);
  }
}

TEST_F(CudaOps, RmsNormForwardBackwardMatchCpu) {
  for (auto [t, d, ld] :
       {std::tuple<int64_t, int64_t, int64_t>{1, 7, 7}, {37, 64, 80}, {100, 576, 576}, {65, 2048, 2048}}) {
    SCOPED_TRACE(::testing::Message() << "t=" << t << " d=" << d << " ld=" << ld);
    const auto x = philox_normals(3, t * ld, 1), w = philox_normals(3, d, 2, 0.1f, 1.f),
               dy = philox_normals(3, t * ld, 3);
    const auto dx0 = philox_normals(3, t * ld, 4), dw0 = philox_normals(3, d, 5);
    std::vector<float> y(t * ld), rstd(t), dx = dx0, dw = dw0;
    cpu().rmsnorm_forward(x.data(), ld, w.data(), y.data(), ld, rstd.data(), t, d, 1e-6f);
    cpu().rmsnorm_backward(dy.data(), ld, x.data(), ld, w.data(), rstd.data(), dx.data(), ld, dw.data(), t, d,
                           1.f);
    DeviceBuffer gx = up(x), gw = up(w), gy = up(std::vector<float>(t * ld)), gr = up(std::vector<float>(t));
    DeviceBuffer gdy = up(dy), gdx = up(dx0), gdw = up(dw0);
    gpu_->rmsnorm_forward(gx.as<float>(), ld, gw.as<float>(), gy.as<float>(), ld, gr.as<float>(), t, d,
                          1e-6f);
    gpu_->rmsnorm_backward(gdy.as<float>(), ld, gx.as<float>(), ld, gw.as<float>(), gr.as<float>(),
                           gdx.as<float>(), ld, gdw.as<float>(), t, d, 1.f);
    EXPECT_LE(max_rel(down<float>(gy, y.size()), y), 1e-5);
    EXPECT_LE(max_rel(down<float>(gr, t), rstd), 1e-5);
    EXPECT_LE(max_rel(down<float>(gdx, dx.size()), dx), 1e-5);
    EXPECT_LE(max_rel(down<float>(gdw, d), dw), 1e-5);
  }
}

TEST_F(CudaOps, SwigluForwardBackwardMatchCpuScaledAndFused) {
  for (bool scaled : {false, true}) {
    const int64_t t = 45, f = 1408, ld = 2 * f;  // fused [T, 2F]: gate then up
    const auto ab = philox_normals(4, t * ld, 1, 2.f), dh = philox_normals(4, t * f, 2),
               p = philox_normals(4, t, 3);
    std::vector<float> h(t * f), dab(t * ld), dp(t);
    const float* pp = scaled ? p.data() : nullptr;
    cpu().swiglu_forward(ab.data(), ab.data() + f, ld, pp, h.data(), t, f);
    cpu().swiglu_backward(dh.data(), ab.data(), ab.data() + f, ld, pp, dab.data(), dab.data() + f, ld,
                          scaled ? dp.data() : nullptr, t, f);
    DeviceBuffer gab = up(ab), gdh = up(dh), gp = up(p), gh = up(std::vector<float>(t * f));
    DeviceBuffer gdab = up(std::vector<float>(t * ld)), gdp = up(std::vector<float>(t));
    const float* gpp = scaled ? gp.as<float>() : nullptr;
    gpu_->swiglu_forward(gab.as<float>(), gab.as<float>() + f, ld, gpp, gh.as<float>(), t, f);
    gpu_->swiglu_backward(gdh.as<float>(), gab.as<float>(), gab.as<float>() + f, ld, gpp, gdab.as<float>(),
                          gdab.as<float>() + f, ld, scaled ? gdp.as<float>() : nullptr, t, f);
    EXPECT_LE(max_rel(down<float>(gh, h.size()), h), 1e-5) << "scaled=" << scaled;
    EXPECT_LE(max_rel(down<float>(gdab, dab.size()), dab), 1e-5) << "scaled=" << scaled;
    if (scaled) {
      EXPECT_LE(max_rel(down<float>(gdp, t), dp), 1e-5);
    }
  }
}

TEST_F(CudaOps, EmbeddingMatchesCpuAndIsDeterministic) {
  const int64_t t = 300, vocab = 50, d = 40;
  std::vector<int32_t> ids(t);
  for (int64_t i = 0; i < t; ++i) ids[i] = static_cast<int32_t>((i * 7 + i / 13) % 11);  // heavy repeats
  ids[5] = 49;
  const auto table = philox_normals(5, vocab * d, 1), dout = philox_normals(5, t * d, 2),
             dt0 = philox_normals(5, vocab * d, 3);
  std::vector<float> out(t * d), dtab = dt0;
  cpu().embedding_forward(ids.data(), table.data(), out.data(), t, vocab, d);
  cpu().embedding_backward(dout.data(), ids.data(), dtab.data(), t, vocab, d);
  DeviceBuffer gids = up(ids), gtab = up(table), gout = up(std::vector<float>(t * d)), gdout = up(dout);
  DeviceBuffer gdt = up(dt0);
  gpu_->embedding_forward(gids.as<int32_t>(), gtab.as<float>(), gout.as<float>(), t, vocab, d);
  gpu_->embedding_backward(gdout.as<float>(), gids.as<int32_t>(), gdt.as<float>(), t, vocab, d);
  EXPECT_EQ(down<float>(gout, out.size()), out);  // a gather: exact
  const auto first = down<float>(gdt, dtab.size());
  EXPECT_LE(max_rel(first, dtab), 1e-6);
  gpu_->copy_to_device(gdt.data(), dt0.data(), dt0.size() * sizeof(float));
  gpu_->embedding_backward(gdout.as<float>(), gids.as<int32_t>(), gdt.as<float>(), t, vocab, d);
  EXPECT_EQ(down<float>(gdt, dtab.size()), first);  // bit-identical on a rerun
}

TEST_F(CudaOps, EmbeddingReportsAnIdOutsideTheVocabulary) {
  const std::vector<int32_t> ids = {1, 2, 77, 3};
  DeviceBuffer gids = up(ids), gtab = up(std::vector<float>(10 * 4)), gout = up(std::vector<float>(4 * 4));
  gpu_->embedding_forward(gids.as<int32_t>(), gtab.as<float>(), gout.as<float>(), 4, 10, 4);
  try {
    gpu_->synchronize();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("token id 77 at token index 2"), std::string::npos) << e.what();
  }
  gpu_->synchronize();  // reported once, then cleared
}

TEST_F(CudaOps, YarnRopeMatchesCpuInPlaceAndStrided) {
  YarnParams y;
  y.factor = 40, y.original_max_position_embeddings = 64, y.beta_fast = 32, y.beta_slow = 1, y.mscale = 1,
  y.mscale_all_dim = 1;
  RopeTable tab;
  rope_build_table(rope_inv_freq(64, 10000.0, &y, 2560), 256, tab);
  DeviceBuffer gcos = up(tab.cos_PH), gsin = up(tab.sin_PH);
  const RopeTableView gtab{gcos.as<float>(), gsin.as<float>(), tab.max_pos, tab.half};
  const int64_t t = 2 * 100, heads = 3, ld = heads * 192, hs = 192;  // q_pe inside q [T, H·192] at column 128
  for (bool interleave : {true, false}) {
    const auto x = philox_normals(6, t * ld, 1);
    std::vector<float> y1 = x, y2;
    cpu().rope_forward(x.data() + 128, ld, hs, y1.data() + 128, ld, hs, t, heads, 100, view_of(tab),
                       interleave);
    y2 = y1;
    cpu().rope_backward(y1.data() + 128, ld, hs, y2.data() + 128, ld, hs, t, heads, 100, view_of(tab),
                        interleave);
    DeviceBuffer g = up(x);
    gpu_->rope_forward(g.as<float>() + 128, ld, hs, g.as<float>() + 128, ld, hs, t, heads, 100, gtab,
                       interleave);
    EXPECT_LE(max_rel(down<float>(g, x.size()), y1), 1e-6) << "interleave=" << interleave;
    gpu_->rope_backward(g.as<float>() + 128, ld, hs, g.as<float>() + 128, ld, hs, t, heads, 100, gtab,
                        interleave);
    EXPECT_LE(max_rel(down<float>(g, x.size()), y2), 1e-6) << "interleave=" << interleave;
  }
}

// Attention: MLA's head sizes and small odd ones; sequences that end inside a tile.
TEST_F(CudaOps, AttentionForwardBackwardMatchCpu) {
  struct Case {
    int64_t b, s, h, dqk, dv;
  };
  for (const Case c :
       {Case{1, 5, 2, 12, 8}, Case{2, 67, 3, 24, 16}, Case{1, 130, 2, 192, 128}, Case{2, 256, 1, 192, 128}}) {
    for (Precision p : {Precision::kF32, Precision::kBF16}) {
      SCOPED_TRACE(::testing::Message() << "b=" << c.b << " s=" << c.s << " h=" << c.h << " dqk=" << c.dqk
                                        << " dv=" << c.dv << " bf16=" << (p == Precision::kBF16));
      const AttentionShape sh{c.b, c.s, c.h, c.dqk, c.dv, 1.f / std::sqrt(static_cast<float>(c.dqk))};
      const int64_t T = c.b * c.s, ldq = c.h * c.dqk, ldv = c.h * c.dv;
      const auto q = philox_normals(7, T * ldq, 1), k = philox_normals(7, T * ldq, 2),
                 v = philox_normals(7, T * ldv, 3);
      const auto dout = philox_normals(7, T * ldv, 4);
      std::vector<float> o(T * ldv), lse(c.b * c.h * c.s), dq(T * ldq), dk(T * ldq), dv(T * ldv);
      auto hv = [&](const float* x, int64_t d) { return HeadsView{x, c.h * d, d}; };
      auto hm = [&](float* x, int64_t d) { return HeadsViewMut{x, c.h * d, d}; };
      cpu().attention_forward(sh, hv(q.data(), c.dqk), hv(k.data(), c.dqk), hv(v.data(), c.dv),
                              hm(o.data(), c.dv), lse.data(), p);
      cpu().attention_backward(sh, hv(q.data(), c.dqk), hv(k.data(), c.dqk), hv(v.data(), c.dv),
                               hv(o.data(), c.dv), lse.data(), hv(dout.data(), c.dv), hm(dq.data(), c.dqk),
                               hm(dk.data(), c.dqk), hm(dv.data(), c.dv), p);
      DeviceBuffer gq = up(q), gk = up(k), gv = up(v), gdo = up(dout), go = up(std::vector<float>(o.size()));
      DeviceBuffer gl = up(std::vector<float>(lse.size())), gdq = up(std::vector<float>(dq.size()));
      DeviceBuffer gdk = up(std::vector<float>(dk.size())), gdv = up(std::vector<float>(dv.size()));
      gpu_->attention_forward(sh, hv(gq.as<float>(), c.dqk), hv(gk.as<float>(), c.dqk),
                              hv(gv.as<float>(), c.dv), hm(go.as<float>(), c.dv), gl.as<float>(), p);
      gpu_->attention_backward(sh, hv(gq.as<float>(), c.dqk), hv(gk.as<float>(), c.dqk),
                               hv(gv.as<float>(), c.dv), hv(go.as<float>(), c.dv), gl.as<float>(),
                               hv(gdo.as<float>(), c.dv), hm(gdq.as<float>(), c.dqk),
                               hm(gdk.as<float>(), c.dqk), hm(gdv.as<float>(), c.dv), p);
      // bf16: both round the same operands at the same places; what differs is fp32 accumulation order, which
      // can move a probability across a bf16 rounding boundary (2^-8 relative) now and then.
      const double tol = p == Precision::kF32 ? 1e-5 : 1e-2;
      EXPECT_LE(max_rel(down<float>(go, o.size()), o), tol);
      EXPECT_LE(max_rel(down<float>(gl, lse.size()), lse), p == Precision::kF32 ? 1e-5 : 1e-3);
      const auto gdq1 = down<float>(gdq, dq.size());
      EXPECT_LE(max_rel(gdq1, dq), tol);
      EXPECT_LE(max_rel(down<float>(gdk, dk.size()), dk), tol);
      EXPECT_LE(max_rel(down<float>(gdv, dv.size()), dv), tol);
      gpu_->attention_backward(sh, hv(gq.as<float>(), c.dqk), hv(gk.as<float>(), c.dqk),
                               hv(gv.as<float>(), c.dv), hv(go.as<float>(), c.dv), gl.as<float>(),
                               hv(gdo.as<float>(), c.dv), hm(gdq.as<float>(), c.dqk),
                               hm(gdk.as<float>(), c.dqk), hm(gdv.as<float>(), c.dv), p);
      EXPECT_EQ(down<float>(gdq, dq.size()), gdq1) << "attention backward is not deterministic";
    }
  }
}

// The tensor-core path (attention_tc.cu), which the backend takes for bf16 unless DSV3_ATTENTION=cuda-cores.
// Shapes: MLA's 192/128, 128/128, 64/64; sequences ending inside a 64- and a 32-row tile (77, 200), three tokens,
// B = 2, H = 3; q is a slice of a wider row and v has padding between heads (as MLA's views do).
struct TcCase {
  int64_t b, s, h, dqk, dv;
};
struct TcRun {
  std::vector<float> o, lse, dq, dk, dv;
};

class CudaAttentionTc : public CudaOps {
 protected:
  void SetUp() override {
    CudaOps::SetUp();
    if (IsSkipped()) return;
    if (!cuda::attention_tc_enabled())
      GTEST_SKIP() << "DSV3_ATTENTION=cuda-cores: the tensor-core path is off";
  }
  static AttentionShape shape(const TcCase& c) {
    return {c.b, c.s, c.h, c.dqk, c.dv, 1.f / std::sqrt(static_cast<float>(c.dqk))};
  }
  // Inputs: q [T, H·dqk + 16] (a slice), k contiguous, v with 8 floats between heads, dO contiguous.
  struct Inputs {
    int64_t ldq, ldk, ldv, hsv, lddo;
    std::vector<float> q, k, v, dout;
  };
  static Inputs inputs(const TcCase& c, uint64_t seed) {
    const int64_t T = c.b * c.s;
    Inputs in{c.h * c.dqk + 16, c.h * c.dqk, c.h * (c.dv + 8), c.dv + 8, c.h * c.dv, {}, {}, {}, {}};
    in.q = philox_normals(seed, T * in.ldq, 1), in.k = philox_normals(seed, T * in.ldk, 2);
    in.v = philox_normals(seed, T * in.ldv, 3), in.dout = philox_normals(seed, T * in.lddo, 4);
    return in;
  }
  // Forward then backward through a backend; o has 8 sentinel floats after each token's heads.
  static void run(Backend& be, const TcCase& c, const Inputs& in, const float* q, const float* k,
                  const float* v, const float* dout, float* o, float* lse, float* dq, float* dk, float* dv) {
    const AttentionShape sh = shape(c);
    const HeadsView hq{q, in.ldq, c.dqk}, hk{k, in.ldk, c.dqk}, hv{v, in.ldv, in.hsv},
        hdo{dout, in.lddo, c.dv};
    const HeadsViewMut ho{o, c.h * c.dv + 8, c.dv};
    be.attention_forward(sh, hq, hk, hv, ho, lse, Precision::kBF16);
    be.attention_backward(sh, hq, hk, hv, {o, c.h * c.dv + 8, c.dv}, lse, hdo, {dq, c.h * c.dqk, c.dqk},
                          {dk, c.h * c.dqk, c.dqk}, {dv, c.h * c.dv, c.dv}, Precision::kBF16);
  }
  TcRun run_gpu(const TcCase& c, const Inputs& in) {
    const int64_t T = c.b * c.s;
    DeviceBuffer gq = up(in.q), gk = up(in.k), gv = up(in.v), gdo = up(in.dout);
    DeviceBuffer go = up(std::vector<float>(T * (c.h * c.dv + 8), 7.f)),
                 gl = up(std::vector<float>(c.b * c.h * c.s));
    DeviceBuffer gdq = up(std::vector<float>(T * c.h * c.dqk)), gdk = up(std::vector<float>(T * c.h * c.dqk));
    DeviceBuffer gdv = up(std::vector<float>(T * c.h * c.dv));
    run(*gpu_, c, in, gq.as<float>(), gk.as<float>(), gv.as<float>(), gdo.as<float>(), go.as<float>(),
        gl.as<float>(), gdq.as<float>(), gdk.as<float>(), gdv.as<float>());
    return {down<float>(go, T * (c.h * c.dv + 8)), down<float>(gl, c.b * c.h * c.s),
            down<float>(gdq, T * c.h * c.dqk), down<float>(gdk, T * c.h * c.dqk),
            down<float>(gdv, T * c.h * c.dv)};
  }
  TcRun run_cpu(const TcCase& c, const Inputs& in) {
    const int64_t T = c.b * c.s;
    TcRun r{std::vector<float>(T * (c.h * c.dv + 8), 7.f), std::vector<float>(c.b * c.h * c.s),
            std::vector<float>(T * c.h * c.dqk), std::vector<float>(T * c.h * c.dqk),
            std::vector<float>(T * c.h * c.dv)};
    run(cpu(), c, in, in.q.data(), in.k.data(), in.v.data(), in.dout.data(), r.o.data(), r.lse.data(),
        r.dq.data(), r.dk.data(), r.dv.data());
    return r;
  }
};

// [B,S,H,D] out of a strided host array, as float (the comparisons are in float; the reference's own error is
// far below the tolerances).
std::vector<float> dense_f(const std::vector<float>& x, int64_t T, int64_t H, int64_t D, int64_t ld_token,
                           int64_t ld_head) {
  std::vector<float> out(T * H * D);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t d = 0; d < D; ++d) out[(t * H + h) * D + d] = x[t * ld_token + h * ld_head + d];
  return out;
}

TEST_F(CudaAttentionTc, ForwardBackwardMatchCpuBf16AndReference) {
  for (const TcCase c : {TcCase{1, 77, 2, 192, 128}, TcCase{2, 200, 3, 192, 128}, TcCase{1, 3, 1, 192, 128},
                         TcCase{2, 77, 3, 128, 128}, TcCase{1, 200, 2, 64, 64}, TcCase{1, 64, 1, 64, 64}}) {
    SCOPED_TRACE(::testing::Message()
                 << "b=" << c.b << " s=" << c.s << " h=" << c.h << " dqk=" << c.dqk << " dv=" << c.dv);
    const AttentionShape sh = shape(c);
    ASSERT_TRUE(cuda::attention_tc_supported(sh));
    const int64_t T = c.b * c.s;
    const Inputs in = inputs(c, 21);
    const TcRun g = run_gpu(c, in), p = run_cpu(c, in);
    for (int64_t t = 0; t < T; ++t)  // the sentinels after each token's heads are untouched
      for (int64_t j = c.h * c.dv; j < c.h * c.dv + 8; ++j) ASSERT_EQ(g.o[t * (c.h * c.dv + 8) + j], 7.f);
    const auto o_g = dense_f(g.o, T, c.h, c.dv, c.h * c.dv + 8, c.dv),
               o_p = dense_f(p.o, T, c.h, c.dv, c.h * c.dv + 8, c.dv);

    // Against the CPU's bf16 mode: both round the same operands (q, k, v, dO, P, dS) to bf16, but the fp32 sums
    // run in another order (tensor-core 16-wide chunks vs oneDNN) and the online softmax rescales per 64 keys
    // here and per 256 on the CPU, so a probability can land on the other side of a bf16 rounding boundary
    // (2^-8 relative) now and then: 1e-2 of the largest magnitude, as for the fp32-core kernel's bf16 mode.
    // lse involves no rounded probability (only q·k in fp32 and exp/log): 1e-4.
    EXPECT_LE(max_rel(o_g, o_p), 1e-2);
    EXPECT_LE(max_rel(g.lse, p.lse), 1e-4);
    EXPECT_LE(max_rel(g.dq, p.dq), 1e-2);
    EXPECT_LE(max_rel(g.dk, p.dk), 1e-2);
    EXPECT_LE(max_rel(g.dv, p.dv), 1e-2);

    // Against the double reference on the bf16-rounded q, k, v (dO unrounded): what remains is the rounding of P
    // (o, dV) and of dS and dO (dQ, dK), a relative 2^-9 per element that partly averages out. The CPU's bf16
    // mode measures at most 9e-4 (o), 3.2e-3 (dv), 4.1e-3 (dq, dk), 1e-7 (lse) on these shapes; the bounds
    // allow about 4x that (the tensor cores add only their fp32 accumulation order), and lse, which sees no
    // rounded probability, 2e-5. (A single-token sequence is left out: its dq, dk are exactly 0, so relative
    // errors are undefined.)
    std::vector<double> qd(T * c.h * c.dqk), kd(qd.size()), vd(T * c.h * c.dv), dod(vd.size());
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < c.h; ++h) {
        for (int64_t d = 0; d < c.dqk; ++d) {
          qd[(t * c.h + h) * c.dqk + d] = round_bf16(in.q[t * in.ldq + h * c.dqk + d]);
          kd[(t * c.h + h) * c.dqk + d] = round_bf16(in.k[t * in.ldk + h * c.dqk + d]);
        }
        for (int64_t d = 0; d < c.dv; ++d) {
          vd[(t * c.h + h) * c.dv + d] = round_bf16(in.v[t * in.ldv + h * in.hsv + d]);
          dod[(t * c.h + h) * c.dv + d] = in.dout[t * in.lddo + h * c.dv + d];
        }
      }
    std::vector<double> ro(vd.size()), rl(c.b * c.h * c.s), rdq(qd.size()), rdk(qd.size()), rdv(vd.size());
    attention_forward_reference(sh, qd.data(), kd.data(), vd.data(), ro.data(), rl.data());
    attention_backward_reference(sh, qd.data(), kd.data(), vd.data(), dod.data(), rdq.data(), rdk.data(),
                                 rdv.data());
    auto f = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
    EXPECT_LE(max_rel(o_g, f(ro)), 4e-3);
    EXPECT_LE(max_rel(g.lse, f(rl)), 2e-5);
    EXPECT_LE(max_rel(g.dq, f(rdq)), 1.6e-2);
    EXPECT_LE(max_rel(g.dk, f(rdk)), 1.6e-2);
    EXPECT_LE(max_rel(g.dv, f(rdv)), 1.2e-2);
  }
}

TEST_F(CudaAttentionTc, IsDeterministic) {
  const TcCase c{2, 333, 3, 192, 128};
  const Inputs in = inputs(c, 22);
  const TcRun a = run_gpu(c, in), b = run_gpu(c, in);
  auto same_bits = [](const std::vector<float>& x, const std::vector<float>& y) {
    return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(float)) == 0;
  };
  EXPECT_TRUE(same_bits(a.o, b.o));
  EXPECT_TRUE(same_bits(a.lse, b.lse));
  EXPECT_TRUE(same_bits(a.dq, b.dq));
  EXPECT_TRUE(same_bits(a.dk, b.dk));
  EXPECT_TRUE(same_bits(a.dv, b.dv));
}

// Shapes the tensor-core kernels do not take fall back to the fp32-core kernels (the bf16 case of
// AttentionForwardBackwardMatchCpu covers them): head sizes not multiples of 16, and 256/256, whose dK/dV tile
// set needs 257.25 KiB of shared memory (Hopper allows 227).
TEST_F(CudaAttentionTc, DeclinesShapesItCannotRun) {
  EXPECT_FALSE(cuda::attention_tc_supported({2, 67, 3, 24, 16, 1.f}));
  EXPECT_FALSE(cuda::attention_tc_supported({1, 64, 1, 256, 256, 1.f}));
  EXPECT_FALSE(cuda::attention_tc_supported({1, 64, 1, 272, 128, 1.f}));
  EXPECT_TRUE(cuda::attention_tc_supported({1, 4096, 16, 192, 128, 1.f}));
}

TEST_F(CudaOps, AttentionRefusesHeadSizesItCannotRun) {
  const AttentionShape sh{1, 4, 1, 512, 128, 1.f};
  DeviceBuffer q = up(std::vector<float>(4 * 512)), v = up(std::vector<float>(4 * 128)),
               l = up(std::vector<float>(4));
  EXPECT_THROW(gpu_->attention_forward(sh, {q.as<float>(), 512, 512}, {q.as<float>(), 512, 512},
                                       {v.as<float>(), 128, 128}, {v.as<float>(), 128, 128}, l.as<float>(),
                                       Precision::kF32),
               Error);
}

TEST_F(CudaOps, HeadCrossEntropyMatchesCpuWithIgnoredLabels) {
  const int64_t t = 70, d = 96, v = 1000;  // v not a multiple of any chunk size
  for (Precision p : {Precision::kF32, Precision::kBF16}) {
    const auto h = philox_normals(8, t * d, 1), w = philox_normals(8, v * d, 2, 0.05f),
               dloss_T = philox_normals(8, t, 4);
    std::vector<int32_t> labels(t);
    for (int64_t i = 0; i < t; ++i) labels[i] = i % 9 == 4 ? -100 : static_cast<int32_t>((i * 37) % v);
    const auto wb = rounded(w);
    const bf16* wbp = p == Precision::kBF16 ? wb.data() : nullptr;
    const auto dw0 = philox_normals(8, v * d, 3);
    std::vector<float> loss(t), lse(t), dh(t * d), dw = dw0;
    cpu().head_cross_entropy_forward(h.data(), w.data(), wbp, labels.data(), loss.data(), lse.data(), t, d, v,
                                     p);
    cpu().head_cross_entropy_backward(h.data(), w.data(), wbp, labels.data(), lse.data(), 0.5f,
                                      dloss_T.data(), dh.data(), dw.data(), t, d, v, p);
    DeviceBuffer gh = up(h), gw = up(w), gwb = up(wb), gl = up(labels), gloss = up(std::vector<float>(t));
    DeviceBuffer glse = up(std::vector<float>(t)), gdh = up(std::vector<float>(t * d)), gdw = up(dw0),
                 gdl = up(dloss_T);
    const bf16* gwbp = p == Precision::kBF16 ? gwb.as<bf16>() : nullptr;
    gpu_->head_cross_entropy_forward(gh.as<float>(), gw.as<float>(), gwbp, gl.as<int32_t>(),
                                     gloss.as<float>(), glse.as<float>(), t, d, v, p);
    gpu_->head_cross_entropy_backward(gh.as<float>(), gw.as<float>(), gwbp, gl.as<int32_t>(),
                                      glse.as<float>(), 0.5f, gdl.as<float>(), gdh.as<float>(),
                                      gdw.as<float>(), t, d, v, p);
    const double tol = p == Precision::kF32 ? 1e-5 : 1e-2;  // bf16: dlogits rounded to bf16 on both sides
    EXPECT_LE(max_rel(down<float>(gloss, t), loss), 1e-5) << "bf16=" << (p == Precision::kBF16);
    EXPECT_LE(max_rel(down<float>(glse, t), lse), 1e-5);
    EXPECT_LE(max_rel(down<float>(gdh, dh.size()), dh), tol);
    EXPECT_LE(max_rel(down<float>(gdw, dw.size()), dw), tol);
    const auto gl_host = down<float>(gloss, t);
    for (int64_t i = 0; i < t; ++i) {
      if (labels[i] == -100) {
        EXPECT_EQ(gl_host[i], 0.f);
      }
    }
  }
}

TEST_F(CudaOps, AdamWIsBitIdenticalToCpuOverSegments) {
  const int64_t n = 100003;
  auto p = philox_normals(9, n, 1), g = philox_normals(9, n, 2, 1e-2f);
  std::vector<float> m(n), v(n);
  DeviceBuffer gp = up(p), gg = up(g), gm = up(m), gv = up(v);
  for (int64_t step = 1; step <= 3; ++step) {
    const std::vector<AdamWSegment> segs = {
        {0, 40000, adamw_step_consts(0.9, 0.95, 1e-8, step, 3e-4, 0.1)},
        {40000, 17, adamw_step_consts(0.9, 0.95, 1e-8, step, 3e-4, 0.0)},
        {40017, n - 40017, adamw_step_consts(0.9, 0.95, 1e-8, step, 1e-3, 0.1)},
    };
    cpu().adamw(p.data(), g.data(), m.data(), v.data(), segs);
    gpu_->adamw(gp.as<float>(), gg.as<float>(), gm.as<float>(), gv.as<float>(), segs);
  }
  auto bits_equal = [](const std::vector<float>& a, const std::vector<float>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * 4) == 0;
  };
  EXPECT_TRUE(bits_equal(down<float>(gp, n), p));
  EXPECT_TRUE(bits_equal(down<float>(gm, n), m));
  EXPECT_TRUE(bits_equal(down<float>(gv, n), v));
}

TEST_F(CudaOps, SumOfSquaresIsBitIdenticalToCpu) {
  const auto x = philox_normals(10, 70001, 1);
  DeviceBuffer gx = up(x);
  const std::vector<std::pair<int64_t, int64_t>> segs = {{0, 5}, {5, 16384}, {16389, 50000}, {66389, 3612}};
  const double want = cpu().sum_of_squares(x.data(), segs), got = gpu_->sum_of_squares(gx.as<float>(), segs);
  EXPECT_EQ(got, want);
}

TEST_F(CudaOps, ScaleAndBf16RoundingMatchCpu) {
  const auto x = philox_normals(12, 1001, 1);
  std::vector<float> xs = x;
  std::vector<bf16> xb(x.size());
  cpu().scale(xs.data(), static_cast<int64_t>(xs.size()), 0.37f);
  cpu().to_bf16(x.data(), xb.data(), static_cast<int64_t>(x.size()));
  DeviceBuffer g = up(x), gb = up(std::vector<bf16>(x.size()));
  gpu_->to_bf16(g.as<float>(), gb.as<bf16>(), static_cast<int64_t>(x.size()));
  gpu_->scale(g.as<float>(), static_cast<int64_t>(x.size()), 0.37f);
  EXPECT_EQ(down<float>(g, x.size()), xs);
  const auto gbh = down<bf16>(gb, x.size());
  for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(gbh[i].bits, xb[i].bits) << i;
}

// The model's data movement: residual adds, strided row copies, MLA's k_pe gradient summed over heads, and the
// MoE token permutation, with a hot expert, empty experts and dropped pairs. All are copies or fixed-order fp32
// sums: bit-identical to the CPU.
TEST_F(CudaOps, DataMovementOpsAreBitIdenticalToCpu) {
  const int64_t t = 37, h = 5, k = 24, n = t * h * k;
  const auto a = philox_normals(20, n, 1), b = philox_normals(20, n, 2);
  std::vector<float> sum(n), rows(n, 0.f), heads(t * 9, 0.f);
  cpu().add(sum.data(), a.data(), b.data(), n);
  cpu().copy_rows(rows.data(), k, a.data() + 3, k, t * h, 16);
  cpu().sum_heads(a.data() + 16, h * k, k, heads.data() + 1, 9, t, h, 8);
  DeviceBuffer ga = up(a), gb = up(b), gs = up(std::vector<float>(n)), gr = up(std::vector<float>(n, 0.f)),
               gh = up(std::vector<float>(t * 9, 0.f));
  gpu_->add(gs.as<float>(), ga.as<float>(), gb.as<float>(), n);
  gpu_->copy_rows(gr.as<float>(), k, ga.as<float>() + 3, k, t * h, 16);
  gpu_->sum_heads(ga.as<float>() + 16, h * k, k, gh.as<float>() + 1, 9, t, h, 8);
  EXPECT_EQ(down<float>(gs, n), sum);
  EXPECT_EQ(down<float>(gr, n), rows);
  EXPECT_EQ(down<float>(gh, t * 9), heads);
  gpu_->add(ga.as<float>(), ga.as<float>(), gb.as<float>(), n);  // in place, as the MTP backward runs it
  EXPECT_EQ(down<float>(ga, n), sum);
}

TEST_F(CudaOps, MoePermutationIsBitIdenticalToCpuForSkewedRoutings) {
  const int64_t t = 53, kk = 3, e = 8, d = 19;
  // Three routings: spread, one hot expert (all tokens on expert 5, the others empty), and capacity-dropped pairs.
  for (int routing = 0; routing < 3; ++routing) {
    std::vector<int32_t> idx(t * kk);
    std::vector<uint8_t> kept(t * kk, 1);
    for (int64_t i = 0; i < t * kk; ++i) {
      idx[i] = routing == 1 ? (i % kk == 0 ? 5 : static_cast<int32_t>((5 + i % kk) % e))
                            : static_cast<int32_t>((i * 7 + i / kk) % e);
      if (routing == 2) kept[i] = (i * 13) % 5 != 0;
    }
    MoePermutation perm;
    build_permutation(idx.data(), kept.data(), t, kk, e, perm);
    const int64_t r = perm.rows();
    const auto x = philox_normals(21, t * d, 1), y = philox_normals(21, r * d, 2),
               w = philox_normals(21, t * kk, 3);
    std::vector<float> xr(r * d), out(t * d), out1 = x, pr(r), back(t * kk);
    cpu().permute_rows(x.data(), perm.token_R.data(), r, d, xr.data());
    cpu().unpermute_sum(y.data(), perm.row_TK.data(), t, kk, d, out.data(), 0.f);
    cpu().unpermute_sum(y.data(), perm.row_TK.data(), t, kk, d, out1.data(), 1.f);
    cpu().gather_or_zero(w.data(), perm.slot_R.data(), r, pr.data());
    cpu().gather_or_zero(pr.data(), perm.row_TK.data(), t * kk, back.data());
    DeviceBuffer gx = up(x), gy = up(y), gw = up(w), tok = up(perm.token_R), row = up(perm.row_TK),
                 slot = up(perm.slot_R), gxr = up(std::vector<float>(r * d)),
                 go = up(std::vector<float>(t * d)), go1 = up(x), gpr = up(std::vector<float>(r)),
                 gback = up(std::vector<float>(t * kk));
    gpu_->permute_rows(gx.as<float>(), tok.as<int32_t>(), r, d, gxr.as<float>());
    gpu_->unpermute_sum(gy.as<float>(), row.as<int32_t>(), t, kk, d, go.as<float>(), 0.f);
    gpu_->unpermute_sum(gy.as<float>(), row.as<int32_t>(), t, kk, d, go1.as<float>(), 1.f);
    gpu_->gather_or_zero(gw.as<float>(), slot.as<int32_t>(), r, gpr.as<float>());
    gpu_->gather_or_zero(gpr.as<float>(), row.as<int32_t>(), t * kk, gback.as<float>());
    EXPECT_EQ(down<float>(gxr, r * d), xr) << "routing " << routing;
    EXPECT_EQ(down<float>(go, t * d), out) << "routing " << routing;
    EXPECT_EQ(down<float>(go1, t * d), out1) << "routing " << routing;
    EXPECT_EQ(down<float>(gpr, r), pr) << "routing " << routing;
    EXPECT_EQ(down<float>(gback, t * kk), back) << "routing " << routing;
  }
}

// MLA rotates the one k_pe into every head's key by reading it with head stride 0.
TEST_F(CudaOps, RopeBroadcastsAnInputWithHeadStrideZero) {
  RopeTable tab;
  rope_build_table(rope_inv_freq(64, 10000.0, nullptr, 512), 64, tab);
  DeviceBuffer gcos = up(tab.cos_PH), gsin = up(tab.sin_PH);
  const RopeTableView gtab{gcos.as<float>(), gsin.as<float>(), tab.max_pos, tab.half};
  const int64_t t = 2 * 33, heads = 4, ld_x = 576, ld_y = heads * 192;
  const auto x = philox_normals(22, t * ld_x, 1);
  std::vector<float> y(t * ld_y, 0.f);
  cpu().rope_forward(x.data() + 512, ld_x, 0, y.data() + 128, ld_y, 192, t, heads, 33, view_of(tab), true);
  DeviceBuffer gx = up(x), gy = up(std::vector<float>(t * ld_y, 0.f));
  gpu_->rope_forward(gx.as<float>() + 512, ld_x, 0, gy.as<float>() + 128, ld_y, 192, t, heads, 33, gtab,
                     true);
  EXPECT_LE(max_rel(down<float>(gy, y.size()), y), 1e-6);
}

// The MoE's expert GEMMs in lanes (Backend::lanes_begin: several streams): each expert's chain (a GEMM, then one
// accumulating into the same rows) stays in order on its lane, lanes run concurrently, and stream order resumes
// after lanes_end (the scale below must see every lane's result). Nine experts over the default four lanes, with
// 0- and 1-row experts: the same bits as the GEMMs in order on one stream, in fp32 and with bf16 operands, and
// the CPU's results within the GEMM test's bound.
TEST_F(CudaOps, ExpertLanesGiveTheInOrderResults) {
  const int64_t d = 96, f = 64;
  const std::vector<int64_t> rows = {37, 0, 1, 128, 5, 64, 0, 200, 3};
  const int64_t e_n = static_cast<int64_t>(rows.size());
  std::vector<int64_t> off(1, 0);
  for (int64_t n : rows) off.push_back(off.back() + n);
  const int64_t r = off.back();
  const auto x = philox_normals(17, r * d, 1), w1 = philox_normals(17, e_n * f * d, 2),
             w2 = philox_normals(17, e_n * f * d, 3);
  for (const GemmType ab : {GemmType::kF32, GemmType::kBF16}) {
    SCOPED_TRACE(ab == GemmType::kBF16 ? "bf16 operands" : "fp32");
    const bool bf = ab == GemmType::kBF16;
    const auto xb = rounded(x), w1b = rounded(w1), w2b = rounded(w2);
    DeviceBuffer gx = bf ? up(xb) : up(x), gw1 = bf ? up(w1b) : up(w1), gw2 = bf ? up(w2b) : up(w2);
    const size_t el = bf ? 2 : 4;
    // y_e = x_e·w1_eᵀ, then y_e += x_e·w2_eᵀ, for every expert with rows, on `be`.
    auto experts = [&](Backend& be, const void* px, const void* pw1, const void* pw2, float* y, bool lanes) {
      if (lanes) be.lanes_begin();
      for (int64_t e = 0; e < e_n; ++e) {
        if (rows[e] == 0) continue;
        if (lanes) be.lane(e);
        const auto* xe = static_cast<const char*>(px) + off[e] * d * el;
        for (int k = 0; k < 2; ++k) {
          const auto* we = static_cast<const char*>(k ? pw2 : pw1) + e * f * d * el;
          be.gemm(GemmArgs{rows[e], f, d, xe, d, false, we, d, true, y + off[e] * f, f, ab, GemmType::kF32,
                           1.f, k ? 1.f : 0.f});
        }
      }
      if (lanes) be.lanes_end();
      be.scale(y, r * f, 2.f);
    };
    auto on_gpu = [&](bool lanes) {
      DeviceBuffer y = up(std::vector<float>(r * f, NAN));  // beta 0 overwrites whatever is there
      experts(*gpu_, gx.data(), gw1.data(), gw2.data(), y.as<float>(), lanes);
      return down<float>(y, r * f);
    };
    const auto in_lanes = on_gpu(true), in_order = on_gpu(false);
    ASSERT_EQ(in_lanes.size(), in_order.size());
    EXPECT_EQ(std::memcmp(in_lanes.data(), in_order.data(), in_lanes.size() * sizeof(float)), 0);
    std::vector<float> want(r * f, NAN);
    experts(cpu(), bf ? (const void*)xb.data() : x.data(), bf ? (const void*)w1b.data() : w1.data(),
            bf ? (const void*)w2b.data() : w2.data(), want.data(), false);
    EXPECT_LE(max_rel(in_lanes, want), 1e-5);
  }
}

// The router on the GPU (kernels/route.h, route.cu) against the same bodies on the CPU: DeepSeek-V3's 256 experts
// top-8 in 8 groups choosing 4, the MoE proxy's 64 top-6, and 8 experts top-2 with HF's 0.0 group mask; biased
// selection, the sequence aux loss over 3 sequences, the permutation and the backward; then the capacity rule
// (probs and position policies, one hot expert and an even spread, each dropping pairs). Logits on a grid 0.05
// apart per token (no near-ties: a 1-ulp difference in a device sigmoid cannot flip a choice; equal gate weights
// come from equal inputs and are equal on each side), so the choices, the kept map and the permutation must be
// equal; values within fp32 rounding.
TEST_F(CudaOps, RouterMatchesCpu) {
  struct Case {
    int32_t e, k, g, tg, gstk;
    bool neg_inf;
    int64_t capacity;  // -1: dropless
    bool by_position;
    int32_t hot;  // an expert whose bias wins most tokens (-1: none)
  };
  for (const Case cs : {Case{256, 8, 8, 4, 2, true, -1, false, -1}, Case{64, 6, 8, 3, 2, true, -1, false, -1},
                        Case{8, 2, 4, 2, 2, false, -1, false, -1}, Case{64, 6, 8, 3, 2, true, 30, false, 5},
                        Case{64, 6, 8, 3, 2, true, 30, true, 5}, Case{8, 2, 4, 2, 2, false, 70, false, -1}}) {
    SCOPED_TRACE(::testing::Message() << "E=" << cs.e << " K=" << cs.k << " capacity=" << cs.capacity
                                      << (cs.by_position ? " position" : " probs"));
    RouteSelect c;
    c.e = cs.e, c.k = cs.k, c.n_group = cs.g, c.topk_group = cs.tg, c.group_score_topk = cs.gstk;
    c.mask_neg_inf = cs.neg_inf, c.normalise = true, c.scaling = 2.5f;
    const int64_t batch = 3, seq = 100, t = batch * seq, e = cs.e, k = cs.k, nrb = 2 * (e + 1) + 1;
    std::vector<float> logits(t * e), bias(e), dweight = philox_normals(19, t * k, 2);
    for (int64_t i = 0; i < t; ++i)
      for (int64_t j = 0; j < e; ++j)
        logits[i * e + j] = 0.05f * static_cast<float>((i * 7 + j * 13) % e) - 1.5f;
    for (int64_t j = 0; j < e; ++j) bias[j] = 0.003f * static_cast<float>(j % 5);
    if (cs.hot >= 0) bias[cs.hot] = 0.5f;
    struct Out {
      std::vector<float> scores, weight, denom, aux_dl, dl;
      std::vector<int32_t> idx, readback, token, slot, row;
      std::vector<uint8_t> kept;
    };
    auto sizes = [&](Out& o) {
      o.scores.resize(t * e), o.weight.resize(t * k), o.denom.resize(t), o.aux_dl.resize(t * e),
          o.dl.resize(t * e);
      o.idx.resize(t * k), o.readback.resize(nrb), o.token.resize(t * k), o.slot.resize(t * k),
          o.row.resize(t * k), o.kept.resize(t * k);
    };
    // The readback block as the MoE layer lays it out: kept offsets, the aux loss, routed offsets.
    auto args = [&](const float* lg, const float* b, float* s, float* w, float* d, int32_t* idx, int32_t* rb,
                    int32_t* tok, int32_t* sl, int32_t* row, float* aux, uint8_t* kept) {
      RouteForwardArgs f;
      f.cfg = c, f.t = t, f.batch = batch, f.logits_TE = lg, f.bias_E = b;
      f.scores_TE = s, f.weight_TK = w, f.denom_T = d, f.idx_TK = idx, f.offsets_E1 = rb;
      f.token_R = tok, f.slot_R = sl, f.row_TK = row;
      f.aux_coeff = 1e-2f, f.aux_loss_1 = reinterpret_cast<float*>(rb + e + 1), f.aux_dlogits_TE = aux;
      if (cs.capacity >= 0)
        f.capacity = cs.capacity, f.drop_by_position = cs.by_position, f.kept_TK = kept,
        f.routed_E1 = rb + e + 2;
      return f;
    };
    auto bwd = [&](const float* s, const float* d, const float* dw, const int32_t* idx, const uint8_t* kept,
                   const float* aux, float* dl) {
      RouteBackwardArgs b;
      b.cfg = c, b.t = t, b.scores_TE = s, b.denom_T = d, b.dweight_TK = dw, b.idx_TK = idx;
      b.kept_TK = cs.capacity >= 0 ? kept : nullptr, b.aux_dlogits_TE = aux, b.aux_grad = 0.5f,
      b.dlogits_TE = dl;
      return b;
    };
    Out want;
    sizes(want);
    cpu().route_forward(args(logits.data(), bias.data(), want.scores.data(), want.weight.data(),
                             want.denom.data(), want.idx.data(), want.readback.data(), want.token.data(),
                             want.slot.data(), want.row.data(), want.aux_dl.data(), want.kept.data()));
    cpu().route_backward(bwd(want.scores.data(), want.denom.data(), dweight.data(), want.idx.data(),
                             want.kept.data(), want.aux_dl.data(), want.dl.data()));
    if (cs.capacity >= 0) {  // the case must drop something to test the rule
      const int64_t kept = want.readback[e], routed = want.readback[e + 2 + e];
      EXPECT_LT(kept, routed);
    }
    // The same on the GPU, every buffer in device memory.
    Out got;
    sizes(got);
    DeviceBuffer glg = up(logits), gb = up(bias), gdw = up(dweight), gs = up(got.scores), gw = up(got.weight),
                 gd = up(got.denom), gaux = up(got.aux_dl), gdl = up(got.dl), gi = up(got.idx),
                 grb = up(got.readback), gt = up(got.token), gsl = up(got.slot), gr = up(got.row),
                 gk = up(got.kept);
    gpu_->route_forward(args(glg.as<float>(), gb.as<float>(), gs.as<float>(), gw.as<float>(), gd.as<float>(),
                             gi.as<int32_t>(), grb.as<int32_t>(), gt.as<int32_t>(), gsl.as<int32_t>(),
                             gr.as<int32_t>(), gaux.as<float>(), gk.as<uint8_t>()));
    gpu_->route_backward(bwd(gs.as<float>(), gd.as<float>(), gdw.as<float>(), gi.as<int32_t>(),
                             gk.as<uint8_t>(), gaux.as<float>(), gdl.as<float>()));
    EXPECT_EQ(down<int32_t>(gi, t * k), want.idx);
    EXPECT_EQ(down<int32_t>(gr, t * k), want.row);
    const auto rb = down<int32_t>(grb, nrb);
    const int64_t rows = want.readback[e];  // the kept rows; the maps beyond them are not written
    EXPECT_EQ(down<int32_t>(gt, rows), std::vector<int32_t>(want.token.begin(), want.token.begin() + rows));
    EXPECT_EQ(down<int32_t>(gsl, rows), std::vector<int32_t>(want.slot.begin(), want.slot.begin() + rows));
    EXPECT_TRUE(std::equal(rb.begin(), rb.begin() + e + 1, want.readback.begin()));
    if (cs.capacity >= 0) {
      EXPECT_EQ(down<uint8_t>(gk, t * k), want.kept);
      EXPECT_TRUE(std::equal(rb.begin() + e + 2, rb.end(), want.readback.begin() + e + 2));
    }
    float loss = 0, want_loss = 0;
    std::memcpy(&loss, &rb[e + 1], 4), std::memcpy(&want_loss, &want.readback[e + 1], 4);
    EXPECT_NEAR(loss, want_loss, 1e-5 * std::fabs(want_loss));
    EXPECT_LE(max_rel(down<float>(gs, t * e), want.scores), 1e-6);
    EXPECT_LE(max_rel(down<float>(gw, t * k), want.weight), 1e-6);
    EXPECT_LE(max_rel(down<float>(gd, t), want.denom), 1e-6);
    EXPECT_LE(max_rel(down<float>(gaux, t * e), want.aux_dl), 1e-5);
    EXPECT_LE(max_rel(down<float>(gdl, t * e), want.dl), 1e-5);
  }
}

// A non-finite router logit is reported at the next synchronisation, naming the token and the expert.
TEST_F(CudaOps, RouterReportsANonFiniteLogit) {
  RouteSelect c;
  c.e = 8, c.k = 2;
  const int64_t t = 4;
  std::vector<float> logits(t * c.e, 0.1f);
  logits[2 * c.e + 5] = NAN;
  DeviceBuffer lg = up(logits), s(*gpu_, t * c.e * 4), w(*gpu_, t * c.k * 4), d(*gpu_, t * 4),
               i(*gpu_, t * c.k * 4), rb(*gpu_, (c.e + 2) * 4), tok(*gpu_, t * c.k * 4),
               sl(*gpu_, t * c.k * 4), row(*gpu_, t * c.k * 4);
  RouteForwardArgs f;
  f.cfg = c, f.t = t, f.batch = 1, f.logits_TE = lg.as<float>(), f.scores_TE = s.as<float>();
  f.weight_TK = w.as<float>(), f.denom_T = d.as<float>(), f.idx_TK = i.as<int32_t>(),
  f.offsets_E1 = rb.as<int32_t>();
  f.token_R = tok.as<int32_t>(), f.slot_R = sl.as<int32_t>(), f.row_TK = row.as<int32_t>();
  gpu_->route_forward(f);
  try {
    gpu_->synchronize();
    ADD_FAILURE() << "no error reported";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("router: logit of token 2, expert 5 is not finite"),
              std::string::npos)
        << err.what();
  }
}

// Once its scratch has grown, repeating the same ops allocates nothing.
// The grouped expert GEMM (CUTLASS's Hopper grouped kernel, grouped_gemm.cuh) against the CPU's on every case of
// grouped_gemm_cases.h (the three kinds, empty and one-row experts, every row on one expert, partial tiles, a
// strided operand): fp32 outputs of exact bf16 products, so 1e-5 (only the summation order differs); reruns
// bit-identical (no split-K); an expert without rows leaves its gradient untouched (no NaN, no zeros); a shape
// the kernel's alignment refuses is declined (the MoE then runs per expert), the output untouched.
TEST_F(CudaOps, GroupedExpertGemmMatchesCpu) {
  int major = 0, minor = 0;
  ASSERT_EQ(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), cudaSuccess);
  ASSERT_EQ(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, 0), cudaSuccess);
  const int cc = major * 10 + minor;
  {
    const testing::GroupedData first = testing::grouped_data(testing::grouped_cases().front(), 43);
    if (!cuda::grouped_gemm_supported(first.args, 90))
      GTEST_SKIP() << "this build has no CUTLASS grouped kernel (its CMake configure said why)";
  }
  for (const testing::GroupedCase& k : testing::grouped_cases()) {
    SCOPED_TRACE(k.name);
    const testing::GroupedData d = testing::grouped_data(k, 43);
    std::vector<float> want = d.c;
    GroupedGemmArgs host = d.args;
    host.c = want.data();
    ASSERT_TRUE(cpu().grouped_gemm(host));
    DeviceBuffer a = up(d.a), b = up(d.b), off = up(d.offsets);
    GroupedGemmArgs g = d.args;
    g.a = a.as<bf16>(), g.b = b.as<bf16>(), g.offsets_G1 = off.as<int32_t>();
    const bool runs = cuda::grouped_gemm_supported(g, cc);
    if (cc == 90) {
      EXPECT_EQ(runs, k.gpu_aligned) << "a Hopper GPU and a build with CUTLASS";
    }
    auto on_gpu = [&] {
      DeviceBuffer c = up(d.c);
      g.c = c.as<float>();
      EXPECT_EQ(gpu_->grouped_gemm(g), runs);
      return down<float>(c, d.c.size());
    };
    const std::vector<float> got = on_gpu();
    if (!runs) {
      EXPECT_EQ(got, d.c);
      continue;
    }
    EXPECT_LE(max_rel(got, want), 1e-5);
    const std::vector<float> again = on_gpu();
    EXPECT_EQ(std::memcmp(got.data(), again.data(), got.size() * sizeof(float)), 0);
    for (int64_t e = 0; e < g.groups; ++e) {
      if (k.kind != GroupedGemmArgs::Kind::kReduce || k.rows[e] != 0) continue;
      for (int64_t i = 0; i < g.c_stride; ++i)
        ASSERT_EQ(got[e * g.c_stride + i], d.c[e * g.c_stride + i]) << "expert " << e;
    }
  }
}

TEST_F(CudaOps, RepeatedOpsAllocateNothing) {
  const int64_t t = 64, d = 128, v = 500;
  DeviceBuffer x = up(philox_normals(13, t * d, 1)), w = up(philox_normals(13, v * d, 2)),
               y = up(std::vector<float>(t * d));
  DeviceBuffer r = up(std::vector<float>(t)), dw = up(std::vector<float>(v * d)),
               l = up(std::vector<float>(t));
  std::vector<int32_t> lab(t, 3);
  DeviceBuffer labels = up(lab);
  auto step = [&] {
    gpu_->rmsnorm_forward(x.as<float>(), d, w.as<float>(), y.as<float>(), d, r.as<float>(), t, d, 1e-6f);
    gpu_->rmsnorm_backward(x.as<float>(), d, x.as<float>(), d, w.as<float>(), r.as<float>(), y.as<float>(), d,
                           dw.as<float>(), t, d, 0.f);
    gpu_->head_cross_entropy_forward(x.as<float>(), w.as<float>(), nullptr, labels.as<int32_t>(),
                                     l.as<float>(), r.as<float>(), t, d, v, Precision::kF32);
    gpu_->head_cross_entropy_backward(x.as<float>(), w.as<float>(), nullptr, labels.as<int32_t>(),
                                      r.as<float>(), 1.f, nullptr, y.as<float>(), dw.as<float>(), t, d, v,
                                      Precision::kF32);
    gpu_->synchronize();
  };
  step();
  const int64_t before = gpu_->allocations();
  step();
  step();
  EXPECT_EQ(gpu_->allocations(), before);
}

}  // namespace
}  // namespace dsv3
