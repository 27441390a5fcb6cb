// Comm on MPI (OpenMPI), the single-process Comm, and the per-group communicators. The only file that includes
// <mpi.h>.
#include "parallel/comm.h"

#define OMPI_SKIP_MPICXX 1  // the C API only; no deprecated C++ bindings
#include <mpi.h>

#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace dsv3 {
namespace {

size_t type_bytes(CommType t) {
  switch (t) {
    case CommType::kF32: return 4;
    case CommType::kF64: return 8;
    case CommType::kI32: return 4;
    case CommType::kI64: return 8;
    case CommType::kU8: return 1;
    case CommType::kBF16: return 2;
  }
  return 1;
}

MPI_Datatype mpi_type(CommType t) {
  switch (t) {
    case CommType::kF32: return MPI_FLOAT;
    case CommType::kF64: return MPI_DOUBLE;
    case CommType::kI32: return MPI_INT32_T;
    case CommType::kI64: return MPI_INT64_T;
    case CommType::kU8: return MPI_UINT8_T;
    case CommType::kBF16: return MPI_UINT16_T;  // moved as bits; reductions are refused before MPI sees them
  }
  return MPI_BYTE;
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return MPI_SUM;
    case ReduceOp::kMax: return MPI_MAX;
    case ReduceOp::kMin: return MPI_MIN;
  }
  return MPI_SUM;
}

void check_mpi(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, msg, &len);
  fail(what, " failed: ", std::string(msg, len));
}

// Largest element count passed to one MPI call (counts are int).
constexpr int64_t kMaxChunk = int64_t{1} << 30;

