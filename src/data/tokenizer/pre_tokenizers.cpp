#include "data/tokenizer/pre_tokenizers.h"

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dsv3::tok {
namespace {

using Range = std::pair<size_t, size_t>;

// GPT-2's pattern, which ByteLevel uses when use_regex is true.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

SplitBehavior parse_behavior(const std::string& s) {
  if (s == "Removed") return SplitBehavior::kRemoved;
  if (s == "Isolated") return SplitBehavior::kIsolated;
  if (s == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (s == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (s == "Contiguous") return SplitBehavior::kContiguous;
  fail("tokenizer: unsupported Split behavior \"", s, "\"");
}

struct Match {
  size_t b, e;
  bool is_match;
};

// HF's Pattern::find_matches for a regex: the matches and the gaps between them, covering s.
void find_matches(const OnigRegex& re, std::string_view s, bool invert, std::vector<Match>& out) {
  thread_local std::vector<Range> found;
  out.clear();
  if (s.empty()) {
    out.push_back({0, 0, invert});
    return;
  }
  found.clear();
  re.find_all(s, found);
  size_t prev = 0;
  for (auto [b, e] : found) {
    if (prev != b) out.push_back({prev, b, invert});
    out.push_back({b, e, !invert});
    prev = e;
  }
  if (prev != s.size()) out.push_back({prev, s.size(), invert});
}

// HF's NormalizedString::split: turns matches into the kept pieces (offsets relative to the piece) and
// appends the non-empty ones, shifted by base, to out.
void apply_behavior(std::vector<Match>& m, SplitBehavior behavior, size_t base, std::vector<Range>& out) {
  auto emit = [&](size_t b, size_t e) {
    if (b != e) out.emplace_back(base + b, base + e);
  };
  switch (behavior) {
    case SplitBehavior::kIsolated:
      for (const auto& x : m) emit(x.b, x.e);
      return;
    case SplitBehavior::kRemoved:
      for (const auto& x : m)
        if (!x.is_match) emit(x.b, x.e);
      return;
    case SplitBehavior::kContiguous:
    case SplitBehavior::kMergedWithPrevious: {
      // Contiguous: a piece joins the previous one when both are matches or both are not.
      // MergedWithPrevious: a match joins the previous piece unless that was a match too.
      std::vector<Range> acc;
      bool previous_match = false;
      for (const auto& x : m) {
        bool join = behavior == SplitBehavior::kContiguous ? x.is_match == previous_match
                                                           : x.is_match && !previous_match;
        if (join && !acc.empty())
          acc.back().second = x.e;
        else
          acc.emplace_back(x.b, x.e);
        previous_match = x.is_match;
      }
      for (auto [b, e] : acc) emit(b, e);
      return;
    }
    case SplitBehavior::kMergedWithNext: {
      // Mirror image: walk backwards, a match joins the following piece unless that was a match too.
      std::vector<Range> acc;
      bool previous_match = false;
      for (auto it = m.rbegin(); it != m.rend(); ++it) {
        if (it->is_match && !previous_match && !acc.empty())
          acc.back().first = it->b;
        else
          acc.emplace_back(it->b, it->e);
        previous_match = it->is_match;
      }
      for (auto r = acc.rbegin(); r != acc.rend(); ++r) emit(r->first, r->second);
      return;
    }
  }
}

}  // namespace

PreTokenizer PreTokenizer::from_json(const nlohmann::json& j) {
  PreTokenizer p;
  DSV3_CHECK(!j.is_null(),
             "tokenizer: no pre_tokenizer; only byte-level BPE (a ByteLevel pre-tokenizer) is supported");
  p.parse(j, true);
  DSV3_CHECK(p.has_byte_level_,
             "tokenizer: pre_tokenizer has no ByteLevel step; only byte-level BPE tokenizers are supported");
  return p;
}

void PreTokenizer::parse(const nlohmann::json& j, bool last) {
  DSV3_CHECK(j.is_object() && j.contains("type"), "tokenizer: pre_tokenizer without a \"type\": ", j.dump());
  const std::string type = j.at("type").get<std::string>();
  // ByteLevel only remaps bytes, which we do inside BPE; a step after it would see the remapped text.
  DSV3_CHECK(!has_byte_level_, "tokenizer: unsupported pre_tokenizer \"", type,
             "\" after ByteLevel (ByteLevel must be the last pre-tokenizer)");
  if (type == "Sequence") {
    const auto& seq = j.at("pretokenizers");
    for (size_t i = 0; i < seq.size(); ++i) parse(seq[i], last && i + 1 == seq.size());
  } else if (type == "Split") {
    Step s;
    const auto& pat = j.at("pattern");
    if (pat.contains("Regex")) {
      s.regex = std::make_shared<OnigRegex>(pat.at("Regex").get<std::string>(), "Split pre-tokenizer");
    } else if (pat.contains("String")) {
      s.regex = std::make_shared<OnigRegex>(OnigRegex::escape(pat.at("String").get<std::string>()),
                                            "Split pre-tokenizer");
    } else {
      fail("tokenizer: Split pattern is neither Regex nor String: ", pat.dump());
    }
    s.behavior = parse_behavior(j.at("behavior").get<std::string>());
    s.invert = j.value("invert", false);
    steps_.push_back(std::move(s));
  } else if (type == "Digits") {
    // HF splits on char::is_numeric (general category N), each digit its own match.
    Step s;
    s.regex = std::make_shared<OnigRegex>(R"(\p{N})", "Digits pre-tokenizer");
    s.behavior = j.value("individual_digits", false) ? SplitBehavior::kIsolated : SplitBehavior::kContiguous;
    steps_.push_back(std::move(s));
  } else if (type == "ByteLevel") {
    DSV3_CHECK(last, "tokenizer: unsupported pre_tokenizer chain: ByteLevel must be the last pre-tokenizer");
    has_byte_level_ = true;
    add_prefix_space_ = j.value("add_prefix_space", true);
    if (j.value("use_regex", true))
      byte_level_regex_ = std::make_shared<OnigRegex>(kGpt2Pattern, "ByteLevel");
  } else {
    fail("tokenizer: unsupported pre_tokenizer type \"", type, "\"");
  }
}

void PreTokenizer::split(std::string_view text, const std::function<void(std::string_view)>& emit) const {
  thread_local std::vector<Range> cur, nxt;
  thread_local std::vector<Match> matches;
  cur.clear();
  if (!text.empty()) cur.emplace_back(0, text.size());
  for (const Step& step : steps_) {
    nxt.clear();
    for (auto [b, e] : cur) {
      find_matches(*step.regex, text.substr(b, e - b), step.invert, matches);
      apply_behavior(matches, step.behavior, b, nxt);
    }
    cur.swap(nxt);
  }
  // ByteLevel: optional leading space per piece, then optionally the GPT-2 regex (Isolated) inside the piece.
  thread_local std::string scratch;
  thread_local std::vector<Range> words;
  thread_local std::vector<Match> bl_matches;
  for (auto [b, e] : cur) {
    std::string_view piece = text.substr(b, e - b);
    if (add_prefix_space_ && piece.front() != ' ') {
      scratch.assign(1, ' ');
      scratch.append(piece);
      piece = scratch;
    }
    if (!byte_level_regex_) {
      emit(piece);
      continue;
    }
    words.clear();
    find_matches(*byte_level_regex_, piece, false, bl_matches);
    apply_behavior(bl_matches, SplitBehavior::kIsolated, 0, words);
    for (auto [wb, we] : words) emit(piece.substr(wb, we - wb));
  }
}

}  // namespace dsv3::tok
