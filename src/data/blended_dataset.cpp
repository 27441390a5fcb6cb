// Megatron-Core BlendedDataset indices and cache, and the single-distribution builder (see
// blended_dataset.h).
#include "data/blended_dataset.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/sha256.h"
#include "data/npy.h"

namespace dsv3 {
namespace fs = std::filesystem;

namespace {

std::string strip(const std::string& s) {
  const char* ws = " \t\n\r\f\v";
  auto b = s.find_first_not_of(ws);
  if (b == std::string::npos) return "";
  return s.substr(b, s.find_last_not_of(ws) - b + 1);
}

// Python float(): surrounding whitespace allowed; the rest must be a number.
std::optional<double> parse_python_float(const std::string& s) {
  std::string t = strip(s);
  if (t.empty()) return std::nullopt;
  if (t.size() > 1 && t[0] == '0' && (t[1] == 'x' || t[1] == 'X')) return std::nullopt;
  char* end = nullptr;
  double v = std::strtod(t.c_str(), &end);
  if (end != t.c_str() + t.size()) return std::nullopt;
  return v;
}

}  // namespace

DataBlend parse_data_path(const std::vector<std::string>& tokens) {
  DSV3_CHECK(!tokens.empty(), "--data-path needs at least one dataset prefix");
  DataBlend b;
  if (tokens.size() % 2 == 0) {
    std::vector<double> w;
    bool all = true, any = false;
    for (size_t i = 0; i < tokens.size(); i += 2) {
      auto v = parse_python_float(tokens[i]);
      all = all && v.has_value();
      any = any || v.has_value();
      if (v) w.push_back(*v);
    }
    DSV3_CHECK(all || !any,
               "--data-path mixes weights and prefixes: give either prefixes only, or "
               "'weight prefix' pairs (got ",
               tokens.size(), " values)");
    if (all) {
      for (size_t i = 0; i + 1 < tokens.size(); i += 2) {
        double v = w[i / 2];
        DSV3_CHECK(std::isfinite(v) && v > 0, "--data-path weight '", tokens[i], "' for ", tokens[i + 1],
                   " must be a positive number");
        b.prefixes.push_back(strip(tokens[i + 1]));
      }
      b.weights = std::move(w);
      return b;
    }
  }
  for (const auto& t : tokens) b.prefixes.push_back(strip(t));
  return b;
}

void build_blending_indices(const std::vector<double>& weights, int64_t size,
                            std::vector<int16_t>& dataset_index, std::vector<int64_t>& dataset_sample_index) {
  const size_t n = weights.size();
  DSV3_CHECK(n > 0 && n < 32767, "a blend needs 1..32766 datasets, got ", n);
  std::vector<int64_t> current(n, 0);
  dataset_index.assign(static_cast<size_t>(size), 0);
  dataset_sample_index.assign(static_cast<size_t>(size), 0);
  for (int64_t i = 0; i < size; ++i) {
    double x = std::max(static_cast<double>(i), 1.0);
    size_t best = 0;
    double best_err = weights[0] * x - static_cast<double>(current[0]);
    for (size_t d = 1; d < n; ++d) {
      double err = weights[d] * x - static_cast<double>(current[d]);
      if (err > best_err) {
        best_err = err;
        best = d;
      }
    }
    dataset_index[i] = static_cast<int16_t>(best);
    dataset_sample_index[i] = current[best]++;
  }
}

BlendedDataset::BlendedDataset(std::vector<std::unique_ptr<GptDataset>> datasets, std::vector<double> weights,
                               int64_t size, const GptDatasetConfig& config)
    : datasets_(std::move(datasets)), config_(config) {
  DSV3_CHECK(!datasets_.empty() && datasets_.size() == weights.size(),
             "a blend needs one weight per dataset");
  for (double w : weights) DSV3_CHECK(w > 0, "blend weights must be positive");
  DSV3_CHECK(size >= 0, "blend size must not be negative");
  weights_ = normalize_weights(weights);
  split_ = parse_split_name(datasets_[0]->unique_identifiers()["index_split"].get<std::string>());

  nlohmann::ordered_json id;
  id["class"] = "BlendedDataset";
  id["datasets"] = nlohmann::ordered_json::array();
  for (const auto& d : datasets_) id["datasets"].push_back(d->unique_identifiers());
  id["split"] = split_name(split_);
  id["weights"] = nlohmann::ordered_json::array();
  for (double w : weights_) id["weights"].push_back(w);
  id["size"] = size;
  description_ = python_json_dumps(id);
  hash_ = config_.cache_hash == CacheHash::kMd5 ? md5_hex(description_) : sha256_hex(description_);

  std::string p_desc = cache_path("description.txt"), p_di = cache_path("dataset_index.npy"),
              p_dsi = cache_path("dataset_sample_index.npy");
  if (!p_desc.empty() && fs::is_regular_file(p_desc) && fs::is_regular_file(p_di) &&
      fs::is_regular_file(p_dsi)) {
    auto a = read_npy(p_di), b = read_npy(p_dsi);
    DSV3_CHECK(a.shape == std::vector<int64_t>{size} && b.shape == std::vector<int64_t>{size}, p_di, " / ",
               p_dsi, ": expected ", size, " entries");
    dataset_index_ = a.as<int16_t>();
    dataset_sample_index_ = b.as<int64_t>();
    loaded_from_cache_ = true;
  } else {
    build_blending_indices(weights_, size, dataset_index_, dataset_sample_index_);
  }
  std::vector<int64_t> counts(datasets_.size(), 0);
  for (size_t i = 0; i < dataset_index_.size(); ++i) {
    int16_t d = dataset_index_[i];
    DSV3_CHECK(d >= 0 && static_cast<size_t>(d) < datasets_.size(), p_di, ": dataset id ", d,
               " out of range");
    ++counts[d];
  }
  for (size_t d = 0; d < datasets_.size(); ++d)
    DSV3_CHECK(counts[d] <= datasets_[d]->size(), "the ", split_name(split_), " blend oversamples dataset ",
               d, " (", datasets_[d]->unique_identifiers()["dataset_path"].get<std::string>(), "): it needs ",
               counts[d], " samples but has ", datasets_[d]->size());
  if (!loaded_from_cache_ && !p_desc.empty()) {
    try {
      std::error_code ec;
      fs::create_directories(*config_.path_to_cache, ec);
      DSV3_CHECK(!ec, "cannot create directory ", *config_.path_to_cache, ": ", ec.message());
      write_npy(p_di, dataset_index_, {size});
      write_npy(p_dsi, dataset_sample_index_, {size});
      write_file_atomically(p_desc, description_);
    } catch (const Error& e) {
      fail("cannot write the blended dataset index cache (", e.what(),
           "); pass --data-cache-path with a writable directory");
    }
  }
}

std::string BlendedDataset::cache_path(const std::string& affix) const {
  if (!config_.path_to_cache || config_.path_to_cache->empty()) return "";
  return (fs::path(*config_.path_to_cache) / (hash_ + "-BlendedDataset-" + split_name(split_) + "-" + affix))
      .string();
}

std::vector<int64_t> BlendedDataset::sample(int64_t idx) const {
  DSV3_CHECK(idx >= 0 && idx < size(), "sample ", idx, " is outside the blended ", split_name(split_),
             " dataset (", size(), " samples)");
  return datasets_[dataset_index_[idx]]->sample(dataset_sample_index_[idx]);
}

std::unique_ptr<SampleDataset> build_split_dataset(const DataBlend& blend, Split split,
                                                   std::optional<int64_t> num_samples,
                                                   const GptDatasetConfig& config) {
  DSV3_CHECK(!blend.prefixes.empty(), "--data-path needs at least one dataset prefix");
  auto matrix = split_matrix_from_vector(parse_and_normalize_split(config.split));
  const int s = static_cast<int>(split);
  DSV3_CHECK(matrix[s].has_value(), "the ", split_name(split), " split is empty under --split '",
             config.split, "' (its weight is 0)");
  auto mid = [&](const std::string& prefix, std::optional<int64_t> n) {
    auto low = std::make_shared<const IndexedDataset>(prefix);
    double count = static_cast<double>(low->sequence_count());
    auto beg = static_cast<int64_t>(std::nearbyint(matrix[s]->first * count));
    auto end = static_cast<int64_t>(std::nearbyint(matrix[s]->second * count));
    return std::make_unique<GptDataset>(low, prefix, beg, end, n, split, config);
  };
  if (blend.prefixes.size() == 1 && !blend.weights) return mid(blend.prefixes[0], num_samples);

  std::vector<std::unique_ptr<GptDataset>> parts;
  std::vector<double> weights;
  int64_t size = 0;
  if (blend.weights) {
    DSV3_CHECK(num_samples.has_value(), "weighted --data-path needs a number of samples");
    weights = normalize_weights(*blend.weights);
    for (size_t i = 0; i < blend.prefixes.size(); ++i) {
      auto n = static_cast<int64_t>(std::ceil(static_cast<double>(*num_samples) * weights[i] * 1.005));
      parts.push_back(mid(blend.prefixes[i], n));
      size += n;
    }
  } else {
    int64_t total = 0;
    for (const auto& p : blend.prefixes) {
      parts.push_back(mid(p, std::nullopt));
      weights.push_back(static_cast<double>(parts.back()->size()));
      total += parts.back()->size();
    }
    size = num_samples ? std::min(*num_samples, total) : total;
  }
  return std::make_unique<BlendedDataset>(std::move(parts), std::move(weights), size, config);
}

}  // namespace dsv3
