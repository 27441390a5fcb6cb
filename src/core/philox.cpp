// Philox4x32-10 with the published round constants.
#include "core/philox.h"

#include <cmath>

namespace dsv3 {

std::array<uint32_t, 4> philox4x32(std::array<uint32_t, 4> c, std::array<uint32_t, 2> k) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = static_cast<uint64_t>(kM0) * c[0];
    const uint64_t p1 = static_cast<uint64_t>(kM1) * c[2];
    c = {static_cast<uint32_t>(p1 >> 32) ^ c[1] ^ k[0], static_cast<uint32_t>(p1),
         static_cast<uint32_t>(p0 >> 32) ^ c[3] ^ k[1], static_cast<uint32_t>(p0)};
    k[0] += kW0;
    k[1] += kW1;
  }
  return c;
}

uint64_t name_hash(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char ch : name) {
    h ^= ch;
    h *= 0x100000001b3ull;
  }
  return h;
}

namespace {
std::array<uint32_t, 4> block(uint64_t seed, uint64_t stream, uint64_t index) {
  return philox4x32({static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32),
                     static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)},
                    {static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)});
}
// 24 random bits -> (0, 1], never 0 so the log below is finite.
double unit_open(uint32_t v) {
  return ((v >> 8) + 1.0) / 16777216.0;
}
}  // namespace

float philox_normal(uint64_t seed, uint64_t stream, uint64_t index) {
  auto r = block(seed, stream, index);
  const double u1 = unit_open(r[0]), u2 = unit_open(r[1]);
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

float philox_uniform(uint64_t seed, uint64_t stream, uint64_t index) {
  return static_cast<float>((block(seed, stream, index)[0] >> 8) / 16777216.0);
}

}  // namespace dsv3
