// Shared helpers of the libFuzzer targets (fuzz/README.md): splitting one input into the several files a
// reader takes, and a private scratch directory for the readers that only take paths.
#pragma once
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <vector>

namespace dsv3_fuzz {

// Readers that take several files (.idx + .bin, tracker + state.json + optimizer file) get them from one
// input cut at this line, so a seed stays a readable file and the fuzzer still mutates every part. Missing
// parts are empty.
inline constexpr std::string_view kPartSeparator = "\n--dsv3-fuzz-part--\n";

inline std::vector<std::string_view> split_parts(const uint8_t* data, size_t size, size_t n) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < n) {
    const size_t at = in.find(kPartSeparator);
    if (at == std::string_view::npos) break;
    parts.push_back(in.substr(0, at));
    in.remove_prefix(at + kPartSeparator.size());
  }
  parts.push_back(in);
  parts.resize(n);
  return parts;
}

// One scratch directory per fuzzer process (under $TMPDIR), removed at exit; the file-based readers are fed
// through it.
inline const std::filesystem::path& scratch_dir() {
  static const std::filesystem::path dir = [] {
    const char* t = std::getenv("TMPDIR");
    std::filesystem::path d =
        std::filesystem::path(t && *t ? t : "/tmp") / ("dsv3-fuzz-" + std::to_string(::getpid()));
    std::filesystem::remove_all(d);
    std::filesystem::create_directories(d);
    static struct Cleanup {
      std::filesystem::path p;
      ~Cleanup() {
        std::error_code ec;
        std::filesystem::remove_all(p, ec);
      }
    } cleanup{d};
    return d;
  }();
  return dir;
}

inline void write_file(const std::filesystem::path& p, std::string_view bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!f) std::abort();  // the harness itself failed, not the reader
}

}  // namespace dsv3_fuzz
