// Megatron-Core GPTDataset index construction, cache and sample fetch (see gpt_dataset.h).
#include "data/gpt_dataset.h"

#include <openssl/evp.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <regex>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/sha256.h"
#include "data/megatron_random.h"
#include "data/npy.h"

namespace dsv3 {
namespace fs = std::filesystem;

const char* split_name(Split s) {
  switch (s) {
    case Split::kTrain:
      return "train";
    case Split::kValid:
      return "valid";
    case Split::kTest:
      return "test";
  }
  return "?";
}

Split parse_split_name(const std::string& name) {
  if (name == "train") return Split::kTrain;
  if (name == "valid") return Split::kValid;
  if (name == "test") return Split::kTest;
  fail("unknown index split '", name, "' (expected train, valid or test)");
}

std::string md5_hex(std::string_view bytes) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int n = 0;
  DSV3_CHECK(EVP_Digest(bytes.data(), bytes.size(), md, &n, EVP_md5(), nullptr) == 1, "MD5 failed");
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < n; ++i) {
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

std::string python_float_repr(double x) {
  if (std::isnan(x)) return "NaN";
  if (std::isinf(x)) return x > 0 ? "Infinity" : "-Infinity";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), x, std::chars_format::scientific);
  std::string s(buf, r.ptr);
  std::string sign;
  if (s[0] == '-') {
    sign = "-";
    s.erase(0, 1);
  }
  auto e = s.find('e');
  std::string mant = s.substr(0, e);
  int exp10 = std::stoi(s.substr(e + 1));
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  int decpt = exp10 + 1;  // digits d1d2... = 0.d1d2... * 10^decpt
  int nd = static_cast<int>(digits.size());
  std::string out;
  if (decpt <= -4 || decpt > 16) {
    out = digits.substr(0, 1);
    if (nd > 1) out += "." + digits.substr(1);
    char eb[16];
    std::snprintf(eb, sizeof(eb), "e%c%02d", exp10 < 0 ? '-' : '+', std::abs(exp10));
    out += eb;
  } else if (decpt <= 0) {
    out = "0." + std::string(-decpt, '0') + digits;
  } else if (decpt >= nd) {
    out = digits + std::string(decpt - nd, '0') + ".0";
  } else {
    out = digits.substr(0, decpt) + "." + digits.substr(decpt);
  }
  return sign + out;
}

namespace {

void append_escaped(std::string& out, const std::string& s) {
  char b[16];
  auto u = [&](unsigned cp) {
    std::snprintf(b, sizeof(b), "\\u%04x", cp);
    out += b;
  };
  out += '"';
  for (size_t i = 0; i < s.size();) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    if (c < 0x80) {
      switch (c) {
        case '"':
          out += "\\\"";
          break;
        case '\\':
          out += "\\\\";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\r':
          out += "\\r";
          break;
        case '\t':
          out += "\\t";
          break;
        case '\b':
          out += "\\b";
          break;
        case '\f':
          out += "\\f";
          break;
        default:
          if (c < 0x20)
            u(c);
          else
            out += static_cast<char>(c);
      }
      ++i;
      continue;
    }
    int len = c >= 0xF0 ? 4 : c >= 0xE0 ? 3 : c >= 0xC0 ? 2 : 0;
    unsigned cp = len == 4 ? c & 7 : len == 3 ? c & 15 : c & 31;
    bool ok = len > 0 && i + len <= s.size();
    for (int k = 1; ok && k < len; ++k) {
      unsigned char cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xC0) != 0x80) ok = false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    if (!ok) {  // Python decodes file names with surrogateescape
      u(0xDC00 + c);
      ++i;
      continue;
    }
    if (cp >= 0x10000) {
      cp -= 0x10000;
      u(0xD800 + (cp >> 10));
      u(0xDC00 + (cp & 0x3FF));
    } else {
      u(cp);
    }
    i += len;
  }
  out += '"';
}

