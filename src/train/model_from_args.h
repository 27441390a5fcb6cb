// The model configuration of a training run: `--model-config config.json` (HF semantics) with Megatron shape
// flags overriding its fields, or Megatron flags alone (Megatron semantics, as the seed script builds it).
#pragma once
#include <cstdint>

#include "model/config.h"
#include "train/args.h"

namespace dsv3 {

// Refuses architecture flags with values other than DeepSeek-V3's (LayerNorm, learned positions, dropout) and, for
// a flag-built model (no --model-config), lists the architecture flags that are missing.
void check_architecture_flags(const TrainArgs& a);

// tokenizer_size: len(tokenizer) (0 when unknown); used to pad the vocab like Megatron
// (--make-vocab-size-divisible-by × TP) when no config gives vocab_size.
ModelConfig model_config_from_args(const TrainArgs& a, int64_t tokenizer_size);

// Megatron's `--moe-layer-freq`: an int N (every N-th layer) or a Python list expression such as
// "[0]*3+[1]*58"; returns first_k_dense_replace and moe_layer_freq in HF's terms, or throws when the pattern is
// not "k dense layers, then every N-th".
void parse_moe_layer_freq(const std::string& expr, int64_t num_layers, int64_t& first_k_dense, int64_t& freq);

}  // namespace dsv3
