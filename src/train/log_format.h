// Megatron-LM's stdout formats as pure functions (spec §5.1): the per-iteration line of training_log, the
// validation/test block of evaluate_and_print_results, the startup arguments block of _print_args, the FLOPs
// formula behind "throughput per GPU (TFLOP/s/GPU)", and Python's number formatting that they rest on.
// Every string equals what the Python f-strings produce (tests/golden/log/, from tests/reference/).
#pragma once
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "model/config.h"

namespace dsv3 {

struct IterationLogFields {
  std::string timestamp;  // "YYYY-mm-dd HH:MM:SS" (timestamp_now())
  int64_t iteration = 0, train_iters = 0, seq_length = 0, consumed_samples = 0, skipped_samples = 0;
  double elapsed_ms = 0;      // elapsed time per iteration, milliseconds
  double samples_per_s = 0;   // global batch size / elapsed seconds
  double tokens_per_s = 0;    // samples_per_s * seq_length
  double tflops_per_gpu = 0;  // megatron_flops_per_iteration / (elapsed seconds * 1e12 * world size)
  double learning_rate = 0;
  int64_t global_batch_size = 0;
  // Interval averages in Megatron's dict order ("lm loss", "load_balancing_loss", "mtp_1 loss", ...); each is
  // printed only when > 0 (as Megatron: so a NaN average is not printed either).
  std::vector<std::pair<std::string, double>> losses;
  double loss_scale = 1.0, grad_norm = 0;
  int64_t skipped_iterations = 0, nan_iterations = 0;
};

// One line, no trailing newline:
//  [ts] iteration {it:8d}/{train_iters:8d} | actual seqlen: {seq:5d} | consumed samples: {n:12d} |
//  [skipped samples: {n:12d} |] elapsed time per iteration (ms): {:.1f} | samples per second: {:.3f} |
//  tokens per second: {:.3f} | throughput per GPU (TFLOP/s/GPU): {:.1f} | learning rate: {:.6E} |
//  global batch size: {:5d} |{ {key}: {:.6E} |}* loss scale: {:.1f} | grad norm: {:.3f} |
//  number of skipped iterations: {:3d} | number of nan iterations: {:3d} |
std::string format_iteration_line(const IterationLogFields& f);

// Three lines joined by '\n' (no trailing newline): dashes, the text, dashes, where the text is
// " {label} | " + for each key "{key} value: {v:.6E} | {key} PPL: {exp(min(20, v)):.6E} | " and the dash
// lines are len(text)+1 long. label: "validation loss at iteration 10", "validation loss at iteration 10 on
// test set". Every given key is printed (no > 0 filter); NaN gives PPL exp(20) as Python's min(20, nan) does.
std::string format_eval_block(const std::string& label,
                              const std::vector<std::pair<std::string, double>>& losses);

// Megatron's _print_args("arguments", args): header, lines "  {arg} {'.'*(48-len(arg))} {value}" sorted by
// the whole line lower-cased (ASCII; stable), footer; lines joined by '\n', no trailing newline. Values are
// what Python's str() prints (see python_float_str for floats).
std::string format_arguments_block(const std::vector<std::pair<std::string, std::string>>& args);

// Megatron-LM's num_floating_point_operations(args, batch_size) for MLA + MoE + SwiGLU (spec §5.1), with the
// Megatron args taken from cfg: num_layers = num_hidden_layers, moe_layer_pattern[i] = cfg.is_moe_layer(i)
// (all dense when n_routed_experts == 0), moe_router_topk = num_experts_per_tok, moe_ffn_hidden_size =
// moe_intermediate_size, moe_shared_expert_intermediate_size = n_shared_experts * moe_intermediate_size,
// q_lora_rank (0 = None), kv_lora_rank, qk_head_dim = qk_nope_head_dim, qk_pos_emb_head_dim =
// qk_rope_head_dim, v_head_dim. mtp_layers is --mtp-num-layers (0 = off; cfg.num_nextn_predict_layers is not
// used, since Megatron counts MTP only when enabled); each MTP layer counts as MoE iff the last decoder layer
// is. The arithmetic is in Python's order, so the double equals Python's float.
double megatron_flops_per_iteration(const ModelConfig& cfg, int64_t batch_size, int64_t seq_len,
                                    int64_t padded_vocab, int64_t mtp_layers);

// Local time as "YYYY-mm-dd HH:MM:SS" (datetime.now().strftime('%Y-%m-%d %H:%M:%S')).
std::string timestamp_now();

// ---- Python number formatting (format(v, '.{p}f') / '.{p}E'); nan/inf spelled as Python does ----
std::string python_format_f(double v, int precision);
std::string python_format_e(double v, int precision);  // 'E': mantissa, 'E', sign, >= 2 exponent digits
// Python's str(float) / repr(float): shortest round-trip digits, fixed notation for 1e-4 <= |v| < 1e16
// ("0.00022", "4096.0"), else "1e-05", "1.5e+16"; "inf", "-inf", "nan".
std::string python_float_str(double v);

}  // namespace dsv3
