// Buffered line reader over plain and gzip files.
#include "data/line_reader.h"

#include <glob.h>
#include <zlib.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "core/error.h"

namespace dsv3 {

std::vector<std::string> expand_input(const std::string& pattern) {
  std::vector<std::string> out;
  if (std::filesystem::exists(pattern)) {
    DSV3_CHECK(!std::filesystem::is_directory(pattern), "--input ", pattern, " is a directory, not a file");
    return {pattern};
  }
  glob_t g{};
  int rc = ::glob(pattern.c_str(), 0, nullptr, &g);
  if (rc == 0)
    for (size_t i = 0; i < g.gl_pathc; ++i)
      if (!std::filesystem::is_directory(g.gl_pathv[i])) out.emplace_back(g.gl_pathv[i]);
  ::globfree(&g);
  DSV3_CHECK(!out.empty(), "--input ", pattern, ": no such file (and no file matches it as a glob pattern)");
  std::sort(out.begin(), out.end());
  return out;
}

struct LineReader::Source {
  std::FILE* plain = nullptr;
  gzFile gz = nullptr;
  ~Source() {
    if (plain) std::fclose(plain);
    if (gz) gzclose(gz);
  }
};

LineReader::LineReader(std::vector<std::string> files) : files_(std::move(files)) {
  DSV3_CHECK(!files_.empty(), "no input files");
}

LineReader::~LineReader() = default;

bool LineReader::open_next() {
  if (opened_) {
    if (file_i_ + 1 >= files_.size()) return false;
    ++file_i_;
  }
  opened_ = true;
  line_no_ = 0;
  src_ = std::make_unique<Source>();
  const std::string& path = files_[file_i_];
  const bool is_gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
  if (is_gz) {
    src_->gz = gzopen(path.c_str(), "rb");
    if (!src_->gz) fail("cannot open ", path, ": ", std::strerror(errno));
    gzbuffer(src_->gz, 1 << 18);
  } else {
    src_->plain = std::fopen(path.c_str(), "rb");
    if (!src_->plain) fail("cannot open ", path, ": ", std::strerror(errno));
  }
  buf_.clear();
  pos_ = 0;
  return true;
}

// Appends one block of the current file to the buffer; false at its end.
bool LineReader::fill() {
  constexpr size_t kBlock = 1 << 20;
  if (pos_ > 0) {
    buf_.erase(0, pos_);
    pos_ = 0;
  }
  const size_t old = buf_.size();
  buf_.resize(old + kBlock);
  long n;
  if (src_->gz) {
    n = gzread(src_->gz, buf_.data() + old, kBlock);
    if (n < 0) {
      int err;
      const char* msg = gzerror(src_->gz, &err);
      fail("cannot read ", files_[file_i_], ": ", msg);
    }
  } else {
    n = static_cast<long>(std::fread(buf_.data() + old, 1, kBlock, src_->plain));
    if (n == 0 && std::ferror(src_->plain)) fail("cannot read ", files_[file_i_], ": ", std::strerror(errno));
  }
  buf_.resize(old + n);
  return n > 0;
}

bool LineReader::next(std::string& line) {
  if (!opened_ && !open_next()) return false;
  for (;;) {
    const char* start = buf_.data() + pos_;
    const void* nl = std::memchr(start, '\n', buf_.size() - pos_);
    if (nl) {
      const size_t len = static_cast<const char*>(nl) - start + 1;
      line.assign(start, len);
      pos_ += len;
      ++line_no_;
      return true;
    }
    if (fill()) continue;
    if (pos_ < buf_.size()) {  // last line without a newline
      line.assign(buf_.data() + pos_, buf_.size() - pos_);
      pos_ = buf_.size();
      ++line_no_;
      return true;
    }
    if (!open_next()) return false;
  }
}

}  // namespace dsv3
