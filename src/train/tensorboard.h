// TensorBoard event files, written the way torch.utils.tensorboard.SummaryWriter writes them (Megatron's
// writer), so TensorBoard and its Python loaders read them; plus a strict reader for tests and tools.
//
// File: `<logdir>/events.out.tfevents.<unix seconds>.<hostname>.<pid>.<n>` (SummaryWriter's name; n counts
// the writers this process opened). TensorBoard reads every file whose name contains "tfevents".
//
// Format: a sequence of TFRecords, each
//   uint64 LE  length of data
//   uint32 LE  masked_crc32c(the 8 length bytes)
//   bytes      data (a serialized tensorflow.Event protobuf)
//   uint32 LE  masked_crc32c(data)
// where masked_crc32c(x) = rotr(crc32c(x), 15) + 0xa282ead8 (CRC32C = Castagnoli, reflected poly 0x82F63B78).
//
// Event fields used (tensorboard/compat/proto/event.proto, summary.proto, tensor.proto, tensor_shape.proto):
//   Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5;
//             SourceMetadata source_metadata = 10 { string writer = 1; } }
//   Summary { repeated Value value = 1; }
//   Value   { string tag = 1; oneof { float simple_value = 2; TensorProto tensor = 8; }
//             SummaryMetadata metadata = 9; }
//   SummaryMetadata { PluginData plugin_data = 1 { string plugin_name = 1; } }
//   TensorProto { DataType dtype = 1 (DT_STRING = 7); TensorShapeProto tensor_shape = 2
//                 { repeated Dim dim = 2 { int64 size = 1; } }; repeated bytes string_val = 8; }
// Record 0 is {wall_time, file_version: "brain.Event:2", source_metadata {writer: "dsv3"}}.
// A scalar is {wall_time, step, summary {value {tag, simple_value}}} (float32, as SummaryWriter.add_scalar).
// A text is SummaryWriter.add_text's: tag "<tag>/text_summary", a DT_STRING tensor of shape [1] holding the
// text, metadata plugin_name "text". Fields are emitted in field-number order and proto3 defaults (step 0)
// are omitted, so records are byte-identical to SummaryWriter's for the same wall_time.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace dsv3 {

// CRC32C (Castagnoli), extending `crc` (0 to start): crc32c("123456789") = 0xE3069283.
uint32_t crc32c(const void* data, size_t n, uint32_t crc = 0);
// TFRecord's masked CRC: ((c >> 15) | (c << 17)) + 0xa282ead8 with c = crc32c(data).
uint32_t masked_crc32c(const void* data, size_t n);

// Appends events to a fresh event file in `logdir` (created if missing). Every add_* writes its whole
// record with one write(2) on an O_APPEND descriptor before returning, so a crash of this process loses
// nothing already added and a torn write can only be the last record; flush() also fdatasyncs, so the file
// survives a machine crash. Not thread-safe. Errors (cannot create, cannot write) throw dsv3::Error naming
// the file.
class EventWriter {
 public:
  explicit EventWriter(const std::string& logdir);
  ~EventWriter();
  EventWriter(const EventWriter&) = delete;
  EventWriter& operator=(const EventWriter&) = delete;

  void add_scalar(const std::string& tag, double value, int64_t step);
  void add_text(const std::string& tag, const std::string& text, int64_t step);
  // With an explicit wall time (seconds since the epoch), as SummaryWriter's `walltime=` argument.
  void add_scalar(const std::string& tag, double value, int64_t step, double wall_time);
  void add_text(const std::string& tag, const std::string& text, int64_t step, double wall_time);
  void flush();

  const std::string& path() const { return path_; }

 private:
  void write_record(const std::string& event_bytes);
  std::string path_;
  int fd_ = -1;
};

// One decoded Event (only the fields above; unknown fields are skipped).
struct TbValue {
  std::string tag;
  std::optional<float> simple_value;
  std::string plugin_name;               // metadata.plugin_data.plugin_name ("" when absent)
  std::vector<std::string> string_vals;  // tensor.string_val (texts)
  int64_t tensor_dtype = 0;              // tensor.dtype (0 when no tensor)
  std::vector<int64_t> tensor_shape;     // tensor.tensor_shape.dim[].size
};
struct TbEvent {
  double wall_time = 0;
  int64_t step = 0;
  std::string file_version;
  std::string source_writer;
  std::vector<TbValue> values;
};

// The raw records of a TFRecord file, both CRCs checked; throws dsv3::Error naming the file and byte offset
// on a bad CRC, a truncated record, or a length beyond the file.
std::vector<std::string> read_tfrecords(const std::string& path);
// Decodes an event file (read_tfrecords + the protobuf fields above).
std::vector<TbEvent> read_event_file(const std::string& path);
// Decodes one serialized Event.
TbEvent decode_event(const std::string& bytes);

}  // namespace dsv3
