// `dsv3 data samples`: writes the first K samples of one split of Megatron's GPT (or blended) dataset, one
// line of seq_length+1 space-separated token ids per sample, in the order Megatron's training would read
// them.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "core/atomic_file.h"
#include "core/error.h"
#include "data/blended_dataset.h"
#include "data/gpt_dataset.h"

namespace dsv3::cli {

int data_samples_main(int argc, char** argv) {
  CLI::App app{"Write Megatron's GPT dataset samples in training order", "dsv3 data samples"};
  std::vector<std::string> data_path;
  std::string split = "969, 30, 1", index_split = "train", tokenizer_model, output, cache_hash = "sha256";
  std::string data_cache_path;
  int64_t seq_length = 0, seed = 1234, num_samples = 0;
  app.add_option("--data-path", data_path,
                 "Dataset prefix, or 'weight prefix' pairs (Megatron's --data-path); may repeat")
      ->required()
      ->expected(1, CLI::detail::expected_max_vector_size);
  app.add_option("--split", split, "Megatron split string, e.g. \"969, 30, 1\"")->capture_default_str();
  app.add_option("--seq-length", seq_length, "Sequence length (each sample has seq_length+1 ids)")
      ->required();
  app.add_option("--seed", seed, "Random seed (numpy RandomState)")->capture_default_str();
  app.add_option("--num-samples", num_samples, "Number of samples requested from the split")->required();
  app.add_option("--index-split", index_split, "train, valid or test")->capture_default_str();
  app.add_option("--tokenizer-model", tokenizer_model,
                 "Tokenizer directory (only its path string enters Megatron's cache description)")
      ->required();
  app.add_option("--output", output, "Output file")->required();
  app.add_option("--data-cache-path", data_cache_path,
                 "Index cache directory (default: <prefix>/cache/GPTDataset_indices)");
  app.add_option(
         "--cache-hash", cache_hash,
         "Hash naming the cache files: sha256 (Intel Gaudi Megatron-LM) or md5 (upstream Megatron-Core)")
      ->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }

  DSV3_CHECK(seq_length >= 1, "--seq-length must be at least 1, got ", seq_length);
  DSV3_CHECK(num_samples >= 1, "--num-samples must be at least 1, got ", num_samples);
  DSV3_CHECK(cache_hash == "sha256" || cache_hash == "md5", "--cache-hash must be sha256 or md5, got '",
             cache_hash, "'");
  GptDatasetConfig config;
  config.random_seed = seed;
  config.sequence_length = seq_length;
  config.split = split;
  config.tokenizer_path = tokenizer_model;
  if (!data_cache_path.empty()) config.path_to_cache = data_cache_path;
  config.cache_hash = cache_hash == "md5" ? CacheHash::kMd5 : CacheHash::kSha256;
  Split which = parse_split_name(index_split);

  auto ds = build_split_dataset(parse_data_path(data_path), which, num_samples, config);
  DSV3_CHECK(ds->size() >= num_samples, "the ", index_split, " dataset has only ", ds->size(),
             " samples, fewer than --num-samples ", num_samples);

  AtomicFile out(output);
  std::string line;
  for (int64_t i = 0; i < num_samples; ++i) {
    auto s = ds->sample(i);
    line.clear();
    for (size_t k = 0; k < s.size(); ++k) {
      if (k) line += ' ';
      line += std::to_string(s[k]);
    }
    line += '\n';
    out.write(line);
  }
  out.commit();
  return 0;
}

}  // namespace dsv3::cli
