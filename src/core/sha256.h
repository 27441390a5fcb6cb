// SHA-256 over byte ranges (OpenSSL), used for Megatron's cache-file hashes and corpus checksums.
#pragma once
#include <cstddef>
#include <string>
#include <string_view>

namespace dsv3 {

class Sha256 {
 public:
  Sha256();
  ~Sha256();
  Sha256(const Sha256&) = delete;
  Sha256& operator=(const Sha256&) = delete;
  void update(const void* data, size_t n);
  std::string hex_digest();  // finalises; the object must not be updated afterwards

 private:
  void* ctx_;
};

std::string sha256_hex(std::string_view bytes);

}  // namespace dsv3
