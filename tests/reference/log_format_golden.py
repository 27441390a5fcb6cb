"""Writes tests/golden/log/*.json: Megatron-LM's stdout strings produced by Python's own formatting, for
tests/train/log_format_test.cpp. The functions below transcribe Megatron-LM's code (megatron/training/
training.py `training_log` with the Habana "actual seqlen" field and --log-throughput, `evaluate_and_print_results`,
megatron/training/arguments.py `_print_args`, training.py `num_floating_point_operations` for MLA + MoE), with the
exact format specs of spec §5.1. Floats are stored as float.hex() strings so the C++ side gets the same doubles.

Run from the repository root: python3 tests/reference/log_format_golden.py   (standard library only)
"""
import json
import math
import os
import random

OUT = os.path.join("tests", "golden", "log")
CONFIGS = os.path.join("examples", "deepseek", "configs")


# ----------------------------------------------------------------------------------- Megatron transcriptions
def iteration_line(f):
    log_string = f" [{f['timestamp']}]"
    log_string += ' iteration {:8d}/{:8d} |'.format(f['iteration'], f['train_iters'])
    log_string += ' actual seqlen: {:5d} |'.format(f['seq_length'])
    log_string += ' consumed samples: {:12d} |'.format(f['consumed_samples'])
    if f['skipped_samples'] > 0:
        log_string += ' skipped samples: {:12d} |'.format(f['skipped_samples'])
    log_string += ' elapsed time per iteration (ms): {:.1f} |'.format(f['elapsed_ms'])
    log_string += f" samples per second: {f['samples_per_s']:.3f} |"
    log_string += f" tokens per second: {f['tokens_per_s']:.3f} |"
    log_string += f" throughput per GPU (TFLOP/s/GPU): {f['tflops_per_gpu']:.1f} |"
    log_string += f" learning rate: {f['learning_rate']:.6E} |"
    log_string += ' global batch size: {:5d} |'.format(f['global_batch_size'])
    for key, avg in f['losses']:
        if avg > 0.0:
            log_string += ' {}: {:.6E} |'.format(key, avg)
    log_string += ' loss scale: {:.1f} |'.format(f['loss_scale'])
    log_string += ' grad norm: {:.3f} |'.format(f['grad_norm'])
    log_string += ' number of skipped iterations: {:3d} |'.format(f['skipped_iterations'])
    log_string += ' number of nan iterations: {:3d} |'.format(f['nan_iterations'])
    return log_string


def eval_block(label, losses):
    # evaluate_and_print_results: string = f' validation loss at {prefix} | ' (label includes "validation loss at")
    string = f' {label} | '
    for key, value in losses:
        string += '{} value: {:.6E} | '.format(key, value)
        ppl = math.exp(min(20, value))
        string += '{} PPL: {:.6E} | '.format(key, ppl)
    length = len(string) + 1
    return '\n'.join(['-' * length, string, '-' * length])


def arguments_block(args):
    lines = ['------------------------ arguments ------------------------']
    str_list = []
    for arg, value in args:
        dots = '.' * (48 - len(arg))
        str_list.append('  {} {} {}'.format(arg, dots, value))
    for arg in sorted(str_list, key=lambda x: x.lower()):
        lines.append(arg)
    lines.append('-------------------- end of arguments ---------------------')
    return '\n'.join(lines)


class Args:
    pass


def megatron_args(cfg, seq_length, padded_vocab, mtp):
    """The Megatron args a HF config.json means (what dsv3 derives; see log_format.h)."""
    a = Args()
    a.num_layers = cfg['num_hidden_layers']
    a.hidden_size = cfg['hidden_size']
    a.ffn_hidden_size = cfg['intermediate_size']
    a.num_attention_heads = cfg['num_attention_heads']
    a.seq_length = seq_length
    a.padded_vocab_size = padded_vocab
    a.swiglu = True
    a.group_query_attention = False
    a.multi_latent_attention = True
    a.num_experts = cfg.get('n_routed_experts') or None
    k, freq = cfg.get('first_k_dense_replace', 0), cfg.get('moe_layer_freq', 1)
    a.moe_layer_freq = [1 if (i >= k and i % freq == 0) else 0 for i in range(a.num_layers)]
    a.moe_router_topk = cfg.get('num_experts_per_tok')
    a.moe_ffn_hidden_size = cfg.get('moe_intermediate_size') or None
    shared = (cfg.get('n_shared_experts') or 0) * (cfg.get('moe_intermediate_size') or 0)
    a.moe_shared_expert_intermediate_size = shared or None
    a.q_lora_rank = cfg.get('q_lora_rank') or None
    a.kv_lora_rank = cfg['kv_lora_rank']
    a.qk_head_dim = cfg['qk_nope_head_dim']
    a.qk_pos_emb_head_dim = cfg['qk_rope_head_dim']
    a.v_head_dim = cfg['v_head_dim']
    a.mtp_num_layers = mtp or None
    return a


