// Test helpers: the bundled data (data/, tests/golden/), ../shared/data where present, and scratch
// directories.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>

namespace dsv3::testing {

// The checkout and the dsv3 binary: where this build put them, or $DSV3_SOURCE_DIR / $DSV3_BINARY (the GPU
// machine runs packed test binaries from another path: scripts/device-check.sh sets both).
inline std::filesystem::path source_dir() {
  if (const char* env = std::getenv("DSV3_SOURCE_DIR")) return env;
  return DSV3_SOURCE_DIR;
}
inline std::filesystem::path dsv3_binary() {
  if (const char* env = std::getenv("DSV3_BINARY")) return env;
  return DSV3_BINARY;
}

// The repository's bundled data (tokenizers, corpus slices; provenance in data/README.md). Tests that must
// run on a fresh clone read from here, so they never skip.
inline std::filesystem::path data_dir() {
  return source_dir() / "data";
}

// The shared data folder beside the checkout (as CI lays it), or $DSV3_SHARED_DATA.
inline std::filesystem::path shared_data_dir() {
  if (const char* env = std::getenv("DSV3_SHARED_DATA")) return env;
  return source_dir().parent_path() / "shared" / "data";
}

// A file under the shared data folder, where it exists: extra coverage (the full corpora) on top of what the
// bundled data already checks, never a reason to skip.
inline std::optional<std::filesystem::path> shared_data_file(const std::filesystem::path& relpath) {
  auto p = shared_data_dir() / relpath;
  if (!std::filesystem::exists(p)) return std::nullopt;
  return p;
}

// The whole file as bytes (empty when it cannot be read).
inline std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}

// A fresh empty directory under the build tree, unique per test.
inline std::filesystem::path scratch_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  auto dir = std::filesystem::temp_directory_path() / "dsv3-tests" /
             (std::string(info->test_suite_name()) + "." + info->name());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

}  // namespace dsv3::testing
