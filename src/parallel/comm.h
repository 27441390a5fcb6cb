// Communication between ranks: the `Comm` interface every collective goes through (model and trainer code never
// call MPI, DESIGN principle 3), its MPI implementation (one MPI communicator per group, made with MPI_Comm_split)
// and a single-process implementation, and `GroupComms`: one Comm per group of a ProcessGroups.
//
// Collectives are blocking and in place where that makes sense; counts are elements, not bytes. allreduce and
// broadcast split counts beyond INT_MAX; the gathers, scatters and alltoallv refuse totals beyond INT_MAX with
// an error (MPI's int counts and displacements). Element types: float, double, int32_t, int64_t, uint8_t, and bf16
// for moves only (gathers, alltoallv, broadcast, point to point): a bf16 reduction is refused (reduce in fp32).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "core/bf16.h"
#include "parallel/process_groups.h"

namespace dsv3 {

enum class ReduceOp { kSum, kMax, kMin };
enum class CommType { kF32, kF64, kI32, kI64, kU8, kBF16 };
size_t comm_type_bytes(CommType t);

template <typename T>
constexpr CommType comm_type() {
  if constexpr (std::is_same_v<T, float>)
    return CommType::kF32;
  else if constexpr (std::is_same_v<T, double>)
    return CommType::kF64;
  else if constexpr (std::is_same_v<T, int32_t>)
    return CommType::kI32;
  else if constexpr (std::is_same_v<T, int64_t>)
    return CommType::kI64;
  else if constexpr (std::is_same_v<T, bf16>)
    return CommType::kBF16;
  else {
    static_assert(std::is_same_v<T, uint8_t>,
                  "Comm supports float, double, int32_t, int64_t, uint8_t and bf16");
    return CommType::kU8;
  }
}

class Comm {
 public:
  virtual ~Comm() = default;
  virtual int size() const = 0;
  virtual int rank() const = 0;

  // buf[0..n) ← op over the ranks of buf[0..n).
  template <typename T>
  void allreduce(T* buf, int64_t n, ReduceOp op = ReduceOp::kSum) {
    allreduce_raw(buf, n, comm_type<T>(), op);
  }
  // recv[r·n .. (r+1)·n) ← rank r's send[0..n).
  template <typename T>
  void allgather(const T* send, int64_t n, T* recv) {
    allgather_raw(send, n, recv, comm_type<T>());
  }
  // Rank r sends send_counts[q] elements to rank q (blocks packed in rank order) and receives recv_counts[q] from
  // rank q (likewise packed); every rank's send_counts[q] must equal rank q's recv_counts[r].
  template <typename T>
  void alltoallv(const T* send, const int64_t* send_counts, T* recv, const int64_t* recv_counts) {
    alltoallv_raw(send, send_counts, recv, recv_counts, comm_type<T>());
  }
  // recv[0..n) ← Σ over ranks of their send[rank·n .. (rank+1)·n) (the reverse of allgather; send holds size()·n).
  template <typename T>
  void reduce_scatter(const T* send, T* recv, int64_t n) {
    reduce_scatter_raw(send, recv, n, comm_type<T>());
  }
  // Uneven blocks, in place: buf holds Σ counts elements, rank r's block at offset Σ_{q<r} counts[q].
  // reduce_scatter_v: recv[0..counts[rank]) ← Σ over ranks of their block `rank` of buf (buf is left undefined);
  // allgather_v: every rank's block of buf ← that rank's own block of buf.
  template <typename T>
  void reduce_scatter_v(T* buf, const int64_t* counts, T* recv) {
    reduce_scatter_v_raw(buf, counts, recv, comm_type<T>());
  }
  template <typename T>
  void allgather_v(T* buf, const int64_t* counts) {
    allgather_v_raw(buf, counts, comm_type<T>());
  }
  // buf[0..n) ← root's buf[0..n).
  template <typename T>
  void broadcast(T* buf, int64_t n, int root) {
    broadcast_raw(buf, n, comm_type<T>(), root);
  }
  // Point to point (pipeline stages): blocking, tag 0. sendrecv sends to `dest` and receives from `src` at once,
  // so two ranks exchanging in opposite directions cannot deadlock.
  void send(const float* buf, int64_t n, int dest) { sendrecv(buf, n, dest, nullptr, 0, -1); }
  void recv(float* buf, int64_t n, int src) { sendrecv(nullptr, 0, -1, buf, n, src); }
  virtual void sendrecv(const float* send, int64_t send_n, int dest, float* recv, int64_t recv_n,
                        int src) = 0;
  virtual void barrier() = 0;
  // The ranks of this communicator with the same color, ordered by key (MPI_Comm_split); collective.
  virtual std::unique_ptr<Comm> split(int color, int key) = 0;
  // Ends every process of the job (MPI_Abort on the world); used when one rank failed and the others may be
  // waiting in a collective. The single-process Comm exits with `code`.
  [[noreturn]] virtual void abort(int code) = 0;
  // The name the collective watchdog gives this communicator's group in its message ("dp", "ep/expert tp-ep");
  // GroupComms names its communicators. Only the MPI Comm keeps it (the others never wait on a peer).
  virtual void set_name(const std::string&) {}

