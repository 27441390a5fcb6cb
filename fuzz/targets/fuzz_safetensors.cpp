// A .safetensors file -> SafetensorsReader (header, dtypes, offsets), then every tensor read as the loaders
// do: floats through read_f32, integers through read_i64.
#include "core/error.h"
#include "fuzz_common.h"
#include "model/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = dsv3_fuzz::scratch_dir() / "t.safetensors";
  dsv3_fuzz::write_file(path, {reinterpret_cast<const char*>(data), size});
  try {
    dsv3::SafetensorsReader rd(path.string());
    (void)rd.metadata();
    for (const std::string& name : rd.names()) {
      const dsv3::StTensorInfo& info = rd.info(name);
      if (info.numel > (1 << 22)) continue;  // keep each run small; the offsets were validated already
      try {
        (void)rd.read_f32(name);
      } catch (const dsv3::Error&) {
      }
      try {
        (void)rd.read_i64(name);
      } catch (const dsv3::Error&) {
      }
    }
  } catch (const dsv3::Error&) {
  }
  return 0;
}
