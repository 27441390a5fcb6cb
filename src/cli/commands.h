// Entry points of the `dsv3` subcommands; each parses its own flags (argv[0] names the subcommand).
#pragma once

namespace dsv3::cli {

int preprocess_main(int argc, char** argv);
int data_inspect_main(int argc, char** argv);
int data_samples_main(int argc, char** argv);
int train_main(int argc, char** argv);
int device_info_main(int argc, char** argv);

}  // namespace dsv3::cli
