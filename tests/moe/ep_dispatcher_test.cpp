// The expert-parallel token dispatcher against a reference dispatcher written here from the header's contract
// alone: gather every rank's tokens and routing, then for each local expert, each source rank, each token,
// each k append the kept pairs routed to that expert. Both dispatchers (alltoall, allgather), forward and
// backward, on 4 ranks (this binary re-launches itself under `mpirun -np 4`, as comm_test does; skipped
// without mpirun), including dropped pairs, a case where every token picks the same experts (ranks with zero
// rows), one expert per rank, and alltoall pad-to-capacity; plus EP = 1 in the plain process and
// parse_dispatcher_type.
//
// The values fed to combine and the backward are functions of the pair (source rank, token, k) on a 2^-15
// grid in
// [-1, 1): any sum of a few of them is exact in fp32, so every result is compared bit for bit whatever order
// the dispatcher sums in, and each rank can compute its expected outputs without gathering the expert rows.
#include "moe/ep_dispatcher.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <numeric>
#include <random>

#include "core/error.h"
#include "parallel/comm.h"
#include "parallel/mpi_children.h"

namespace dsv3 {
namespace {

using testing::is_mpi_child;
using testing::run_mpi_children;

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// One rank's tokens and routing. Every rank builds the same shapes (the dispatcher is collective with equal
// T).
struct Case {
  std::string name;
  int64_t t = 13, k = 3, e = 8, d = 5;
  std::vector<int32_t> idx;   // [T, K] distinct experts per token
  std::vector<uint8_t> kept;  // [T, K]
  bool dropless = true;       // pass kept_TK = nullptr
  std::vector<float> w, x;    // [T, K] gate weights in [0.05, 1) (never 0: prob 0 marks padding), [T, D]
  bool is_kept(int64_t t_, int64_t k_) const { return kept[t_ * k + k_] != 0; }
};

// drop: fraction of pairs dropped (0: dropless); same: every token on every rank picks experts {5, 1, 4}.
Case make_case(const std::string& name, int rank, int64_t e, double drop, bool same) {
  Case c;
  c.name = name, c.e = e, c.dropless = drop == 0;
  std::mt19937 rng(rank +
                   1000 * static_cast<unsigned>(e + 10 * drop + 100 * same));  // deterministic per rank
  std::uniform_real_distribution<float> u(-1.f, 1.f), wd(0.05f, 1.f), coin(0.f, 1.f);
  std::vector<int32_t> all(e);
  for (int64_t t = 0; t < c.t; ++t) {
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    if (same) all = {5, 1, 4};
    for (int64_t k = 0; k < c.k; ++k) {
      c.idx.push_back(all[k]);
      c.kept.push_back(c.dropless || coin(rng) >= drop);
      c.w.push_back(wd(rng));  // dropped pairs keep a weight too: the dispatcher must not move them
    }
  }
  for (int64_t i = 0; i < c.t * c.d; ++i) c.x.push_back(u(rng));
  return c;
}

// A value for (salt, source rank, token, k, column) on the 2^-15 grid in [-1, 1), so that sums are exact.
float grid_val(uint64_t salt, int64_t p, int64_t t, int64_t k, int64_t j) {
  uint64_t z =
      salt * 0x9E3779B97F4A7C15ull + uint64_t(p) * 1000003 + uint64_t(t) * 1009 + uint64_t(k) * 31 + j;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return (static_cast<int32_t>(z >> 48) - 32768) / 32768.f;
}

struct Pair {
  int64_t p, t, k, l;  // source rank, token, k, local expert
};
struct Reference {
  std::vector<Pair> rows;
  std::vector<float> x_RD, prob_R;
  std::vector<int64_t> offsets_L1;
};

// The reference dispatcher: the simplest code that meets the header's order (local expert, source rank,
// token).
Reference reference_dispatch(Comm* comm, const Case& c) {
  const int64_t P = comm ? comm->size() : 1, me = comm ? comm->rank() : 0;
  auto gather = [&](const auto& v) {
    auto all = v;
    all.resize(v.size() * P);
    if (comm) comm->allgather(v.data(), static_cast<int64_t>(v.size()), all.data());
    return all;
  };
  const auto x = gather(c.x), w = gather(c.w);
  const auto idx = gather(c.idx);
  const auto kept = gather(c.kept);
  const int64_t L = c.e / P, first = me * L;
  Reference ref;
  ref.offsets_L1.push_back(0);
  for (int64_t l = 0; l < L; ++l) {
    for (int64_t p = 0; p < P; ++p)
      for (int64_t t = 0; t < c.t; ++t)
        for (int64_t k = 0; k < c.k; ++k) {
          const int64_t pair = (p * c.t + t) * c.k + k;
          if (!kept[pair] || idx[pair] != first + l) continue;
          ref.rows.push_back({p, t, k, l});
          ref.x_RD.insert(ref.x_RD.end(), x.begin() + (p * c.t + t) * c.d,
                          x.begin() + (p * c.t + t + 1) * c.d);
          ref.prob_R.push_back(w[pair]);
        }
    ref.offsets_L1.push_back(static_cast<int64_t>(ref.rows.size()));
  }
  return ref;
}

// What the router's pad-to-capacity hands every rank: one count per expert, at least each rank's kept pairs
// of that expert and at most T (the header's "T when the capacity exceeds T"): here the maximum over ranks,
// +1 on odd experts so that some blocks are pure padding.
std::vector<int64_t> padded_counts(Comm& comm, const Case& c) {
  std::vector<int64_t> n(c.e, 0);
  for (int64_t i = 0; i < c.t * c.k; ++i) n[c.idx[i]] += c.kept[i];
  comm.allreduce(n.data(), c.e, ReduceOp::kMax);
  for (int64_t e = 0; e < c.e; ++e) n[e] = std::min(n[e] + e % 2, c.t);
  return n;
}

// dispatch → combine → dispatch_grad → combine_grad (beta 0, then 1) on one state, each checked exactly.
void check(const ExpertParallel& ep, const Case& c, const std::vector<int64_t>* pad, DispatchState& s) {
  const int64_t P = ep.size(), me = ep.rank(), D = c.d, T = c.t, K = c.k;
  const Reference ref = reference_dispatch(ep.comm, c);
  const Routing rt{
      c.idx.data(), c.dropless ? nullptr : c.kept.data(), c.w.data(), pad ? pad->data() : nullptr, T, K, c.e};
  DeviceArray<float> x_dev, prob_dev;  // stale contents must be replaced
  grow(cpu_backend(), x_dev, 1)[0] = 7.f, grow(cpu_backend(), prob_dev, 1)[0] = 7.f;
  ep_dispatch(ep, rt, c.x.data(), D, s, x_dev, prob_dev);
  // The arrays only grow: what dispatch produced are the first offsets_L1.back() rows.
  const int64_t rows = s.offsets_L1.back();
  ASSERT_GE(x_dev.size(), rows * D);
  ASSERT_GE(prob_dev.size(), rows);
  const std::vector<float> x_RD(x_dev.begin(), x_dev.begin() + rows * D),
      prob_R(prob_dev.begin(), prob_dev.begin() + rows);

  std::vector<int64_t> src;  // the reference row of each dispatched row; -1 for padding
  if (!pad) {
    EXPECT_EQ(s.offsets_L1, ref.offsets_L1);
    EXPECT_EQ(x_RD, ref.x_RD);
    EXPECT_EQ(prob_R, ref.prob_R);
    src.resize(ref.rows.size());
    std::iota(src.begin(), src.end(), 0);
  } else {
    // Every (local expert, source rank) block holds exactly the expert's padded count: its real rows in token
    // order (the reference's), the rest zero rows with prob 0 (real rows have prob >= 0.05, so prob 0 marks
    // padding).
    const int64_t L = c.e / P;
    std::vector<int64_t> want_off{0};
    for (int64_t l = 0; l < L; ++l) want_off.push_back(want_off.back() + P * (*pad)[me * L + l]);
    ASSERT_EQ(s.offsets_L1, want_off);
    ASSERT_EQ(x_RD.size(), static_cast<size_t>(want_off.back() * D));
    ASSERT_EQ(prob_R.size(), static_cast<size_t>(want_off.back()));
    int64_t i = 0, r = 0;
    for (int64_t l = 0; l < L; ++l)
      for (int64_t p = 0; p < P; ++p)
        for (int64_t j = 0; j < (*pad)[me * L + l]; ++j, ++r) {
          const auto row = x_RD.begin() + r * D;
          if (prob_R[r] == 0.f) {
            EXPECT_TRUE(std::all_of(row, row + D, [](float v) { return v == 0.f; })) << "padding row " << r;
            src.push_back(-1);
            continue;
          }
          ASSERT_LT(i, static_cast<int64_t>(ref.rows.size())) << "row " << r;
          EXPECT_EQ(ref.rows[i].l, l) << "row " << r;
          EXPECT_EQ(ref.rows[i].p, p) << "row " << r;
          EXPECT_TRUE(std::equal(row, row + D, ref.x_RD.begin() + i * D)) << "row " << r;
          EXPECT_EQ(prob_R[r], ref.prob_R[i]) << "row " << r;
          src.push_back(i++);
        }
    EXPECT_EQ(i, static_cast<int64_t>(ref.rows.size())) << "real rows";
  }
  const int64_t R = static_cast<int64_t>(src.size());
  // A row's value for salt: the pair's grid value, 0 on padding (what an expert gives a row of prob 0).
  auto row_val = [&](uint64_t salt, int64_t r, int64_t j) {
    if (src[r] < 0) return 0.f;
    const Pair& q = ref.rows[src[r]];
    return grid_val(salt, q.p, q.t, q.k, j);
  };
  auto kept = [&](int64_t t, int64_t k) { return c.dropless || c.is_kept(t, k); };

  // combine: out[t] = Σ over the token's kept pairs of its expert row.
  std::vector<float> y(R * D), out(T * D, kNaN), want(T * D, 0.f);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < D; ++j) y[r * D + j] = row_val(1, r, j);
  ep_combine(ep, s, y.data(), out.data());
  for (int64_t t = 0; t < T; ++t)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t j = 0; j < D; ++j) want[t * D + j] += kept(t, k) ? grid_val(1, me, t, k, j) : 0.f;
  EXPECT_EQ(out, want) << "combine";

