// Comm on MPI (OpenMPI), the single-process Comm, and the per-group communicators. The only file that includes
// <mpi.h>.
#include "parallel/comm.h"

#define OMPI_SKIP_MPICXX 1  // the C API only; no deprecated C++ bindings
#include <mpi.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <thread>

#include "core/error.h"

namespace dsv3 {
namespace {

size_t type_bytes(CommType t) {
  switch (t) {
    case CommType::kF32:
      return 4;
    case CommType::kF64:
      return 8;
    case CommType::kI32:
      return 4;
    case CommType::kI64:
      return 8;
    case CommType::kU8:
      return 1;
    case CommType::kBF16:
      return 2;
  }
  return 1;
}

MPI_Datatype mpi_type(CommType t) {
  switch (t) {
    case CommType::kF32:
      return MPI_FLOAT;
    case CommType::kF64:
      return MPI_DOUBLE;
    case CommType::kI32:
      return MPI_INT32_T;
    case CommType::kI64:
      return MPI_INT64_T;
    case CommType::kU8:
      return MPI_UINT8_T;
    case CommType::kBF16:
      return MPI_UINT16_T;  // moved as bits; reductions are refused before MPI sees them
  }
  return MPI_BYTE;
}

MPI_Op mpi_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
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

// ---- The collective watchdog (comm.h) ----
// The training thread runs the blocking MPI calls exactly as without a watchdog; around each it records what it
// waits in (a mutex and a clock read: nothing next to any collective). A watchdog thread (MPI_THREAD_MULTIPLE)
// looks every poll period (62–500 ms, a quarter of the answer grace): it answers other ranks' queries on the side
// channel, and when the training thread has waited longer than the timeout it asks every rank what it is doing,
// prints the report and aborts the job. Polling
// non-blocking collectives instead would need no thread, but runs other algorithms (libnbc's): gradient-sized
// all-reduces (4 MB, 2 ranks) took 1.2-1.8x as long in our measurements.

using WdClock = std::chrono::steady_clock;
class MpiComm;

// What a waiting rank tells another over the side channel: a query carries the communicator the asker waits on
// (its key) and its sequence number there; an answer carries the answerer's sequence number on that
// communicator (how many collectives it has entered on it; -1 when it is no member) and what it waits in.
struct WdMsg {
  uint64_t key = 0;
  int64_t seq = -1;
  int64_t iteration = -1;
  // Answer: 1 while the answerer waits in an op (waited_s: for how long), else 0 (waited_s: how long since its
  // last op ended: computing, or stuck outside communication).
  int64_t waiting = 0;
  uint64_t wait_key = 0;
  int64_t wait_seq = 0;
  double waited_s = 0;
  char op[24] = {};
  char group[96] = {};
};
constexpr int kQueryTag = 1, kAnswerTag = 2;

// The op this rank is waiting in.
struct Waiting {
  const char* op;
  const MpiComm* comm;
  int64_t seq;
  WdClock::time_point since;
  int peers[2];  // point to point: the ranks of `comm` it exchanges with (-1: none); collectives: unused
  bool p2p;
};

WdMsg describe_self(uint64_t key);
[[noreturn]] void report_and_abort(const Waiting& w);

struct Watchdog {
  std::mutex mu;  // guards the fields below between the training thread and the watchdog thread
  double timeout_s = 0;
  int64_t iteration = -1;
  MPI_Comm side = MPI_COMM_NULL;  // MpiSession's duplicate of the world: queries and answers only
  bool multiple = false;          // MPI provides MPI_THREAD_MULTIPLE (the watchdog thread may call it)
  std::vector<MpiComm*> live;     // every MpiComm of this process, to answer queries about any of them
  bool in_op = false;
  Waiting current{};
  WdClock::time_point last_end = WdClock::now();
  std::list<WdMsg> outbox;  // answers in flight (MPI_Isend needs its buffer until the job ends)
  std::thread thread;
  bool stop = false;
  std::condition_variable cv;
  // Set by the watchdog thread before it aborts the job: the training thread then goes no further than the
  // collective it was in (a stopped rank that MPI's teardown resumes can complete it), so it never races the
  // abort into MPI_Finalize, which once left an aborted 3-rank job hanging under load.
  std::atomic<bool> aborting{false};
};
Watchdog g_wd;

void watchdog_loop();

void copy_str(char* dst, size_t cap, const std::string& s) {
  const size_t n = std::min(cap - 1, s.size());
  std::memcpy(dst, s.data(), n);
  dst[n] = 0;
}

// FNV-1a over a communicator's world ranks (and which of this process's live communicators over the same ranks
// it is: all members make them in the same order), so that every member names the same communicator alike.
uint64_t comm_key(const std::vector<int>& world_ranks, int ordinal) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](uint64_t v) {
    for (int b = 0; b < 8; ++b) h = (h ^ ((v >> (8 * b)) & 0xff)) * 1099511628211ull;
  };
  for (int r : world_ranks) mix(static_cast<uint64_t>(r));
  mix(static_cast<uint64_t>(ordinal) + 0x9e37);
  return h;
}

