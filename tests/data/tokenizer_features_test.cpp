// Feature coverage on small synthetic tokenizers (Split behaviours, Digits, ByteLevel options, added-token
// flags, merges forms, ignore_merges) and the errors for features that are not implemented.
//
// Expected ids come from HF `tokenizers` (Python, 0.23.3). Each case writes its tokenizer.json and text.txt
// to /tmp/dsv3-tests/TokenizerFeatures.MatchesHf/<case>/; the ids were produced there with
//   python3 -c 'import
//   tokenizers,sys;d=sys.argv[1];print(tokenizers.Tokenizer.from_file(d+"/tokenizer.json").encode(open(d+"/text.txt",encoding="utf-8",newline="").read(),add_special_tokens=False).ids)'
//   DIR
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/tokenizer/byte_level.h"
#include "data/tokenizer/tokenizer.h"
#include "test_util.h"
#include "tokenizer_case.h"

namespace dsv3 {
namespace {

using nlohmann::json;

// Byte-level BPE whose ids 0..255 are the bytes themselves, plus 13 merges (ids 256..268).
json synth(const std::string& pre_tokenizer, const std::string& added = "[]", bool pair_merges = false,
           bool ignore_merges = false) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[tok::bytes_to_byte_level(std::string(1, static_cast<char>(b)))] = b;
  // Merges across the delimiters used below, so that each split behaviour gives different ids.
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"-", "-"},  {"b", "-"}, {"-", "c"}, {"a", "b"}, {"ab", "c"}, {"Ġ", "a"}, {"1", "2"},
      {"Ġa", "b"}, {"d", "e"}, {"x", "1"}, {"5", "Ġ"}, {"c", "Ġ"},  {"Ġ", "Ġ"}};
  json jm = json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    vocab[a + b] = id++;
    if (pair_merges)
      jm.push_back({a, b});
    else
      jm.push_back(a + " " + b);
  }
  json model = {{"type", "BPE"},          {"dropout", nullptr},
                {"unk_token", nullptr},   {"fuse_unk", false},
                {"byte_fallback", false}, {"ignore_merges", ignore_merges},
                {"vocab", vocab},         {"merges", jm}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", json::parse(added)},
          {"normalizer", nullptr},
          {"pre_tokenizer", json::parse(pre_tokenizer)},
          {"post_processor", nullptr},
          {"decoder",
           {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
          {"model", model}};
}

std::string split(const std::string& pattern_kind, const std::string& pattern, const std::string& behavior,
                  bool invert) {
  json s = {
      {"type", "Split"}, {"pattern", {{pattern_kind, pattern}}}, {"behavior", behavior}, {"invert", invert}};
  return json({{"type", "Sequence"},
               {"pretokenizers",
                {s,
                 {{"type", "ByteLevel"},
                  {"add_prefix_space", false},
                  {"trim_offsets", true},
                  {"use_regex", false}}}}})
      .dump();
}

const std::string kByteLevelOnly =
    R"({"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":false})";

const std::string kGpt2Style =
    R"({"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true})";

using Case = testing::TokenizerCase;
constexpr auto load = testing::load_tokenizer_case;

