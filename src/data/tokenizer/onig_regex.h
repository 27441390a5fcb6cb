// Oniguruma regex compiled the way HF tokenizers' SysRegex (the `onig` crate) compiles it, and the crate's
// find_iter semantics, which decide where Split and ByteLevel cut the text.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dsv3::tok {

class OnigRegex {
 public:
  // Throws dsv3::Error naming `what` and the pattern when Oniguruma rejects it.
  OnigRegex(std::string_view pattern, std::string_view what);
  ~OnigRegex();
  OnigRegex(const OnigRegex&) = delete;
  OnigRegex& operator=(const OnigRegex&) = delete;

  // Appends the byte ranges of successive matches in s, exactly as `onig::Regex::find_iter` yields them
  // (empty matches included, an empty match right after the previous match skipped). Thread-safe.
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;

  // Escapes a literal for the pattern syntax, as `regex::escape` does for Split's String patterns.
  static std::string escape(std::string_view literal);

 private:
  void* re_;  // regex_t*
};

}  // namespace dsv3::tok
