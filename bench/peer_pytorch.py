#!/usr/bin/env python3
"""Peer for `make bench-step`: the same DeepSeek-V3 config trained in PyTorch eager (HF transformers'
DeepseekV3ForCausalLM), forward + backward (+ AdamW step with --optimizer), fp32 and bf16 autocast.

  python3 bench/peer_pytorch.py --config examples/deepseek/configs/proxy-cpu.json --batch 8 --seq 256 --threads 2

Prints one line per precision: `pytorch: precision=<fp32|bf16> tokens_per_s=<x> step_s=<median>`.
"""
import argparse
import json
import statistics
import time

import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--optimizer", action="store_true")
    ap.add_argument("--precisions", default="bf16,fp32")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = json.load(open(a.config))
    cfg.pop("dsv3_semantics", None)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg)).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4) if a.optimizer else None
    # A fresh batch every step, as in training: the routing (so every expert's row count) changes each step.
    batches = [torch.randint(0, cfg["vocab_size"], (a.batch, a.seq + 1)) for _ in range(a.warmup + a.steps)]
    for prec in a.precisions.split(","):
        times = []
        for i in range(a.warmup + a.steps):
            x, y = batches[i][:, :-1].contiguous(), batches[i][:, 1:].contiguous()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=(prec == "bf16")):
                logits = model(input_ids=x).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
            loss.backward()
            if opt:
                opt.step()
            model.zero_grad(set_to_none=True)
            if i >= a.warmup:
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        print(f"pytorch: precision={prec} tokens_per_s={a.batch * a.seq / step:.1f} step_s={step:.3f}", flush=True)


if __name__ == "__main__":
    main()
