// `dsv3 train`: Megatron-LM's pretrain_gpt.py flags; see src/train/trainer.h.
#include "cli/commands.h"
#include "train/trainer.h"

namespace dsv3::cli {

int train_main(int argc, char** argv) { return run_training(argc, argv); }

}  // namespace dsv3::cli
