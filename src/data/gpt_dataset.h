// Megatron-Core's GPTDataset: split over sequences, epochs, the separate-final-epoch rule, numpy-RandomState
// shuffles, build_sample_idx and the sample fetch, with Megatron's .npy index cache (same file names, same
// description text and hash). spec/megatron-deepseek-system.md §4.2-4.6; golden files from Megatron-Core's
// own code in tests/golden/megatron_dataset (tests/reference/megatron_dataset_golden.py).
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "core/unaligned_view.h"
#include "data/indexed_dataset.h"

namespace dsv3 {

enum class Split { kTrain = 0, kValid = 1, kTest = 2 };
const char* split_name(Split s);                  // "train" / "valid" / "test"
Split parse_split_name(const std::string& name);  // throws on anything else

// Which hash names the cache files. The seed system (Intel Gaudi Megatron-LM) uses sha256; upstream
// Megatron-Core uses md5. The description text is the same either way.
enum class CacheHash { kSha256, kMd5 };
std::string md5_hex(std::string_view bytes);

// Python's repr(float) (shortest round trip; exponent form below 1e-4 and from 1e16), as json.dumps writes
// it.
std::string python_float_repr(double x);
// json.dumps(value, indent=4) with Python's defaults (ensure_ascii, ", " / ": " separators as indent makes
// them).
std::string python_json_dumps(const nlohmann::ordered_json& value);

// Megatron's parse_and_normalize_split: numbers matched by [.0-9]+, padded with 0 to 3, divided by their sum.
std::array<double, 3> parse_and_normalize_split(const std::string& split);
// convert_split_vector_to_split_matrix: cumulative bookends; a zero-width split is absent (None).
using SplitMatrix = std::array<std::optional<std::pair<double, double>>, 3>;
SplitMatrix split_matrix_from_vector(const std::array<double, 3>& v);
// numpy.sum (pairwise) then element-wise division, like megatron.core.datasets.utils.normalize.
std::vector<double> normalize_weights(const std::vector<double>& w);

struct GptDatasetConfig {
  int64_t random_seed = 1234;
  int64_t sequence_length = 0;
  std::string split = "969, 30, 1";  // the raw string: it enters the cache description as written
  std::string tokenizer_class = "_HuggingFaceTokenizer";
  std::string tokenizer_path;                // --tokenizer-model, as given
  std::optional<std::string> path_to_cache;  // --data-cache-path
  CacheHash cache_hash = CacheHash::kSha256;
  bool add_extra_token_to_sequence = true;
  bool drop_last_partial_validation_sequence = true;
};

// A dataset that hands out samples of sequence_length + 1 token ids.
class SampleDataset {
 public:
  virtual ~SampleDataset() = default;
  virtual int64_t size() const = 0;
  virtual std::vector<int64_t> sample(int64_t idx) const = 0;
};

class GptDataset : public SampleDataset {
 public:
  // `dataset_path` is the prefix as the user wrote it (it enters the description and the default cache dir);
  // [begin, end) are the split's sequence indices; num_samples nullopt = one epoch.
  GptDataset(std::shared_ptr<const IndexedDataset> dataset, std::string dataset_path, int64_t begin,
             int64_t end, std::optional<int64_t> num_samples, Split split, const GptDatasetConfig& config);

  int64_t size() const override { return num_sample_rows_ - 1; }
  std::vector<int64_t> sample(int64_t idx) const override;

  // Megatron's unique_identifiers (an ordered dict) and unique_description (json.dumps(indent=4)).
  const nlohmann::ordered_json& unique_identifiers() const { return identifiers_; }
  const std::string& description() const { return description_; }
  const std::string& description_hash() const { return hash_; }
  // Directory and "{hash}-GPTDataset-{split}" base of the cache files.
  const std::string& cache_dir() const { return cache_dir_; }
  std::string cache_path(const std::string& affix) const;  // affix e.g. "document_index.npy"
  bool loaded_from_cache() const { return loaded_from_cache_; }

  const std::vector<int32_t>& document_index() const { return document_index_; }
  // sample_index as int64 [rows][2] flattened, whatever dtype it is stored in.
  std::vector<int64_t> sample_index() const;
  bool sample_index_is_int64() const { return !sample_index64_.empty(); }
  std::vector<int64_t> shuffle_index() const;
  bool shuffle_index_is_int64() const { return !shuffle_index64_.empty(); }
  int64_t num_epochs() const { return num_epochs_; }
  bool separate_final_epoch() const { return separate_final_epoch_; }
  int64_t tokens_per_epoch() const { return tokens_per_epoch_; }

 private:
  void build();
  void save() const;
  void load();
  int64_t sample_at(int64_t row, int col) const {
    return sample_index64_.empty() ? sample_index32_[2 * row + col] : sample_index64_[2 * row + col];
  }
  int64_t shuffle_at(int64_t i) const {
    return shuffle_index64_.empty() ? static_cast<int64_t>(shuffle_index32_[i]) : shuffle_index64_[i];
  }

  std::shared_ptr<const IndexedDataset> dataset_;
  std::string dataset_path_;
  int64_t begin_, end_;
  std::optional<int64_t> num_samples_;
  Split split_;
  GptDatasetConfig config_;
  nlohmann::ordered_json identifiers_;
  std::string description_, hash_, cache_dir_;
  bool loaded_from_cache_ = false;

  int64_t tokens_per_epoch_ = 0, num_epochs_ = 0;
  bool separate_final_epoch_ = false;
  std::vector<int32_t> document_index_;
  std::vector<int32_t> sample_index32_;
  std::vector<int64_t> sample_index64_;
  std::vector<uint32_t> shuffle_index32_;
  std::vector<int64_t> shuffle_index64_;
  int64_t num_sample_rows_ = 0;
};

// helpers.cpp build_sample_idx (T = int64 here; callers narrow). Returns [rows][2] flattened.
std::vector<int64_t> build_sample_idx(UnalignedView<int32_t> sizes, std::span<const int32_t> document_index,
                                      int64_t seq_length, int64_t num_epochs, int64_t tokens_per_epoch,
                                      bool drop_last_partial_sequence, int add_extra_token);

}  // namespace dsv3
