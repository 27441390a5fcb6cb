// Shared by the synthetic-tokenizer tests: one case (a tokenizer.json, a text, the ids HF gave) and a loader that
// writes the case to disk, so a failing case can be replayed with the Python `tokenizers` package.
#pragma once
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "data/tokenizer/tokenizer.h"

namespace dsv3::testing {

struct TokenizerCase {
  std::string name;
  nlohmann::json tokenizer;
  std::string text;
  std::vector<int32_t> want;
};

inline Tokenizer load_tokenizer_case(const std::filesystem::path& dir, const nlohmann::json& tokenizer,
                                     const std::string& text) {
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "tokenizer.json") << tokenizer.dump();
  std::ofstream(dir / "text.txt", std::ios::binary) << text;
  return Tokenizer::from_directory(dir);
}

}  // namespace dsv3::testing
