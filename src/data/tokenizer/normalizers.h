// HF normalizers. Only the identity ones are implemented (null and an empty or all-identity Sequence);
// anything that would change the text (NFC, NFKC, Lowercase, Replace, ...) is rejected with an error naming
// it rather than approximated, since a near-miss would silently give different ids.
#pragma once
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>

namespace dsv3::tok {

class Normalizer {
 public:
  // Parses tokenizer.json's "normalizer" (may be null). Throws dsv3::Error naming an unsupported type.
  static Normalizer from_json(const nlohmann::json& j);
  // True when normalize() would return its input unchanged, so callers can skip the copy.
  bool is_identity() const { return true; }
  std::string normalize(std::string_view text) const { return std::string(text); }
};

}  // namespace dsv3::tok
