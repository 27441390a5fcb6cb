// Grow-only host buffers: the one helper every activation and scratch vector goes through. A buffer is sized
// on first use and only ever grows, so a training step after the first allocates nothing (and keeps its
// addresses); contents are kept when it grows (std::vector::resize), new elements are value-initialised.
#pragma once
#include <cstdint>
#include <vector>

namespace dsv3 {

// At least n elements; returns v.data().
template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
  return v.data();
}

}  // namespace dsv3
