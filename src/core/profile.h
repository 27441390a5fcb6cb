// Opt-in coarse profiler: DSV3_PROFILE("label") opens a scope that accumulates wall time under a static label.
// Disabled (the default) it costs one load of a global flag per scope. Scopes nest: each label gets its total
// time and its self time (total minus enclosed scopes), so the self times of all labels add up to the time
// spent inside any scope. Main-thread only: the kernels' OpenMP regions live inside the scopes, never around them.
#pragma once
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dsv3::profile {

extern bool g_enabled;
// Called at every scope boundary while enabled (nullable): a GPU run sets it to its stream's synchronize, so that
// each scope times the device work it enqueued rather than the enqueueing.
extern void (*g_sync)();

struct Entry {
  const char* label = nullptr;
  int64_t calls = 0;
  double total_s = 0, self_s = 0;
};

void set_enabled(bool on);
bool enabled();
void reset();                  // clears the accumulated times (labels are kept)
std::vector<Entry> entries();  // in first-use order

// Internal: called by Scope.
int64_t now_ns();
void push();
void pop(const char* label, int64_t dt_ns);

class Scope {
 public:
  explicit Scope(const char* label) : label_(label), t0_(g_enabled ? (sync(), push(), now_ns()) : -1) {}
  ~Scope() {
    if (t0_ >= 0) sync(), pop(label_, now_ns() - t0_);
  }
  Scope(const Scope&) = delete;
  Scope& operator=(const Scope&) = delete;

 private:
  static void sync() {
    if (g_sync) g_sync();
  }
  const char* label_;
  int64_t t0_;
};

}  // namespace dsv3::profile

#define DSV3_PROFILE_CAT2(a, b) a##b
#define DSV3_PROFILE_CAT(a, b) DSV3_PROFILE_CAT2(a, b)
#define DSV3_PROFILE(label) ::dsv3::profile::Scope DSV3_PROFILE_CAT(dsv3_profile_scope_, __LINE__)(label)
// A scope that does not follow a C++ block: DSV3_PROFILE_BEGIN(name, "label") ... DSV3_PROFILE_END(name).
#define DSV3_PROFILE_BEGIN(name, label) \
  std::optional<::dsv3::profile::Scope> dsv3_profile_##name(std::in_place, label)
#define DSV3_PROFILE_END(name) dsv3_profile_##name.reset()