def num_floating_point_operations(args, batch_size):
    # Megatron-LM training.py transformer_flops() (MLA branch), as in spec §5.1.
    if args.num_experts is None:
        num_dense_layers = args.num_layers
        num_moe_layers = 0
        num_experts_routed_to = 0
        last_layer_is_moe = 0
    else:
        if isinstance(args.moe_layer_freq, int):
            moe_layer_pattern = [1 if (i % args.moe_layer_freq == 0) else 0 for i in range(args.num_layers)]
        else:
            moe_layer_pattern = args.moe_layer_freq
        num_moe_layers = sum(moe_layer_pattern)
        num_dense_layers = args.num_layers - num_moe_layers
        num_experts_routed_to = args.moe_router_topk
        last_layer_is_moe = moe_layer_pattern[-1]
    if args.mtp_num_layers is not None:
        mtp_num_layers = args.mtp_num_layers
        num_moe_layers += last_layer_is_moe * mtp_num_layers
        num_dense_layers += (1 - last_layer_is_moe) * mtp_num_layers
        num_layers = args.num_layers + mtp_num_layers
    else:
        mtp_num_layers = 0
        num_layers = args.num_layers
    moe_ffn_hidden_size = (args.moe_ffn_hidden_size if args.moe_ffn_hidden_size is not None
                           else args.ffn_hidden_size)
    shared_expert_ffn_hidden_size = (0 if args.moe_shared_expert_intermediate_size is None
                                     else args.moe_shared_expert_intermediate_size)
    gated_linear_multiplier = 3 / 2 if args.swiglu else 1
    expansion_factor = 3 * 2 * 2
    assert args.multi_latent_attention
    if args.q_lora_rank is None:
        q_term = args.hidden_size * args.num_attention_heads * (args.qk_head_dim + args.qk_pos_emb_head_dim)
    else:
        q_term = args.q_lora_rank * (
            args.hidden_size + args.num_attention_heads * (args.qk_head_dim + args.qk_pos_emb_head_dim) + 1)
    self_attn_term = (
        3 * 2 * num_layers * (
            q_term
            + args.kv_lora_rank * (args.hidden_size + args.num_attention_heads * (args.qk_head_dim + args.v_head_dim) + 1)
            + args.hidden_size * args.qk_pos_emb_head_dim
            + (args.num_attention_heads * args.v_head_dim) * args.hidden_size
            + args.seq_length * (args.num_attention_heads * (args.qk_head_dim + args.qk_pos_emb_head_dim)) / 2
            + args.seq_length * args.num_attention_heads * args.v_head_dim / 2
        )
    )
    total_floating_point_operations = (
        batch_size * args.seq_length * (
            expansion_factor * num_layers * args.hidden_size * (
                (args.ffn_hidden_size * gated_linear_multiplier) * (num_dense_layers / num_layers)
                + (moe_ffn_hidden_size * num_experts_routed_to * gated_linear_multiplier) * (num_moe_layers / num_layers)
                + (shared_expert_ffn_hidden_size * gated_linear_multiplier) * (num_moe_layers / num_layers)
            )
            + self_attn_term
            + 3 * 2 * mtp_num_layers * (3 * args.hidden_size + 2 * args.hidden_size * args.hidden_size)
            + 3 * 2 * args.hidden_size * args.padded_vocab_size * (mtp_num_layers + 1)
        )
    )
    return total_floating_point_operations


# ----------------------------------------------------------------------------------------------- cases
def hexf(x):
    return float(x).hex()


def rand_double(rng):
    r = rng.random()
    if r < 0.03:
        return rng.choice([0.0, -0.0, 5e-324, 2.2250738585072014e-308, 1.7976931348623157e308, 0.5, 0.05, 0.25,
                           0.125, 2.5, 0.0005, 1.0005, 9.9995, 99.95, 999.95, 1e16, 1e22])
    mag = 10.0 ** rng.uniform(-320, 308)
    if rng.random() < 0.4:
        mag = 10.0 ** rng.uniform(-12, 12)
    if rng.random() < 0.15:  # values on decimal ties / short decimals
        mag = round(rng.uniform(0, 1000), rng.randint(0, 5))
    return -mag if rng.random() < 0.1 else mag


