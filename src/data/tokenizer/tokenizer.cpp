#include "data/tokenizer/tokenizer.h"

#include <simdjson.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "data/tokenizer/added_tokens.h"
#include "data/tokenizer/bpe.h"
#include "data/tokenizer/byte_level.h"
#include "data/tokenizer/normalizers.h"
#include "data/tokenizer/pre_tokenizers.h"

namespace dsv3 {

using nlohmann::json;

struct Tokenizer::Impl {
  Impl(tok::Normalizer n, tok::PreTokenizer p, tok::Bpe m)
      : normalizer(std::move(n)), pre_tokenizer(std::move(p)), model(std::move(m)) {}
  tok::Normalizer normalizer;
  tok::PreTokenizer pre_tokenizer;
  tok::Bpe model;
  tok::AddedVocabulary added;
  bool byte_level_decoder = true;  // false: no decoder, tokens joined with spaces as HF does
  bool post_processor_adds_tokens = false;
  std::optional<int32_t> bos, eos;
  bool add_bos = false, add_eos = false;
  int64_t size = 0;

  void encode_segment(std::string_view text, std::vector<int32_t>& out) const;
};

namespace {

std::string read_file(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  DSV3_CHECK(f, "tokenizer: cannot open ", p.string());
  std::ostringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

// A gzip file's decompressed content. gzread alone cannot tell a truncated file from a complete one, so the
// end is confirmed with gzeof and gzerror.
std::string read_gzip_file(const std::filesystem::path& p) {
  gzFile gz = gzopen(p.c_str(), "rb");
  DSV3_CHECK(gz, "tokenizer: cannot open ", p.string(), ": ", std::strerror(errno));
  std::string out;
  char buf[1 << 16];
  int n, err = Z_OK;
  while ((n = gzread(gz, buf, sizeof buf)) > 0) out.append(buf, static_cast<size_t>(n));
  const bool complete = n == 0 && gzeof(gz);
  const std::string msg = gzerror(gz, &err);
  gzclose(gz);
  DSV3_CHECK(complete && err == Z_OK, "tokenizer: ", p.string(), " is not a complete gzip file (", msg, ")");
  return out;
}

void check_decoder(const json& d, bool& byte_level) {
  if (d.is_null()) {
    byte_level = false;
    return;
  }
  const std::string type = d.value("type", std::string());
  DSV3_CHECK(type == "ByteLevel", "tokenizer: unsupported decoder type \"", type, "\"");
}

// The post-processor only matters for encode_for_model: ByteLevel (trim_offsets) leaves ids alone; processors
// that insert special tokens are not implemented, so encode_for_model refuses them unless transformers itself
// replaces them (the Llama tokenizer classes set BOS/EOS from add_bos_token/add_eos_token).
bool post_processor_adds_tokens(const json& p) {
  if (p.is_null()) return false;
  const std::string type = p.value("type", std::string());
  if (type == "ByteLevel") return false;
  if (type == "Sequence") {
    for (const auto& q : p.at("processors"))
      if (post_processor_adds_tokens(q)) return true;
    return false;
  }
  return true;
}

std::optional<std::string> special_token_content(const json& cfg, const char* key) {
  if (!cfg.contains(key) || cfg.at(key).is_null()) return std::nullopt;
  const json& v = cfg.at(key);
  if (v.is_string()) return v.get<std::string>();
  DSV3_CHECK(v.is_object() && v.contains("content"), "tokenizer_config: ", key,
             " is neither a string nor an AddedToken");
  return v.at("content").get<std::string>();
}

}  // namespace

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_directory(const std::filesystem::path& dir) {
  const auto tj = dir / "tokenizer.json", tj_gz = dir / "tokenizer.json.gz";
  DSV3_CHECK(std::filesystem::exists(tj) || std::filesystem::exists(tj_gz), "tokenizer: ", tj.string(),
             " does not exist (nor does tokenizer.json.gz)");
  const auto cj = dir / "tokenizer_config.json";
  std::string config = std::filesystem::exists(cj) ? read_file(cj) : std::string();
  try {
    return from_json_strings(std::filesystem::exists(tj) ? read_file(tj) : read_gzip_file(tj_gz), config);
  } catch (const Error& e) {
    fail(e.what(), " (in ", dir.string(), ")");
  }
}

Tokenizer Tokenizer::from_json_strings(std::string_view tokenizer_json, std::string_view config_json) {
  try {
    json cfg = config_json.empty() ? json::object() : json::parse(config_json);
    return build(json::parse(tokenizer_json), cfg);
  } catch (const json::exception& e) {  // malformed JSON or a field of the wrong type
    fail("tokenizer: malformed tokenizer.json or tokenizer_config.json: ", e.what());
  }
}

Tokenizer Tokenizer::build(const nlohmann::json& j, const nlohmann::json& cfg) {
  DSV3_CHECK(j.is_object(), "tokenizer: tokenizer.json is not a JSON object");
  for (const char* k : {"truncation", "padding"}) {
    DSV3_CHECK(!j.contains(k) || j.at(k).is_null(), "tokenizer: unsupported tokenizer.json setting \"", k,
               "\"");
  }
  auto get = [&](const char* k) { return j.contains(k) ? j.at(k) : json(); };
  auto impl = std::make_unique<Impl>(tok::Normalizer::from_json(get("normalizer")),
                                     tok::PreTokenizer::from_json(get("pre_tokenizer")),
                                     tok::Bpe::from_json(get("model")));
  impl->added = tok::AddedVocabulary::from_json(get("added_tokens"), impl->model, impl->normalizer);
  check_decoder(get("decoder"), impl->byte_level_decoder);
  impl->post_processor_adds_tokens = post_processor_adds_tokens(get("post_processor"));

  // len(tokenizer): distinct token strings over the vocab and the added tokens.
  impl->size = static_cast<int64_t>(impl->model.vocab().size());
  for (const auto& t : impl->added.tokens())
    if (!impl->model.token_to_id(t.content)) ++impl->size;

  Tokenizer t(std::move(impl));
  Impl& m = *t.impl_;
  if (auto s = special_token_content(cfg, "bos_token")) {
    m.bos = t.token_to_id(*s);
    DSV3_CHECK(m.bos, "tokenizer_config: bos_token \"", *s, "\" is not a token");
  }
  if (auto s = special_token_content(cfg, "eos_token")) {
    m.eos = t.token_to_id(*s);
    DSV3_CHECK(m.eos, "tokenizer_config: eos_token \"", *s, "\" is not a token");
  }
  // Llama tokenizer classes default add_bos_token to true and rebuild the post-processor from these flags.
  const std::string cls = cfg.value("tokenizer_class", std::string());
  const bool llama = cls == "LlamaTokenizerFast" || cls == "LlamaTokenizer";
  auto flag = [&](const char* k, bool dflt) {
    return cfg.contains(k) && !cfg.at(k).is_null() ? cfg.at(k).get<bool>() : dflt;
  };
  m.add_bos = flag("add_bos_token", llama);
  m.add_eos = flag("add_eos_token", false);
  if (llama) m.post_processor_adds_tokens = false;
  DSV3_CHECK(!m.add_bos || m.bos, "tokenizer_config: add_bos_token is true but there is no bos_token");
  DSV3_CHECK(!m.add_eos || m.eos, "tokenizer_config: add_eos_token is true but there is no eos_token");
  // transformers rewrites the ByteLevel pre-tokenizer when the config's add_prefix_space disagrees with it.
  if (cfg.contains("add_prefix_space") && cfg.at("add_prefix_space").is_boolean()) {
    DSV3_CHECK(cfg.at("add_prefix_space").get<bool>() == m.pre_tokenizer.add_prefix_space(),
               "tokenizer_config: unsupported add_prefix_space=", cfg.at("add_prefix_space").dump(),
               " overriding the ByteLevel pre-tokenizer's setting");
  }
  return t;
}

void Tokenizer::Impl::encode_segment(std::string_view text, std::vector<int32_t>& out) const {
  // Identity normalizers (null, empty Sequence: DeepSeek-V3, GPT-2) leave the text as is, without a copy.
  if (!normalizer.is_identity()) {
    thread_local std::string normalized;  // text points into it for the rest of this call
    normalizer.normalize(text, normalized);
    text = normalized;
  }
  thread_local std::vector<tok::AddedVocabulary::Segment> segs;
  size_t first = segs.size();
  added.split(text, /*normalized_trie=*/true, segs);
  size_t last = segs.size();
  for (size_t i = first; i < last; ++i) {
    const auto sg = segs[i];
    if (sg.id >= 0) {
      out.push_back(sg.id);
      continue;
    }
    pre_tokenizer.split(text.substr(sg.begin, sg.end - sg.begin),
                        [&](std::string_view word) { model.tokenize(word, out); });
  }
  segs.resize(first);
}

void Tokenizer::encode_append(std::string_view text, std::vector<int32_t>& out) const {
  DSV3_CHECK(simdjson::validate_utf8(text.data(), text.size()), "tokenizer: input text is not valid UTF-8");
  // HF extract_and_normalize: first the normalized=false tokens in the raw text, then normalization and the
  // normalized=true tokens in each remaining piece.
  std::vector<tok::AddedVocabulary::Segment> segs;
  impl_->added.split(text, /*normalized_trie=*/false, segs);
  for (const auto& sg : segs) {
    if (sg.id >= 0)
      out.push_back(sg.id);
    else
      impl_->encode_segment(text.substr(sg.begin, sg.end - sg.begin), out);
  }
}

std::vector<int32_t> Tokenizer::encode(std::string_view text) const {
  std::vector<int32_t> out;
  encode_append(text, out);
  return out;
}

std::vector<int32_t> Tokenizer::encode_for_model(std::string_view text) const {
  DSV3_CHECK(!impl_->post_processor_adds_tokens,
             "tokenizer: unsupported post_processor (one that inserts special tokens) for encode_for_model");
  std::vector<int32_t> out;
  if (impl_->add_bos) out.push_back(*impl_->bos);
  encode_append(text, out);
  if (impl_->add_eos) out.push_back(*impl_->eos);
  return out;
}

std::string Tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  std::string bytes;
  bool first = true;
  for (int32_t id : ids) {
    const std::string* token = nullptr;
    if (const auto* a = impl_->added.by_id(id)) {
      if (skip_special_tokens && a->special) continue;
      token = &a->content;
    } else {
      token = impl_->model.id_to_token(id);
      if (!token) continue;
      // HF tests "is special" by the token's content, so a vocab token equal to a special added one is
      // skipped.
      if (skip_special_tokens) {
        auto aid = impl_->added.token_to_id(*token);
        if (aid && impl_->added.by_id(*aid)->special) continue;
      }
    }
    if (!impl_->byte_level_decoder) {
      if (!first) bytes.push_back(' ');
      bytes += *token;
    } else if (auto b = tok::byte_level_to_bytes(*token)) {
      bytes += *b;
    } else {
      bytes += *token;  // characters outside the byte alphabet: HF keeps the token's own UTF-8
    }
    first = false;
  }
  return impl_->byte_level_decoder ? tok::utf8_lossy(bytes) : bytes;
}

int64_t Tokenizer::size() const {
  return impl_->size;
}
std::optional<int32_t> Tokenizer::bos_id() const {
  return impl_->bos;
}
std::optional<int32_t> Tokenizer::eos_id() const {
  return impl_->eos;
}
bool Tokenizer::add_bos() const {
  return impl_->add_bos;
}
bool Tokenizer::add_eos() const {
  return impl_->add_eos;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (auto id = impl_->added.token_to_id(token)) return id;
  return impl_->model.token_to_id(token);
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (const auto* a = impl_->added.by_id(id)) return a->content;
  const std::string* t = impl_->model.id_to_token(id);
  return t ? *t : std::string();
}

}  // namespace dsv3
