// Errors for people: one exception type carrying a complete message, and a check macro that builds it.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace dsv3 {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace detail {
template <typename... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

template <typename... Args>
[[noreturn]] void fail(const Args&... args) {
  throw Error(detail::concat(args...));
}

}  // namespace dsv3

// DSV3_CHECK(cond, "what", value, "more") throws dsv3::Error with the pieces streamed together.
#define DSV3_CHECK(cond, ...)               \
  do {                                      \
    if (!(cond)) ::dsv3::fail(__VA_ARGS__); \
  } while (0)
