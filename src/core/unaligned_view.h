// A read-only array view over memory that need not be aligned for T: Megatron's .idx keeps its int32 and int64
// arrays at offset 34 + 4·S, read in place from the mmap (a multi-GB index is not copied). Element reads go
// through memcpy, which compilers turn into one plain load on x86 (where unaligned loads are legal) and into
// what is correct elsewhere; a reinterpret_cast pointer would be undefined behaviour (UBSan's alignment check
// stops at every real file).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <span>
#include <vector>

namespace dsv3 {

template <typename T>
class UnalignedView {
 public:
  UnalignedView() = default;
  UnalignedView(const void* data, size_t n) : p_(static_cast<const unsigned char*>(data)), n_(n) {}
  UnalignedView(std::span<const T> s) : UnalignedView(s.data(), s.size()) {}  // NOLINT: aligned data converts
  UnalignedView(const std::vector<T>& v) : UnalignedView(v.data(), v.size()) {}  // NOLINT

  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  T operator[](size_t i) const {
    T v;
    std::memcpy(&v, p_ + i * sizeof(T), sizeof(T));
    return v;
  }
  T front() const { return (*this)[0]; }
  T back() const { return (*this)[n_ - 1]; }

  class iterator {
   public:
    using iterator_category = std::random_access_iterator_tag;
    using value_type = T;
    using difference_type = std::ptrdiff_t;
    using pointer = void;
    using reference = T;
    iterator() = default;
    iterator(const UnalignedView* v, size_t i) : v_(v), i_(i) {}
    T operator*() const { return (*v_)[i_]; }
    T operator[](difference_type k) const { return (*v_)[i_ + k]; }
    iterator& operator++() { return ++i_, *this; }
    iterator operator++(int) {
      iterator t = *this;
      ++i_;
      return t;
    }
    iterator& operator--() { return --i_, *this; }
    iterator& operator+=(difference_type k) { return i_ += k, *this; }
    iterator operator+(difference_type k) const { return {v_, i_ + k}; }
    difference_type operator-(const iterator& o) const {
      return static_cast<difference_type>(i_) - static_cast<difference_type>(o.i_);
    }
    bool operator==(const iterator& o) const { return i_ == o.i_; }
    bool operator!=(const iterator& o) const { return i_ != o.i_; }
    bool operator<(const iterator& o) const { return i_ < o.i_; }

   private:
    const UnalignedView* v_ = nullptr;
    size_t i_ = 0;
  };
  iterator begin() const { return {this, 0}; }
  iterator end() const { return {this, n_}; }

 private:
  const unsigned char* p_ = nullptr;
  size_t n_ = 0;
};

}  // namespace dsv3