 protected:
  virtual void allreduce_raw(void* buf, int64_t n, CommType t, ReduceOp op) = 0;
  virtual void allgather_raw(const void* send, int64_t n, void* recv, CommType t) = 0;
  virtual void alltoallv_raw(const void* send, const int64_t* send_counts, void* recv,
                             const int64_t* recv_counts, CommType t) = 0;
  virtual void broadcast_raw(void* buf, int64_t n, CommType t, int root) = 0;
  virtual void reduce_scatter_raw(const void* send, void* recv, int64_t n, CommType t) = 0;
  virtual void reduce_scatter_v_raw(void* buf, const int64_t* counts, void* recv, CommType t) = 0;
  virtual void allgather_v_raw(void* buf, const int64_t* counts, CommType t) = 0;
};

// One process, no MPI: collectives are identities (alltoallv and allgather copy).
class SingleComm final : public Comm {
 public:
  int size() const override { return 1; }
  int rank() const override { return 0; }
  void sendrecv(const float*, int64_t, int, float*, int64_t, int) override;
  void barrier() override {}
  std::unique_ptr<Comm> split(int color, int key) override;
  [[noreturn]] void abort(int code) override;

 protected:
  void allreduce_raw(void*, int64_t, CommType, ReduceOp) override {}
  void allgather_raw(const void* send, int64_t n, void* recv, CommType t) override;
  void alltoallv_raw(const void* send, const int64_t* send_counts, void* recv, const int64_t* recv_counts,
                     CommType t) override;
  void broadcast_raw(void*, int64_t, CommType, int) override {}
  void reduce_scatter_raw(const void* send, void* recv, int64_t n, CommType t) override;
  void reduce_scatter_v_raw(void* buf, const int64_t* counts, void* recv, CommType t) override;
  void allgather_v_raw(void*, const int64_t*, CommType) override {}
};

// The collective watchdog (Megatron's --distributed-timeout-minutes; NCCL's timeout there). The MPI calls stay the
// blocking ones; around each the calling thread records what it waits in (op, communicator, how many collectives
// it has entered there, since when). With a timeout > 0 and an MpiSession, a watchdog thread looks every poll
// period (a quarter of the answer grace: 62 ms for timeouts up to a second, 500 ms from 8 s):
// when the training thread has waited longer than the timeout, it asks every rank what it is doing over a side
// channel (a duplicate of the world communicator, answered by the other ranks' watchdog threads), then prints which
// op, group and iteration, and which ranks did not arrive, and ends the job (MPI_Abort, exit status
// kWatchdogExitCode). A stopped rank (SIGSTOP) cannot answer; a rank looping outside communication answers that it
// is. The job ends within the timeout plus watchdog_grace_seconds() (and one poll period) from the moment the first
// rank started waiting. 0 (the default until the trainer sets it) starts no thread. Process-wide.
constexpr int kWatchdogExitCode = 3;
void set_collective_timeout(double seconds);
double collective_timeout();
// How long a rank that timed out waits for the others' answers before it ends the job.
double watchdog_grace_seconds();
// The training iteration the message names (the trainer sets it as each iteration starts; -1: not training).
void set_collective_iteration(int64_t iteration);

// True when this process was started by an MPI launcher (mpirun / srun: OMPI_COMM_WORLD_SIZE, PMI_SIZE or
// PMIX_RANK in the environment). Without one, dsv3 runs as a plain single process and never initialises MPI.
bool launched_by_mpi();

// The MPI library for the life of this object: MPI_Init_thread on construction, MPI_Finalize on destruction (after
// every Comm made from world() is gone). At most one per process. It asks for MPI_THREAD_MULTIPLE so that the
// collective watchdog's thread may call MPI; every other call comes from the thread that made the session.
class MpiSession {
 public:
  MpiSession(int* argc, char*** argv);
  ~MpiSession();
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;
  Comm& world() { return *world_; }

 private:
  std::unique_ptr<Comm> world_;
};

// MpiSession when launched_by_mpi(), otherwise a SingleComm world; what `dsv3 train` runs on.
class Runtime {
 public:
  Runtime(int* argc, char*** argv);
  ~Runtime();
  Comm& world() { return mpi_ ? mpi_->world() : single_; }

 private:
  std::unique_ptr<MpiSession> mpi_;
  SingleComm single_;
};

// One communicator per group of `pg` that this rank belongs to, made by splitting `world` (collective: every rank
// of the world must build its GroupComms with the same layout). Groups that span the same ranks share one Comm.
class GroupComms {
 public:
  GroupComms(const ProcessGroups& pg, Comm& world);
  Comm& operator[](Group g) { return *by_group_.at(g); }
  Comm& world() { return world_; }
  // True when two groups of this rank are the same ranks (so a collective over both is one collective).
  bool same(Group a, Group b) const { return by_group_.at(a) == by_group_.at(b); }

 private:
  Comm& world_;
  std::vector<std::unique_ptr<Comm>> owned_;
  std::map<Group, Comm*> by_group_;
};

}  // namespace dsv3
