// Reads text lines from one or more files (plain or gzip), as preprocess_data.py iterates its input.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dsv3 {

// Expands a path or glob pattern into existing files (sorted, so runs are reproducible; Megatron uses
// glob order, which is directory order). Throws when nothing matches.
std::vector<std::string> expand_input(const std::string& pattern);

// Streams lines across a list of files; each line keeps its terminating '\n' (when present) so byte
// counts match Python's len(line). Files ending in .gz are decompressed.
class LineReader {
 public:
  explicit LineReader(std::vector<std::string> files);
  ~LineReader();
  LineReader(const LineReader&) = delete;
  LineReader& operator=(const LineReader&) = delete;

  // Next line into `line`; false at the end of the last file. Sets `file` and 1-based `line_no`.
  bool next(std::string& line);
  const std::string& file() const { return files_[file_i_]; }
  int64_t line_no() const { return line_no_; }

 private:
  bool open_next();
  bool fill();
  std::vector<std::string> files_;
  size_t file_i_ = 0;
  bool opened_ = false;
  int64_t line_no_ = 0;
  struct Source;
  std::unique_ptr<Source> src_;
  std::string buf_;
  size_t pos_ = 0;
};

}  // namespace dsv3