void dump(std::string& out, const nlohmann::ordered_json& v, int level) {
  using T = nlohmann::ordered_json::value_t;
  auto nl = [&](int l) {
    out += '\n';
    out.append(static_cast<size_t>(4 * l), ' ');
  };
  switch (v.type()) {
    case T::null:
      out += "null";
      break;
    case T::boolean:
      out += v.get<bool>() ? "true" : "false";
      break;
    case T::number_integer:
      out += std::to_string(v.get<int64_t>());
      break;
    case T::number_unsigned:
      out += std::to_string(v.get<uint64_t>());
      break;
    case T::number_float:
      out += python_float_repr(v.get<double>());
      break;
    case T::string:
      append_escaped(out, v.get<std::string>());
      break;
    case T::array: {
      if (v.empty()) {
        out += "[]";
        break;
      }
      out += '[';
      bool first = true;
      for (const auto& e : v) {
        if (!first) out += ',';
        first = false;
        nl(level + 1);
        dump(out, e, level + 1);
      }
      nl(level);
      out += ']';
      break;
    }
    case T::object: {
      if (v.empty()) {
        out += "{}";
        break;
      }
      out += '{';
      bool first = true;
      for (const auto& [k, e] : v.items()) {
        if (!first) out += ',';
        first = false;
        nl(level + 1);
        append_escaped(out, k);
        out += ": ";
        dump(out, e, level + 1);
      }
      nl(level);
      out += '}';
      break;
    }
    default:
      fail("python_json_dumps: unsupported JSON value");
  }
}

double pairwise_sum(const double* a, size_t n) {
  if (n < 8) {
    double r = -0.0;
    for (size_t i = 0; i < n; ++i) r += a[i];
    return r;
  }
  if (n <= 128) {
    double r[8];
    for (int j = 0; j < 8; ++j) r[j] = a[j];
    size_t i = 8;
    for (; i < n - (n % 8); i += 8)
      for (int j = 0; j < 8; ++j) r[j] += a[i + j];
    double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) res += a[i];
    return res;
  }
  size_t n2 = n / 2;
  n2 -= n2 % 8;
  return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

}  // namespace

std::string python_json_dumps(const nlohmann::ordered_json& value) {
  std::string out;
  dump(out, value, 0);
  return out;
}

std::vector<double> normalize_weights(const std::vector<double>& w) {
  double s = pairwise_sum(w.data(), w.size());
  std::vector<double> out(w.size());
  for (size_t i = 0; i < w.size(); ++i) out[i] = w[i] / s;
  return out;
}

std::array<double, 3> parse_and_normalize_split(const std::string& split) {
  static const std::regex re("[.0-9]+");
  std::vector<double> v;
  for (auto it = std::sregex_iterator(split.begin(), split.end(), re); it != std::sregex_iterator(); ++it) {
    std::string tok = it->str();
    double d = 0;
    auto [p, ec] = std::from_chars(tok.data(), tok.data() + tok.size(), d);
    DSV3_CHECK(ec == std::errc() && p == tok.data() + tok.size(), "invalid split string '", split,
               "': cannot read '", tok, "' as a number");
    v.push_back(d);
  }
  DSV3_CHECK(!v.empty(), "invalid split string '", split, "': expected up to 3 weights like \"969, 30, 1\"");
  DSV3_CHECK(v.size() <= 3, "invalid split string '", split, "': more than 3 weights (train, valid, test)");
  while (v.size() < 3) v.push_back(0.0);
  auto n = normalize_weights(v);
  DSV3_CHECK(std::isfinite(n[0]) && std::isfinite(n[1]) && std::isfinite(n[2]), "invalid split string '",
             split, "': the weights must not all be zero");
  return {n[0], n[1], n[2]};
}

SplitMatrix split_matrix_from_vector(const std::array<double, 3>& v) {
  double ex[4] = {0.0, 0, 0, 0};
  for (int i = 0; i < 3; ++i) ex[i + 1] = ex[i] + v[i];
  SplitMatrix m;
  for (int i = 0; i < 3; ++i)
    if (!(ex[i + 1] <= ex[i])) m[i] = std::make_pair(ex[i], ex[i + 1]);
  return m;
}