class MpiComm final : public Comm {
 public:
  MpiComm(MPI_Comm c, bool owned) : comm_(c), owned_(owned) {
    MPI_Comm_size(comm_, &size_);
    MPI_Comm_rank(comm_, &rank_);
    // The members' world ranks, for the watchdog's message and its key.
    MPI_Group mine, world;
    MPI_Comm_group(comm_, &mine);
    MPI_Comm_group(MPI_COMM_WORLD, &world);
    std::vector<int> local(size_);
    for (int r = 0; r < size_; ++r) local[r] = r;
    world_ranks_.resize(size_);
    MPI_Group_translate_ranks(mine, size_, local.data(), world, world_ranks_.data());
    MPI_Group_free(&mine), MPI_Group_free(&world);
    std::lock_guard<std::mutex> l(g_wd.mu);
    int ordinal = 0;
    for (const MpiComm* o : g_wd.live) ordinal += o->world_ranks_ == world_ranks_;
    key_ = comm_key(world_ranks_, ordinal);
    name_ = c == MPI_COMM_WORLD ? "world" : "";
    g_wd.live.push_back(this);
  }
  ~MpiComm() override {
    {
      std::lock_guard<std::mutex> l(g_wd.mu);
      g_wd.live.erase(std::find(g_wd.live.begin(), g_wd.live.end(), this));
    }
    if (owned_) MPI_Comm_free(&comm_);
  }
  int size() const override { return size_; }
  int rank() const override { return rank_; }
  void set_name(const std::string& n) override {
    std::lock_guard<std::mutex> l(g_wd.mu);
    name_ = n;
  }
  void barrier() override {
    collective("barrier", [&] { return MPI_Barrier(comm_); });
  }
  void sendrecv(const float* send, int64_t send_n, int dest, float* recv, int64_t recv_n, int src) override {
    DSV3_CHECK(send_n <= INT_MAX && recv_n <= INT_MAX, "point-to-point message of ", std::max(send_n, recv_n),
               " elements exceeds MPI's int counts");
    const int d = dest < 0 ? MPI_PROC_NULL : dest, s = src < 0 ? MPI_PROC_NULL : src;
    Entered e(this, dest < 0 ? "recv" : src < 0 ? "send" : "sendrecv", true, dest, src);
    check_mpi(MPI_Sendrecv(send, static_cast<int>(send_n), MPI_FLOAT, d, 0, recv, static_cast<int>(recv_n),
                           MPI_FLOAT, s, 0, comm_, MPI_STATUS_IGNORE),
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
    DSV3_CHECK(t != CommType::kBF16,
               "allreduce of bf16 elements: reduce in fp32 (bf16 sums lose the low bits)");
    auto* p = static_cast<char*>(buf);
    for (int64_t i = 0; i < n; i += kMaxChunk) {
      const int c = static_cast<int>(std::min(kMaxChunk, n - i));
      void* b = p + i * type_bytes(t);
      collective("allreduce",
                 [&] { return MPI_Allreduce(MPI_IN_PLACE, b, c, mpi_type(t), mpi_op(op), comm_); });
    }
  }
  void allgather_raw(const void* send, int64_t n, void* recv, CommType t) override {
    DSV3_CHECK(n * size_ <= INT_MAX, "allgather of ", n, " elements × ", size_,
               " ranks exceeds MPI's int counts");
    const int c = static_cast<int>(n);
    collective("allgather", [&] { return MPI_Allgather(send, c, mpi_type(t), recv, c, mpi_type(t), comm_); });
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
    DSV3_CHECK(so <= INT_MAX && ro <= INT_MAX, "alltoallv of ", std::max(so, ro),
               " elements exceeds MPI's int counts");
    const MPI_Datatype ty = mpi_type(t);
    collective("alltoallv", [&] {
      return MPI_Alltoallv(send, sc.data(), sd.data(), ty, recv, rc.data(), rd.data(), ty, comm_);
    });
  }
  void reduce_scatter_raw(const void* send, void* recv, int64_t n, CommType t) override {
    DSV3_CHECK(t != CommType::kBF16, "reduce-scatter of bf16 elements: reduce in fp32");
    DSV3_CHECK(n * size_ <= INT_MAX, "reduce_scatter of ", n, " elements × ", size_,
               " ranks exceeds MPI's int counts");
    const int c = static_cast<int>(n);
    collective("reduce_scatter",
               [&] { return MPI_Reduce_scatter_block(send, recv, c, mpi_type(t), MPI_SUM, comm_); });
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
    collective("reduce_scatter_v",
               [&] { return MPI_Reduce_scatter(buf, recv, c.data(), mpi_type(t), MPI_SUM, comm_); });
  }
  void allgather_v_raw(void* buf, const int64_t* counts, CommType t) override {
    std::vector<int> c, displ;
    int_blocks(counts, c, displ);
    collective("allgather_v", [&] {
      return MPI_Allgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, buf, c.data(), displ.data(), mpi_type(t),
                            comm_);
    });
  }
  void broadcast_raw(void* buf, int64_t n, CommType t, int root) override {
    auto* p = static_cast<char*>(buf);
    for (int64_t i = 0; i < n; i += kMaxChunk) {
      const int c = static_cast<int>(std::min(kMaxChunk, n - i));
      void* b = p + i * type_bytes(t);
      collective("broadcast", [&] { return MPI_Bcast(b, c, mpi_type(t), root, comm_); });
    }
  }

