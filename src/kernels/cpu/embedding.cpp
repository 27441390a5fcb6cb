// Embedding fast path: row copies in parallel over tokens; the scatter-add in parallel over column blocks.
#include "kernels/cpu/embedding.h"

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace dsv3 {
namespace {

constexpr int64_t kParallelMin = 1 << 15;
constexpr int64_t kColBlock = 256;

void check_ids(const int32_t* ids, int64_t t, int64_t vocab, int64_t row_begin, int64_t rows, int64_t d,
               const char* what) {
  DSV3_CHECK(t >= 0 && d > 0 && vocab > 0, what, ": bad shape t=", t, " d=", d, " vocab=", vocab);
  DSV3_CHECK(row_begin >= 0 && rows >= 0 && row_begin + rows <= vocab, what, ": shard rows [", row_begin,
             ", ", row_begin + rows, ") outside vocab ", vocab);
  for (int64_t i = 0; i < t; ++i)
    DSV3_CHECK(ids[i] >= 0 && ids[i] < vocab, what, ": token id ", ids[i], " at position ", i,
               " is outside the vocabulary [0, ", vocab, ")");
}

}  // namespace

void embedding_forward_shard(const int32_t* ids, const float* table, float* out, int64_t t, int64_t vocab,
                             int64_t row_begin, int64_t rows, int64_t d) {
  check_ids(ids, t, vocab, row_begin, rows, d, "embedding_forward");
#pragma omp parallel for schedule(static) if (t * d >= kParallelMin)
  for (int64_t i = 0; i < t; ++i) {
    const int64_t r = static_cast<int64_t>(ids[i]) - row_begin;
    if (r >= 0 && r < rows)
      std::memcpy(out + i * d, table + r * d, d * sizeof(float));
    else
      std::memset(out + i * d, 0, d * sizeof(float));
  }
}

void embedding_backward_shard(const float* dout, const int32_t* ids, float* dtable, int64_t t, int64_t vocab,
                              int64_t row_begin, int64_t rows, int64_t d, int64_t padding_idx) {
  check_ids(ids, t, vocab, row_begin, rows, d, "embedding_backward");
  const int64_t nblk = (d + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) if (t * d >= kParallelMin)
  for (int64_t b = 0; b < nblk; ++b) {
    const int64_t j0 = b * kColBlock, n = std::min(kColBlock, d - j0);
    for (int64_t i = 0; i < t; ++i) {
      const int64_t r = static_cast<int64_t>(ids[i]) - row_begin;
      if (r < 0 || r >= rows || ids[i] == padding_idx) continue;
      float* dst = dtable + r * d + j0;
      const float* src = dout + i * d + j0;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) dst[j] += src[j];
    }
  }
}

void embedding_forward(const int32_t* ids, const float* table, float* out, int64_t t, int64_t vocab,
                       int64_t d) {
  embedding_forward_shard(ids, table, out, t, vocab, 0, vocab, d);
}

void embedding_backward(const float* dout, const int32_t* ids, float* dtable, int64_t t, int64_t vocab,
                        int64_t d, int64_t padding_idx) {
  embedding_backward_shard(dout, ids, dtable, t, vocab, 0, vocab, d, padding_idx);
}

void embedding_forward_reference(const int32_t* ids, const float* table, float* out, int64_t t, int64_t d) {
  for (int64_t i = 0; i < t; ++i)
    for (int64_t j = 0; j < d; ++j) out[i * d + j] = table[static_cast<int64_t>(ids[i]) * d + j];
}

void embedding_backward_reference(const float* dout, const int32_t* ids, float* dtable, int64_t t, int64_t d,
                                  int64_t padding_idx) {
  for (int64_t i = 0; i < t; ++i) {
    if (ids[i] == padding_idx) continue;
    for (int64_t j = 0; j < d; ++j) dtable[static_cast<int64_t>(ids[i]) * d + j] += dout[i * d + j];
  }
}

}  // namespace dsv3
