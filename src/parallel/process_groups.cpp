// Megatron-Core's rank layout: RankGenerator / generate_masked_orthogonal_rank_groups transcribed, the dense and
// expert grids of initialize_model_parallel, and the size rules it asserts (spec §8).
#include "parallel/process_groups.h"

#include <algorithm>
#include <sstream>

#include "core/error.h"

namespace dsv3 {
namespace {

std::vector<std::string> split_dash(const std::string& s) {
  std::vector<std::string> out;
  std::string cur;
  for (char c : s) {
    if (c == '-') {
      out.push_back(cur), cur.clear();
    } else {
      cur += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
  }
  out.push_back(cur);
  return out;
}

// Decomposes `index` into mixed-radix digits (first digit fastest).
std::vector<int> decompose(int64_t index, const std::vector<int>& shape) {
  std::vector<int> idx(shape.size());
  for (size_t i = 0; i < shape.size(); ++i) idx[i] = static_cast<int>(index % shape[i]), index /= shape[i];
  return idx;
}

}  // namespace

RankGrid::RankGrid(std::vector<std::pair<std::string, int>> dims) : dims_(std::move(dims)) {
  world_ = 1;
  for (const auto& [name, n] : dims_) {
    DSV3_CHECK(n >= 1, "rank grid: size of ", name, " must be >= 1, got ", n);
    world_ *= n;
  }
}

int RankGrid::size(const std::string& dim) const {
  for (const auto& [name, n] : dims_)
    if (name == dim) return n;
  fail("rank grid: no dimension named ", dim);
}

int RankGrid::coord(int rank, const std::string& dim) const {
  int stride = 1;
  for (const auto& [name, n] : dims_) {
    if (name == dim) return (rank / stride) % n;
    stride *= n;
  }
  fail("rank grid: no dimension named ", dim);
}

std::vector<bool> RankGrid::mask(const std::string& token) const {
  std::vector<bool> m(dims_.size(), false);
  for (const auto& t : split_dash(token)) {
    bool found = false;
    for (size_t i = 0; i < dims_.size(); ++i)
      if (dims_[i].first == t) m[i] = found = true;
    DSV3_CHECK(found, "rank grid: no dimension named ", t, " (in '", token, "')");
  }
  return m;
}

std::vector<std::vector<int>> RankGrid::groups(const std::string& token) const {
  const auto m = mask(token);
  std::vector<int> masked_shape, unmasked_shape;
  std::vector<int64_t> masked_stride, unmasked_stride;
  int64_t stride = 1;
  for (size_t i = 0; i < dims_.size(); ++i) {
    (m[i] ? masked_shape : unmasked_shape).push_back(dims_[i].second);
    (m[i] ? masked_stride : unmasked_stride).push_back(stride);
    stride *= dims_[i].second;
  }
  int64_t group_size = 1, num_groups = 1;
  for (int n : masked_shape) group_size *= n;
  for (int n : unmasked_shape) num_groups *= n;
  std::vector<std::vector<int>> out(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) {
    const auto gi = decompose(g, unmasked_shape);
    int64_t base = 0;
    for (size_t i = 0; i < gi.size(); ++i) base += gi[i] * unmasked_stride[i];
    out[g].reserve(group_size);
    for (int64_t r = 0; r < group_size; ++r) {
      const auto ri = decompose(r, masked_shape);
      int64_t rank = base;
      for (size_t i = 0; i < ri.size(); ++i) rank += ri[i] * masked_stride[i];
      out[g].push_back(static_cast<int>(rank));
    }
  }
  return out;
}

std::vector<int> RankGrid::group_of(int rank, const std::string& token) const {
  DSV3_CHECK(rank >= 0 && rank < world_, "rank grid: rank ", rank, " outside [0, ", world_, ")");
  for (auto& g : groups(token))
    if (std::find(g.begin(), g.end(), rank) != g.end()) return g;
  fail("rank grid: rank ", rank, " is in no '", token,
       "' group");  // unreachable: the groups partition the ranks
}

const char* group_name(Group g) {
  switch (g) {
    case Group::kWorld:
      return "world";
    case Group::kTp:
      return "tp";
    case Group::kCp:
      return "cp";
    case Group::kDp:
      return "dp";
    case Group::kPp:
      return "pp";
    case Group::kDpCp:
      return "dp-cp";
    case Group::kTpCp:
      return "tp-cp";
    case Group::kTpPp:
      return "tp-pp";
    case Group::kTpDpCp:
      return "tp-dp-cp";
    case Group::kEtp:
      return "expert tp";
    case Group::kEp:
      return "ep";
    case Group::kEdp:
      return "expert dp";
    case Group::kEtpEp:
      return "expert tp-ep";
    case Group::kEtpEpPp:
      return "expert tp-ep-pp";
  }
  return "?";
}

ProcessGroups ProcessGroups::build(int world, int rank, const ParallelSizes& s) {
  DSV3_CHECK(world >= 1 && rank >= 0 && rank < world, "rank ", rank, " of world size ", world,
             " is impossible");
  DSV3_CHECK(s.tp >= 1 && s.cp >= 1 && s.ep >= 1 && s.pp >= 1,
             "parallel sizes must be >= 1: --tensor-model-parallel-size ", s.tp, ", --context-parallel-size ",
             s.cp, ", --expert-model-parallel-size ", s.ep, ", --pipeline-model-parallel-size ", s.pp);
  // Megatron's RankGenerator: each of tp, cp, ep, dp, pp at most once; ep, when named, next to dp; a dimension
  // missing from the order must have size 1 and is appended (in Megatron's order tp, pp, dp, ep, cp).
  auto tokens = split_dash(s.order);
  for (const auto& t : tokens)
    DSV3_CHECK((t == "tp" || t == "cp" || t == "ep" || t == "dp" || t == "pp") &&
                   std::count(tokens.begin(), tokens.end(), t) == 1,
               "parallel order '", s.order, "': '", t, "' is not one of tp, cp, ep, dp, pp or appears twice");
  if (std::find(tokens.begin(), tokens.end(), "ep") != tokens.end()) {
    const auto e = std::find(tokens.begin(), tokens.end(), "ep") - tokens.begin();
    const auto d = std::find(tokens.begin(), tokens.end(), "dp") - tokens.begin();
    DSV3_CHECK(e - d == 1 || d - e == 1, "parallel order '", s.order, "': ep and dp must be adjacent");
  }
  for (const auto& [t, n] :
       {std::pair<const char*, int>{"tp", s.tp}, {"pp", s.pp}, {"dp", 0}, {"ep", s.ep}, {"cp", s.cp}})
    if (std::find(tokens.begin(), tokens.end(), t) == tokens.end()) {
      DSV3_CHECK(n <= 1, "parallel order '", s.order, "' does not name ", t, ", whose size is ", n);
      tokens.emplace_back(t);
    }

  const int mp = s.tp * s.pp * s.cp;
  DSV3_CHECK(world % mp == 0, "impossible distributed layout: the world size ", world,
             " (ranks started by mpirun) is not divisible by --tensor-model-parallel-size ", s.tp,
             " × --pipeline-model-parallel-size ", s.pp, " × --context-parallel-size ", s.cp, " = ", mp,
             " (rule: world % (TP·PP·CP) == 0)");
  DSV3_CHECK(s.num_experts < 0 || s.num_experts % s.ep == 0,
             "impossible distributed layout: the number of experts ", s.num_experts,
             " is not divisible by --expert-model-parallel-size ", s.ep, " (rule: num_experts % EP == 0)");
  const int etp = s.etp < 0 ? s.tp : s.etp;
  DSV3_CHECK(etp >= 1, "--expert-tensor-parallel-size must be >= 1, got ", etp);
  const int emp = etp * s.ep * s.pp;
  DSV3_CHECK(world % emp == 0, "impossible distributed layout: the world size ", world,
             " is not divisible by --expert-tensor-parallel-size ", etp, " × --expert-model-parallel-size ",
             s.ep, " × --pipeline-model-parallel-size ", s.pp, " = ", emp,
             " (rule: world % (ETP·EP·PP) == 0)");

  ProcessGroups pg;
  pg.world = world, pg.rank = rank;
  pg.tp = s.tp, pg.cp = s.cp, pg.pp = s.pp, pg.dp = world / mp;
  pg.etp = etp, pg.ep = s.ep, pg.edp = world / emp;
  std::string order;
  for (const auto& t : tokens) order += (order.empty() ? "" : "-") + t;
  pg.order = order;

  const RankGrid dense = pg.dense_grid(), expert = pg.expert_grid();
  DSV3_CHECK(dense.groups("pp") == expert.groups("pp"), "impossible distributed layout: with order ", order,
             " the pipeline groups of the dense grid (tp ", pg.tp, ", cp ", pg.cp, ", dp ", pg.dp,
             ") and of the expert grid (etp ", pg.etp, ", ep ", pg.ep, ", edp ", pg.edp, ") differ");
  // Megatron-Core >= 0.10 asserts this too: with an order whose last dimension is not pp, the two grids' DP sizes
  // must agree (else their pipeline stages would interleave differently).
  DSV3_CHECK(order.size() >= 2 && (order.substr(order.size() - 2) == "pp" || pg.pp == 1 || pg.edp == pg.dp),
             "impossible distributed layout: with order ", order, " (pp not last) and pipeline size ", pg.pp,
             " the expert-data-parallel size ", pg.edp, " must equal the data-parallel size ", pg.dp);
  pg.tp_rank = dense.coord(rank, "tp"), pg.cp_rank = dense.coord(rank, "cp");
  pg.dp_rank = dense.coord(rank, "dp"), pg.pp_rank = dense.coord(rank, "pp");
  pg.etp_rank = expert.coord(rank, "tp"), pg.ep_rank = expert.coord(rank, "ep");
  pg.edp_rank = expert.coord(rank, "dp");
  return pg;
}

RankGrid ProcessGroups::dense_grid() const {
  std::vector<std::pair<std::string, int>> dims;
  for (const auto& t : split_dash(order)) {
    if (t == "tp") dims.emplace_back(t, tp);
    if (t == "cp") dims.emplace_back(t, cp);
    if (t == "dp") dims.emplace_back(t, dp);
    if (t == "pp") dims.emplace_back(t, pp);
  }
  return RankGrid(std::move(dims));
}

RankGrid ProcessGroups::expert_grid() const {
  std::vector<std::pair<std::string, int>> dims;
  for (const auto& t : split_dash(order)) {
    if (t == "tp") dims.emplace_back(t, etp);
    if (t == "cp") dims.emplace_back(t, 1);
    if (t == "ep") dims.emplace_back(t, ep);
    if (t == "dp") dims.emplace_back(t, edp);
    if (t == "pp") dims.emplace_back(t, pp);
  }
  return RankGrid(std::move(dims));
}

namespace {
// (expert grid?, token) of a group kind.
std::pair<bool, const char*> group_token(Group g) {
  switch (g) {
    case Group::kWorld:
      return {false, "tp-cp-dp-pp"};
    case Group::kTp:
      return {false, "tp"};
    case Group::kCp:
      return {false, "cp"};
    case Group::kDp:
      return {false, "dp"};
    case Group::kPp:
      return {false, "pp"};
    case Group::kDpCp:
      return {false, "dp-cp"};
    case Group::kTpCp:
      return {false, "tp-cp"};
    case Group::kTpPp:
      return {false, "tp-pp"};
    case Group::kTpDpCp:
      return {false, "tp-dp-cp"};
    case Group::kEtp:
      return {true, "tp"};
    case Group::kEp:
      return {true, "ep"};
    case Group::kEdp:
      return {true, "dp"};
    case Group::kEtpEp:
      return {true, "tp-ep"};
    case Group::kEtpEpPp:
      return {true, "tp-ep-pp"};
  }
  return {false, "tp-cp-dp-pp"};
}
}  // namespace

std::vector<std::vector<int>> ProcessGroups::all_groups(Group g) const {
  const auto [expert, token] = group_token(g);
  return (expert ? expert_grid() : dense_grid()).groups(token);
}

std::vector<int> ProcessGroups::members(Group g) const {
  const auto [expert, token] = group_token(g);
  return (expert ? expert_grid() : dense_grid()).group_of(rank, token);
}

std::string ProcessGroups::describe() const {
  std::ostringstream os;
  os << "world " << world << " (" << order << "): tp " << tp << ", cp " << cp << ", dp " << dp << ", pp "
     << pp << "; expert grid etp " << etp << ", ep " << ep << ", edp " << edp;
  return os.str();
}

}  // namespace dsv3
