#include "data/tokenizer/normalizers.h"

#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/uniset.h>
#include <unicode/unistr.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/tokenizer/byte_level.h"
#include "data/tokenizer/onig_regex.h"

namespace dsv3::tok {
namespace {

// ICU's NFC/NFD/NFKC/NFKD restricted to the characters of Unicode 9.0, the version of the tables in the
// unicode-normalization-alignments crate that HF uses: later characters are left alone (as that crate
// leaves characters it does not know) and split the text for reordering and composition.
class Unicode9Normalizers {
 public:
  static const icu::Normalizer2& get(int form) {
    static const Unicode9Normalizers n;
    return *n.nf_[form];
  }

 private:
  Unicode9Normalizers() {
    UErrorCode e = U_ZERO_ERROR;
    set_.applyPattern(icu::UnicodeString::fromUTF8("[:age=9.0:]"), e);
    DSV3_CHECK(U_SUCCESS(e), "tokenizer: ICU cannot build the Unicode 9.0 set: ", u_errorName(e));
    set_.freeze();
    const icu::Normalizer2* base[4] = {
        icu::Normalizer2::getNFCInstance(e), icu::Normalizer2::getNFDInstance(e),
        icu::Normalizer2::getNFKCInstance(e), icu::Normalizer2::getNFKDInstance(e)};
    DSV3_CHECK(U_SUCCESS(e), "tokenizer: ICU normalizer data unavailable: ", u_errorName(e));
    for (int i = 0; i < 4; ++i) nf_[i] = std::make_unique<icu::FilteredNormalizer2>(*base[i], set_);
  }
  icu::UnicodeSet set_;
  std::unique_ptr<icu::FilteredNormalizer2> nf_[4];
};

void unicode_normalize(int form, std::string_view s, std::string& out) {
  out.clear();
  UErrorCode e = U_ZERO_ERROR;
  icu::StringByteSink<std::string> sink(&out, static_cast<int32_t>(s.size()));
  Unicode9Normalizers::get(form).normalizeUTF8(0, icu::StringPiece(s.data(), static_cast<int32_t>(s.size())),
                                               sink, nullptr, e);
  DSV3_CHECK(U_SUCCESS(e), "tokenizer: ICU normalization failed: ", u_errorName(e));
}

// Lowercase pairs added in Unicode 16.0 and 17.0, which Rust's char::to_lowercase has and ICU 72 (Unicode
// 15.0) lacks; used only where ICU maps the character to itself.
char32_t newer_lowercase(char32_t c) {
  if (c >= 0x10D50 && c <= 0x10D65) return c + 0x20;  // Garay
  if (c >= 0x16EA0 && c <= 0x16EB8) return c + 0x1B;  // Beria Erfe
  switch (c) {
    case 0x1C89:
      return 0x1C8A;
    case 0xA7CB:
      return 0x0264;
    case 0xA7CC:
      return 0xA7CD;
    case 0xA7CE:
      return 0xA7CF;
    case 0xA7D2:
      return 0xA7D3;
    case 0xA7D4:
      return 0xA7D5;
    case 0xA7DA:
      return 0xA7DB;
    case 0xA7DC:
      return 0x019B;
    default:
      return c;
  }
}

// HF NormalizedString::lowercase: each char through Rust's char::to_lowercase, i.e. the full lowercase
// mapping without context or locale. The only full mapping that is not a single code point is U+0130
// ('İ' -> "i̇"); Final_Sigma is a context rule, so 'Σ' is always 'σ'.
void lowercase(std::string_view s, std::string& out) {
  out.clear();
  out.reserve(s.size() + 8);
  for (size_t i = 0; i < s.size();) {
    const auto b = static_cast<uint8_t>(s[i]);
    if (b < 0x80) {
      out.push_back(static_cast<char>(b >= 'A' && b <= 'Z' ? b + 32 : b));
      ++i;
      continue;
    }
    const size_t start = i;
    const char32_t c = next_utf8(s, i);
    if (c == 0x130) {
      out += "i\xCC\x87";
      continue;
    }
    char32_t l = static_cast<char32_t>(u_tolower(static_cast<UChar32>(c)));
    if (l == c) l = newer_lowercase(c);
    if (l == c)
      out.append(s.substr(start, i - start));
    else
      append_utf8(out, l);
  }
}

// HF Strip: lstrip/rstrip of Rust char::is_whitespace characters.
void strip(std::string_view s, bool left, bool right, std::string& out) {
  size_t begin = 0, end = s.size();
  if (left) {
    while (begin < s.size()) {
      size_t q = begin;
      if (!is_whitespace(next_utf8(s, q))) break;
      begin = q;
    }
  }
  if (right) {
    end = begin;
    for (size_t i = begin; i < s.size();)
      if (!is_whitespace(next_utf8(s, i))) end = i;
  }
  out.assign(s.substr(begin, end - begin));
}

// HF NormalizedString::replace with its SysRegex (String patterns are regex-escaped first): every match of
// find_iter, empty ones included, becomes content; an empty text is left alone.
void replace(const OnigRegex& re, const std::string& content, std::string_view s, std::string& out) {
  out.clear();
  if (s.empty()) return;
  thread_local std::vector<std::pair<size_t, size_t>> m;
  m.clear();
  re.find_all(s, m);
  size_t last = 0;
  for (const auto& [b, e] : m) {
    out.append(s.substr(last, b - last));
    out += content;
    last = e;
  }
  out.append(s.substr(last));
}

}  // namespace

void Normalizer::parse(const nlohmann::json& j) {
  if (j.is_null()) return;
  DSV3_CHECK(j.is_object() && j.contains("type"), "tokenizer: normalizer without a \"type\": ", j.dump());
  const std::string type = j.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const auto& n : j.at("normalizers")) parse(n);
  } else if (type == "NFC") {
    steps_.emplace_back(Kind::kNfc);
  } else if (type == "NFD") {
    steps_.emplace_back(Kind::kNfd);
  } else if (type == "NFKC") {
    steps_.emplace_back(Kind::kNfkc);
  } else if (type == "NFKD") {
    steps_.emplace_back(Kind::kNfkd);
  } else if (type == "Lowercase") {
    steps_.emplace_back(Kind::kLowercase);
  } else if (type == "Strip") {
    Step s(Kind::kStrip);
    s.left = j.at("strip_left").get<bool>();
    s.right = j.at("strip_right").get<bool>();
    if (s.left || s.right) steps_.push_back(std::move(s));
  } else if (type == "Replace") {
    Step s(Kind::kReplace);
    const auto& pat = j.at("pattern");
    if (pat.contains("String"))
      s.pattern = std::make_shared<OnigRegex>(OnigRegex::escape(pat.at("String").get<std::string>()),
                                              "Replace normalizer");
    else if (pat.contains("Regex"))
      s.pattern = std::make_shared<OnigRegex>(pat.at("Regex").get<std::string>(), "Replace normalizer");
    else
      fail("tokenizer: Replace normalizer pattern is neither String nor Regex: ", pat.dump());
    s.content = j.at("content").get<std::string>();
    steps_.push_back(std::move(s));
  } else if (type == "Prepend") {
    Step s(Kind::kPrepend);
    s.content = j.at("prepend").get<std::string>();
    if (!s.content.empty()) steps_.push_back(std::move(s));
  } else {
    fail("tokenizer: unsupported normalizer type \"", type, "\"");
  }
}

Normalizer Normalizer::from_json(const nlohmann::json& j) {
  Normalizer n;
  n.parse(j);
  return n;
}

void Normalizer::normalize(std::string_view text, std::string& out) const {
  out.assign(text);
  thread_local std::string tmp;
  for (const Step& s : steps_) {
    switch (s.kind) {
      case Kind::kNfc:
        unicode_normalize(0, out, tmp);
        break;
      case Kind::kNfd:
        unicode_normalize(1, out, tmp);
        break;
      case Kind::kNfkc:
        unicode_normalize(2, out, tmp);
        break;
      case Kind::kNfkd:
        unicode_normalize(3, out, tmp);
        break;
      case Kind::kLowercase:
        lowercase(out, tmp);
        break;
      case Kind::kStrip:
        strip(out, s.left, s.right, tmp);
        break;
      case Kind::kReplace:
        replace(*s.pattern, s.content, out, tmp);
        break;
      case Kind::kPrepend:
        if (out.empty()) continue;
        tmp = s.content;
        tmp += out;
        break;
    }
    out.swap(tmp);
  }
}

}  // namespace dsv3::tok
