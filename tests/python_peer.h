// Tests that check dsv3's files with Python packages (transformers, torch, tensorboard) run their scripts in
// tests/reference/ with $DSV3_PYTHON (default python3), so that `make check-interop` can point them at
// virtual environments holding pinned versions. A script exits 77 when a package is missing (127: no
// interpreter); the check then skips with a message, as in CI (no torch) — unless
// DSV3_REQUIRE_PYTHON_PEERS=1, which `make check-interop` sets because there a skip would hide the very check
// it is run for.
#pragma once
#include <cstdlib>
#include <string>

namespace dsv3::testing {

inline std::string python_interpreter() {
  const char* p = std::getenv("DSV3_PYTHON");
  return p && *p ? p : "python3";
}

inline bool python_peers_required() {
  const char* p = std::getenv("DSV3_REQUIRE_PYTHON_PEERS");
  return p && std::string(p) == "1";
}

// The exit status of a peer script that could not import what it needs.
inline bool python_peer_unavailable(int rc) {
  return rc == 77 || rc == 127;
}

}  // namespace dsv3::testing