 private:
  friend WdMsg describe_self(uint64_t key);
  friend void report_and_abort(const Waiting& w);  // [[noreturn]]: declared so above

  // What the training thread waits in, for the watchdog thread, for the life of one MPI call.
  struct Entered {
    Entered(MpiComm* c, const char* op, bool p2p, int dest, int src) {
      std::lock_guard<std::mutex> l(g_wd.mu);
      if (!p2p) ++c->seq_;
      g_wd.current = Waiting{op, c, c->seq_, WdClock::now(), {dest, src}, p2p};
      g_wd.in_op = true;
    }
    ~Entered() {
      {
        std::lock_guard<std::mutex> l(g_wd.mu);
        g_wd.in_op = false;
        g_wd.last_end = WdClock::now();
      }
      while (g_wd.aborting.load()) pause();  // the job is being ended by this process's watchdog
    }
  };
  template <typename Blocking>
  void collective(const char* op, Blocking blocking) {
    Entered e(this, op, false, -1, -1);
    check_mpi(blocking(), op);
  }

  std::string group_text() const {
    std::string s = name_.empty() ? std::string("of ranks") : name_ + " (ranks";
    for (int r = 0; r < size_ && r < 16; ++r) s += (r ? "," : " ") + std::to_string(world_ranks_[r]);
    if (size_ > 16) s += ",…";
    return name_.empty() ? s : s + ")";
  }

