// A Comm over buffers in a backend's memory (a GPU's), staged through host memory around a host Comm (MPI). Every
// pointer handed to it is backend memory: sends are copied down to a host staging buffer, the host Comm runs, and
// results are copied back up. With one rank nothing is staged: the copies a collective makes stay on the
// backend (never a memmove on what may be device memory). NCCL, which moves device memory directly, replaces
// this for multi-GPU runs later; this path is what parity tests with several ranks on one GPU need anyway (NCCL
// refuses two ranks on one GPU).
#pragma once
#include <cstdlib>
#include <memory>
#include <vector>

#include "kernels/backend.h"
#include "parallel/comm.h"

namespace dsv3 {

class StagedComm final : public Comm {
 public:
  StagedComm(Backend& be, Comm& host) : be_(be), host_(host) {}
  int size() const override { return host_.size(); }
  int rank() const override { return host_.rank(); }
  void sendrecv(const float* send, int64_t send_n, int dest, float* recv, int64_t recv_n, int src) override;
  void barrier() override { host_.barrier(); }
  std::unique_ptr<Comm> split(int color, int key) override;
  [[noreturn]] void abort(int code) override {
    host_.abort(code);
    std::_Exit(code);  // not reached (Comm::abort does not return); tells the compiler so
  }
  void set_name(const std::string& n) override { host_.set_name(n); }

 protected:
  void allreduce_raw(void* buf, int64_t n, CommType t, ReduceOp op) override;
  void allgather_raw(const void* send, int64_t n, void* recv, CommType t) override;
  void alltoallv_raw(const void* send, const int64_t* send_counts, void* recv, const int64_t* recv_counts,
                     CommType t) override;
  void broadcast_raw(void* buf, int64_t n, CommType t, int root) override;
  void reduce_scatter_raw(const void* send, void* recv, int64_t n, CommType t) override;
  void reduce_scatter_v_raw(void* buf, const int64_t* counts, void* recv, CommType t) override;
  void allgather_v_raw(void* buf, const int64_t* counts, CommType t) override;

 private:
  StagedComm(Backend& be, std::unique_ptr<Comm> owned) : be_(be), owned_(std::move(owned)), host_(*owned_) {}
  // Host staging, grow-only: a_ is the send side, b_ the receive side.
  static char* stage(std::vector<char>& v, size_t bytes);

  Backend& be_;
  std::unique_ptr<Comm> owned_;  // set when made by split()
  Comm& host_;
  std::vector<char> a_, b_;
};

}  // namespace dsv3
