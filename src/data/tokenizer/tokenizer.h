// A HuggingFace byte-level BPE tokenizer loaded from tokenizer.json (+ tokenizer_config.json), giving exactly
// the ids of HF `tokenizers` and `transformers.AutoTokenizer`. Features it does not implement are rejected at
// load with a dsv3::Error naming them, never approximated. See docs/tokenizer.md.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3 {

class Tokenizer {
 public:
  // Loads DIR/tokenizer.json, or DIR/tokenizer.json.gz where there is no plain one (the repository ships the
  // 7.8 MB DeepSeek-V3 file compressed), and (optional) DIR/tokenizer_config.json. Throws dsv3::Error naming
  // any unsupported feature.
  static Tokenizer from_directory(const std::filesystem::path& dir);
  // The same from the two files' contents (config_json empty when there is no tokenizer_config.json).
  static Tokenizer from_json_strings(std::string_view tokenizer_json, std::string_view config_json);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // HF tokenizers' Tokenizer.encode(text, add_special_tokens=False).ids; added tokens are still matched.
  // Throws dsv3::Error on invalid UTF-8. Safe to call concurrently on one Tokenizer.
  std::vector<int32_t> encode(std::string_view text) const;
  void encode_append(std::string_view text, std::vector<int32_t>& out) const;  // appends to out
  // transformers AutoTokenizer(text).input_ids: BOS prepended if add_bos_token, EOS appended if
  // add_eos_token.
  std::vector<int32_t> encode_for_model(std::string_view text) const;
  // HF tokenizers' decode: unknown ids are dropped; invalid UTF-8 becomes U+FFFD.
  std::string decode(std::span<const int32_t> ids, bool skip_special_tokens = false) const;

  // len(hf_tokenizer): model vocab + added tokens not in the vocab.
  int64_t size() const;
  std::optional<int32_t> bos_id() const;  // from tokenizer_config bos_token (string or AddedToken dict)
  std::optional<int32_t> eos_id() const;
  bool add_bos() const;
  bool add_eos() const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  // The token as tokenizer.json writes it (byte-level alphabet for model tokens); empty for an unknown id.
  std::string id_to_token(int32_t id) const;

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  static Tokenizer build(const nlohmann::json& tokenizer, const nlohmann::json& config);
  std::unique_ptr<Impl> impl_;
};

}  // namespace dsv3