  // dispatch_grad: each expert row gets its token's dout row (padding rows: 0).
  std::vector<float> dout(T * D), want_dy(R * D);
  DeviceArray<float> dy_dev;
  grow(cpu_backend(), dy_dev, 1)[0] = 7.f;
  for (int64_t i = 0; i < T * D; ++i) dout[i] = grid_val(2, me, i / D, 0, i % D);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t j = 0; j < D; ++j)
      want_dy[r * D + j] = src[r] < 0 ? 0.f : grid_val(2, ref.rows[src[r]].p, ref.rows[src[r]].t, 0, j);
  ep_dispatch_grad(ep, s, dout.data(), dy_dev);
  ASSERT_GE(dy_dev.size(), R * D);
  EXPECT_EQ(std::vector<float>(dy_dev.begin(), dy_dev.begin() + R * D), want_dy) << "dispatch_grad";

  // combine_grad: dx[t] = beta·dx[t] + Σ the token's rows; dweight = the pair's dprob, 0 for dropped pairs.
  // NaN prefill checks that beta 0 and dweight assign.
  std::vector<float> dx_RD(R * D), dprob_R(R);
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t j = 0; j < D; ++j) dx_RD[r * D + j] = row_val(3, r, j);
    dprob_R[r] = row_val(4, r, 0);
  }
  for (float beta : {0.f, 1.f}) {
    std::vector<float> dx(T * D), dw(T * K, kNaN), want_dx(T * D), want_dw(T * K);
    for (int64_t i = 0; i < T * D; ++i) {
      dx[i] = beta == 0.f ? kNaN : grid_val(5, me, i / D, 0, i % D);
      want_dx[i] = beta == 0.f ? 0.f : dx[i];
    }
    for (int64_t t = 0; t < T; ++t)
      for (int64_t k = 0; k < K; ++k) {
        want_dw[t * K + k] = kept(t, k) ? grid_val(4, me, t, k, 0) : 0.f;
        for (int64_t j = 0; j < D; ++j) want_dx[t * D + j] += kept(t, k) ? grid_val(3, me, t, k, j) : 0.f;
      }
    ep_combine_grad(ep, s, dx_RD.data(), dprob_R.data(), dx.data(), beta, dw.data());
    EXPECT_EQ(dx, want_dx) << "combine_grad dx, beta " << beta;
    EXPECT_EQ(dw, want_dw) << "combine_grad dweight, beta " << beta;
  }
}