TEST(TokenizerFeatures, MatchesHf) {
  const std::string t1 = "ab-c--abc d-";
  const std::string t2 = "x1abc5 6 abc c  d-c12";
  const std::string added_flags = R"([
    {"id":269,"content":"<L>","single_word":false,"lstrip":true,"rstrip":false,"normalized":false,"special":true},
    {"id":270,"content":"<R>","single_word":false,"lstrip":false,"rstrip":true,"normalized":false,"special":true},
    {"id":271,"content":"de","single_word":true,"lstrip":false,"rstrip":false,"normalized":true,"special":false},
    {"id":272,"content":"<L><R>","single_word":false,"lstrip":false,"rstrip":false,"normalized":true,"special":false}])";
  const std::vector<Case> cases = {
      {"removed", synth(split("String", "-", "Removed", false)), t1, {259, 99, 260, 32, 100}},
      {"isolated",
       synth(split("String", "-", "Isolated", false)),
       t1,
       {259, 45, 99, 45, 45, 260, 32, 100, 45}},
      {"merged_prev",
       synth(split("String", "-", "MergedWithPrevious", false)),
       t1,
       {97, 257, 99, 45, 45, 260, 32, 100, 45}},
      {"merged_next",
       synth(split("String", "-", "MergedWithNext", false)),
       t1,
       {259, 258, 45, 45, 260, 32, 100, 45}},
      {"contiguous",
       synth(split("String", "-", "Contiguous", false)),
       t1,
       {259, 45, 99, 256, 260, 32, 100, 45}},
      {"removed_invert", synth(split("Regex", "[a-c]+", "Removed", true)), t1, {259, 99, 260}},
      {"isolated_invert",
       synth(split("Regex", "[a-c]+", "Isolated", true)),
       t1,
       {259, 45, 99, 256, 260, 32, 100, 45}},
      {"merged_prev_regex",
       synth(split("Regex", "\\d+|\\s", "MergedWithPrevious", false)),
       t2,
       {265, 260, 53, 32, 54, 32, 260, 32, 267, 32, 100, 258, 262}},
      {"merged_next_regex",
       synth(split("Regex", "\\d+|\\s", "MergedWithNext", false)),
       t2,
       {120, 49, 260, 53, 32, 54, 32, 260, 32, 99, 32, 32, 100, 258, 262}},
      {"contiguous_regex",
       synth(split("Regex", "\\d", "Contiguous", false)),
       t2,
       {120, 49, 260, 53, 32, 54, 32, 260, 32, 267, 32, 100, 258, 262}},
      {"empty_matches",
       synth(split("Regex", "b*", "Isolated", false)),
       "abcabbc",
       {97, 98, 99, 97, 98, 98, 99}},
      {"digits_individual",
       synth(R"({"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":true},)" +
             kByteLevelOnly + "]}"),
       t2,
       {120, 49, 260, 53, 32, 54, 32, 260, 32, 267, 32, 100, 258, 49, 50}},
      {"digits_grouped",
       synth(R"({"type":"Sequence","pretokenizers":[{"type":"Digits","individual_digits":false},)" +
             kByteLevelOnly + "]}"),
       t2,
       {120, 49, 260, 53, 32, 54, 32, 260, 32, 267, 32, 100, 258, 262}},
      {"byte_level_regex_prefix",
       synth(
           R"({"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true})",
           R"([{"id":269,"content":"<X>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}])"),
       "ab abc<X>abc  ab's\n12",
       {32, 259, 32, 260, 269, 32, 260, 32, 32, 259, 39, 115, 10, 262}},
      {"byte_level_no_regex_prefix",
       synth(R"({"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":false})"),
       "ab abc",
       {32, 259, 32, 260}},
      {"added_flags",
       synth(kByteLevelOnly, added_flags),
       "a  <L>  b<R>  c de xde de_ <L><R> <L> <R>",
       {97, 269, 268, 98, 270, 267, 264, 32, 120, 264, 32, 264, 95, 269, 270, 269, 32, 270}},
      {"pair_merges", synth(kByteLevelOnly, "[]", /*pair_merges=*/true), "abcab de", {260, 259, 32, 264}},
      // " ab" is in the vocab but BPE cannot reach it (a+b outranks Ġ+a): only ignore_merges gives it whole.
      {"ignore_merges", synth(kGpt2Style, "[]", false, /*ignore_merges=*/true), "x ab", {120, 263}},
      {"no_ignore_merges", synth(kGpt2Style, "[]", false, /*ignore_merges=*/false), "x ab", {120, 32, 259}},
  };
  const auto root = testing::scratch_dir();
  for (const auto& c : cases) {
    const Tokenizer t = load(root / c.name, c.tokenizer, c.text);
    EXPECT_EQ(t.encode(c.text), c.want) << "case " << c.name;
  }
}

// Each unsupported feature must be refused with an error that names it.
TEST(TokenizerFeatures, RejectsUnsupported) {
  struct Bad {
    std::string name, expect_in_message;
    std::function<void(json&)> edit;
  };
  const std::vector<Bad> bad = {
      {"wordpiece", "WordPiece", [](json& j) { j["model"]["type"] = "WordPiece"; }},
      {"metaspace", "Metaspace",
       [](json& j) {
         j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}, {"prepend_scheme", "always"}};
       }},
      {"byte_fallback", "byte_fallback", [](json& j) { j["model"]["byte_fallback"] = true; }},
      {"dropout", "dropout", [](json& j) { j["model"]["dropout"] = 0.1; }},
      {"strip_accents", "StripAccents",
       [](json& j) {
         j["normalizer"] = {{"type", "Sequence"},
                            {"normalizers", {{{"type", "NFD"}}, {{"type", "StripAccents"}}}}};
       }},
      {"decoder", "Metaspace",
       [](json& j) {
         j["decoder"] = {{"type", "Metaspace"}};
       }},
      {"no_byte_level", "ByteLevel", [](json& j) { j["pre_tokenizer"] = nullptr; }},
      {"suffix", "end_of_word_suffix", [](json& j) { j["model"]["end_of_word_suffix"] = "</w>"; }},
      {"bad_regex", "Split",
       [](json& j) { j["pre_tokenizer"] = json::parse(split("Regex", "(", "Isolated", false)); }},
      {"truncation", "truncation",
       [](json& j) {
         j["truncation"] = {{"max_length", 8}};
       }},
  };
  for (const auto& b : bad) {
    json j = synth(kByteLevelOnly);
    b.edit(j);
    try {
      Tokenizer::from_json_strings(j.dump(), "");
      ADD_FAILURE() << b.name << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(b.expect_in_message), std::string::npos)
          << b.name << ": " << e.what();
    }
  }
}

TEST(TokenizerFeatures, Movable) {
  Tokenizer a = Tokenizer::from_json_strings(synth(kByteLevelOnly).dump(), "");
  const auto before = a.encode("abc de--c");
  Tokenizer b = std::move(a);
  EXPECT_EQ(b.encode("abc de--c"), before);
  EXPECT_EQ(b.decode(before), "abc de--c");
}

}  // namespace
}  // namespace dsv3
