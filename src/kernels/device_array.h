// A typed, grow-only array in a backend's memory: what every parameter, gradient, activation and scratch buffer
// of the model is, so that one model code runs on the CPU (host memory) or the GPU (device memory).
//
// grow(be, v, n) is the one sizing call: the array is sized on first use and only ever grows, so a training step
// after the first allocates nothing and keeps its addresses; contents are kept when it grows and new elements
// are zero (std::vector::resize semantics, which the host buffers it replaces had).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "kernels/backend.h"

namespace dsv3 {

template <typename T>
class DeviceArray {
 public:
  DeviceArray() = default;
  DeviceArray(Backend& be, int64_t n) { grow_to(be, n); }

  T* data() { return buf_.as<T>(); }
  const T* data() const { return buf_.as<T>(); }
  int64_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  Backend* backend() const { return be_; }

  // Element access for host-memory backends (the CPU's); on a device backend these pointers are not the host's.
  T& operator[](int64_t i) { return data()[i]; }
  const T& operator[](int64_t i) const { return data()[i]; }
  T* begin() { return data(); }
  T* end() { return data() + n_; }
  const T* begin() const { return data(); }
  const T* end() const { return data() + n_; }

  std::vector<T> to_host() const {
    std::vector<T> h(static_cast<size_t>(n_));
    if (n_) be_->copy_to_host(h.data(), data(), static_cast<size_t>(n_) * sizeof(T));
    return h;
  }
  void copy_from_host(const T* src, int64_t n) {  // the first n elements
    DSV3_CHECK(n <= n_, "DeviceArray: copying ", n, " elements into ", n_);
    if (n) be_->copy_to_device(data(), src, static_cast<size_t>(n) * sizeof(T));
  }

  void grow_to(Backend& be, int64_t n) {
    if (n <= n_ && be_ == &be) return;
    DSV3_CHECK(be_ == nullptr || be_ == &be || n_ == 0, "DeviceArray: grown on ", be.name(), " after ",
               be_->name());
    if (n > cap_ || be_ != &be) {
      // The first sizing is exact (activations are sized by the batch once); a re-grow (MoE rows vary every
      // step) takes 1.5x headroom, so a run settles after a few steps instead of reallocating (and fragmenting
      // the host heap) each time a count rises a little.
      const int64_t cap = n_ == 0 ? n : std::max(n, n_ + n_ / 2);
      DeviceBuffer next(be, static_cast<size_t>(cap) * sizeof(T));
      if (n_) be.copy(next.data(), buf_.data(), static_cast<size_t>(n_) * sizeof(T));
      buf_ = std::move(next);
      cap_ = cap;
    }
    be_ = &be, n_ = n;
  }

 private:
  Backend* be_ = nullptr;
  DeviceBuffer buf_;
  int64_t n_ = 0, cap_ = 0;  // elements in use (the most ever asked for) and allocated (zero-filled)
};

// At least n elements in be's memory; returns v.data().
template <typename T>
T* grow(Backend& be, DeviceArray<T>& v, int64_t n) {
  v.grow_to(be, n);
  return v.data();
}

}  // namespace dsv3
