// HF normalizers (NFC/NFD/NFKC/NFKD, Lowercase, Strip, Replace, Prepend, Sequence) on small synthetic
// byte-level BPE tokenizers, with added tokens matched in the raw (normalized=false) and the normalized
// (normalized=true) text.
//
// Expected ids come from HF `tokenizers` (Python, 0.22.2). Each case writes its tokenizer.json and text.txt
// to /tmp/dsv3-tests/TokenizerNormalizers.MatchesHf/<case>/; the ids were produced there with
//   python3 -c 'import
//   tokenizers,sys;d=sys.argv[1];print(tokenizers.Tokenizer.from_file(d+"/tokenizer.json").encode(open(d+"/text.txt",encoding="utf-8",newline="").read(),add_special_tokens=False).ids)'
//   DIR
// and the normalized strings of NormalizesLikeHf with
//   python3 -c 'import tokenizers.normalizers as N;print(ascii(N.NFKC().normalize_str("...")))'
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "data/tokenizer/byte_level.h"
#include "data/tokenizer/normalizers.h"
#include "data/tokenizer/tokenizer.h"
#include "test_util.h"
#include "tokenizer_case.h"

namespace dsv3 {
namespace {

using nlohmann::json;

// Byte-level BPE whose ids 0..255 are the bytes themselves (so ids spell out the normalized bytes), plus a
// few merges (ids 256..) among them "fi", "σ" and "ς".
json synth(const json& normalizer, const std::string& added = "[]") {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) vocab[tok::bytes_to_byte_level(std::string(1, static_cast<char>(b)))] = b;
  auto bl = [](const std::string& s) { return tok::bytes_to_byte_level(s); };
  const std::vector<std::pair<std::string, std::string>> merges = {
      {"f", "i"}, {"a", "b"}, {"Ġ", "a"}, {bl("\xCF"), bl("\x83")}, {bl("\xCF"), bl("\x82")}, {"e", "x"}};
  json jm = json::array();
  int id = 256;
  for (const auto& [a, b] : merges) {
    vocab[a + b] = id++;
    jm.push_back(a + " " + b);
  }
  json model = {
      {"type", "BPE"},          {"dropout", nullptr},     {"unk_token", nullptr}, {"fuse_unk", false},
      {"byte_fallback", false}, {"ignore_merges", false}, {"vocab", vocab},       {"merges", jm}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", json::parse(added)},
          {"normalizer", normalizer},
          {"pre_tokenizer",
           {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
          {"post_processor", nullptr},
          {"decoder",
           {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
          {"model", model}};
}

json seq(const std::vector<json>& steps) {
  json a = json::array();
  for (const auto& s : steps) a.push_back(s);
  return {{"type", "Sequence"}, {"normalizers", a}};
}
json type(const char* t) {
  return {{"type", t}};
}

// "HELLO" and "ﬁx" are matched after normalization; "<RAW>" and "İ" in the raw text. "Hello" (special,
// normalized) and "HELLO" normalize alike under Lowercase: HF's trie takes special tokens first.
const std::string kAdded = R"([
  {"id":262,"content":"HELLO","single_word":false,"lstrip":false,"rstrip":false,"normalized":true,"special":false},
  {"id":263,"content":"<RAW>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true},
  {"id":264,"content":"ﬁx","single_word":false,"lstrip":false,"rstrip":true,"normalized":true,"special":false},
  {"id":265,"content":"İ","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":false},
  {"id":266,"content":"Hello","single_word":false,"lstrip":false,"rstrip":false,"normalized":true,"special":true}])";

// Combining marks (decomposed é, Å, ṩ with its marks out of order, Hangul jamo), compatibility characters
// (ﬁ, ①, full-width letters, ², ㎏), Turkish İ, Greek Σ in and at the end of words, and characters newer than
// the Unicode 9.0 of HF's normalization tables (U+1DF9, a combining mark of 10.0 after U+0301; U+1FBF0,
// SEGMENTED DIGIT ZERO of 13.0) and of ICU 72's Unicode 15.0 (U+A7CB, lowercased in 16.0).
const std::string kText =
    "Cafe\u0301 A\u030A \u1E9B\u0323 s\u0307\u0323 \u1100\u1161\u11A8 \uFB01 \u2460 \uFF21\uFF22c x\u00B2 "
    "\u338F \u0130stanbul \u0399\u03A3\u0391 \u039F\u0394\u039F\u03A3 \u03C3\u03C2 x\u0301\u1DF9 "
    "\U0001FBF0 \uA7CB \u1E9E \u01C4";

using Case = testing::TokenizerCase;
constexpr auto load = testing::load_tokenizer_case;

TEST(TokenizerNormalizers, MatchesHf) {
  const std::string added_text = "HELLO hello Hello hellO <RAW> <raw> \uFB01x  fix \uFB01X \u0130 i\u0307 ";
  const std::string strip_text = " \u3000ab\t<RAW>  cd \u00A0<RAW><RAW>\n";
  const std::vector<Case> cases = {
      {"nfc",
       synth(type("NFC")),
       kText,
       {67,  97,  102, 195, 169, 32,  195, 133, 32,  225, 186, 155, 204, 163, 32,  225, 185, 169, 32,  234,
        176, 129, 32,  239, 172, 129, 32,  226, 145, 160, 32,  239, 188, 161, 239, 188, 162, 99,  32,  120,
        194, 178, 32,  227, 142, 143, 32,  196, 176, 115, 116, 97,  110, 98,  117, 108, 32,  206, 153, 206,
        163, 206, 145, 32,  206, 159, 206, 148, 206, 159, 206, 163, 32,  259, 260, 32,  120, 204, 129, 225,
        183, 185, 32,  240, 159, 175, 176, 32,  234, 159, 139, 32,  225, 186, 158, 32,  199, 132}},
      {"nfd",
       synth(type("NFD")),
       kText,
       {67,  97,  102, 101, 204, 129, 32,  65,  204, 138, 32,  197, 191, 204, 163, 204, 135, 32,  115,
        204, 163, 204, 135, 32,  225, 132, 128, 225, 133, 161, 225, 134, 168, 32,  239, 172, 129, 32,
        226, 145, 160, 32,  239, 188, 161, 239, 188, 162, 99,  32,  120, 194, 178, 32,  227, 142, 143,
        32,  73,  204, 135, 115, 116, 97,  110, 98,  117, 108, 32,  206, 153, 206, 163, 206, 145, 32,
        206, 159, 206, 148, 206, 159, 206, 163, 32,  259, 260, 32,  120, 204, 129, 225, 183, 185, 32,
        240, 159, 175, 176, 32,  234, 159, 139, 32,  225, 186, 158, 32,  199, 132}},
      {"nfkc", synth(type("NFKC")), kText, {67,  97,  102, 195, 169, 32,  195, 133, 32,  225, 185, 169, 32,
                                            225, 185, 169, 32,  234, 176, 129, 32,  256, 32,  49,  32,  65,
                                            66,  99,  32,  120, 50,  32,  107, 103, 32,  196, 176, 115, 116,
                                            97,  110, 98,  117, 108, 32,  206, 153, 206, 163, 206, 145, 32,
                                            206, 159, 206, 148, 206, 159, 206, 163, 32,  259, 260, 32,  120,
                                            204, 129, 225, 183, 185, 32,  240, 159, 175, 176, 32,  234, 159,
                                            139, 32,  225, 186, 158, 32,  68,  197, 189}},
      {"nfkd", synth(type("NFKD")), kText, {67,  97,  102, 101, 204, 129, 32,  65,  204, 138, 32,  115, 204,
                                            163, 204, 135, 32,  115, 204, 163, 204, 135, 32,  225, 132, 128,
                                            225, 133, 161, 225, 134, 168, 32,  256, 32,  49,  32,  65,  66,
                                            99,  32,  120, 50,  32,  107, 103, 32,  73,  204, 135, 115, 116,
                                            97,  110, 98,  117, 108, 32,  206, 153, 206, 163, 206, 145, 32,
                                            206, 159, 206, 148, 206, 159, 206, 163, 32,  259, 260, 32,  120,
                                            204, 129, 225, 183, 185, 32,  240, 159, 175, 176, 32,  234, 159,
                                            139, 32,  225, 186, 158, 32,  68,  90,  204, 140}},
      {"lowercase",
       synth(type("Lowercase")),
       kText,
       {99,  97,  102, 101, 204, 129, 258, 204, 138, 32,  225, 186, 155, 204, 163, 32,  115, 204,
        135, 204, 163, 32,  225, 132, 128, 225, 133, 161, 225, 134, 168, 32,  239, 172, 129, 32,
        226, 145, 160, 32,  239, 189, 129, 239, 189, 130, 99,  32,  120, 194, 178, 32,  227, 142,
        143, 32,  105, 204, 135, 115, 116, 97,  110, 98,  117, 108, 32,  206, 185, 259, 206, 177,
        32,  206, 191, 206, 180, 206, 191, 259, 32,  259, 260, 32,  120, 204, 129, 225, 183, 185,
        32,  240, 159, 175, 176, 32,  201, 164, 32,  195, 159, 32,  199, 134}},
      {"nfkc_lowercase",
       synth(seq({type("NFKC"), type("Lowercase")})),
       kText,
       {99,  97,  102, 195, 169, 32,  195, 165, 32,  225, 185, 169, 32,  225, 185, 169, 32,
        234, 176, 129, 32,  256, 32,  49,  32,  257, 99,  32,  120, 50,  32,  107, 103, 32,
        105, 204, 135, 115, 116, 97,  110, 98,  117, 108, 32,  206, 185, 259, 206, 177, 32,
        206, 191, 206, 180, 206, 191, 259, 32,  259, 260, 32,  120, 204, 129, 225, 183, 185,
        32,  240, 159, 175, 176, 32,  201, 164, 32,  195, 159, 32,  100, 197, 190}},
      {"nfd_lowercase_nfc",
       synth(seq({type("NFD"), type("Lowercase"), type("NFC")})),
       kText,
       {99,  97,  102, 195, 169, 32,  195, 165, 32,  225, 186, 155, 204, 163, 32,  225, 185, 169, 32,
        234, 176, 129, 32,  239, 172, 129, 32,  226, 145, 160, 32,  239, 189, 129, 239, 189, 130, 99,
        32,  120, 194, 178, 32,  227, 142, 143, 32,  105, 204, 135, 115, 116, 97,  110, 98,  117, 108,
        32,  206, 185, 259, 206, 177, 32,  206, 191, 206, 180, 206, 191, 259, 32,  259, 260, 32,  120,
        204, 129, 225, 183, 185, 32,  240, 159, 175, 176, 32,  201, 164, 32,  195, 159, 32,  199, 134}},
      {"added_lowercase", synth(type("Lowercase"), kAdded), added_text, {265, 32,  265, 32,  265, 32, 265,
                                                                         32,  263, 32,  60,  114, 97, 119,
                                                                         62,  32,  264, 256, 120, 32, 264,
                                                                         142, 32,  105, 204, 135, 32}},
      {"added_nfkc_lowercase",
       synth(seq({type("NFKC"), type("Lowercase")}), kAdded),
       added_text,
       {265, 32, 265, 32,  265, 32,  265, 32, 263, 32,  60,  114, 97,
        119, 62, 32,  264, 264, 264, 142, 32, 105, 204, 135, 32}},
      {"added_identity",
       synth(seq({}), kAdded),
       added_text,
       {262, 32,  104, 101, 108, 108, 111, 32, 265, 32,  104, 101, 108, 108, 79, 32,  263, 32,  60, 114,
        97,  119, 62,  32,  264, 256, 120, 32, 239, 172, 129, 88,  32,  142, 32, 105, 204, 135, 32}},
      {"strip_both",
       synth(json{{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}, kAdded),
       strip_text,
       {257, 263, 99, 100, 263, 263}},
      {"strip_left",
       synth(json{{"type", "Strip"}, {"strip_left", true}, {"strip_right", false}}, kAdded),
       strip_text,
       {257, 9, 263, 99, 100, 32, 194, 160, 263, 263}},
      {"strip_right",
       synth(json{{"type", "Strip"}, {"strip_left", false}, {"strip_right", true}}, kAdded),
       strip_text,
       {32, 227, 128, 128, 257, 263, 32, 32, 99, 100, 263, 263}},
      {"replace_string",
       synth(seq({json{{"type", "Replace"}, {"pattern", {{"String", "\u2460"}}}, {"content", "ab ab"}},
                  json{{"type", "Replace"}, {"pattern", {{"String", "a."}}}, {"content", ""}}}),
             kAdded),
       "\u2460<RAW>\u2460 a.b a.a. a",
       {257, 32, 257, 263, 257, 32, 257, 32, 98, 32, 258}},
      {"replace_regex",
       synth(json{{"type", "Replace"}, {"pattern", {{"Regex", "\\s+"}}}, {"content", "\u2581"}}, kAdded),
       "ab  c\t\n<RAW> d\u3000e ",
       {257, 226, 150, 129, 99, 226, 150, 129, 263, 226, 150, 129, 100, 226, 150, 129, 101, 226, 150, 129}},
      {"prepend",
       synth(seq({type("NFKC"), json{{"type", "Prepend"}, {"prepend", "\u2581"}}}), kAdded),
       "ab<RAW>\uFB01x<RAW>ab",
       {226, 150, 129, 257, 263, 264, 263, 226, 150, 129, 257}},
  };
  const auto root = testing::scratch_dir();
  for (const auto& c : cases) {
    const Tokenizer t = load(root / c.name, c.tokenizer, c.text);
    EXPECT_EQ(t.encode(c.text), c.want) << "case " << c.name;
  }
}

TEST(TokenizerNormalizers, NormalizesLikeHf) {
  struct N {
    json normalizer;
    std::string in, want;
  };
  const std::vector<N> cases = {
      {type("NFKC"), "\uFB01 \u2460 \uFF21", "fi 1 A"},
      {type("NFD"), "\u00E9", "e\u0301"},
      {type("NFC"), "e\u0301\u1100\u1161", "\u00E9\uAC00"},
      {type("Lowercase"), "\u0130\u03A3 \u039F\u03A3", "i\u0307\u03C3 \u03BF\u03C3"},
      {type("Lowercase"), "\uA7CB\U00010D50", "\u0264\U00010D70"},
      {type("NFKD"), "\U0001FBF0", "\U0001FBF0"},
      {json{{"type", "Replace"}, {"pattern", {{"String", ""}}}, {"content", "_"}}, "ab", "_a_b_"},
      {json{{"type", "Replace"}, {"pattern", {{"String", ""}}}, {"content", "_"}}, "", ""},
      {json{{"type", "Prepend"}, {"prepend", "\u2581"}}, "", ""},
      {json{{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}, " \u3000\u00A0", ""},
  };
  for (const auto& c : cases) {
    EXPECT_EQ(tok::Normalizer::from_json(c.normalizer).normalize(c.in), c.want)
        << c.normalizer.dump() << " on " << c.in;
  }
  EXPECT_TRUE(tok::Normalizer::from_json(nullptr).is_identity());
  EXPECT_TRUE(tok::Normalizer::from_json(seq({})).is_identity());
  EXPECT_FALSE(tok::Normalizer::from_json(seq({type("NFC")})).is_identity());
}

TEST(TokenizerNormalizers, RejectsUnsupported) {
  const std::vector<std::pair<json, std::string>> bad = {
      {json{{"type", "BertNormalizer"},
            {"clean_text", true},
            {"handle_chinese_chars", true},
            {"strip_accents", nullptr},
            {"lowercase", true}},
       "BertNormalizer"},
      {seq({type("NFD"), type("StripAccents")}), "StripAccents"},
      {json{{"type", "Precompiled"}, {"precompiled_charsmap", ""}}, "Precompiled"},
      {type("Nmt"), "Nmt"},
      {json{{"type", "Replace"}, {"pattern", {{"Regex", "("}}}, {"content", ""}}, "Replace"},
  };
  for (const auto& [n, name] : bad) {
    try {
      Tokenizer::from_json_strings(synth(n).dump(), "");
      ADD_FAILURE() << name << ": no error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(name), std::string::npos) << name << ": " << e.what();
    }
  }
  // An added token that the normalizer erases.
  const std::string erased =
      R"([{"id":262,"content":"  ","single_word":false,"lstrip":false,"rstrip":false,"normalized":true,"special":false}])";
  EXPECT_THROW(
      Tokenizer::from_json_strings(
          synth(json{{"type", "Strip"}, {"strip_left", true}, {"strip_right", true}}, erased).dump(), ""),
      Error);
}

}  // namespace
}  // namespace dsv3