const char* type_name(DispatcherType t) {
  return t == DispatcherType::kAllToAll ? "alltoall" : "allgather";
}

TEST(EpDispatch, ParseDispatcherType) {
  EXPECT_EQ(parse_dispatcher_type("alltoall"), DispatcherType::kAllToAll);
  EXPECT_EQ(parse_dispatcher_type("allgather"), DispatcherType::kAllGather);
  EXPECT_THROW(parse_dispatcher_type("flex"), Error);
  EXPECT_THROW(parse_dispatcher_type("bogus"), Error);
}

// EP = 1: no comm, or a group of one; every expert is local and the reference is the plain permutation.
TEST(EpDispatch, SingleProcess) {
  SingleComm one;
  ep_dispatch_seconds_reset();
  for (Comm* comm : {static_cast<Comm*>(nullptr), static_cast<Comm*>(&one)})
    for (auto type : {DispatcherType::kAllToAll, DispatcherType::kAllGather}) {
      DispatchState s;  // reused across the cases below, as across steps
      for (const Case& c :
           {make_case("random-dropless", 0, 8, 0, false), make_case("random-dropped", 0, 8, 0.3, false),
            make_case("same-experts", 0, 8, 0, true), make_case("four-experts", 0, 4, 0.25, false)}) {
        SCOPED_TRACE(c.name + " " + type_name(type) + (comm ? " SingleComm" : " no comm"));
        check(ExpertParallel{comm, type}, c, nullptr, s);
      }
    }
  EXPECT_GT(ep_dispatch_seconds(), 0.0);
}