  MPI_Comm comm_;
  bool owned_;
  int size_ = 1, rank_ = 0;
  std::vector<int> world_ranks_;
  uint64_t key_ = 0;
  int64_t seq_ = 0;  // collectives entered on this communicator (the same count on every member)
  std::string name_;
};

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

// This rank's answer to a query about the communicator `key` (g_wd.mu held).
WdMsg describe_self(uint64_t key) {
  WdMsg m;
  m.key = key;
  for (const MpiComm* c : g_wd.live)
    if (c->key_ == key) m.seq = c->seq_;
  m.iteration = g_wd.iteration;
  if (g_wd.in_op) {
    const Waiting* w = &g_wd.current;
    m.waiting = 1;
    m.wait_key = w->comm->key_, m.wait_seq = w->seq;
    m.waited_s = std::chrono::duration<double>(WdClock::now() - w->since).count();
    copy_str(m.op, sizeof m.op, w->op);
    copy_str(m.group, sizeof m.group, w->comm->group_text());
  } else {
    m.waited_s = std::chrono::duration<double>(WdClock::now() - g_wd.last_end).count();
  }
  return m;
}

// Answers every query that has arrived (other ranks that timed out ask what this one is doing).
void answer_queries() {
  if (g_wd.side == MPI_COMM_NULL) return;
  for (;;) {
    int flag = 0;
    MPI_Status st;
    MPI_Iprobe(MPI_ANY_SOURCE, kQueryTag, g_wd.side, &flag, &st);
    if (!flag) return;
    WdMsg q;
    MPI_Recv(&q, sizeof q, MPI_BYTE, st.MPI_SOURCE, kQueryTag, g_wd.side, MPI_STATUS_IGNORE);
    std::lock_guard<std::mutex> l(g_wd.mu);
    g_wd.outbox.push_back(describe_self(q.key));
    MPI_Request r;
    MPI_Isend(&g_wd.outbox.back(), sizeof(WdMsg), MPI_BYTE, st.MPI_SOURCE, kAnswerTag, g_wd.side, &r);
    MPI_Request_free(&r);  // the buffer stays in the outbox; the job ends soon after a timeout anyway
  }
}

