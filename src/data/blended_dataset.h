// Megatron-Core's BlendedDataset and the part of BlendedMegatronDatasetBuilder that turns `--data-path`
// (a prefix, or weight/prefix pairs) into one split's dataset. spec/megatron-deepseek-system.md §4.7.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "data/gpt_dataset.h"

namespace dsv3 {

// Megatron's get_blend_from_list: an even count whose every other token parses as a float is
// (weight, prefix) pairs; anything else is a list of prefixes (weights absent). Prefixes are stripped.
struct DataBlend {
  std::vector<std::string> prefixes;
  std::optional<std::vector<double>> weights;
};
DataBlend parse_data_path(const std::vector<std::string>& tokens);

// helpers.cpp build_blending_indices: greedy argmax of w_d * max(i, 1) - count_d, ties to the lowest d.
void build_blending_indices(const std::vector<double>& weights, int64_t size,
                            std::vector<int16_t>& dataset_index, std::vector<int64_t>& dataset_sample_index);

class BlendedDataset : public SampleDataset {
 public:
  // `weights` are normalised here (Megatron normalises again even if the builder already did); cached under
  // config.path_to_cache only (Megatron has no default directory for blends).
  BlendedDataset(std::vector<std::unique_ptr<GptDataset>> datasets, std::vector<double> weights, int64_t size,
                 const GptDatasetConfig& config);

  int64_t size() const override { return static_cast<int64_t>(dataset_index_.size()); }
  std::vector<int64_t> sample(int64_t idx) const override;

  const std::string& description() const { return description_; }
  const std::string& description_hash() const { return hash_; }
  std::string cache_path(const std::string& affix) const;  // empty without a cache directory
  bool loaded_from_cache() const { return loaded_from_cache_; }
  const std::vector<int16_t>& dataset_index() const { return dataset_index_; }
  const std::vector<int64_t>& dataset_sample_index() const { return dataset_sample_index_; }
  const std::vector<double>& weights() const { return weights_; }
  const GptDataset& dataset(size_t i) const { return *datasets_[i]; }
  size_t num_datasets() const { return datasets_.size(); }

 private:
  std::vector<std::unique_ptr<GptDataset>> datasets_;
  std::vector<double> weights_;
  Split split_;
  GptDatasetConfig config_;
  std::string description_, hash_;
  bool loaded_from_cache_ = false;
  std::vector<int16_t> dataset_index_;
  std::vector<int64_t> dataset_sample_index_;
};

// One split of Megatron's BlendedMegatronDatasetBuilder (blend from a single distribution, `--split`):
// a single prefix without weight gives a GptDataset; otherwise mid-level GptDatasets of
// ceil(num_samples * w * 1.005) samples each, blended to their sum. `num_samples` nullopt = one epoch.
std::unique_ptr<SampleDataset> build_split_dataset(const DataBlend& blend, Split split,
                                                   std::optional<int64_t> num_samples,
                                                   const GptDatasetConfig& config);

}  // namespace dsv3