TEST(EpDispatchMpi, FourRanks) {
  if (!is_mpi_child()) return run_mpi_children("EpDispatchMpi.FourRanks", 4);
  MpiSession mpi(nullptr, nullptr);
  Comm& w = mpi.world();
  ASSERT_EQ(w.size(), 4);
  const int me = w.rank();
  // E = 8: 2 experts per rank; "same-experts" routes every token to {5, 1, 4}, so ranks 1 and 3 receive no
  // rows; E = 4: one expert per rank.
  const std::vector<Case> cases = {
      make_case("random-dropless", me, 8, 0, false), make_case("random-dropped", me, 8, 0.3, false),
      make_case("same-experts", me, 8, 0, true), make_case("one-expert-per-rank", me, 4, 0.25, false)};
  for (auto type : {DispatcherType::kAllToAll, DispatcherType::kAllGather}) {
    DispatchState s;  // one state through every case: reuse across shapes must not leave stale data
    for (const Case& c : cases) {
      SCOPED_TRACE(c.name + " " + type_name(type) + " rank " + std::to_string(me));
      check(ExpertParallel{&w, type}, c, nullptr, s);
    }
  }
  // Pad-to-capacity (alltoall only): the same results as the unpadded reference, padding rows zero.
  DispatchState s;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name + " alltoall padded, rank " + std::to_string(me));
    const auto pad = padded_counts(w, c);
    check(ExpertParallel{&w, DispatcherType::kAllToAll}, c, &pad, s);
  }
}

}  // namespace
}  // namespace dsv3