// The timeout (on the watchdog thread; `w` a copy of what the training thread waits in): ask every rank what it is
// doing, wait the grace period for answers, print which ranks did not arrive, and end the job.
[[noreturn]] void report_and_abort(const Waiting& w) {
  const MpiComm& c = *w.comm;
  const int me = world_rank();
  int world_n = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world_n);
  std::vector<WdMsg> answers(world_n);
  std::vector<char> answered(world_n, 0);
  answered[me] = 1;
  if (g_wd.side != MPI_COMM_NULL) {
    WdMsg q;
    q.key = c.key_, q.seq = w.seq;
    std::vector<MPI_Request> recvs;
    std::vector<int> from;
    for (int r = 0; r < world_n; ++r) {
      if (r == me) continue;
      MPI_Request s;
      MPI_Isend(&q, sizeof q, MPI_BYTE, r, kQueryTag, g_wd.side, &s);
      MPI_Request_free(&s);
      recvs.emplace_back();
      from.push_back(r);
      MPI_Irecv(&answers[r], sizeof(WdMsg), MPI_BYTE, r, kAnswerTag, g_wd.side, &recvs.back());
    }
    const auto until = WdClock::now() + std::chrono::duration<double>(watchdog_grace_seconds());
    int left = static_cast<int>(recvs.size());
    while (left > 0 && WdClock::now() < until) {
      answer_queries();
      for (size_t i = 0; i < recvs.size(); ++i) {
        if (answered[from[i]]) continue;
        int done = 0;
        MPI_Test(&recvs[i], &done, MPI_STATUS_IGNORE);
        if (done) answered[from[i]] = 1, --left;
      }
    }
  }
  // Who of the ranks this op waits on has not arrived: no answer (its process is stopped or frozen), or
  // an answer showing it has not yet entered this op.
  std::vector<int> candidates;
  if (w.p2p) {
    for (int p : w.peers)
      if (p >= 0) candidates.push_back(c.world_ranks_[p]);
  } else {
    for (int r : c.world_ranks_)
      if (r != me) candidates.push_back(r);
  }
  std::string missing, detail;
  for (int r : candidates) {
    const WdMsg& a = answers[r];
    bool arrived = false;
    if (answered[r])
      arrived = w.p2p ? a.waiting && a.wait_key == c.key_ &&
                            (std::strstr(a.op, "send") || std::strstr(a.op, "recv"))
                      : a.seq >= w.seq;
    if (arrived) continue;
    missing += (missing.empty() ? "" : ", ") + std::to_string(r);
    char line[320];
    if (!answered[r])
      std::snprintf(line, sizeof line,
                    "\n  rank %d: no answer within %.1f s (its process is stopped or frozen)", r,
                    watchdog_grace_seconds());
    else if (a.waiting)
      std::snprintf(
          line, sizeof line, "\n  rank %d: waits in %s #%lld on group %s at iteration %lld (for %.1f s)", r,
          a.op, static_cast<long long>(a.wait_seq), a.group, static_cast<long long>(a.iteration), a.waited_s);
    else
      std::snprintf(
          line, sizeof line,
          "\n  rank %d: outside communication for %.1f s since its last op, at iteration %lld (computing, or "
          "looping)",
          r, a.waited_s, static_cast<long long>(a.iteration));
    detail += line;
  }
  const double waited = std::chrono::duration<double>(WdClock::now() - w.since).count();
  char head[200];
  std::snprintf(head, sizeof head,
                "Rank %d: collective watchdog: timed out after %.1f s (timeout %g s = %g minutes) ", me,
                waited, g_wd.timeout_s, g_wd.timeout_s / 60.0);
  std::string msg = head;
  msg += std::string("waiting in ") + w.op + " #" + std::to_string(w.seq) + " on group " + c.group_text() +
         (g_wd.iteration >= 0 ? " at iteration " + std::to_string(g_wd.iteration)
                              : std::string(" (not training)")) +
         "; ";
  msg += missing.empty() ? "every rank of the group arrived (a mismatched collective?)"
                         : "rank(s) that did not arrive: " + missing;
  msg += detail + "\n";
  g_wd.aborting = true;
  std::fflush(stdout);
  std::fputs(msg.c_str(), stderr);
  std::fflush(stderr);
  MPI_Abort(MPI_COMM_WORLD, kWatchdogExitCode);
  std::_Exit(kWatchdogExitCode);
}

// The watchdog thread: every poll period, answer queries, and past the deadline report and abort. The period is a
// quarter of the grace other ranks are given to answer (62 ms for timeouts up to a second, 500 ms from 8 s, so for
// Megatron's 10 minutes): each look probes the side channel, which under MPI_THREAD_MULTIPLE takes MPI's lock and
// runs its progress engine beside the training thread's collective (looking every 20 ms, 2-rank DP steps on shared
// cores ran ~2% slower).
void watchdog_loop() {
  std::unique_lock<std::mutex> l(g_wd.mu);
  while (!g_wd.stop) {
    const double period = std::clamp(g_wd.timeout_s / 4, 0.25, 2.0) / 4;  // watchdog_grace_seconds() / 4
    g_wd.cv.wait_for(l, std::chrono::duration<double>(period));
    if (g_wd.stop || g_wd.timeout_s <= 0) continue;
    const bool late =
        g_wd.in_op && WdClock::now() - g_wd.current.since >= std::chrono::duration<double>(g_wd.timeout_s);
    const Waiting w = g_wd.current;
    l.unlock();
    if (late) report_and_abort(w);
    answer_queries();
    l.lock();
  }
}

}  // namespace

size_t comm_type_bytes(CommType t) {
  return type_bytes(t);
}

