// HF's AddedVocabulary: added tokens (special or not) are cut out of the raw text before normalization and
// pre-tokenization, leftmost-longest, honouring lstrip / rstrip / single_word. Tokens with normalized=false
// are matched in the raw text, the others, by their normalized content, in the normalized text.
#pragma once
#include <cstdint>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "data/tokenizer/bpe.h"
#include "data/tokenizer/normalizers.h"

namespace dsv3::tok {

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = true;
};

class AddedVocabulary {
 public:
  // Reads tokenizer.json's "added_tokens" in order and gives each its id as HF does: the model's id when the
  // content is in the vocab, else the next free id after the vocab (the file's "id" field is not trusted).
  // As HF's refresh_added_tokens, normalized=true tokens are matched by their content run through the
  // normalizer, special tokens taking precedence over others that normalize to the same text.
  static AddedVocabulary from_json(const nlohmann::json& added, const Bpe& model,
                                   const Normalizer& normalizer);

  struct Segment {
    size_t begin, end;
    int32_t id;  // the added token's id, or -1 for text that still has to be tokenized
  };
  // Splits text at the added tokens of one trie (normalized or not), as HF's split_with_indices: text
  // segments are non-empty and in order; token segments may include stripped whitespace.
  void split(std::string_view text, bool normalized_trie, std::vector<Segment>& out) const;
  bool has_tokens(bool normalized_trie) const { return !tries_[normalized_trie].nodes.empty(); }

  std::optional<int32_t> token_to_id(std::string_view content) const;
  const AddedToken* by_id(int32_t id) const;
  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  // Byte trie; leftmost-longest matching walks it from each position whose byte can start a token.
  struct Trie {
    struct Node {
      std::vector<std::pair<uint8_t, int32_t>> next;
      int32_t token = -1;  // index into tokens_ when a token ends here
    };
    std::vector<Node> nodes;
    bool first_byte[256] = {};
    void add(std::string_view s, int32_t token);
  };
  std::vector<AddedToken> tokens_;
  std::unordered_map<std::string, int32_t> by_content_;  // content -> index in tokens_
  std::unordered_map<int32_t, int32_t> by_id_;           // id -> index in tokens_
  Trie tries_[2];                                        // [0]: normalized=false, [1]: normalized=true
};

}  // namespace dsv3::tok
