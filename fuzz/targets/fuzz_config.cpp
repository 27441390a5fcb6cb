// config.json -> ModelConfig::from_json_string. A config it accepts must also survive its own round trip
// (to_hf_json, parsed again to the same file), since checkpoints store exactly that file.
#include <cstdlib>

#include "core/error.h"
#include "model/config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  dsv3::ModelConfig cfg;
  try {
    cfg = dsv3::ModelConfig::from_json_string(text, "fuzz config.json");
  } catch (const dsv3::Error&) {
    return 0;  // the expected outcome for bad input: a clear error
  }
  const std::string written = cfg.to_hf_json();
  // Our own output must parse back (a dsv3::Error here is a bug too, so it is not caught).
  const dsv3::ModelConfig again = dsv3::ModelConfig::from_json_string(written, "round trip");
  if (again.to_hf_json() != written) std::abort();
  return 0;
}
