// Shared by the kernel tests: deterministic normal inputs and the relative error they compare with.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/philox.h"

namespace dsv3::testing {

// n values shift + scale·N(0, 1), element i from Philox (seed, stream, i).
inline std::vector<float> philox_normals(uint64_t seed, int64_t n, uint64_t stream, float scale = 1.f,
                                         float shift = 0.f) {
  std::vector<float> v(n);
  for (int64_t i = 0; i < n; ++i) v[i] = shift + scale * philox_normal(seed, stream, i);
  return v;
}

// max |a − b| / max |b|.
inline double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, mag = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - b[i]));
    mag = std::max(mag, std::fabs(static_cast<double>(b[i])));
  }
  return err / std::max(mag, 1e-30);
}

}  // namespace dsv3::testing
