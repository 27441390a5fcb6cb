#include "data/tokenizer/bpe.h"

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <shared_mutex>

#include "core/error.h"
#include "data/tokenizer/byte_level.h"

namespace dsv3::tok {

// Open-addressing map from an id pair to (rank, merged id): the inner loop of BPE, so no std::unordered_map.
struct Bpe::MergeTable {
  struct Slot {
    uint64_t key = ~0ull;
    int32_t rank = 0, id = 0;
  };
  std::vector<Slot> slots;
  uint64_t mask = 0;

  explicit MergeTable(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n + 16) cap <<= 1;
    slots.resize(cap);
    mask = cap - 1;
  }
  static uint64_t key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
  size_t home(uint64_t k) const { return (k * 0x9E3779B97F4A7C15ull) >> 20 & mask; }
  void put(int32_t a, int32_t b, int32_t rank,
           int32_t id) {  // a later duplicate overwrites, like HF's HashMap
    uint64_t k = key(a, b);
    for (size_t i = home(k);; i = (i + 1) & mask) {
      if (slots[i].key == k || slots[i].key == ~0ull) {
        slots[i] = {k, rank, id};
        return;
      }
    }
  }
  const Slot* get(int32_t a, int32_t b) const {
    uint64_t k = key(a, b);
    for (size_t i = home(k);; i = (i + 1) & mask) {
      if (slots[i].key == k) return &slots[i];
      if (slots[i].key == ~0ull) return nullptr;
    }
  }
};

// Word -> ids memo shared by all threads: 64 independently locked shards keep contention low. A full shard is
// cleared rather than tracked LRU; the cache only ever changes speed, never ids.
class WordCache {
 public:
  bool get(std::string_view word, std::vector<int32_t>& out) {
    Shard& s = shard(word);
    std::shared_lock lock(s.mu);
    auto it = s.map.find(word);
    if (it == s.map.end()) return false;
    out.insert(out.end(), it->second.begin(), it->second.end());
    return true;
  }
  void put(std::string_view word, const int32_t* ids, size_t n) {
    if (word.size() > kMaxWordBytes) return;
    Shard& s = shard(word);
    std::unique_lock lock(s.mu);
    if (s.map.size() >= kShardCapacity) s.map.clear();
    s.map.emplace(std::string(word), std::vector<int32_t>(ids, ids + n));
  }

 private:
  static constexpr size_t kShards = 64, kShardCapacity = 8192, kMaxWordBytes = 256;
  struct Shard {
    std::shared_mutex mu;
    std::unordered_map<std::string, std::vector<int32_t>, StringHash, std::equal_to<>> map;
  };
  Shard& shard(std::string_view w) { return shards_[StringHash{}(w)*0x9E3779B97F4A7C15ull >> 58]; }
  std::array<Shard, kShards> shards_;
};

Bpe::Bpe() = default;
Bpe::Bpe(Bpe&&) noexcept = default;
Bpe& Bpe::operator=(Bpe&&) noexcept = default;
Bpe::~Bpe() = default;

