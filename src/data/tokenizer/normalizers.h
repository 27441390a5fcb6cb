// HF normalizers: NFC, NFD, NFKC, NFKD, Lowercase, Strip, Replace (String or Regex pattern), Prepend and
// Sequence of these, giving exactly the normalized text of HF tokenizers. Other types (BertNormalizer,
// StripAccents, Nmt, Precompiled, ByteLevel, ...) are rejected with an error naming them rather than
// approximated, since a near-miss would silently give different ids.
//
// HF keeps an alignment map from normalized to original text; it only feeds offsets, which this tokenizer
// does not expose (ids depend on the normalized text alone), so no map is kept.
//
// Unicode versions, as HF tokenizers (0.22/0.23) has them: its NFx come from the unicode-normalization-
// alignments crate, whose tables are Unicode 9.0 (later characters pass through unchanged and block
// reordering/composition), which we get with ICU's normalizers filtered to [:age=9.0:]. Its Lowercase is
// Rust's per-char `char::to_lowercase` (no Final_Sigma context, no locale: 'Σ' -> 'σ' always, 'İ' -> "i̇"),
// from the Rust standard library's Unicode tables (17.0 as built); ICU gives the same mapping per code point
// for the Unicode version it knows, and the lowercase pairs added after ICU 72's Unicode 15.0 are built in.
#pragma once
#include <memory>
#include <nlohmann/json_fwd.hpp>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3::tok {

class OnigRegex;

class Normalizer {
 public:
  // Parses tokenizer.json's "normalizer" (may be null). Throws dsv3::Error naming an unsupported type.
  static Normalizer from_json(const nlohmann::json& j);
  // True when normalize() would return its input unchanged (null, or a Sequence with no steps), so callers
  // can skip it.
  bool is_identity() const { return steps_.empty(); }
  // Sets out to the normalized text (valid UTF-8 in, valid UTF-8 out). Thread-safe.
  void normalize(std::string_view text, std::string& out) const;
  std::string normalize(std::string_view text) const {
    std::string out;
    normalize(text, out);
    return out;
  }

 private:
  enum class Kind { kNfc, kNfd, kNfkc, kNfkd, kLowercase, kStrip, kReplace, kPrepend };
  struct Step {
    explicit Step(Kind k) : kind(k) {}
    Kind kind;
    bool left = false, right = false;          // Strip
    std::shared_ptr<const OnigRegex> pattern;  // Replace
    std::string content;                       // Replace: replacement; Prepend: prefix
  };
  void parse(const nlohmann::json& j);
  std::vector<Step> steps_;
};

}  // namespace dsv3::tok
