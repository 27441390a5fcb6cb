// The preprocess pipeline: a reader feeds chunks of lines to tokenizer threads; finished chunks are
// written in input order. Megatron's partitions (round-robin line assignment, merged in partition order)
// are reproduced by writing each partition to its own temporary dataset and merging at the end; with
// --keep-sequential-samples the partitions are contiguous, so the order is simply the input order.
#include "data/preprocess.h"

#include <simdjson.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <thread>

#include "core/error.h"
#include "data/indexed_dataset.h"
#include "data/line_reader.h"
#include "data/tokenizer/tokenizer.h"

namespace dsv3 {
namespace {

constexpr size_t kChunkBytes = 1 << 20;
constexpr size_t kChunkLines = 512;
constexpr int kMaxReportedBadLines = 5;

using Doc = EncodedLine;

struct Chunk {
  std::vector<std::string> lines;
  std::vector<int64_t> line_index;  // global 0-based line index (partition assignment)
  std::vector<std::string> where;   // "file:line" per line, for messages
  std::vector<Doc> docs;
  bool done = false;
};

const char* json_type_name(simdjson::dom::element_type t) {
  using T = simdjson::dom::element_type;
  switch (t) {
    case T::ARRAY:
      return "an array";
    case T::OBJECT:
      return "an object";
    case T::INT64:
    case T::UINT64:
    case T::DOUBLE:
      return "a number";
    case T::STRING:
      return "a string";
    case T::BOOL:
      return "a boolean";
    case T::NULL_VALUE:
      return "null";
  }
  return "unknown";
}

// Encodes one JSONL line as Megatron's Encoder.encode does: each key's value is one sentence (a string) or
// a list of sentences; empty sentences are dropped; EOD goes after the last sentence of a non-empty doc.
void encode_line(std::string_view line, const PreprocessOptions& opt, const Tokenizer& tok,
                 std::optional<int32_t> eod, simdjson::dom::parser& parser, Doc& doc) {
  simdjson::dom::element root;
  if (auto err = parser.parse(line.data(), line.size(), true).get(root)) {
    doc.error = std::string("malformed JSON: ") + simdjson::error_message(err);
    return;
  }
  simdjson::dom::object obj;
  if (root.get(obj)) {
    doc.error = std::string("expected a JSON object, got ") + json_type_name(root.type());
    return;
  }
  for (const auto& key : opt.json_keys) {
    simdjson::dom::element value;
    if (obj.at_key(key).get(value)) {
      doc.error = "key \"" + key + "\" is missing";
      return;
    }
    const size_t key_begin_ids = doc.ids.size();
    auto add_sentence = [&](std::string_view text) {
      const std::vector<int32_t> sentence = tok.encode_for_model(text);
      if (sentence.empty()) return;
      doc.ids.insert(doc.ids.end(), sentence.begin(), sentence.end());
      doc.lengths.push_back(static_cast<int32_t>(sentence.size()));
    };
    std::string_view text;
    simdjson::dom::array list;
    if (!value.get(text)) {
      add_sentence(text);
    } else if (!value.get(list)) {
      for (auto item : list) {
        if (item.get(text)) {
          doc.error = "key \"" + key + "\" is a list holding " + json_type_name(item.type()) +
                      "; expected a string or a list of strings";
          return;
        }
        add_sentence(text);
      }
    } else {
      doc.error = "key \"" + key + "\" is " + json_type_name(value.type()) +
                  "; expected a string or a list of strings";
      return;
    }
    if (opt.append_eod && doc.ids.size() > key_begin_ids) {
      doc.ids.push_back(*eod);
      ++doc.lengths.back();
    }
    doc.key_seq_end.push_back(static_cast<uint32_t>(doc.lengths.size()));
  }
}

// A bounded, ordered work queue: the reader appends chunks, workers claim them, the writer pops the oldest
// once it is done.
class Pipeline {
 public:
  explicit Pipeline(size_t max_in_flight) : max_in_flight_(max_in_flight) {}

