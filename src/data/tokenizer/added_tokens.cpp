#include "data/tokenizer/added_tokens.h"

#include <algorithm>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/tokenizer/byte_level.h"
#include "data/tokenizer/onig_regex.h"

namespace dsv3::tok {
namespace {

// The regex crate's Unicode \w, which HF uses to decide whether a single_word token touches a word.
bool is_word_char(std::string_view ch) {
  static const OnigRegex re(R"(\A[\p{Alphabetic}\p{M}\p{Nd}\p{Pc}\p{Join_Control}]\z)", "single_word check");
  thread_local std::vector<std::pair<size_t, size_t>> m;
  m.clear();
  re.find_all(ch, m);
  return !m.empty();
}

size_t prev_char_start(std::string_view s, size_t i) {
  do --i;
  while (i > 0 && (static_cast<uint8_t>(s[i]) & 0xC0) == 0x80);
  return i;
}

}  // namespace

void AddedVocabulary::Trie::add(std::string_view s, int32_t token) {
  if (nodes.empty()) nodes.emplace_back();
  int32_t n = 0;
  for (unsigned char c : s) {
    auto& nx = nodes[n].next;
    auto it = std::find_if(nx.begin(), nx.end(), [&](const auto& p) { return p.first == c; });
    if (it != nx.end()) {
      n = it->second;
    } else {
      int32_t child = static_cast<int32_t>(nodes.size());
      nodes[n].next.emplace_back(c, child);
      nodes.emplace_back();
      n = child;
    }
  }
  if (nodes[n].token < 0) nodes[n].token = token;  // the first pattern wins among equal ones
  first_byte[static_cast<uint8_t>(s[0])] = true;
}

AddedVocabulary AddedVocabulary::from_json(const nlohmann::json& added, const Bpe& model,
                                           const Normalizer& normalizer) {
  AddedVocabulary v;
  if (added.is_null()) return v;
  DSV3_CHECK(added.is_array(), "tokenizer: \"added_tokens\" is not an array");
  int32_t model_size = static_cast<int32_t>(model.vocab().size());
  std::optional<int32_t> max_id;
  for (const auto& j : added) {
    AddedToken t;
    t.content = j.at("content").get<std::string>();
    t.special = j.value("special", false);
    t.lstrip = j.value("lstrip", false);
    t.rstrip = j.value("rstrip", false);
    t.single_word = j.value("single_word", false);
    t.normalized = j.value("normalized", !t.special);
    // HF skips empty tokens and ones already added (AddedToken equality is by content).
    if (t.content.empty() || v.by_content_.count(t.content)) continue;
    if (auto id = model.token_to_id(t.content)) {
      t.id = *id;
    } else {
      // AddedVocabulary::add_tokens: one past the largest id handed out so far once that reaches the vocab.
      DSV3_CHECK(!max_id || *max_id < INT32_MAX, "tokenizer: no id left for added token \"", t.content,
                 "\" (the largest id in use is ", *max_id, ")");
      t.id = !max_id ? model_size : (*max_id >= model_size || model_size == 0) ? *max_id + 1 : model_size;
    }
    max_id = max_id ? std::max(*max_id, t.id) : t.id;
    int32_t idx = static_cast<int32_t>(v.tokens_.size());
    v.by_content_[t.content] = idx;
    v.by_id_[t.id] = idx;
    v.tokens_.push_back(std::move(t));
  }
  // HF builds its tries from the special tokens, then all tokens, in order; the first of equal patterns wins.
  for (bool special : {true, false}) {
    for (int32_t idx = 0; idx < static_cast<int32_t>(v.tokens_.size()); ++idx) {
      const AddedToken& t = v.tokens_[idx];
      if (t.special != special) continue;
      if (!t.normalized || normalizer.is_identity()) {
        v.tries_[t.normalized].add(t.content, idx);
        continue;
      }
      const std::string content = normalizer.normalize(t.content);
      DSV3_CHECK(!content.empty(), "tokenizer: unsupported added token \"", t.content,
                 "\" whose normalized content is empty");
      v.tries_[1].add(content, idx);
    }
  }
  return v;
}

std::optional<int32_t> AddedVocabulary::token_to_id(std::string_view content) const {
  auto it = by_content_.find(std::string(content));
  if (it == by_content_.end()) return std::nullopt;
  return tokens_[it->second].id;
}

const AddedToken* AddedVocabulary::by_id(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

void AddedVocabulary::split(std::string_view s, bool normalized_trie, std::vector<Segment>& out) const {
  const Trie& trie = tries_[normalized_trie];
  size_t start_offset = 0;
  if (!trie.nodes.empty()) {
    for (size_t i = 0; i < s.size();) {
      if (!trie.first_byte[static_cast<uint8_t>(s[i])]) {
        ++i;
        continue;
      }
      // Longest token starting at i.
      int32_t n = 0, tok = -1;
      size_t len = 0;
      for (size_t k = i; k < s.size(); ++k) {
        const auto& nx = trie.nodes[n].next;
        uint8_t c = static_cast<uint8_t>(s[k]);
        auto it = std::find_if(nx.begin(), nx.end(), [&](const auto& p) { return p.first == c; });
        if (it == nx.end()) break;
        n = it->second;
        if (trie.nodes[n].token >= 0) tok = trie.nodes[n].token, len = k + 1 - i;
      }
      if (tok < 0) {
        ++i;
        continue;
      }
      const AddedToken& t = tokens_[tok];
      size_t start = i, stop = i + len;
      i = stop;  // the matcher resumes after the raw match, whatever stripping does below
      if (t.single_word) {
        bool start_space = start == 0 || !is_word_char(s.substr(prev_char_start(s, start)));
        size_t j = stop;
        bool stop_space = stop == s.size() || (next_utf8(s, j), !is_word_char(s.substr(stop, j - stop)));
        if (!start_space || !stop_space) continue;
      }
      if (t.lstrip) {
        size_t newstart = start;
        while (newstart > 0) {
          size_t p = prev_char_start(s, newstart), q = p;
          if (!is_whitespace(next_utf8(s, q))) break;
          newstart = p;
        }
        start = std::max(newstart, start_offset);
      }
      if (t.rstrip) {
        while (stop < s.size()) {
          size_t q = stop;
          if (!is_whitespace(next_utf8(s, q))) break;
          stop = q;
        }
      }
      if (start_offset < start) out.push_back({start_offset, start, -1});
      out.push_back({start, stop, t.id});
      start_offset = stop;
    }
  }
  if (start_offset < s.size()) out.push_back({start_offset, s.size(), -1});
}

}  // namespace dsv3::tok