void set_collective_timeout(double seconds) {
  std::lock_guard<std::mutex> l(g_wd.mu);
  g_wd.timeout_s = seconds > 0 ? seconds : 0;
  if (g_wd.timeout_s > 0 && g_wd.side != MPI_COMM_NULL && g_wd.multiple && !g_wd.thread.joinable())
    g_wd.thread = std::thread(watchdog_loop);
}
double collective_timeout() {
  std::lock_guard<std::mutex> l(g_wd.mu);
  return g_wd.timeout_s;
}
// Long enough for a rank busy in a short computation to reach its next op and answer; short next to any timeout
// worth setting.
double watchdog_grace_seconds() {
  return std::clamp(g_wd.timeout_s / 4, 0.25, 2.0);
}  // read once set
void set_collective_iteration(int64_t iteration) {
  std::lock_guard<std::mutex> l(g_wd.mu);
  g_wd.iteration = iteration;
}

std::unique_ptr<Comm> SingleComm::split(int, int) {
  return std::make_unique<SingleComm>();
}

void SingleComm::abort(int code) {
  std::fflush(stdout), std::fflush(stderr);
  std::_Exit(code);
}

void SingleComm::allgather_raw(const void* send, int64_t n, void* recv, CommType t) {
  if (send != recv) std::memmove(recv, send, n * type_bytes(t));
}

void SingleComm::alltoallv_raw(const void* send, const int64_t* send_counts, void* recv,
                               const int64_t* recv_counts, CommType t) {
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
  // MULTIPLE for the watchdog thread; the training thread alone makes every other call (as under FUNNELED).
  check_mpi(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &provided), "MPI_Init_thread");
  DSV3_CHECK(provided >= MPI_THREAD_FUNNELED, "the MPI library provides no MPI_THREAD_FUNNELED");
  g_wd.multiple = provided >= MPI_THREAD_MULTIPLE;
  if (!g_wd.multiple)
    std::fprintf(
        stderr,
        "note: the MPI library lacks MPI_THREAD_MULTIPLE: --distributed-timeout-minutes has no effect\n");
  world_ = std::make_unique<MpiComm>(MPI_COMM_WORLD, false);
  check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &g_wd.side), "MPI_Comm_dup");
}

MpiSession::~MpiSession() {
  if (g_wd.thread.joinable()) {
    {
      std::lock_guard<std::mutex> l(g_wd.mu);
      g_wd.stop = true;
    }
    g_wd.cv.notify_all();
    g_wd.thread.join();
    g_wd.stop = false;
  }
  world_.reset();
  if (g_wd.side != MPI_COMM_NULL) MPI_Comm_free(&g_wd.side);
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized) MPI_Finalize();
}

Runtime::Runtime(int* argc, char*** argv) {
  if (launched_by_mpi()) mpi_ = std::make_unique<MpiSession>(argc, argv);
}

Runtime::~Runtime() = default;

GroupComms::GroupComms(const ProcessGroups& pg, Comm& world) : world_(world) {
  DSV3_CHECK(world.size() == pg.world && world.rank() == pg.rank, "GroupComms: the layout is for rank ",
             pg.rank, " of ", pg.world, " but this process is rank ", world.rank(), " of ", world.size());
  // Decisions use the whole partition of each kind (the same on every rank), so every rank makes the same
  // sequence of MPI_Comm_split calls.
  std::vector<std::pair<std::vector<std::vector<int>>, Comm*>> made;
  std::vector<int> all(pg.world);
  for (int r = 0; r < pg.world; ++r) all[r] = r;
  for (Group g :
       {Group::kWorld, Group::kTp, Group::kCp, Group::kDp, Group::kPp, Group::kDpCp, Group::kTpCp,
        Group::kTpPp, Group::kTpDpCp, Group::kEtp, Group::kEp, Group::kEdp, Group::kEtpEp, Group::kEtpEpPp}) {
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
  // The watchdog's names: every group a communicator serves ("dp/dp-cp/expert dp").
  std::map<Comm*, std::string> names;
  for (const auto& [g, c] : by_group_) names[c] += (names[c].empty() ? "" : "/") + std::string(group_name(g));
  for (auto& [c, n] : names) c->set_name(n);
}

}  // namespace dsv3
