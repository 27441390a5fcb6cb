// AtomicFile: POSIX write loop, fsync, rename.
#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <random>

#include "core/error.h"

namespace dsv3 {

AtomicFile::AtomicFile(std::string path)
    : path_(std::move(path)),
      tmp_(path_ + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(std::random_device{}())) {
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  DSV3_CHECK(fd_ >= 0, "cannot create ", tmp_, ": ", std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
    std::remove(tmp_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t n) {
  DSV3_CHECK(fd_ >= 0, "write after commit to ", path_);
  const char* c = static_cast<const char*>(data);
  while (n > 0) {
    const ssize_t w = ::write(fd_, c, n);
    if (w < 0 && errno == EINTR) continue;
    DSV3_CHECK(w > 0, "cannot write ", tmp_, ": ", std::strerror(errno));
    c += w;
    n -= static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  DSV3_CHECK(fd_ >= 0, "commit called twice for ", path_);
  const bool synced = ::fsync(fd_) == 0;
  const int sync_err = errno;
  const bool closed = ::close(fd_) == 0;
  fd_ = -1;
  if (!synced || !closed) {
    std::remove(tmp_.c_str());
    fail("cannot flush ", tmp_, ": ", std::strerror(synced ? errno : sync_err));
  }
  if (std::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    std::remove(tmp_.c_str());
    fail("cannot rename ", tmp_, " to ", path_, ": ", std::strerror(err));
  }
}

void write_file_atomically(const std::string& path, std::string_view content) {
  AtomicFile f(path);
  f.write(content);
  f.commit();
}

}  // namespace dsv3