def line_fields(rng, i):
    keys = ['lm loss', 'load_balancing_loss', 'mtp_1 loss', 'mtp_2 loss']
    nloss = rng.randint(0, 4)
    return {
        'timestamp': f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:"
                     f"{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
        'iteration': rng.choice([rng.randint(1, 10**8 - 1), rng.randint(10**8, 10**12), rng.randint(1, 100)]),
        'train_iters': rng.choice([500000, rng.randint(1, 10**13)]),
        'seq_length': rng.choice([4096, 256, 131072, rng.randint(1, 10**6)]),
        'consumed_samples': rng.choice([rng.randint(0, 10**12), rng.randint(10**12, 10**15)]),
        'skipped_samples': rng.choice([0, 0, rng.randint(1, 10**13)]),
        'elapsed_ms': rand_double(rng),
        'samples_per_s': rand_double(rng),
        'tokens_per_s': rand_double(rng),
        'tflops_per_gpu': rand_double(rng),
        'learning_rate': rand_double(rng),
        'global_batch_size': rng.choice([8, 3072, rng.randint(1, 10**6)]),
        'losses': [(keys[j], rand_double(rng)) for j in range(nloss)],
        'loss_scale': rng.choice([1.0, rand_double(rng)]),
        'grad_norm': rand_double(rng),
        'skipped_iterations': rng.choice([0, rng.randint(1, 99999)]),
        'nan_iterations': rng.choice([0, rng.randint(1, 99999)]),
    }


def handmade_lines():
    base = {
        'timestamp': '2025-01-02 03:04:05', 'iteration': 10, 'train_iters': 500000, 'seq_length': 4096,
        'consumed_samples': 80, 'skipped_samples': 0, 'elapsed_ms': 12345.678, 'samples_per_s': 0.648,
        'tokens_per_s': 2654.2, 'tflops_per_gpu': 57.2, 'learning_rate': 2.2e-4 * 10 / 2000,
        'global_batch_size': 8, 'losses': [('lm loss', 11.5), ('load_balancing_loss', 1.0034)],
        'loss_scale': 1.0, 'grad_norm': 7.25, 'skipped_iterations': 0, 'nan_iterations': 0,
    }
    cases = [dict(base)]
    cases.append(dict(base, skipped_samples=3))
    cases.append(dict(base, losses=[('lm loss', 0.0), ('load_balancing_loss', -1.0), ('mtp_1 loss', float('nan'))]))
    cases.append(dict(base, losses=[('lm loss', 9.87), ('load_balancing_loss', 1.0), ('mtp_1 loss', 3.25)]))
    cases.append(dict(base, learning_rate=0.0))
    cases.append(dict(base, learning_rate=3.7e-11))        # 0 < x < 1e-10
    cases.append(dict(base, learning_rate=1e-300))
    cases.append(dict(base, learning_rate=5e-324))
    cases.append(dict(base, iteration=123456789, train_iters=1234567890))  # wider than 8
    cases.append(dict(base, consumed_samples=10**13, global_batch_size=123456, seq_length=1048576))
    cases.append(dict(base, grad_norm=float('inf'), tflops_per_gpu=float('nan'), elapsed_ms=-0.0))
    cases.append(dict(base, grad_norm=float('nan'), samples_per_s=float('-inf')))
    cases.append(dict(base, tokens_per_s=1e300, elapsed_ms=1.7976931348623157e308))
    cases.append(dict(base, elapsed_ms=0.25, samples_per_s=0.0005, tokens_per_s=2.0005, grad_norm=0.0625))
    cases.append(dict(base, skipped_iterations=1000, nan_iterations=7))
    return cases


def python_float_str_cases(rng):
    vals = [0.0, -0.0, 1.0, 0.1, 0.00022, 2.2e-5, 1e-4, 9.999e-5, 1e-5, 1e16, 9999999999999998.0, 1e15 + 0.5,
            123456789012345.6, 4096.0, 1e-8, 6e-3, 0.006, 1e22, 1.5e-310, 5e-324, 1.7976931348623157e308,
            float('inf'), float('-inf'), float('nan'), 0.9, 0.95, 1e-3, 3.0, 2.5, 1234.5]
    vals += [rand_double(rng) for _ in range(300)]
    return [{'value': hexf(v), 'expected': str(v)} for v in vals]


