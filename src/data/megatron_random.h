// numpy's legacy RandomState as Megatron's dataset uses it: MT19937 seeded with init_genrand(seed) (exactly
// std::mt19937(seed)) and RandomState.shuffle, a Fisher-Yates from the top whose bounded draw is numpy's
// legacy random_interval (mask to the smallest all-ones value >= max, redraw while above max; 32-bit draws
// unless max > 0xFFFFFFFF, then 64-bit draws made of two 32-bit outputs, high word first). The array's dtype
// does not matter: numpy swaps raw items of any 1-D array in the same order.
#pragma once
#include <cstdint>
#include <random>
#include <span>
#include <utility>

#include "core/error.h"

namespace dsv3 {

class NumpyRandomState {
 public:
  // numpy accepts seeds in [0, 2^32-1]; anything else is a ValueError there and an Error here.
  explicit NumpyRandomState(int64_t seed) : gen_(check_seed(seed)) {}

  uint32_t next_uint32() { return static_cast<uint32_t>(gen_()); }
  uint64_t next_uint64() {
    uint64_t hi = next_uint32();
    return (hi << 32) | next_uint32();
  }

  // Uniform integer in [0, max] (numpy's legacy random_interval).
  uint64_t random_interval(uint64_t max) {
    if (max == 0) return 0;
    uint64_t mask = max;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    mask |= mask >> 32;
    uint64_t value;
    if (max <= 0xFFFFFFFFULL) {
      while ((value = (next_uint32() & mask)) > max) {
      }
    } else {
      while ((value = (next_uint64() & mask)) > max) {
      }
    }
    return value;
  }

  // RandomState.shuffle on a 1-D array.
  template <typename T>
  void shuffle(std::span<T> a) {
    if (a.size() < 2) return;
    for (size_t i = a.size() - 1; i >= 1; --i) {
      size_t j = static_cast<size_t>(random_interval(i));
      std::swap(a[i], a[j]);
    }
  }

 private:
  static uint32_t check_seed(int64_t seed) {
    DSV3_CHECK(seed >= 0 && seed <= 0xFFFFFFFFLL, "random seed must be between 0 and 2**32 - 1, got ", seed);
    return static_cast<uint32_t>(seed);
  }
  std::mt19937 gen_;
};

}  // namespace dsv3