Bpe Bpe::from_json(const nlohmann::json& m) {
  DSV3_CHECK(m.is_object(), "tokenizer: \"model\" is missing or not an object");
  const std::string type = m.value("type", std::string("BPE"));
  DSV3_CHECK(type == "BPE", "tokenizer: unsupported model type \"", type,
             "\" (only byte-level BPE is implemented)");
  auto is_set = [&](const char* k) { return m.contains(k) && !m.at(k).is_null(); };
  DSV3_CHECK(!(is_set("byte_fallback") && m.at("byte_fallback").get<bool>()),
             "tokenizer: unsupported BPE option byte_fallback=true");
  DSV3_CHECK(!is_set("dropout") || m.at("dropout").get<double>() == 0.0,
             "tokenizer: unsupported BPE option dropout=", m.value("dropout", nlohmann::json()).dump());
  for (const char* k : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    DSV3_CHECK(!is_set(k) || m.at(k).get<std::string>().empty(), "tokenizer: unsupported BPE option ", k, "=",
               m.at(k).dump());
  }

  Bpe bpe;
  const auto& vocab = m.at("vocab");
  DSV3_CHECK(vocab.is_object(), "tokenizer: BPE vocab is not an object");
  bpe.vocab_.reserve(vocab.size());
  for (const auto& [tok, id] : vocab.items()) {
    // HF stores ids as u32; a float or out-of-range id must not reach get<int32_t> (an out-of-range float
    // to int conversion is undefined behaviour, and a fraction would be truncated silently).
    DSV3_CHECK(id.is_number_integer() && id.get<int64_t>() >= 0 && id.get<int64_t>() <= INT32_MAX,
               "tokenizer: BPE vocab entry \"", tok, "\" has id ", id.dump(), "; expected an integer in [0, ",
               INT32_MAX, "]");
    bpe.vocab_[tok] = id.get<int32_t>();
    bpe.id_to_token_[id.get<int32_t>()] = tok;
  }
  for (int b = 0; b < 256; ++b) {
    auto it = bpe.vocab_.find(bytes_to_byte_level(std::string(1, static_cast<char>(b))));
    bpe.byte_id_[b] = it == bpe.vocab_.end() ? -1 : it->second;
  }

  const auto& merges = m.at("merges");
  bpe.merges_ = std::make_unique<MergeTable>(merges.size());
  auto id_of = [&](const std::string& t, const std::string& merge) {
    auto it = bpe.vocab_.find(t);
    DSV3_CHECK(it != bpe.vocab_.end(), "tokenizer: merge \"", merge, "\" uses token \"", t,
               "\" which is not in the vocab");
    return it->second;
  };
  int32_t rank = 0;
  for (const auto& mj : merges) {
    std::string a, b;
    if (mj.is_string()) {  // old form "a b"
      const std::string s = mj.get<std::string>();
      size_t sp = s.find(' ');
      DSV3_CHECK(sp != std::string::npos && s.find(' ', sp + 1) == std::string::npos, "tokenizer: merge \"",
                 s, "\" is not two tokens separated by one space");
      a = s.substr(0, sp);
      b = s.substr(sp + 1);
    } else {  // new form ["a", "b"]
      DSV3_CHECK(mj.is_array() && mj.size() == 2, "tokenizer: merge ", mj.dump(), " is not a pair");
      a = mj[0].get<std::string>();
      b = mj[1].get<std::string>();
    }
    const std::string label = a + " " + b;
    bpe.merges_->put(id_of(a, label), id_of(b, label), rank++, id_of(a + b, label));
  }

  bpe.ignore_merges_ = m.value("ignore_merges", false);
  if (bpe.ignore_merges_) {
    for (const auto& [tok, id] : bpe.vocab_) {
      if (auto bytes = byte_level_to_bytes(tok)) bpe.byte_vocab_.emplace(*bytes, id);
    }
  }
  if (is_set("unk_token")) {
    const std::string unk = m.at("unk_token").get<std::string>();
    auto it = bpe.vocab_.find(unk);
    DSV3_CHECK(it != bpe.vocab_.end(), "tokenizer: BPE unk_token \"", unk, "\" is not in the vocab");
    bpe.unk_id_ = it->second;
  }
  bpe.fuse_unk_ = m.value("fuse_unk", false);
  bpe.cache_ = std::make_unique<WordCache>();
  return bpe;
}

