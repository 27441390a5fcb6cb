// `dsv3 preprocess` against .bin/.idx files written by Megatron-Core's builder from transformers' ids
// (tests/reference/preprocess_golden.py), plus its behaviour on bad input.
#include "data/preprocess.h"

#include <unistd.h>
#include <zlib.h>

#include <fstream>
#include <iterator>

#include "core/error.h"
#include "data/tokenizer/tokenizer.h"
#include "test_util.h"

namespace dsv3 {
namespace {

namespace fs = std::filesystem;

using testing::slurp;

const fs::path kGolden = testing::source_dir() / "tests/golden/preprocess";
const fs::path kInput = kGolden / "input.jsonl";
const fs::path kTiny = testing::data_dir() / "tiny-4k";

PreprocessOptions tiny_options(const fs::path& out_dir) {
  PreprocessOptions o;
  o.input = kInput.string();
  o.output_prefix = (out_dir / "out").string();
  o.tokenizer_model = kTiny.string();
  o.append_eod = true;
  return o;
}

void quiet(const std::string&) {}

void expect_same_as_golden(const fs::path& out_dir, const std::string& golden,
                           const std::string& key = "text") {
  const auto ours = out_dir / ("out_" + key + "_document");
  const auto ref = kGolden / (golden + "_" + key + "_document");
  EXPECT_EQ(slurp(ours.string() + ".idx"), slurp(ref.string() + ".idx")) << golden << " " << key;
  EXPECT_EQ(slurp(ours.string() + ".bin"), slurp(ref.string() + ".bin")) << golden << " " << key;
}

TEST(Preprocess, MatchesMegatronOnePartition) {
  for (int workers : {1, 2}) {
    const auto dir = testing::scratch_dir();
    auto o = tiny_options(dir);
    o.workers = workers;
    auto st = preprocess(o, quiet);
    EXPECT_EQ(st.documents, 39);
    expect_same_as_golden(dir, "tiny_p1_eod");
  }
}

TEST(Preprocess, RoundRobinPartitionsMatchMegatronMergeOrder) {
  const auto dir = testing::scratch_dir();
  auto o = tiny_options(dir);
  o.workers = 3;
  o.partitions = 3;
  preprocess(o, quiet);
  expect_same_as_golden(dir, "tiny_p3_eod");
  // Partition intermediates are merged and removed: only the final pair remains.
  EXPECT_EQ(std::distance(fs::directory_iterator(dir), fs::directory_iterator()), 2);
}

TEST(Preprocess, SequentialPartitionsKeepInputOrder) {
  const auto dir = testing::scratch_dir();
  auto o = tiny_options(dir);
  o.workers = 2;
  o.partitions = 2;
  o.keep_sequential_samples = true;
  preprocess(o, quiet);
  expect_same_as_golden(dir, "tiny_p1_eod");
}

TEST(Preprocess, FullTokenizerTwoKeysInt32) {
  const auto dir = testing::scratch_dir();
  auto o = tiny_options(dir);
  o.tokenizer_model = (testing::data_dir() / "deepseek-v3-tokenizer").string();  // tokenizer.json.gz
  o.append_eod = false;
  o.json_keys = {"text", "title"};
  o.workers = 2;
  preprocess(o, quiet);
  expect_same_as_golden(dir, "full_p1_two_keys", "text");
  expect_same_as_golden(dir, "full_p1_two_keys", "title");
}

TEST(Preprocess, GzipAndGlobInputs) {
  const auto dir = testing::scratch_dir();
  const std::string text = slurp(kInput);
  const auto gz_path = dir / "in" / "input.jsonl.gz";
  fs::create_directories(gz_path.parent_path());
  gzFile gz = gzopen(gz_path.c_str(), "wb");
  ASSERT_TRUE(gz);
  ASSERT_EQ(gzwrite(gz, text.data(), text.size()), static_cast<int>(text.size()));
  gzclose(gz);
  auto o = tiny_options(dir);
  o.input = (dir / "in" / "*.gz").string();
  preprocess(o, quiet);
  expect_same_as_golden(dir, "tiny_p1_eod");
}

// Writes `lines` as a JSONL file and returns its path.
fs::path write_jsonl(const fs::path& dir, const std::vector<std::string>& lines) {
  auto p = dir / "bad.jsonl";
  std::ofstream f(p);
  for (auto& l : lines) f << l << "\n";
  return p;
}

void expect_bad(const std::vector<std::string>& lines, const std::string& needle) {
  const auto dir = testing::scratch_dir();
  auto o = tiny_options(dir);
  o.input = write_jsonl(dir, lines).string();
  try {
    preprocess(o, quiet);
    ADD_FAILURE() << "no error; expected " << needle;
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
  // Nothing under the final names, and no temporaries left behind.
  for (auto& entry : fs::directory_iterator(dir))
    EXPECT_EQ(entry.path().filename(), "bad.jsonl") << "left behind: " << entry.path();
}

TEST(Preprocess, BadLinesStopWithFileAndLine) {
  // Enough good lines before the bad one that several chunks are already written when it is met.
  std::vector<std::string> lines(1500, R"({"text": "fine"})");
  lines.push_back(R"({"text": "unterminated)");
  expect_bad(lines, "bad.jsonl:1501: malformed JSON");
  expect_bad({R"({"text": "a"})", R"({"body": "a"})"}, "bad.jsonl:2: key \"text\" is missing");
  expect_bad({R"({"text": 3})"}, "bad.jsonl:1: key \"text\" is a number");
  expect_bad({R"({"text": ["a", null]})"}, "bad.jsonl:1: key \"text\" is a list holding null");
  expect_bad({R"(["text"])"}, "bad.jsonl:1: expected a JSON object");
  expect_bad({""}, "bad.jsonl:1: malformed JSON");
}

TEST(Preprocess, SkipBadLinesCountsAndReports) {
  const auto dir = testing::scratch_dir();
  auto o = tiny_options(dir);
  o.input = write_jsonl(dir, {R"({"text": "one"})", "{oops", R"({"text": "two"})", R"({"x": 1})"}).string();
  o.skip_bad_lines = true;
  auto st = preprocess(o, quiet);
  EXPECT_EQ(st.documents, 2);
  EXPECT_EQ(st.bad_lines, 2);
  ASSERT_EQ(st.first_bad.size(), 2u);
  EXPECT_NE(st.first_bad[0].find("bad.jsonl:2:"), std::string::npos);
  EXPECT_NE(st.first_bad[1].find("bad.jsonl:4:"), std::string::npos);
}

TEST(Preprocess, FlagErrors) {
  const auto dir = testing::scratch_dir();
  auto o = tiny_options(dir);
  o.workers = 3;
  o.partitions = 2;
  EXPECT_THROW(preprocess(o, quiet), Error);  // Megatron: workers must divide by partitions
  o = tiny_options(dir);
  o.input = (dir / "nothing*.jsonl").string();
  EXPECT_THROW(preprocess(o, quiet), Error);
  o = tiny_options(dir);
  o.output_prefix = (dir / "no/such/dir/out").string();
  EXPECT_THROW(preprocess(o, quiet), Error);
}

// The command line: Megatron's flags work, flags we do not implement are refused by name.
int run(const std::string& args, std::string* err = nullptr) {
  const auto log = fs::temp_directory_path() / ("dsv3-cli-" + std::to_string(::getpid()) + ".log");
  int rc =
      std::system((testing::dsv3_binary().string() + " " + args + " >" + log.string() + " 2>&1").c_str());
  if (err) *err = slurp(log);
  return WEXITSTATUS(rc);
}

TEST(PreprocessCli, MegatronFlagsAndInspect) {
  const auto dir = testing::scratch_dir();
  const std::string common = "--input " + kInput.string() + " --output-prefix " + (dir / "out").string() +
                             " --tokenizer-type HuggingFaceTokenizer --tokenizer-model " + kTiny.string();
  std::string out;
  ASSERT_EQ(run("preprocess " + common +
                    " --workers 2 --partitions 1 --append-eod --json-keys text "
                    "--log-interval 10",
                &out),
            0)
      << out;
  EXPECT_NE(out.find("Processed 30 documents"), std::string::npos) << out;
  expect_same_as_golden(dir, "tiny_p1_eod");
  ASSERT_EQ(
      run("data inspect " + (dir / "out_text_document").string() + " --tokenizer-model " + kTiny.string(),
          &out),
      0)
      << out;
  EXPECT_NE(out.find("documents: 39"), std::string::npos) << out;
  EXPECT_NE(out.find("<｜begin▁of▁sentence｜>Fellow-Citizens"), std::string::npos) << out;

  EXPECT_EQ(run("preprocess " + common + " --workers 1 --split-sentences", &out), 1);
  EXPECT_NE(out.find("--split-sentences is not supported"), std::string::npos) << out;
  EXPECT_EQ(run("preprocess --input " + kInput.string() + " --output-prefix " + (dir / "x").string() +
                    " --tokenizer-type GPT2BPETokenizer --tokenizer-model " + kTiny.string() + " --workers 1",
                &out),
            1);
  EXPECT_NE(out.find("GPT2BPETokenizer"), std::string::npos) << out;
}

// encode_jsonl_line (the per-line entry point the fuzz target uses) gives the ids and errors of the job itself.
TEST(Preprocess, EncodeJsonlLineIsThePerLineStep) {
  const Tokenizer tok = Tokenizer::from_directory(testing::data_dir() / "tiny-4k");
  PreprocessOptions opt;
  opt.append_eod = true;
  opt.json_keys = {"text", "title"};
  const EncodedLine ok = encode_jsonl_line(R"({"title": "T", "text": ["a b", "", "c"]})"
                                           "\n",
                                           opt, tok, tok.eos_id());
  EXPECT_EQ(ok.error, "");
  // Megatron's Encoder: every non-empty encoding is a sequence (with BOS, "" is not empty), EOD after a key's last.
  std::vector<int32_t> want, lengths;
  for (const char* sentence : {"a b", "", "c", "T"}) {
    const std::vector<int32_t> ids = tok.encode_for_model(sentence);
    want.insert(want.end(), ids.begin(), ids.end());
    lengths.push_back(static_cast<int32_t>(ids.size()));
    if (sentence[0] == 'c' || sentence[0] == 'T') {
      want.push_back(*tok.eos_id());
      ++lengths.back();
    }
  }
  EXPECT_EQ(ok.ids, want);
  EXPECT_EQ(ok.lengths, lengths);
  EXPECT_EQ(ok.key_seq_end, (std::vector<uint32_t>{3, 4}));
  EXPECT_EQ(encode_jsonl_line(R"({"text": "x"})", opt, tok, tok.eos_id()).error, "key \"title\" is missing");
  EXPECT_EQ(encode_jsonl_line("[1]", opt, tok, tok.eos_id()).error, "expected a JSON object, got an array");
  EXPECT_NE(encode_jsonl_line("{", opt, tok, tok.eos_id()).error.find("malformed JSON"), std::string::npos);
}

}  // namespace
}  // namespace dsv3