  void push(std::unique_ptr<Chunk> c) {
    std::unique_lock lk(mu_);
    queue_.push_back(c.get());
    in_flight_.push_back(std::move(c));
    work_cv_.notify_one();
  }
  bool full() {
    std::lock_guard lk(mu_);
    return in_flight_.size() >= max_in_flight_;
  }
  Chunk* claim() {
    std::unique_lock lk(mu_);
    work_cv_.wait(lk, [&] { return !queue_.empty() || closed_; });
    if (queue_.empty()) return nullptr;
    Chunk* c = queue_.front();
    queue_.pop_front();
    return c;
  }
  void finish(Chunk* c) {
    std::lock_guard lk(mu_);
    c->done = true;
    done_cv_.notify_all();
  }
  // The oldest chunk once done; nullptr when nothing is in flight.
  std::unique_ptr<Chunk> pop_oldest() {
    std::unique_lock lk(mu_);
    if (in_flight_.empty()) return nullptr;
    done_cv_.wait(lk, [&] { return in_flight_.front()->done; });
    auto c = std::move(in_flight_.front());
    in_flight_.pop_front();
    return c;
  }
  void close() {
    std::lock_guard lk(mu_);
    closed_ = true;
    queue_.clear();
    work_cv_.notify_all();
  }

 private:
  size_t max_in_flight_;
  std::mutex mu_;
  std::condition_variable work_cv_, done_cv_;
  std::deque<Chunk*> queue_;
  std::deque<std::unique_ptr<Chunk>> in_flight_;
  bool closed_ = false;
};

std::string fmt_double(double v, int prec) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", prec, v);
  return buf;
}

}  // namespace

EncodedLine encode_jsonl_line(std::string_view line, const PreprocessOptions& opt, const Tokenizer& tok,
                              std::optional<int32_t> eod) {
  DSV3_CHECK(!opt.append_eod || eod, "encode_jsonl_line: append_eod needs the tokenizer's EOS id");
  simdjson::dom::parser parser;
  EncodedLine doc;
  encode_line(line, opt, tok, eod, parser, doc);
  return doc;
}

std::string output_prefix_for_key(const std::string& prefix, const std::string& key) {
  return prefix + "_" + key + "_document";
}