class MpiComm final : public Comm {
 public:
  MpiComm(MPI_Comm c, bool owned) : comm_(c), owned_(owned) {
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_rank(comm_, &rank_);
  }
  ~MpiComm() override {
    if (owned_) MPI_Comm_free(&comm_);
  }
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  void barrier() override { check_mpi(MPI_Barrier(comm_), "MPI_Barrier"); }
  void sendrecv(const float* send, int64_t send_n, int dest, float* recv, int64_t recv_n, int src) override {
    DSV3_CHECK(send_n <= INT_MAX && recv_n <= INT_MAX, "point-to-point message of ", std::max(send_n, recv_n),
               " elements exceeds MPI's int counts");
    const int d = dest < 0 ? MPI_PROC_NULL : dest, s = src < 0 ? MPI_PROC_NULL : src;
    check_mpi(MPI_Sendrecv(send, static_cast<int>(send_n), MPI_FLOAT, d, 0, recv, static_cast<int>(recv_n), MPI_FLOAT,
                           s, 0, comm_, MPI_STATUS_IGNORE),
              "MPI_Sendrecv");
  }
  std::unique_ptr<Comm> split(int color, int key) override {
    MPI_Comm c;
    check_mpi(MPI_Comm_split(comm_, color, key, &c), "MPI_Comm_split");
    return std::make_unique<MpiComm>(c, true);
  }
  [[noreturn]] void abort(int code) override {
    std::fflush(stdout), std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

 protected:
  void allreduce_raw(void* buf, int64_t n, CommType t, ReduceOp op) override {
    DSV3_CHECK(t != CommType::kBF16, "allreduce of bf16 elements: reduce in fp32 (bf16 sums lose the low bits)");
    auto* p = static_cast<char*>(buf);
    for (int64_t i = 0; i < n; i += kMaxChunk) {
      const int c = static_cast<int>(std::min(kMaxChunk, n - i));
      check_mpi(MPI_Allreduce(MPI_IN_PLACE, p + i * type_bytes(t), c, mpi_type(t), mpi_op(op), comm_),
                "MPI_Allreduce");
    }
  }
  void allgather_raw(const void* send, int64_t n, void* recv, CommType t) override {
    DSV3_CHECK(n * size_ <= INT_MAX, "allgather of ", n, " elements × ", size_, " ranks exceeds MPI's int counts");
    check_mpi(MPI_Allgather(send, static_cast<int>(n), mpi_type(t), recv, static_cast<int>(n), mpi_type(t), comm_),
              "MPI_Allgather");
  }
  void alltoallv_raw(const void* send, const int64_t* send_counts, void* recv, const int64_t* recv_counts,
                     CommType t) override {
    std::vector<int> sc(size_), sd(size_), rc(size_), rd(size_);
    int64_t so = 0, ro = 0;
    for (int r = 0; r < size_; ++r) {
      DSV3_CHECK(send_counts[r] >= 0 && recv_counts[r] >= 0, "alltoallv: negative count");
      sc[r] = static_cast<int>(send_counts[r]), sd[r] = static_cast<int>(so);
      rc[r] = static_cast<int>(recv_counts[r]), rd[r] = static_cast<int>(ro);
      so += send_counts[r], ro += recv_counts[r];
    }
    DSV3_CHECK(so <= INT_MAX && ro <= INT_MAX, "alltoallv of ", std::max(so, ro), " elements exceeds MPI's int counts");
    check_mpi(MPI_Alltoallv(send, sc.data(), sd.data(), mpi_type(t), recv, rc.data(), rd.data(), mpi_type(t), comm_),
              "MPI_Alltoallv");
  }
  void reduce_scatter_raw(const void* send, void* recv, int64_t n, CommType t) override {
    DSV3_CHECK(t != CommType::kBF16, "reduce-scatter of bf16 elements: reduce in fp32");
    DSV3_CHECK(n * size_ <= INT_MAX, "reduce_scatter of ", n, " elements × ", size_, " ranks exceeds MPI's int counts");
    check_mpi(MPI_Reduce_scatter_block(send, recv, static_cast<int>(n), mpi_type(t), MPI_SUM, comm_),
              "MPI_Reduce_scatter_block");
  }
  // MPI's int counts and displacements of uneven blocks.
  void int_blocks(const int64_t* counts, std::vector<int>& c, std::vector<int>& displ) const {
    c.resize(size_), displ.resize(size_);
    int64_t o = 0;
    for (int r = 0; r < size_; ++r) {
      DSV3_CHECK(counts[r] >= 0, "uneven collective: negative count");
      c[r] = static_cast<int>(counts[r]), displ[r] = static_cast<int>(o);
      o += counts[r];
    }
    DSV3_CHECK(o <= INT_MAX, "uneven collective of ", o, " elements exceeds MPI's int counts");
  }
  void reduce_scatter_v_raw(void* buf, const int64_t* counts, void* recv, CommType t) override {
    DSV3_CHECK(t != CommType::kBF16, "reduce-scatter of bf16 elements: reduce in fp32");
    std::vector<int> c, displ;
    int_blocks(counts, c, displ);
    check_mpi(MPI_Reduce_scatter(buf, recv, c.data(), mpi_type(t), MPI_SUM, comm_), "MPI_Reduce_scatter");
  }
  void allgather_v_raw(void* buf, const int64_t* counts, CommType t) override {
    std::vector<int> c, displ;
    int_blocks(counts, c, displ);
    check_mpi(MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, c.data(), displ.data(), mpi_type(t), comm_),
              "MPI_Allgatherv");
  }
  void broadcast_raw(void* buf, int64_t n, CommType t, int root) override {
    auto* p = static_cast<char*>(buf);
    for (int64_t i = 0; i < n; i += kMaxChunk) {
      const int c = static_cast<int>(std::min(kMaxChunk, n - i));
      check_mpi(MPI_Bcast(p + i * type_bytes(t), c, mpi_type(t), root, comm_), "MPI_Bcast");
    }
  }

 private:
  MPI_Comm comm_;
  bool owned_;
  int size_ = 1, rank_ = 0;
};

}  // namespace

size_t comm_type_bytes(CommType t) { return type_bytes(t); }

std::unique_ptr<Comm> SingleComm::split(int, int) { return std::make_unique<SingleComm>(); }

