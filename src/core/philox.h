// Counter-based RNG (Philox4x32-10, Salmon et al. 2011) so that every parameter element's initial value is a
// pure function of (seed, parameter name, global element index): any sharding yields the same global weights.
#pragma once
#include <array>
#include <cstdint>
#include <string_view>

namespace dsv3 {

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> counter, std::array<uint32_t, 2> key);

// 64-bit FNV-1a of a name: the stream id of a parameter.
uint64_t name_hash(std::string_view name);

// A standard normal sample for (seed, stream, index), by Box-Muller on one Philox block.
float philox_normal(uint64_t seed, uint64_t stream, uint64_t index);
// A uniform sample in [0, 1) for (seed, stream, index).
float philox_uniform(uint64_t seed, uint64_t stream, uint64_t index);

}  // namespace dsv3