std::vector<int64_t> build_sample_idx(UnalignedView<int32_t> sizes, std::span<const int32_t> document_index,
                                      int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch,
                                      bool drop_last_partial_sequence, int add_extra_token) {
  int64_t total = num_epochs * tokens_per_epoch - add_extra_token;
  int64_t num_samples =
      drop_last_partial_sequence
          ? total / seq_length
          : static_cast<int64_t>(std::ceil(static_cast<float>(total) / static_cast<float>(seq_length)));
  DSV3_CHECK(num_samples >= 0, "build_sample_idx: negative sample count");
  std::vector<int64_t> idx(static_cast<size_t>(2 * (num_samples + 1)));
  int64_t k = 0, doc_i = 0, off = 0;
  idx[0] = 0;
  idx[1] = 0;
  ++k;
  const int64_t last = static_cast<int64_t>(document_index.size()) - 1;
  while (k <= num_samples) {
    int64_t remaining = seq_length + add_extra_token;
    while (remaining != 0) {
      DSV3_CHECK(doc_i <= last, "build_sample_idx ran past the document index");
      int64_t len = sizes[document_index[doc_i]] - off;
      remaining -= len;
      if (remaining <= 0) {
        off += remaining + len - add_extra_token;
        remaining = 0;
      } else {
        if (doc_i == last) {
          off = sizes[document_index[doc_i]] - add_extra_token;
          break;
        }
        ++doc_i;
        off = 0;
      }
    }
    idx[2 * k] = doc_i;
    idx[2 * k + 1] = off;
    ++k;
  }
  return idx;
}

GptDataset::GptDataset(std::shared_ptr<const IndexedDataset> dataset, std::string dataset_path, int64_t begin,
                       int64_t end, std::optional<int64_t> num_samples, Split split,
                       const GptDatasetConfig& config)
    : dataset_(std::move(dataset)),
      dataset_path_(std::move(dataset_path)),
      begin_(begin),
      end_(end),
      num_samples_(num_samples),
      split_(split),
      config_(config) {
  DSV3_CHECK(config_.sequence_length >= 1, "--seq-length must be at least 1, got ", config_.sequence_length);
  DSV3_CHECK(!num_samples_ || *num_samples_ >= 0, "the number of samples must not be negative, got ",
             *num_samples_);
  DSV3_CHECK(0 <= begin_ && begin_ <= end_ && end_ <= dataset_->sequence_count(), "split range [", begin_,
             ", ", end_, ") is outside ", dataset_path_, " (", dataset_->sequence_count(), " sequences)");
  NumpyRandomState check_seed(config_.random_seed);
  (void)check_seed;

  auto m = split_matrix_from_vector(parse_and_normalize_split(config_.split));
  nlohmann::ordered_json sm = nlohmann::ordered_json::array();
  for (int i = 0; i < 3; ++i) {
    if (!m[i]) {
      sm.push_back(nullptr);
      continue;
    }
    nlohmann::ordered_json pair = nlohmann::ordered_json::array();
    if (i == 0)
      pair.push_back(0);  // Megatron's bookends start from the int 0
    else
      pair.push_back(m[i]->first);
    pair.push_back(m[i]->second);
    sm.push_back(pair);
  }
  identifiers_["class"] = "GPTDataset";
  identifiers_["dataset_path"] = dataset_path_;
  identifiers_["num_samples"] =
      num_samples_ ? nlohmann::ordered_json(*num_samples_) : nlohmann::ordered_json();
  identifiers_["index_split"] = split_name(split_);
  identifiers_["random_seed"] = config_.random_seed;
  identifiers_["sequence_length"] = config_.sequence_length;
  identifiers_["split"] = config_.split;
  identifiers_["split_matrix"] = sm;
  nlohmann::ordered_json tok;
  tok["class"] = config_.tokenizer_class;
  tok["tokenizer_path"] = nlohmann::ordered_json::array({config_.tokenizer_path});
  identifiers_["tokenizer"] = tok;
  description_ = python_json_dumps(identifiers_);
  hash_ = config_.cache_hash == CacheHash::kMd5 ? md5_hex(description_) : sha256_hex(description_);
  cache_dir_ = config_.path_to_cache && !config_.path_to_cache->empty()
                   ? *config_.path_to_cache
                   : (fs::path(dataset_path_) / "cache" / "GPTDataset_indices").string();

  const auto lengths = dataset_->sequence_lengths();
  for (int64_t i = begin_; i < end_; ++i) tokens_per_epoch_ += lengths[i];

  bool hit = true;
  for (const char* a : {"description.txt", "document_index.npy", "sample_index.npy", "shuffle_index.npy"})
    hit = hit && fs::is_regular_file(cache_path(a));
  if (hit) {
    load();
    loaded_from_cache_ = true;
  } else {
    build();
    save();
  }
}

