#include "data/tokenizer/normalizers.h"

#include <nlohmann/json.hpp>

#include "core/error.h"

namespace dsv3::tok {
namespace {

void check_supported(const nlohmann::json& j) {
  if (j.is_null()) return;
  DSV3_CHECK(j.is_object() && j.contains("type"), "tokenizer: normalizer without a \"type\": ", j.dump());
  const std::string type = j.at("type").get<std::string>();
  if (type == "Sequence") {
    for (const auto& n : j.at("normalizers")) check_supported(n);
    return;
  }
  if (type == "NFC" || type == "NFKC" || type == "NFD" || type == "NFKD") {
    fail("tokenizer: unsupported normalizer type \"", type,
         "\" (Unicode normalization needs a library such as ICU linked into dsv3lib)");
  }
  fail("tokenizer: unsupported normalizer type \"", type, "\"");
}

}  // namespace

Normalizer Normalizer::from_json(const nlohmann::json& j) {
  check_supported(j);
  return Normalizer{};
}

}  // namespace dsv3::tok
