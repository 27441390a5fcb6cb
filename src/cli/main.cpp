// The dsv3 command: dispatches to subcommands; every dsv3::Error becomes one line on stderr and exit 1.
#include <cstdio>
#include <cstring>
#include <exception>
#include <string>

#include "cli/commands.h"
#include "cli/model_info.h"
#include "core/error.h"

namespace {

constexpr const char* kUsage =
    "usage: dsv3 <command> [flags]\n"
    "commands:\n"
    "  preprocess      tokenize JSONL into Megatron .bin/.idx (flags of tools/preprocess_data.py)\n"
    "  data inspect    validate a .bin/.idx pair and print its counts and first document\n"
    "  data samples    write Megatron's GPT dataset samples in order\n"
    "  train           pretrain DeepSeek-V3 with Megatron-LM's flags (pretrain_gpt.py)\n"
    "  model-info      layer plan and parameter counts of a model config.json\n"
    "  device-info     the backends this binary has (cpu, cuda) and the GPU it sees\n"
    "Run `dsv3 <command> --help` for its flags.\n";

}  // namespace

int main(int argc, char** argv) {
  using namespace dsv3::cli;
  if (argc < 2 || !std::strcmp(argv[1], "--help") || !std::strcmp(argv[1], "-h")) {
    std::fputs(kUsage, argc < 2 ? stderr : stdout);
    return argc < 2 ? 2 : 0;
  }
  const std::string cmd = argv[1];
  try {
    if (cmd == "preprocess") return preprocess_main(argc - 1, argv + 1);
    if (cmd == "model-info") return model_info_main(argc - 1, argv + 1);
    if (cmd == "train") return train_main(argc - 1, argv + 1);
    if (cmd == "device-info") return device_info_main(argc - 1, argv + 1);
    if (cmd == "data" && argc >= 3) {
      const std::string sub = argv[2];
      if (sub == "inspect") return data_inspect_main(argc - 2, argv + 2);
      if (sub == "samples") return data_samples_main(argc - 2, argv + 2);
    }
  } catch (const dsv3::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "internal error: %s\n", e.what());
    return 1;
  }
  std::fprintf(stderr, "dsv3: unknown command '%s'\n%s",
               (cmd + (argc >= 3 && cmd == "data" ? std::string(" ") + argv[2] : "")).c_str(), kUsage);
  return 2;
}