std::string GptDataset::cache_path(const std::string& affix) const {
  return (fs::path(cache_dir_) / (hash_ + "-GPTDataset-" + split_name(split_) + "-" + affix)).string();
}

void GptDataset::build() {
  const int64_t S = config_.sequence_length;
  const int X = config_.add_extra_token_to_sequence ? 1 : 0;
  DSV3_CHECK(tokens_per_epoch_ > 0, "the ", split_name(split_), " split of ", dataset_path_,
             " has no tokens (", end_ - begin_, " sequences from split '", config_.split,
             "'); change --split or add data");
  num_epochs_ = 1;
  if (num_samples_) {
    int64_t requested = *num_samples_ * S + X, have = tokens_per_epoch_;
    while (have < requested) {
      ++num_epochs_;
      have += tokens_per_epoch_;
    }
  }
  int64_t ns_sans_final = 0;
  if (num_epochs_ > 1) {
    ns_sans_final = ((num_epochs_ - 1) * tokens_per_epoch_ - X) / S;
    int64_t ns_final = *num_samples_ - ns_sans_final;
    int64_t ns_per_epoch = (tokens_per_epoch_ - X) / S;
    DSV3_CHECK(ns_final >= 0 && ns_final <= ns_per_epoch + 1, "internal: final-epoch sample count ", ns_final,
               " out of range");
    separate_final_epoch_ = ns_final < static_cast<int64_t>(0.80 * static_cast<double>(ns_per_epoch));
  }

  NumpyRandomState rs(config_.random_seed);
  auto tiled = [&](int64_t epochs) {
    std::vector<int32_t> d;
    d.reserve(static_cast<size_t>(epochs * (end_ - begin_)));
    for (int64_t e = 0; e < epochs; ++e)
      for (int64_t i = begin_; i < end_; ++i) d.push_back(static_cast<int32_t>(i));
    rs.shuffle(std::span<int32_t>(d));
    return d;
  };
  if (!separate_final_epoch_) {
    document_index_ = tiled(num_epochs_);
  } else {
    document_index_ = tiled(num_epochs_ - 1);
    auto last = tiled(1);
    document_index_.insert(document_index_.end(), last.begin(), last.end());
  }

  bool drop_last = split_ != Split::kValid || config_.drop_last_partial_validation_sequence;
  auto lengths = dataset_->sequence_lengths();
  auto sidx = build_sample_idx(lengths, document_index_, S, num_epochs_, tokens_per_epoch_, drop_last, X);
  int64_t max_size = 0;
  for (int32_t l : lengths) max_size = std::max<int64_t>(max_size, l);
  int64_t sample_idx_max = std::max<int64_t>(static_cast<int64_t>(document_index_.size()), max_size);
  if (sample_idx_max <= std::numeric_limits<int32_t>::max()) {
    sample_index32_.assign(sidx.begin(), sidx.end());
  } else {
    sample_index64_ = std::move(sidx);
  }
  num_sample_rows_ = static_cast<int64_t>((sample_index32_.size() + sample_index64_.size()) / 2);

  const int64_t n = num_sample_rows_ - 1;
  const int64_t first = separate_final_epoch_ ? ns_sans_final : n;
  auto fill = [&](auto& v) {
    v.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<std::remove_reference_t<decltype(v[0])>>(i);
    rs.shuffle(std::span(v.data(), static_cast<size_t>(first)));
    if (first < n) rs.shuffle(std::span(v.data() + first, static_cast<size_t>(n - first)));
  };
  if (n >= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()) - 1)
    fill(shuffle_index64_);
  else
    fill(shuffle_index32_);
}

void GptDataset::save() const {
  std::error_code ec;
  fs::create_directories(cache_dir_, ec);
  try {
    DSV3_CHECK(!ec, "cannot create directory ", cache_dir_, ": ", ec.message());
    int64_t rows = num_sample_rows_;
    write_npy(cache_path("document_index.npy"), document_index_,
              {static_cast<int64_t>(document_index_.size())});
    if (sample_index64_.empty())
      write_npy(cache_path("sample_index.npy"), sample_index32_, {rows, 2});
    else
      write_npy(cache_path("sample_index.npy"), sample_index64_, {rows, 2});
    if (shuffle_index64_.empty())
      write_npy(cache_path("shuffle_index.npy"), shuffle_index32_, {rows - 1});
    else
      write_npy(cache_path("shuffle_index.npy"), shuffle_index64_, {rows - 1});
    write_file_atomically(cache_path("description.txt"), description_);
  } catch (const Error& e) {
    fail("cannot write the GPT dataset index cache (", e.what(),
         "); pass --data-cache-path with a writable directory");
  }
}

