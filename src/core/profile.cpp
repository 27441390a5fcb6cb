// Opt-in coarse profiler (see profile.h).
#include "core/profile.h"

#include <cstring>

namespace dsv3::profile {

bool g_enabled = false;
void (*g_sync)() = nullptr;

namespace {

struct State {
  std::vector<Entry> entries;
  std::vector<int64_t> child_ns;  // per open scope: time spent in its enclosed scopes
};

State& state() {
  static State s;
  return s;
}

Entry& find(const char* label) {
  auto& e = state().entries;
  for (auto& x : e)  // few dozen labels: a pointer scan, then a string compare for labels from other TUs
    if (x.label == label || std::strcmp(x.label, label) == 0) return x;
  e.push_back(Entry{label});
  return e.back();
}

}  // namespace

void set_enabled(bool on) {
  g_enabled = on;
}
bool enabled() {
  return g_enabled;
}

void reset() {
  for (auto& x : state().entries) x.calls = 0, x.total_s = 0, x.self_s = 0;
  state().child_ns.clear();
}

std::vector<Entry> entries() {
  return state().entries;
}

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

void push() {
  state().child_ns.push_back(0);
}

void pop(const char* label, int64_t dt) {
  State& s = state();
  const int64_t child = s.child_ns.empty() ? 0 : s.child_ns.back();
  if (!s.child_ns.empty()) s.child_ns.pop_back();
  if (!s.child_ns.empty()) s.child_ns.back() += dt;
  Entry& e = find(label);
  e.calls++;
  e.total_s += dt * 1e-9;
  e.self_s += (dt - child) * 1e-9;
}

}  // namespace dsv3::profile
