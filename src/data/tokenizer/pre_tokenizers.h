// HF pre-tokenizers for byte-level BPE: Sequence, Split (regex or literal, every delimiter behaviour,
// invert), Digits, and ByteLevel (which must come last: it only maps bytes to its alphabet, which BPE here
// folds into the vocabulary). Other types are rejected with an error naming them.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "data/tokenizer/onig_regex.h"

namespace dsv3::tok {

// HF SplitDelimiterBehavior.
enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

class PreTokenizer {
 public:
  // Parses tokenizer.json's "pre_tokenizer". Throws dsv3::Error for unsupported types and for chains without
  // a final ByteLevel step.
  static PreTokenizer from_json(const nlohmann::json& j);

  // Calls emit(word) for each pre-token of text in order. A word may point into text or into a per-thread
  // scratch buffer (after ByteLevel's add_prefix_space), so emit must not keep it. Thread-safe.
  void split(std::string_view text, const std::function<void(std::string_view)>& emit) const;

  bool add_prefix_space() const { return add_prefix_space_; }

 private:
  struct Step {
    std::shared_ptr<const OnigRegex> regex;
    SplitBehavior behavior = SplitBehavior::kIsolated;
    bool invert = false;
  };
  void parse(const nlohmann::json& j, bool last);

  std::vector<Step> steps_;  // Split and Digits steps, in order
  bool has_byte_level_ = false;
  bool add_prefix_space_ = false;
  std::shared_ptr<const OnigRegex> byte_level_regex_;  // null when ByteLevel's use_regex is false
};

}  // namespace dsv3::tok
