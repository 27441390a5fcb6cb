#!/usr/bin/env python3
"""Golden files for dsv3's optimizer pieces (src/optim/), computed by the reference code itself.

Writes tests/golden/optim/:
  adamw.json         torch.optim.AdamW (betas 0.9/0.95, eps 1e-8) on a 203-element parameter split in two param
                     groups (wd 0.1 / wd 0), 6 steps with a per-step lr as Megatron's scheduler sets it (lr 0 on
                     step 1, warmup); params, exp_avg, exp_avg_sq after every step
  lr_schedule.json   Megatron-Core OptimizerParamScheduler.get_lr (linear, cosine, constant, inverse-square-root,
                     with and without warmup, sampled incl. beyond decay; the spec §8 GBS-3072 example), and the
                     configurations its constructor rejects
  grad_clip.json     numpy float64 L2 norms of float32 vectors and Megatron's clip coefficient / clipped grads
  expert_bias.json   Megatron-Core moe_utils.get_updated_expert_bias on stacked [layers, E] fp32 counts

Megatron-Core 0.8.0 (the system python's) has neither optimizer_param_scheduler.py (first shipped in 0.9.0; before
that it lived in Megatron-LM's megatron/training/) nor get_updated_expert_bias (added later). So:
    pip install --no-deps --target /tmp/mcore016 megatron-core==0.16.1
    pip install --no-deps --target /tmp/mcore090 megatron-core==0.9.0
    MCORE_PATH=/tmp/mcore016 MCORE090_PATH=/tmp/mcore090 python3 tests/reference/optim_golden.py
The scheduler values come from 0.9.0's file and are checked equal to 0.16.1's (get_lr is unchanged for these
styles; later releases only add WSD variants).
"""
import importlib.util
import json
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore")
MCORE_PATH = os.environ.get("MCORE_PATH", "/tmp/mcore016")
MCORE090_PATH = os.environ.get("MCORE090_PATH", "/tmp/mcore090")
sys.path.insert(0, MCORE_PATH)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import megatron.core  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler as Sched016  # noqa: E402
from megatron.core.transformer.moe import moe_utils  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "optim")


