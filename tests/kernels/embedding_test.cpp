// Embedding: fast path vs reference loops (repeated ids, padding_idx), id validation messages, vocab shards
// summing to the full table, and a backward that is bit-identical for any thread count.
#include "kernels/cpu/embedding.h"

#include <omp.h>

#include <vector>

#include "core/error.h"
#include "core/philox.h"
#include "test_util.h"

namespace dsv3 {
namespace {

std::vector<float> randn(int64_t n, uint64_t stream) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = philox_normal(5, stream, i);
  return v;
}

std::vector<int32_t> ids_with_repeats(int64_t t, int64_t vocab) {
  std::vector<int32_t> ids(t);
  for (int64_t i = 0; i < t; ++i) ids[i] = static_cast<int32_t>((i * 7 + i * i) % vocab);  // many repeats
  return ids;
}

TEST(Embedding, FastMatchesReference) {
  const int64_t t = 300, vocab = 50, d = 300;
  auto table = randn(vocab * d, 1), dout = randn(t * d, 2), dt0 = randn(vocab * d, 3);
  auto ids = ids_with_repeats(t, vocab);
  std::vector<float> out(t * d), outr(t * d);
  embedding_forward(ids.data(), table.data(), out.data(), t, vocab, d);
  embedding_forward_reference(ids.data(), table.data(), outr.data(), t, d);
  EXPECT_EQ(out, outr);
  for (int64_t pad : {-1, 7}) {
    auto dt = dt0, dtr = dt0;
    embedding_backward(dout.data(), ids.data(), dt.data(), t, vocab, d, pad);
    embedding_backward_reference(dout.data(), ids.data(), dtr.data(), t, d, pad);
    EXPECT_EQ(dt, dtr) << "padding_idx " << pad;  // same per-row summation order: exact
    if (pad >= 0) {
      for (int64_t j = 0; j < d; ++j) EXPECT_EQ(dt[pad * d + j], dt0[pad * d + j]);
    }
  }
}

TEST(Embedding, BackwardDeterministicAcrossThreadCounts) {
  const int64_t t = 1000, vocab = 37, d = 520;
  auto dout = randn(t * d, 4);
  auto ids = ids_with_repeats(t, vocab);
  const int saved = omp_get_max_threads();
  std::vector<std::vector<float>> res;
  for (int nt : {1, 2, 5}) {
    omp_set_num_threads(nt);
    std::vector<float> dt(vocab * d, 0.f);
    embedding_backward(dout.data(), ids.data(), dt.data(), t, vocab, d);
    res.push_back(dt);
  }
  omp_set_num_threads(saved);
  EXPECT_EQ(res[0], res[1]);
  EXPECT_EQ(res[0], res[2]);
}

TEST(Embedding, RejectsOutOfRangeIds) {
  std::vector<float> table(4 * 3), out(2 * 3);
  for (int32_t bad : {-1, 4, 100000}) {
    std::vector<int32_t> ids = {1, bad};
    try {
      embedding_forward(ids.data(), table.data(), out.data(), 2, 4, 3);
      FAIL() << "no error for id " << bad;
    } catch (const Error& e) {
      const std::string msg = e.what();
      EXPECT_NE(msg.find("token id " + std::to_string(bad)), std::string::npos) << msg;
      EXPECT_NE(msg.find("position 1"), std::string::npos) << msg;
    }
    EXPECT_THROW(embedding_backward(out.data(), ids.data(), table.data(), 2, 4, 3), Error);
  }
}

TEST(Embedding, VocabShardsSumToFullTable) {
  const int64_t t = 40, vocab = 23, d = 6;
  auto table = randn(vocab * d, 6), dout = randn(t * d, 7);
  auto ids = ids_with_repeats(t, vocab);
  std::vector<float> full(t * d), sum(t * d, 0.f), dfull(vocab * d, 0.f), dshards(vocab * d, 0.f);
  embedding_forward(ids.data(), table.data(), full.data(), t, vocab, d);
  embedding_backward(dout.data(), ids.data(), dfull.data(), t, vocab, d);
  const int64_t bounds[] = {0, 8, 16, 23};
  for (int s = 0; s < 3; ++s) {
    const int64_t b = bounds[s], rows = bounds[s + 1] - b;
    std::vector<float> part(t * d);
    embedding_forward_shard(ids.data(), table.data() + b * d, part.data(), t, vocab, b, rows, d);
    for (int64_t k = 0; k < t * d; ++k) sum[k] += part[k];
    embedding_backward_shard(dout.data(), ids.data(), dshards.data() + b * d, t, vocab, b, rows, d);
  }
  EXPECT_EQ(sum, full);
  EXPECT_EQ(dshards, dfull);
}

}  // namespace
}  // namespace dsv3
