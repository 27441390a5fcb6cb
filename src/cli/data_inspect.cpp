// `dsv3 data inspect PREFIX`: validates a .bin/.idx pair, prints its counts and decodes the first document.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "cli/commands.h"
#include "core/error.h"
#include "data/indexed_dataset.h"
#include "data/tokenizer/tokenizer.h"

namespace dsv3::cli {

int data_inspect_main(int argc, char** argv) {
  CLI::App app{"Validate a Megatron .bin/.idx pair and show what it holds", "dsv3 data inspect"};
  std::string prefix, tokenizer_model;
  int64_t max_tokens = 256;
  app.add_option("prefix", prefix, "Dataset prefix (PREFIX.bin and PREFIX.idx)")->required();
  app.add_option("--tokenizer-model", tokenizer_model,
                 "HF tokenizer directory to decode with (else ids are shown)");
  app.add_option("--max-tokens", max_tokens, "Show at most this many tokens of the first document");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  if (prefix.size() > 4 && (prefix.ends_with(".bin") || prefix.ends_with(".idx")))
    prefix.resize(prefix.size() - 4);
  IndexedDataset ds(prefix);
  std::printf("dataset: %s\n", prefix.c_str());
  std::printf("dtype: %s\n", dtype_name(ds.dtype()));
  std::printf("sequences: %lld\n", static_cast<long long>(ds.sequence_count()));
  std::printf("documents: %lld\n", static_cast<long long>(ds.document_count()));
  std::printf("tokens: %lld\n", static_cast<long long>(ds.token_count()));
  auto docs = ds.document_indices();
  if (docs.back() != ds.sequence_count())
    std::printf("warning: document indices end at %lld, not at the sequence count\n",
                static_cast<long long>(docs.back()));
  if (ds.document_count() == 0) return 0;
  std::vector<int64_t> ids;
  for (int64_t s = docs[0]; s < docs[1]; ++s) ds.get(s, 0, -1, ids);
  const size_t total = ids.size();
  if (static_cast<int64_t>(ids.size()) > max_tokens) ids.resize(max_tokens);
  std::printf("first document: %zu tokens%s\n", total, ids.size() < total ? " (truncated for display)" : "");
  if (!tokenizer_model.empty()) {
    Tokenizer tok = Tokenizer::from_directory(tokenizer_model);
    std::vector<int32_t> ids32(ids.begin(), ids.end());
    for (auto id : ids32)
      DSV3_CHECK(id >= 0 && id < tok.size(), "token id ", id, " is outside the tokenizer (size ", tok.size(),
                 ")");
    std::printf("%s\n", tok.decode(ids32).c_str());
  } else {
    for (size_t i = 0; i < ids.size(); ++i)
      std::printf("%s%lld", i ? " " : "", static_cast<long long>(ids[i]));
    std::printf("\n");
  }
  return 0;
}

}  // namespace dsv3::cli
