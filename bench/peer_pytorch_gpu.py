#!/usr/bin/env python3
"""Peer for `make bench-gpu`: one DeepSeek-V3 training step (forward, backward, AdamW) in PyTorch on the GPU, with
HF transformers' DeepseekV3ForCausalLM: fp32 master weights under bf16 autocast (the precision dsv3 trains in),
fused AdamW, a fresh batch every step; eager and torch.compile.

  python3 bench/peer_pytorch_gpu.py --config examples/deepseek/configs/proxy-gpu-dense.json --batch 1 --seq 4096

Prints one line per mode: `pytorch: mode=<eager|compile> tokens_per_s=<x> step_s=<median> peak_gib=<y>`.

--routing balanced routes every MoE layer on fixed standard-normal logits with the gradient passed straight to
the real ones (Megatron's --moe-router-force-load-balancing; dsv3's bench_gpu --routing balanced), so the experts'
load is even whatever the weights; untrained (the default) routes on the initialised weights.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def run(model, opt, batches, warmup, steps, device):
    times = []
    for i in range(warmup + steps):
        x, y = batches[i][:, :-1].contiguous(), batches[i][:, 1:].contiguous()
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def force_balanced_routing(tokens, experts, device):
    """HF's router computes its logits with the module's F.linear (its only use there): that call now returns fixed
    normals in the forward and passes the gradient to the real logits (a straight-through estimator)."""
    import transformers.models.deepseek_v3.modeling_deepseek_v3 as ds

    normals = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(42)).to(device)

    class Functional:
        def __getattr__(self, name):
            return getattr(torch.nn.functional, name)

        @staticmethod
        def linear(x, w, b=None):
            y = torch.nn.functional.linear(x, w, b)
            assert y.shape == normals.shape, f"router logits {tuple(y.shape)}, normals {tuple(normals.shape)}"
            return y + (normals - y).detach()

    ds.F = Functional()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--routing", default="untrained", choices=["untrained", "balanced"])
    ap.add_argument("--device", default="cuda")  # cpu: a smoke test of this script on a machine without a GPU
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = json.load(open(a.config))
    cfg.pop("dsv3_semantics", None)
    hf = DeepseekV3Config(**cfg)
    hf._attn_implementation = "sdpa"  # PyTorch's fused attention (flash / memory-efficient kernels)
    dev = a.device
    if a.routing == "balanced":
        force_balanced_routing(a.batch * a.seq, cfg["n_routed_experts"], dev)
    batches = [torch.randint(0, cfg["vocab_size"], (a.batch, a.seq + 1), device=dev) for _ in range(a.warmup + a.steps)]
    for mode in a.modes.split(","):
        model = DeepseekV3ForCausalLM(hf).float().to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev == "cuda")
        if mode == "compile":
            model = torch.compile(model)
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            step = run(model, opt, batches, a.warmup, a.steps, dev)
            peak = torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else 0.0
            print(f"pytorch: mode={mode} routing={a.routing} tokens_per_s={a.batch * a.seq / step:.1f} step_s={step:.4f} "
                  f"peak_gib={peak:.1f}", flush=True)
        except Exception as e:  # e.g. out of memory, or a compile failure: report it, keep the other mode
            print(f"pytorch: mode={mode} routing={a.routing} failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)
        del model, opt
        if dev == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