std::optional<int32_t> Bpe::token_to_id(std::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* Bpe::id_to_token(int32_t id) const {
  auto it = id_to_token_.find(id);
  return it == id_to_token_.end() ? nullptr : &it->second;
}

void Bpe::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_) {
    auto it = byte_vocab_.find(word);
    if (it != byte_vocab_.end()) {
      out.push_back(it->second);
      return;
    }
  }
  if (word.size() == 1 && byte_id_[static_cast<uint8_t>(word[0])] >= 0) {
    out.push_back(byte_id_[static_cast<uint8_t>(word[0])]);
    return;
  }
  if (cache_->get(word, out)) return;
  size_t start = out.size();
  merge_word(word, out);
  cache_->put(word, out.data() + start, out.size() - start);
}

void Bpe::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  // Initial symbols: one per byte (= one per ByteLevel character). A byte without a vocab entry becomes unk,
  // or vanishes when there is no unk token, as in HF's merge_word.
  thread_local std::vector<int32_t> sym;
  sym.clear();
  for (unsigned char c : word) {
    int32_t id = byte_id_[c];
    if (id >= 0) {
      sym.push_back(id);
    } else if (unk_id_) {
      // fuse_unk joins consecutive unknowns into one unk symbol (which no merge can touch).
      if (!(fuse_unk_ && !sym.empty() && sym.back() == *unk_id_)) sym.push_back(*unk_id_);
    }
  }
  constexpr int32_t kNone = INT32_MAX;
  const size_t n = sym.size();
  if (n <= 128) {
    // Short words: keep each adjacent pair's rank and repeatedly merge the leftmost lowest one. This picks
    // the same merge as HF's heap (lowest rank, then lowest position) without its allocations.
    thread_local std::vector<int32_t> rank;
    rank.resize(n);
    auto pair_rank = [&](size_t i) {
      const MergeTable::Slot* s = merges_->get(sym[i], sym[i + 1]);
      return s ? s->rank : kNone;
    };
    size_t m = n;
    for (size_t i = 0; i + 1 < m; ++i) rank[i] = pair_rank(i);
    while (m > 1) {
      size_t best = 0;
      for (size_t i = 1; i + 1 < m; ++i)
        if (rank[i] < rank[best]) best = i;
      if (rank[best] == kNone) break;
      sym[best] = merges_->get(sym[best], sym[best + 1])->id;
      sym.erase(sym.begin() + best + 1);
      rank.erase(rank.begin() + best + 1);
      --m;
      if (best + 1 < m) rank[best] = pair_rank(best);
      if (best > 0) rank[best - 1] = pair_rank(best - 1);
    }
    out.insert(out.end(), sym.begin(), sym.begin() + m);
    return;
  }
  // Long words: HF's algorithm proper, a min-heap of (rank, position) over a linked list of symbols with
  // stale entries skipped on pop.
  std::vector<int32_t> prev(n), next(n);
  std::vector<bool> alive(n, true);
  for (size_t i = 0; i < n; ++i) {
    prev[i] = static_cast<int32_t>(i) - 1;
    next[i] = i + 1 < n ? static_cast<int32_t>(i + 1) : -1;
  }
  struct Cand {
    int32_t rank, pos, id;
    bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap;
  auto push = [&](int32_t i) {
    if (i < 0 || next[i] < 0) return;
    if (const auto* s = merges_->get(sym[i], sym[next[i]])) heap.push({s->rank, i, s->id});
  };
  for (size_t i = 0; i + 1 < n; ++i) push(static_cast<int32_t>(i));
  while (!heap.empty()) {
    Cand c = heap.top();
    heap.pop();
    if (!alive[c.pos] || next[c.pos] < 0) continue;
    const auto* s = merges_->get(sym[c.pos], sym[next[c.pos]]);
    if (!s || s->id != c.id) continue;
    int32_t r = next[c.pos];
    sym[c.pos] = c.id;
    alive[r] = false;
    next[c.pos] = next[r];
    if (next[r] >= 0) prev[next[r]] = c.pos;
    push(prev[c.pos]);
    push(c.pos);
  }
  for (int32_t i = 0; i >= 0; i = next[i]) out.push_back(sym[i]);
}

}  // namespace dsv3::tok