def main():
    rng = random.Random(20250101)
    os.makedirs(OUT, exist_ok=True)

    def enc_line(f):
        g = dict(f)
        for k in ['elapsed_ms', 'samples_per_s', 'tokens_per_s', 'tflops_per_gpu', 'learning_rate',
                  'loss_scale', 'grad_norm']:
            g[k] = hexf(f[k])
        g['losses'] = [[k, hexf(v)] for k, v in f['losses']]
        return {'fields': g, 'expected': iteration_line(f)}

    lines = handmade_lines() + [line_fields(rng, i) for i in range(300)]
    write('iteration_lines.json', [enc_line(f) for f in lines])

    evals = [
        ('validation loss at iteration 10', [('lm loss', 10.5)]),
        ('validation loss at iteration 1000', [('lm loss', 2.345678)]),
        ('validation loss at iteration 500000 on test set', [('lm loss', 1.0)]),
        ('validation loss at iteration 100 on validation set', [('lm loss', 25.0)]),   # PPL clamps at exp(20)
        ('validation loss at iteration 7', [('lm loss', float('nan'))]),            # min(20, nan) == 20
        ('validation loss at iteration 7', [('lm loss', float('inf'))]),
        ('validation loss at iteration 7', [('lm loss', -3.0)]),
        ('validation loss at iteration 7', [('lm loss', 0.0), ('mtp_1 loss', 4.5e-11)]),
        ('validation loss at iteration 12345678901', []),
    ]
    evals += [(f'validation loss at iteration {rng.randint(1, 10**9)}', [('lm loss', rand_double(rng))])
              for _ in range(40)]
    write('eval_blocks.json', [{'label': l, 'losses': [[k, hexf(v)] for k, v in ls], 'expected': eval_block(l, ls)}
                               for l, ls in evals])

    args = [('seq_length', '4096'), ('lr', str(2.2e-4)), ('min_lr', str(2.2e-5)), ('adam_eps', str(1e-8)),
            ('Zeta', 'x'), ('alpha', 'y'), ('ALPHA', 'z'), ('a', '1'), ('a_b', '2'), ('ab', '3'), ('a.b', '4'),
            ('num_layers', '4'), ('moe_layer_freq', '[0, 0, 0, 1]'), ('tokenizer_model', '/data/tok'),
            ('bf16', 'True'), ('fp16', 'False'), ('load', 'None'), ('x' * 48, 'exactly48'),
            ('y' * 60, 'longer than 48'), ('', 'empty name'), ('dup', 'b'), ('dup', 'a'), ('Dup', 'c'),
            ('value_with_spaces', 'a b  c'), ('init_method_std', str(0.006)), ('train_iters', '500000')]
    write('arguments_block.json', [{'args': args, 'expected': arguments_block(args)},
                                   {'args': [], 'expected': arguments_block([])}])

    write('python_float_str.json', python_float_str_cases(rng))

    flops = []
    for name, batch, seq, vocab, mtp in [
        ('deepseek-v3-671b.json', 1, 4096, 128896, 0),     # spec: ~2.498e11 FLOPs per token
        ('seed-reduced.json', 8, 4096, 128896, 0),         # spec: README 4-layer/GBS=8 case, ~7.06e14
        ('deepseek-v3-671b.json', 3072, 4096, 129280, 1),
        ('seed-reduced.json', 8, 4096, 129024, 2),
        ('tiny.json', 4, 64, 8192, 0),
        ('tiny.json', 4, 64, 8192, 1),
        ('proxy-cpu.json', 16, 512, 129280, 0),
    ]:
        with open(os.path.join(CONFIGS, name)) as f:
            cfg = json.load(f)
        a = megatron_args(cfg, seq, vocab, mtp)
        flops.append({'config': name, 'batch_size': batch, 'seq_length': seq, 'padded_vocab': vocab,
                      'mtp_layers': mtp, 'flops': hexf(num_floating_point_operations(a, batch)),
                      'flops_decimal': repr(float(num_floating_point_operations(a, batch)))})
    write('flops.json', flops)


def write(name, obj):
    with open(os.path.join(OUT, name), 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write('\n')


if __name__ == '__main__':
    main()
