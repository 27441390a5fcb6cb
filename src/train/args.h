// `dsv3 train` command line: Megatron-LM's flag names and meanings (spec §1.1–1.2), so that the seed's own command
// line runs unchanged. Every flag is declared in a table with its type and default: flags dsv3 applies, flags that
// only choose an implementation or runtime detail (accepted, reported by no_effect()), and flags asking for other
// numbers than dsv3 computes (refused by name with the reason); an unknown one is refused as argparse would
// ("unrecognized arguments"). Values are checked once, at start-up, by TrainConfig (train_config.h).
#pragma once
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace dsv3 {

class TrainArgs {
 public:
  // Parses argv (argv[0] is the program/subcommand name). Throws dsv3::Error on bad input.
  static TrainArgs parse(int argc, char** argv);
  static TrainArgs parse(const std::vector<std::string>& args);

  bool given(const std::string& dest) const;  // set on the command line (dest: underscored name)
  int64_t i(const std::string& dest) const;   // typed access; throws if unset and without default
  double f(const std::string& dest) const;
  const std::string& s(const std::string& dest) const;
  bool b(const std::string& dest) const;
  const std::vector<std::string>& list(const std::string& dest) const;
  std::optional<int64_t> opt_i(const std::string& dest) const;
  std::optional<double> opt_f(const std::string& dest) const;
  std::optional<std::string> opt_s(const std::string& dest) const;

  void set(const std::string& dest, const std::string& value);  // derived values (e.g. global_batch_size)

  // Every argument as Megatron prints it (dest, value; "None" when unset), for the arguments block, TensorBoard
  // text and the checkpoint.
  std::vector<std::pair<std::string, std::string>> all() const;
  std::map<std::string, std::string> all_map() const;

  // The flags given that have no effect in dsv3, as written ("--ckpt-format torch_dist"), each with the reason,
  // in command-line order.
  const std::vector<std::pair<std::string, std::string>>& no_effect() const { return no_effect_; }

 private:
  std::map<std::string, std::vector<std::string>> values_;  // dest -> values (lists keep several)
  std::map<std::string, bool> given_;
  std::vector<std::pair<std::string, std::string>> no_effect_;
};

// One line naming every no-effect flag, grouped by reason ("" when there are none).
std::string format_no_effect_line(const std::vector<std::pair<std::string, std::string>>& flags);

}  // namespace dsv3
