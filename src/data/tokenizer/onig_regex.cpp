#include "data/tokenizer/onig_regex.h"

#include <oniguruma.h>

#include <mutex>

#include "core/error.h"

namespace dsv3::tok {
namespace {

void init_once() {
  static std::once_flag flag;
  std::call_once(flag, [] {
    OnigEncoding enc[] = {ONIG_ENCODING_UTF8};
    onig_initialize(enc, 1);
  });
}

// One match region per thread, reused across searches so a search allocates nothing.
OnigRegion* thread_region() {
  struct Holder {
    OnigRegion* r = onig_region_new();
    ~Holder() { onig_region_free(r, 1); }
  };
  thread_local Holder h;
  return h.r;
}

}  // namespace

OnigRegex::OnigRegex(std::string_view pattern, std::string_view what) {
  init_once();
  regex_t* re = nullptr;
  OnigErrorInfo einfo;
  auto* p = reinterpret_cast<const OnigUChar*>(pattern.data());
  // The onig crate's Regex::new: ONIG_OPTION_NONE, UTF-8, the library's default syntax.
  int rc =
      onig_new(&re, p, p + pattern.size(), ONIG_OPTION_NONE, ONIG_ENCODING_UTF8, ONIG_SYNTAX_DEFAULT, &einfo);
  if (rc != ONIG_NORMAL) {
    OnigUChar msg[ONIG_MAX_ERROR_MESSAGE_LEN];
    onig_error_code_to_str(msg, rc, &einfo);
    fail("tokenizer: ", what, ": cannot compile regex '", pattern, "': ", reinterpret_cast<char*>(msg));
  }
  re_ = re;
}

OnigRegex::~OnigRegex() {
  onig_free(static_cast<regex_t*>(re_));
}

void OnigRegex::find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const {
  auto* re = static_cast<regex_t*>(re_);
  OnigRegion* region = thread_region();
  auto* str = reinterpret_cast<const OnigUChar*>(s.data());
  const OnigUChar* end = str + s.size();
  size_t last_end = 0;
  bool have_last = false;
  size_t last_match_end = 0;
  while (last_end <= s.size()) {
    onig_region_clear(region);
    int r = onig_search(re, str, end, str + last_end, end, region, ONIG_OPTION_NONE);
    if (r < 0) {
      if (r == ONIG_MISMATCH) break;
      fail("tokenizer: Oniguruma search failed with code ", r);
    }
    size_t b = static_cast<size_t>(region->beg[0]), e = static_cast<size_t>(region->end[0]);
    if (b == e && have_last && last_match_end == e) {
      // An empty match touching the previous match: step one character and search again (onig crate).
      if (last_end >= s.size()) break;
      unsigned char c = static_cast<unsigned char>(s[last_end]);
      last_end += c < 0x80 ? 1 : c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
      continue;
    }
    last_end = e;
    last_match_end = e;
    have_last = true;
    out.emplace_back(b, e);
  }
}

std::string OnigRegex::escape(std::string_view literal) {
  std::string out;
  for (char c : literal) {
    if (std::string_view("\\.+*?()|[]{}^$#&-~").find(c) != std::string_view::npos) out.push_back('\\');
    out.push_back(c);
  }
  return out;
}

}  // namespace dsv3::tok
