// StagedComm: each collective as down-copy, host collective, up-copy (see the header).
#include "parallel/staged_comm.h"

#include <numeric>

namespace dsv3 {
namespace {

// The host Comm's typed entry points for a runtime element type (its raw ones are protected).
template <typename F>
void with_type(CommType t, F&& f) {
  switch (t) {
    case CommType::kF32:
      return f(float{});
    case CommType::kF64:
      return f(double{});
    case CommType::kI32:
      return f(int32_t{});
    case CommType::kI64:
      return f(int64_t{});
    case CommType::kU8:
      return f(uint8_t{});
    case CommType::kBF16:
      return f(bf16{});
  }
}

}  // namespace

char* StagedComm::stage(std::vector<char>& v, size_t bytes) {
  if (v.size() < bytes) v.resize(bytes);
  return v.data();
}

std::unique_ptr<Comm> StagedComm::split(int color, int key) {
  return std::unique_ptr<Comm>(new StagedComm(be_, host_.split(color, key)));
}

void StagedComm::sendrecv(const float* send, int64_t send_n, int dest, float* recv, int64_t recv_n, int src) {
  float* hs = reinterpret_cast<float*>(stage(a_, send_n * sizeof(float)));
  float* hr = reinterpret_cast<float*>(stage(b_, recv_n * sizeof(float)));
  if (send_n) be_.copy_to_host(hs, send, send_n * sizeof(float));
  host_.sendrecv(send_n ? hs : nullptr, send_n, dest, recv_n ? hr : nullptr, recv_n, src);
  if (recv_n) be_.copy_to_device(recv, hr, recv_n * sizeof(float));
}

void StagedComm::allreduce_raw(void* buf, int64_t n, CommType t, ReduceOp op) {
  if (size() == 1 || n == 0) return;
  const size_t bytes = n * comm_type_bytes(t);
  char* h = stage(a_, bytes);
  be_.copy_to_host(h, buf, bytes);
  with_type(t, [&](auto z) { host_.allreduce(reinterpret_cast<decltype(z)*>(h), n, op); });
  be_.copy_to_device(buf, h, bytes);
}

void StagedComm::allgather_raw(const void* send, int64_t n, void* recv, CommType t) {
  const size_t bytes = n * comm_type_bytes(t);
  if (size() == 1) return be_.copy(recv, send, bytes);
  char* hs = stage(a_, bytes);
  char* hr = stage(b_, bytes * size());
  be_.copy_to_host(hs, send, bytes);
  with_type(t, [&](auto z) {
    using T = decltype(z);
    host_.allgather(reinterpret_cast<const T*>(hs), n, reinterpret_cast<T*>(hr));
  });
  be_.copy_to_device(recv, hr, bytes * size());
}

void StagedComm::alltoallv_raw(const void* send, const int64_t* send_counts, void* recv,
                               const int64_t* recv_counts, CommType t) {
  const size_t el = comm_type_bytes(t);
  const int64_t ns = std::accumulate(send_counts, send_counts + size(), int64_t{0});
  const int64_t nr = std::accumulate(recv_counts, recv_counts + size(), int64_t{0});
  if (size() == 1) return be_.copy(recv, send, ns * el);
  char* hs = stage(a_, ns * el);
  char* hr = stage(b_, nr * el);
  be_.copy_to_host(hs, send, ns * el);
  with_type(t, [&](auto z) {
    using T = decltype(z);
    host_.alltoallv(reinterpret_cast<const T*>(hs), send_counts, reinterpret_cast<T*>(hr), recv_counts);
  });
  be_.copy_to_device(recv, hr, nr * el);
}

void StagedComm::broadcast_raw(void* buf, int64_t n, CommType t, int root) {
  if (size() == 1 || n == 0) return;
  const size_t bytes = n * comm_type_bytes(t);
  char* h = stage(a_, bytes);
  if (rank() == root) be_.copy_to_host(h, buf, bytes);
  with_type(t, [&](auto z) { host_.broadcast(reinterpret_cast<decltype(z)*>(h), n, root); });
  if (rank() != root) be_.copy_to_device(buf, h, bytes);
}

void StagedComm::reduce_scatter_raw(const void* send, void* recv, int64_t n, CommType t) {
  const size_t bytes = n * comm_type_bytes(t);
  if (size() == 1) return be_.copy(recv, send, bytes);
  char* hs = stage(a_, bytes * size());
  char* hr = stage(b_, bytes);
  be_.copy_to_host(hs, send, bytes * size());
  with_type(t, [&](auto z) {
    using T = decltype(z);
    host_.reduce_scatter(reinterpret_cast<const T*>(hs), reinterpret_cast<T*>(hr), n);
  });
  be_.copy_to_device(recv, hr, bytes);
}

void StagedComm::reduce_scatter_v_raw(void* buf, const int64_t* counts, void* recv, CommType t) {
  const size_t el = comm_type_bytes(t);
  const int64_t total = std::accumulate(counts, counts + size(), int64_t{0});
  const int64_t mine = counts[rank()];
  const int64_t offset = std::accumulate(counts, counts + rank(), int64_t{0});
  if (size() == 1) return be_.copy(recv, static_cast<char*>(buf) + offset * el, mine * el);
  char* h = stage(a_, total * el);
  char* hr = stage(b_, mine * el);
  be_.copy_to_host(h, buf, total * el);
  with_type(t, [&](auto z) {
    using T = decltype(z);
    host_.reduce_scatter_v(reinterpret_cast<T*>(h), counts, reinterpret_cast<T*>(hr));
  });
  be_.copy_to_device(recv, hr, mine * el);
}

void StagedComm::allgather_v_raw(void* buf, const int64_t* counts, CommType t) {
  if (size() == 1) return;
  const size_t el = comm_type_bytes(t);
  const int64_t total = std::accumulate(counts, counts + size(), int64_t{0});
  char* h = stage(a_, total * el);
  be_.copy_to_host(h, buf, total * el);  // only this rank's block matters; the copy keeps the code plain
  with_type(t, [&](auto z) { host_.allgather_v(reinterpret_cast<decltype(z)*>(h), counts); });
  be_.copy_to_device(buf, h, total * el);
}

}  // namespace dsv3
