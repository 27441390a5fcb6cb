// Files that appear complete or not at all: written under a temporary name beside the target, fsynced, and
// renamed into place by commit(). Destroyed without commit() (an error unwinding), the temporary is removed, so a
// failed run never leaves a partial file under the final name.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace dsv3 {

class AtomicFile {
 public:
  explicit AtomicFile(std::string path);
  ~AtomicFile();
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);  // all of it, or throws naming the file
  void write(std::string_view s) { write(s.data(), s.size()); }
  void commit();  // fsync, close, rename onto the target
  const std::string& path() const { return path_; }

 private:
  std::string path_, tmp_;
  int fd_ = -1;
};

// The whole content at once.
void write_file_atomically(const std::string& path, std::string_view content);

}  // namespace dsv3