void SingleComm::abort(int code) {
  std::fflush(stdout), std::fflush(stderr);
  std::_Exit(code);
}

void SingleComm::allgather_raw(const void* send, int64_t n, void* recv, CommType t) {
  if (send != recv) std::memmove(recv, send, n * type_bytes(t));
}

void SingleComm::alltoallv_raw(const void* send, const int64_t* send_counts, void* recv, const int64_t* recv_counts,
                               CommType t) {
  DSV3_CHECK(send_counts[0] == recv_counts[0], "alltoallv on one rank: sending ", send_counts[0],
             " elements but receiving ", recv_counts[0]);
  if (send != recv) std::memmove(recv, send, send_counts[0] * type_bytes(t));
}

void SingleComm::reduce_scatter_raw(const void* send, void* recv, int64_t n, CommType t) {
  if (send != recv) std::memmove(recv, send, n * type_bytes(t));
}

void SingleComm::sendrecv(const float*, int64_t send_n, int dest, float*, int64_t recv_n, int src) {
  DSV3_CHECK((send_n == 0 || dest < 0) && (recv_n == 0 || src < 0),
             "point-to-point communication in a single-process run");
}

void SingleComm::reduce_scatter_v_raw(void* buf, const int64_t* counts, void* recv, CommType t) {
  if (buf != recv) std::memmove(recv, buf, counts[0] * type_bytes(t));
}

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"})
    if (std::getenv(v)) return true;
  return false;
}

MpiSession::MpiSession(int* argc, char*** argv) {
  int inited = 0;
  MPI_Initialized(&inited);
  DSV3_CHECK(!inited, "MPI is already initialised in this process");
  int provided = 0;
  check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
  world_ = std::make_unique<MpiComm>(MPI_COMM_WORLD, false);
}

MpiSession::~MpiSession() {
  world_.reset();
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

Runtime::Runtime(int* argc, char*** argv) {
  if (launched_by_mpi()) mpi_ = std::make_unique<MpiSession>(argc, argv);
}

Runtime::~Runtime() = default;

GroupComms::GroupComms(const ProcessGroups& pg, Comm& world) : world_(world) {
  DSV3_CHECK(world.size() == pg.world && world.rank() == pg.rank, "GroupComms: the layout is for rank ", pg.rank,
             " of ", pg.world, " but this process is rank ", world.rank(), " of ", world.size());
  // Decisions use the whole partition of each kind (the same on every rank), so every rank makes the same
  // sequence of MPI_Comm_split calls.
  std::vector<std::pair<std::vector<std::vector<int>>, Comm*>> made;
  std::vector<int> all(pg.world);
  for (int r = 0; r < pg.world; ++r) all[r] = r;
  for (Group g : {Group::kWorld, Group::kTp, Group::kCp, Group::kDp, Group::kPp, Group::kDpCp, Group::kTpCp,
                  Group::kTpPp, Group::kTpDpCp, Group::kEtp, Group::kEp, Group::kEdp, Group::kEtpEp,
                  Group::kEtpEpPp}) {
    const auto parts = pg.all_groups(g);
    Comm* c = nullptr;
    for (auto& [p, comm] : made)
      if (p == parts) c = comm;
    if (!c) {
      if (parts.size() == 1 && parts[0] == all) {
        c = &world;
      } else if (parts[0].size() == 1) {
        owned_.push_back(std::make_unique<SingleComm>());
        c = owned_.back().get();
      } else {
        int color = -1, key = -1;
        for (size_t i = 0; i < parts.size(); ++i)
          for (size_t j = 0; j < parts[i].size(); ++j)
            if (parts[i][j] == pg.rank) color = static_cast<int>(i), key = static_cast<int>(j);
        owned_.push_back(world.split(color, key));
        c = owned_.back().get();
      }
      made.emplace_back(parts, c);
    }
    by_group_[g] = c;
  }
}

}  // namespace dsv3
