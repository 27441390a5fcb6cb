// Inputs the fuzz targets (fuzz/README.md) found that crashed a reader or tripped a sanitizer: each now gets a
// clear dsv3::Error (or, for valid input, the right answer). The same inputs are seeds in fuzz/corpus/.
#include <gtest/gtest.h>

#include <cstring>
#include <fstream>
#include <string>
#include <vector>

#include "core/error.h"
#include "data/indexed_dataset.h"
#include "data/tokenizer/tokenizer.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

void write_bytes(const fs::path& p, const std::string& bytes) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
void put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof v);
}

// A Megatron .idx (version 1) with the given arrays, as the writer lays it out.
std::string idx_bytes(uint8_t dtype_code, const std::vector<int32_t>& lengths,
                      const std::vector<int64_t>& pointers, const std::vector<int64_t>& doc_idx) {
  std::string out("MMIDIDX\0\0", 9);
  put<uint64_t>(out, 1);
  put<uint8_t>(out, dtype_code);
  put<uint64_t>(out, lengths.size());
  put<uint64_t>(out, doc_idx.size());
  for (int32_t l : lengths) put(out, l);
  for (int64_t p : pointers) put(out, p);
  for (int64_t d : doc_idx) put(out, d);
  return out;
}

// Runs f expecting a dsv3::Error whose message contains every needle.
template <typename F>
void expect_error(F&& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "no error; expected " << needles[0];
  } catch (const Error& e) {
    for (const auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

// fuzz_indexed_dataset: only the last sequence pointer was checked against the .bin size, so a corrupt pointer
// of an earlier sequence made get() read outside the mapping (SEGV).
TEST(FuzzRegressions, IndexedDatasetPointerOutsideBin) {
  const auto dir = testing::scratch_dir();
  const std::string prefix = (dir / "ds").string();
  // uint16 tokens: sequence 0 claims byte 1000 of a 6-byte .bin; the last one ends exactly at the end.
  write_bytes(idx_path(prefix), idx_bytes(8, {2, 1}, {1000, 4}, {0, 2}));
  write_bytes(bin_path(prefix), std::string(6, '\1'));
  expect_error([&] { IndexedDataset ds(prefix); },
               {"ds.idx", "sequence 0", "byte 1000", "lies outside", "ds.bin"});
  // A negative pointer likewise.
  write_bytes(idx_path(prefix), idx_bytes(8, {2, 1}, {-2, 4}, {0, 2}));
  expect_error([&] { IndexedDataset ds(prefix); }, {"sequence 0", "byte -2", "lies outside"});
  // The artifact the fuzzer wrote (the same fault in a dataset of 39 sequences).
  const std::string artifact =
      testing::slurp(testing::source_dir() / "fuzz/corpus/indexed_dataset/regression_pointer_outside_bin");
  const std::string sep = "\n--dsv3-fuzz-part--\n";
  const size_t at = artifact.find(sep);
  ASSERT_NE(at, std::string::npos);
  write_bytes(idx_path(prefix), artifact.substr(0, at));
  write_bytes(bin_path(prefix), artifact.substr(at + sep.size()));
  expect_error([&] { IndexedDataset ds(prefix); }, {"lies outside"});
  // A well-formed pair still reads.
  write_bytes(idx_path(prefix), idx_bytes(8, {2, 1}, {0, 4}, {0, 2}));
  write_bytes(bin_path(prefix), std::string(6, '\1'));
  IndexedDataset ok(prefix);
  EXPECT_EQ(ok.get(1), std::vector<int64_t>{257});
}

// fuzz_safetensors: read_f32 of a zero-element F32 tensor passed a null destination to memcpy (UBSan).
TEST(FuzzRegressions, SafetensorsEmptyF32Tensor) {
  const auto dir = testing::scratch_dir();
  const std::string header = R"({"e":{"dtype":"F32","shape":[0,3],"data_offsets":[0,0]}})";
  std::string file;
  put<uint64_t>(file, header.size());
  file += header;
  write_bytes(dir / "e.safetensors", file);
  SafetensorsReader rd((dir / "e.safetensors").string());
  EXPECT_TRUE(rd.read_f32("e").empty());
}

// The committed seed `name` of fuzz target `target`, cut into its parts (fuzz/targets/fuzz_common.h).
std::vector<std::string> seed_parts(const std::string& target, const std::string& name) {
  const std::string in = testing::slurp(testing::source_dir() / "fuzz/corpus" / target / name);
  EXPECT_FALSE(in.empty()) << target << "/" << name;
  const std::string sep = "\n--dsv3-fuzz-part--\n";
  std::vector<std::string> parts;
  size_t from = 0;
  for (size_t at; (at = in.find(sep, from)) != std::string::npos; from = at + sep.size())
    parts.push_back(in.substr(from, at - from));
  parts.push_back(in.substr(from));
  return parts;
}

// fuzz_config: an integer field too large for int64 ("vocab_size": 1.2e49, a float to JSON) was converted
// with static_cast<int64_t> (undefined behaviour; UBSan float-cast-overflow); one above INT64_MAX as an
// unsigned JSON integer wrapped to a negative number.
TEST(FuzzRegressions, ConfigIntegerOutOfRange) {
  expect_error(
      [] { ModelConfig::from_json_string(seed_parts("config", "regression_vocab_size_1e49")[0], "c.json"); },
      {"c.json", "vocab_size", "out of range"});
  std::string tiny = testing::slurp(testing::source_dir() / "examples/deepseek/configs/tiny.json");
  const std::string field = "\"hidden_size\": 32";
  const size_t at = tiny.find(field);
  ASSERT_NE(at, std::string::npos);
  for (const char* big : {"18446744073709551615", "9.3e18", "-1e300"}) {
    std::string cfg = tiny;
    cfg.replace(at, field.size(), std::string("\"hidden_size\": ") + big);
    expect_error([&] { ModelConfig::from_json_string(cfg, "c.json"); },
                 {"c.json", "hidden_size", "out of range"});
  }
}

// fuzz_tokenizer: a BPE vocab id written as a huge float (2.2e115) reached nlohmann's get<int32_t>, an
// out-of-range float to int conversion (undefined behaviour); a fractional id was truncated silently.
TEST(FuzzRegressions, TokenizerVocabIdNotAnInt32) {
  const auto parts = seed_parts("tokenizer", "regression_vocab_id_2e115");
  expect_error([&] { Tokenizer::from_json_strings(parts[0], parts.size() > 1 ? parts[1] : ""); },
               {"BPE vocab entry", "expected an integer in [0, 2147483647]"});
  for (const char* id : {"1.5", "-1", "4294967296"}) {
    const std::string tj =
        std::string(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": )") + id + R"(}, "merges": []}})";
    expect_error([&] { Tokenizer::from_json_strings(tj, ""); }, {"BPE vocab entry \"b\" has id", id});
  }
}

}  // namespace
}  // namespace dsv3