PreprocessStats preprocess(const PreprocessOptions& opt, const std::function<void(const std::string&)>& log) {
  DSV3_CHECK(opt.workers >= 1, "--workers must be at least 1 (got ", opt.workers, ")");
  DSV3_CHECK(opt.partitions >= 1, "--partitions must be at least 1 (got ", opt.partitions, ")");
  DSV3_CHECK(opt.workers % opt.partitions == 0, "--workers (", opt.workers,
             ") must be divisible by --partitions (", opt.partitions,
             "), as in Megatron's preprocess_data.py");
  DSV3_CHECK(opt.log_interval >= 1, "--log-interval must be at least 1");
  DSV3_CHECK(!opt.json_keys.empty(), "--json-keys needs at least one key");
  DSV3_CHECK(!opt.output_prefix.empty(), "--output-prefix is empty");
  const auto out_dir = std::filesystem::path(opt.output_prefix).parent_path();
  DSV3_CHECK(out_dir.empty() || std::filesystem::is_directory(out_dir), "--output-prefix ", opt.output_prefix,
             ": directory ", out_dir.string(), " does not exist");

  const auto t0 = std::chrono::steady_clock::now();
  const auto files = expand_input(opt.input);
  Tokenizer tok = Tokenizer::from_directory(opt.tokenizer_model);
  const std::optional<int32_t> eod = tok.eos_id();
  DSV3_CHECK(!opt.append_eod || eod, "--append-eod: tokenizer ", opt.tokenizer_model, " has no eos_token");
  const DType dtype = optimal_dtype(tok.size());
  for (const auto& f : files) log("Opening " + f);
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  log("Time to startup: " + fmt_double(elapsed(), 3));

  // Round-robin partitions change the document order; contiguous ones do not (see the file comment).
  const int parts = opt.keep_sequential_samples ? 1 : opt.partitions;
  const size_t nkeys = opt.json_keys.size();
  std::vector<std::vector<std::unique_ptr<IndexedDatasetBuilder>>> builders(parts);
  std::vector<std::string> part_prefixes;
  for (int p = 0; p < parts; ++p) {
    for (const auto& key : opt.json_keys) {
      std::string prefix = parts == 1
                               ? output_prefix_for_key(opt.output_prefix, key)
                               : output_prefix_for_key(opt.output_prefix + "_" + std::to_string(p), key);
      builders[p].push_back(std::make_unique<IndexedDatasetBuilder>(prefix, dtype));
      if (parts > 1) part_prefixes.push_back(prefix);
    }
  }

  PreprocessStats st;
  Pipeline pipe(static_cast<size_t>(opt.workers) * 4);
  std::vector<std::thread> pool;
  std::mutex err_mu;
  std::exception_ptr worker_error;
  for (int w = 0; w < opt.workers; ++w) {
    pool.emplace_back([&] {
      simdjson::dom::parser parser;
      while (Chunk* c = pipe.claim()) {
        try {
          c->docs.resize(c->lines.size());
          for (size_t i = 0; i < c->lines.size(); ++i)
            encode_line(c->lines[i], opt, tok, eod, parser, c->docs[i]);
        } catch (...) {
          std::lock_guard lk(err_mu);
          if (!worker_error) worker_error = std::current_exception();
        }
        pipe.finish(c);
      }
    });
  }
  auto stop_pool = [&] {
    pipe.close();
    for (auto& t : pool) t.join();
    pool.clear();
  };

  int64_t next_log = opt.log_interval;
  auto write_chunk = [&](Chunk& c) {
    {
      std::lock_guard lk(err_mu);
      if (worker_error) std::rethrow_exception(worker_error);
    }
    for (size_t i = 0; i < c.docs.size(); ++i) {
      Doc& d = c.docs[i];
      st.bytes += static_cast<int64_t>(c.lines[i].size());
      if (!d.error.empty()) {
        const std::string msg = c.where[i] + ": " + d.error;
        DSV3_CHECK(opt.skip_bad_lines, msg, " (use --skip-bad-lines to skip such lines)");
        if (st.bad_lines++ < kMaxReportedBadLines) st.first_bad.push_back(msg);
        continue;
      }
      auto& out = builders[parts == 1 ? 0 : c.line_index[i] % parts];
      size_t id_at = 0, seq_at = 0;
      for (size_t k = 0; k < nkeys; ++k) {
        const size_t seq_end = d.key_seq_end[k];
        size_t n = 0;
        for (size_t s = seq_at; s < seq_end; ++s) n += d.lengths[s];
        out[k]->add_document({d.ids.data() + id_at, n}, {d.lengths.data() + seq_at, seq_end - seq_at});
        id_at += n;
        seq_at = seq_end;
      }
      st.tokens += static_cast<int64_t>(d.ids.size());
      if (++st.documents >= next_log) {
        next_log += opt.log_interval;
        const double t = elapsed();
        log("Processed " + std::to_string(st.documents) + " documents (" + fmt_double(st.documents / t, 2) +
            " docs/s, " + fmt_double(st.bytes / t / 1024 / 1024, 2) + " MB/s).");
      }
    }
  };

  try {
    LineReader reader(files);
    std::string line;
    int64_t index = 0;
    auto chunk = std::make_unique<Chunk>();
    size_t chunk_bytes = 0;
    auto flush = [&] {
      while (pipe.full()) write_chunk(*pipe.pop_oldest());
      pipe.push(std::move(chunk));
      chunk = std::make_unique<Chunk>();
      chunk_bytes = 0;
    };
    while (reader.next(line)) {
      chunk_bytes += line.size();
      chunk->where.push_back(reader.file() + ":" + std::to_string(reader.line_no()));
      chunk->line_index.push_back(index++);
      chunk->lines.push_back(std::move(line));
      if (chunk_bytes >= kChunkBytes || chunk->lines.size() >= kChunkLines) flush();
    }
    if (!chunk->lines.empty()) flush();
    while (auto c = pipe.pop_oldest()) write_chunk(*c);
    stop_pool();
  } catch (...) {
    stop_pool();
    throw;  // builders' destructors remove their temporaries
  }

  if (parts == 1) {
    for (auto& b : builders[0]) b->finalize();
  } else {
    for (auto& part : builders)
      for (auto& b : part) b->finalize();
    for (size_t k = 0; k < nkeys; ++k) {
      IndexedDatasetBuilder merged(output_prefix_for_key(opt.output_prefix, opt.json_keys[k]), dtype);
      for (int p = 0; p < parts; ++p) merged.add_index(part_prefixes[p * nkeys + k]);
      merged.finalize();
    }
    // Megatron leaves partition outputs behind; they duplicate the merged data, so we remove them.
    for (const auto& pp : part_prefixes) {
      std::filesystem::remove(idx_path(pp));
      std::filesystem::remove(bin_path(pp));
    }
  }
  for (const auto& key : opt.json_keys) st.outputs.push_back(output_prefix_for_key(opt.output_prefix, key));
  st.seconds = elapsed();
  return st;
}

}  // namespace dsv3