def load_sched090():
    path = os.path.join(MCORE090_PATH, "megatron", "core", "optimizer_param_scheduler.py")
    spec = importlib.util.spec_from_file_location("mcore090_optimizer_param_scheduler", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ver = {}
    exec(open(os.path.join(MCORE090_PATH, "megatron", "core", "package_info.py")).read(), ver)
    assert ver["__version__"] == "0.9.0", ver["__version__"]
    return mod.OptimizerParamScheduler


def f32list(t):
    return [float(x) for x in np.asarray(t, dtype=np.float32).reshape(-1)]


def dump(name, obj):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(obj, f, indent=None, separators=(",", ":"))
        f.write("\n")


# ------------------------------------------------------------------------------------------------ AdamW
def gen_adamw():
    g = torch.Generator().manual_seed(20240601)
    n_a, n_b = 150, 53
    p0 = torch.randn(n_a + n_b, generator=g, dtype=torch.float32)
    pa = torch.nn.Parameter(p0[:n_a].clone())
    pb = torch.nn.Parameter(p0[n_a:].clone())
    opt = torch.optim.AdamW(
        [{"params": [pa], "weight_decay": 0.1}, {"params": [pb], "weight_decay": 0.0}],
        lr=0.0, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False)
    lrs = [0.0, 1e-3, 2e-3, 3e-3, 2.5e-3, 5e-4]
    grads, steps = [], []
    for lr in lrs:
        gr = torch.randn(n_a + n_b, generator=g, dtype=torch.float32)
        # magnitudes from 1e-9 to 10, so eps matters for some elements
        scale = torch.pow(10.0, torch.empty(n_a + n_b).uniform_(-9.0, 1.0, generator=g)).to(torch.float32)
        gr = gr * scale
        grads.append(f32list(gr))
        pa.grad = gr[:n_a].clone()
        pb.grad = gr[n_a:].clone()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
        st_a, st_b = opt.state[pa], opt.state[pb]
        steps.append({
            "params": f32list(torch.cat([pa.detach(), pb.detach()])),
            "exp_avg": f32list(torch.cat([st_a["exp_avg"], st_b["exp_avg"]])),
            "exp_avg_sq": f32list(torch.cat([st_a["exp_avg_sq"], st_b["exp_avg_sq"]])),
        })
    dump("adamw.json", {
        "reference": f"torch.optim.AdamW (foreach=False), torch {torch.__version__}",
        "beta1": 0.9, "beta2": 0.95, "eps": 1e-8,
        "ranges": [{"begin": 0, "n": n_a, "wd": 0.1}, {"begin": n_a, "n": n_b, "wd": 0.0}],
        "numel": n_a + n_b, "lr": lrs, "params0": f32list(p0), "grads": grads, "steps": steps,
    })


# ------------------------------------------------------------------------------------------------ LR schedule
class DummyOptimizer:
    def __init__(self):
        self.param_groups = [{}]


def make(cls, c):
    return cls(DummyOptimizer(), init_lr=c["init_lr"], max_lr=c["max_lr"], min_lr=c["min_lr"],
               lr_warmup_steps=c["warmup_steps"], lr_decay_steps=c["decay_steps"],
               lr_decay_style=c["decay_style"], start_wd=0.1, end_wd=0.1, wd_incr_steps=c["decay_steps"],
               wd_incr_style="constant")


def gen_lr_schedule():
    s090 = load_sched090()
    gbs = 3072
    cases = []

    def case(name, increments, **c):
        cfg = dict(max_lr=1.0, min_lr=0.0, init_lr=0.0, warmup_steps=0, decay_steps=1, decay_style="linear")
        cfg.update(c)
        a, b = make(s090, cfg), make(Sched016, cfg)
        samples = [[a.num_steps, a.optimizer.param_groups[0]["lr"]]]
        for inc in increments:
            a.step(inc)
            b.step(inc)
            la, lb = a.optimizer.param_groups[0]["lr"], b.optimizer.param_groups[0]["lr"]
            assert la == lb, (name, a.num_steps, la, lb)
            samples.append([a.num_steps, la])
        cases.append({"name": name, "config": cfg, "increments": increments, "samples": samples})

    small = [1] * 40 + [3, 7, 11, 13, 50, 100, 1000]
    for style in ["linear", "cosine", "constant", "inverse-square-root"]:
        case(f"{style}_warmup", small, max_lr=3e-4, min_lr=3e-5, warmup_steps=10, decay_steps=37,
             decay_style=style)
        case(f"{style}_nowarmup", small, max_lr=1e-3, min_lr=1e-5, warmup_steps=0, decay_steps=29,
             decay_style=style)
    case("cosine_init_lr", small, max_lr=2e-3, min_lr=0.0, init_lr=1e-4, warmup_steps=7, decay_steps=41,
         decay_style="cosine")
    case("linear_min_eq_max", [1] * 20, max_lr=5e-4, min_lr=5e-4, warmup_steps=3, decay_steps=9)
    # Spec §8 example: GBS 3072, warmup 2000 iterations, cosine to 2.2e-5 at 320000 iterations (samples).
    iters = list(range(1, 21)) + [100, 1999, 2000, 2001, 2002, 5000, 100000, 160000, 160001, 250000, 319999,
                                  320000, 320001, 320002, 400000]
    incs, prev = [], 0
    for it in iters:
        incs.append((it - prev) * gbs)
        prev = it
    case("spec_gbs3072", incs, max_lr=2.2e-4, min_lr=2.2e-5, warmup_steps=2000 * gbs, decay_steps=320000 * gbs,
         decay_style="cosine")
    spec = cases[-1]
    lr_after_10 = dict((n, lr) for n, lr in spec["samples"])[10 * gbs]
    assert abs(lr_after_10 - 1.1e-6) < 1e-18, lr_after_10
    # Many-gbs sampling over a whole cosine schedule (every 997 iterations).
    case("cosine_sweep", [997 * 512] * 400, max_lr=1.5e-4, min_lr=1e-5, warmup_steps=500 * 512,
         decay_steps=300000 * 512, decay_style="cosine")
    case("linear_sweep", [997 * 512] * 400, max_lr=1.5e-4, min_lr=1e-5, warmup_steps=500 * 512,
         decay_steps=300000 * 512, decay_style="linear")

    rejected = []
    for name, c in [("min_lr_negative", dict(min_lr=-1e-5)), ("max_below_min", dict(max_lr=1e-5, min_lr=1e-4)),
                    ("init_above_max", dict(init_lr=2e-3)), ("decay_zero", dict(decay_steps=0, warmup_steps=0)),
                    ("warmup_eq_decay", dict(warmup_steps=100, decay_steps=100)),
                    ("warmup_above_decay", dict(warmup_steps=200, decay_steps=100))]:
        cfg = dict(max_lr=1e-3, min_lr=0.0, init_lr=0.0, warmup_steps=10, decay_steps=100, decay_style="cosine")
        cfg.update(c)
        for cls in (s090, Sched016):
            try:
                make(cls, cfg)
            except AssertionError:
                pass
            else:
                raise RuntimeError(f"{name}: Megatron accepted {cfg}")
        rejected.append({"name": name, "config": cfg})
    dump("lr_schedule.json", {
        "reference": "megatron.core.optimizer_param_scheduler.OptimizerParamScheduler, megatron-core 0.9.0 "
                     f"(checked equal to {megatron.core.__version__})",
        "cases": cases, "rejected": rejected,
    })


# ------------------------------------------------------------------------------------------------ grad clip
def gen_grad_clip():
    rng = np.random.RandomState(7)
    cases = []
    for name, n, lo, hi, max_norm in [("small", 1000, -4, 0, 1.0), ("large_norm", 2000, -2, 2, 1.0),
                                      ("below_max", 777, -6, -3, 1.0), ("clip_0p5_multiblock", 16500, -3, 0, 0.5)]:
        g = (rng.randn(n) * 10.0 ** rng.uniform(lo, hi, n)).astype(np.float32)
        norm = float(np.linalg.norm(g.astype(np.float64)))
        coeff = max_norm / (norm + 1.0e-6)  # megatron clip_grad_by_total_norm_fp32
        clipped = g * np.float32(coeff) if coeff < 1.0 else g.copy()
        case = {"name": name, "max_norm": max_norm, "grads": f32list(g), "norm": norm,
                "clip_coeff": coeff if coeff < 1.0 else 1.0}
        if n <= 2000:
            case["clipped"] = f32list(clipped)
        cases.append(case)
    dump("grad_clip.json", {"reference": f"numpy {np.__version__} float64 norm; Megatron clip_grad_by_total_norm_fp32",
                            "cases": cases})


# ------------------------------------------------------------------------------------------------ expert bias
def gen_expert_bias():
    # The real function; its all-reduce over TPxCPxDP is the identity on one rank.
    real_all_reduce = torch.distributed.all_reduce
    real_group = parallel_state.get_tensor_and_data_parallel_group
    torch.distributed.all_reduce = lambda t, group=None, **kw: None
    parallel_state.get_tensor_and_data_parallel_group = lambda **kw: None
    g = torch.Generator().manual_seed(99)
    cases = []

    def case(name, counts, bias, rate):
        counts_t = torch.tensor(counts, dtype=torch.float32)  # Megatron's local_tokens_per_expert is fp32
        bias_t = torch.tensor(bias, dtype=torch.float32)
        out = moe_utils.get_updated_expert_bias(counts_t.clone(), bias_t.clone(), rate)
        assert out.dtype == torch.float32
        cases.append({"name": name, "rate": rate, "counts": [[int(x) for x in row] for row in counts],
                      "bias": [f32list(r) for r in bias_t], "updated": [f32list(r) for r in out]})

    L, E = 3, 16
    counts = torch.randint(0, 200, (L, E), generator=g).tolist()
    bias = (torch.randn(L, E, generator=g) * 0.01).tolist()
    case("random", counts, bias, 1e-3)
    case("pad_to_capacity_equal", [[37] * E for _ in range(L)], bias, 1e-3)  # spec §7.1.8 quirk: no change
    # some experts exactly at the (integer) mean
    row = [10, 30, 20, 20, 0, 40, 20, 20]
    case("some_at_mean", [row, row[::-1]], [[0.0] * 8, [0.5] * 8], 1e-3)
    case("rate_0p01_zero_bias", torch.randint(0, 5, (2, 64), generator=g).tolist(), [[0.0] * 64] * 2, 0.01)
    # production scale: 256 experts, ~GBS 3072 x 4096 tokens x top-8 / 256 per expert, sum above 2^24
    E = 256
    c = 3072 * 4096 * 8 // E
    base = (c + torch.randint(-3000, 3000, (E,), generator=g)).tolist()
    near = [c] * E
    near[5] += 1  # exact mean is c + 1/256; fp32 sum rounds it to c
    case("production_scale", [base, near], [[0.0] * E, [0.001] * E], 1e-3)
    torch.distributed.all_reduce = real_all_reduce
    parallel_state.get_tensor_and_data_parallel_group = real_group
    dump("expert_bias.json", {"reference": f"megatron.core.transformer.moe.moe_utils.get_updated_expert_bias, "
                                           f"megatron-core {megatron.core.__version__}, torch {torch.__version__} "
                                           f"(CPU)", "cases": cases})


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    gen_adamw()
    gen_lr_schedule()
    gen_grad_clip()
    gen_expert_bias()
    print("wrote", sorted(os.listdir(OUT)))