void GptDataset::load() {
  auto d = read_npy(cache_path("document_index.npy"));
  auto s = read_npy(cache_path("sample_index.npy"));
  auto h = read_npy(cache_path("shuffle_index.npy"));
  DSV3_CHECK(d.shape.size() == 1, d.path, ": expected a 1-D document index");
  DSV3_CHECK(s.shape.size() == 2 && s.shape[1] == 2 && s.shape[0] >= 1, s.path, ": expected shape (n, 2)");
  DSV3_CHECK(h.shape.size() == 1 && h.shape[0] == s.shape[0] - 1, h.path, ": expected ", s.shape[0] - 1,
             " entries to match ", s.path);
  DSV3_CHECK(!d.fortran_order && !s.fortran_order && !h.fortran_order, "Fortran-order index cache in ",
             cache_dir_);
  document_index_ = d.as<int32_t>();
  if (s.descr == "<i8")
    sample_index64_ = s.as<int64_t>();
  else
    sample_index32_ = s.as<int32_t>();
  if (h.descr == "<i8")
    shuffle_index64_ = h.as<int64_t>();
  else
    shuffle_index32_ = h.as<uint32_t>();
  num_sample_rows_ = s.shape[0];
  // A stale or foreign cache must fail here, not as an out-of-range read later.
  const int64_t nseq = dataset_->sequence_count(), nd = static_cast<int64_t>(document_index_.size());
  for (int32_t v : document_index_)
    DSV3_CHECK(v >= 0 && v < nseq, d.path, ": sequence id ", v, " outside ", dataset_path_, " (", nseq,
               " sequences)");
  for (int64_t r = 0; r < num_sample_rows_; ++r)
    DSV3_CHECK(sample_at(r, 0) >= 0 && sample_at(r, 0) < nd, s.path, ": row ", r,
               " points outside the document index");
  for (int64_t i = 0; i + 1 < num_sample_rows_; ++i)
    DSV3_CHECK(shuffle_at(i) >= 0 && shuffle_at(i) < num_sample_rows_ - 1, h.path, ": entry ", i,
               " out of range");
}

std::vector<int64_t> GptDataset::sample_index() const {
  if (!sample_index64_.empty()) return sample_index64_;
  return {sample_index32_.begin(), sample_index32_.end()};
}

std::vector<int64_t> GptDataset::shuffle_index() const {
  if (!shuffle_index64_.empty()) return shuffle_index64_;
  return {shuffle_index32_.begin(), shuffle_index32_.end()};
}

std::vector<int64_t> GptDataset::sample(int64_t idx) const {
  DSV3_CHECK(idx >= 0 && idx < size(), "sample ", idx, " is outside the ", split_name(split_), " dataset of ",
             dataset_path_, " (", size(), " samples)");
  const int64_t X = config_.add_extra_token_to_sequence ? 1 : 0;
  int64_t j = shuffle_at(idx);
  int64_t d0 = sample_at(j, 0), o0 = sample_at(j, 1), d1 = sample_at(j + 1, 0), o1 = sample_at(j + 1, 1);
  std::vector<int64_t> out;
  out.reserve(static_cast<size_t>(config_.sequence_length + X));
  if (d0 == d1) {
    dataset_->get(document_index_[d0], o0, o1 - o0 + X, out);
  } else {
    for (int64_t i = d0; i <= d1; ++i) {
      int64_t off = i > d0 ? 0 : o0;
      int64_t len = i < d1 ? -1 : o1 + X;
      dataset_->get(document_index_[i], off, len, out);
    }
  }
  const int64_t want = config_.sequence_length + X;
  if (static_cast<int64_t>(out.size()) < want)
    out.resize(static_cast<size_t>(want), -1);  // Megatron's pad id
  return out;
}

}  // namespace dsv3
