// Test helpers: locating ../shared/data (skip with a message when absent) and scratch directories.
#pragma once
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace dsv3::testing {

inline std::filesystem::path source_dir() { return DSV3_SOURCE_DIR; }
inline std::filesystem::path dsv3_binary() { return DSV3_BINARY; }

// The shared data folder beside the checkout (as CI lays it), or $DSV3_SHARED_DATA.
inline std::filesystem::path shared_data_dir() {
  if (const char* env = std::getenv("DSV3_SHARED_DATA")) return env;
  return source_dir().parent_path() / "shared" / "data";
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

// Skips the current test when a file under ../shared/data is missing, naming it.
#define DSV3_REQUIRE_SHARED(relpath)                                                       \
  do {                                                                                     \
    auto _p = ::dsv3::testing::shared_data_dir() / (relpath);                              \
    if (!std::filesystem::exists(_p)) GTEST_SKIP() << "missing shared data: " << _p;      \
  } while (0)
