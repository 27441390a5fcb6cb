// HF's BPE model for byte-level tokenizers. Words arrive as raw bytes (the ByteLevel alphabet is folded into
// the vocabulary at load), merges are looked up by id pair, and finished words are memoised in a sharded
// cache so the common words of a corpus cost one hash lookup.
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace dsv3::tok {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using StringMap = std::unordered_map<std::string, int32_t, StringHash, std::equal_to<>>;

class WordCache;

class Bpe {
 public:
  // Parses tokenizer.json's "model". Throws dsv3::Error naming anything this implementation does not do
  // (another model type, byte_fallback, dropout, subword prefixes/suffixes, merges naming unknown tokens).
  static Bpe from_json(const nlohmann::json& model);
  Bpe(Bpe&&) noexcept;
  Bpe& operator=(Bpe&&) noexcept;
  ~Bpe();

  // Appends the ids of one pre-token given as the bytes it stands for. Thread-safe.
  void tokenize(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> token_to_id(std::string_view token) const;
  const std::string* id_to_token(int32_t id) const;
  const StringMap& vocab() const { return vocab_; }

 private:
  Bpe();
  struct MergeTable;
  void merge_word(std::string_view word, std::vector<int32_t>& out) const;

  StringMap vocab_;  // token as written in tokenizer.json -> id
  std::unordered_map<int32_t, std::string> id_to_token_;
  std::array<int32_t, 256> byte_id_{};  // id of each single byte's token, -1 if absent
  std::unique_ptr<MergeTable> merges_;
  StringMap byte_vocab_;  // byte form -> id; only built for ignore_merges
  bool ignore_merges_ = false;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false;
  std::unique_ptr<WordCache> cache_;
};

}  // namespace dsv3::tok
