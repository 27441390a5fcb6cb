#!/usr/bin/env python3
"""Whole-model golden files for dsv3, computed by HuggingFace transformers' own DeepseekV3ForCausalLM.

Builds the model of examples/deepseek/configs/tiny.json in fp32 (eager attention), gives it deterministic weights
that make routing non-degenerate, runs one forward + backward on a fixed batch and writes tests/golden/hf_tiny/:

  config.json, model.safetensors   written by model.save_pretrained (so dsv3 proves it reads what transformers
                                   writes). HF's class has no MTP layer: num_nextn_predict_layers stays in
                                   config.json but no model.layers.{L}.* tensors exist.
  inputs.safetensors               input_ids I64 [B, S], labels I64 [B, S] (HF convention: unshifted, -100 =
                                   ignored; the loss shifts them by one)
  outputs.safetensors              logits F32 [B, S, V]; loss F32 [] (HF ForCausalLMLoss, mean over counted
                                   targets); hidden_states.{i} F32 [B, S, D] = HF's output_hidden_states
                                   (i = 0: embeddings, i = 1..L: after each decoder layer, the last one after
                                   model.norm); router.{l}.topk_indices I64 [B*S, K] (ascending per token) and
                                   router.{l}.topk_weights F32 [B*S, K] (same order, after renormalisation and
                                   routed_scaling_factor) for every MoE layer l; attn_softmax_scale F64 [],
                                   rope_attention_scaling F64 [] and rope_inv_freq F32 [qk_rope_head_dim/2]:
                                   the constants transformers derived from the config
  grads.safetensors                d loss / d param for every parameter, HF names (e_score_correction_bias is a
                                   buffer without gradient)
  dtypes.safetensors               not model data: one small tensor per dtype (F32, BF16, F16 incl. subnormals
                                   and inf, I64, I32, BOOL, a 0-d scalar, a zero-size tensor) with metadata, so
                                   the C++ reader is checked against the Python safetensors writer

Weights (torch.Generator seeded with SEED, parameters in sorted-name order): embedding N(0, 1); linears
N(0, 1/sqrt(fan_in)); router N(0, 2/sqrt(fan_in)) so sigmoid scores spread; RMSNorm weights 1 + 0.1·N(0, 1);
e_score_correction_bias U(0, 0.3) — non-zero so it changes the selection, and non-negative so transformers 4.57's
"mask unselected groups with 0.0" (not -inf) cannot pick an expert outside the chosen groups. The script checks
that every routing decision (group choice and expert choice) has a margin > MIN_MARGIN, so an fp32
reimplementation routes identically; it tries SEED, SEED+1, ... until one does (the seed used is in the metadata).

Run from the repository root:  python3 tests/reference/hf_model_golden.py
Requires torch 2.x, transformers 4.57.6, safetensors.
"""
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples/deepseek/configs/tiny.json"
OUT = ROOT / "tests/golden/hf_tiny"
SEED = 20250731
BATCH, SEQ = 2, 12
MIN_MARGIN = 1e-3


def init_weights(model, gen):
    for name, p in sorted(model.named_parameters()):
        with torch.no_grad():
            if p.dim() == 1:  # RMSNorm weights
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p.shape[1] ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[1] ** 0.5))
    for name, b in sorted(model.named_buffers()):
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.3 * torch.rand(b.shape, generator=gen))


def routing_margin(gate, h, cfg):
    """Smallest gap at any routing boundary (groups, then experts) for router input h [T, D]."""
    scores = torch.sigmoid(h.float() @ gate.weight.float().t())
    choice = scores + gate.e_score_correction_bias
    T, E = choice.shape
    G, per = cfg.n_group, E // cfg.n_group
    gscore = choice.view(T, G, per).topk(2, dim=-1)[0].sum(-1)
    gs = gscore.sort(dim=-1, descending=True)[0]
    margin = (gs[:, cfg.topk_group - 1] - gs[:, cfg.topk_group]).min().item() if cfg.topk_group < G else 1.0
    top_groups = gscore.topk(cfg.topk_group, dim=-1)[1]
    mask = torch.zeros(T, G, dtype=torch.bool)
    mask.scatter_(1, top_groups, True)
    masked = choice.masked_fill(~mask.repeat_interleave(per, dim=1), float("-inf"))
    ms = masked.sort(dim=-1, descending=True)[0]
    k = cfg.num_experts_per_tok
    emargin = (ms[:, k - 1] - ms[:, k]).min().item()
    assert (choice[mask.repeat_interleave(per, dim=1)] > 0).all()
    return min(margin, emargin)


def run(seed):
    cfg = DeepseekV3Config.from_json_file(str(CONFIG))
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float()
    gen = torch.Generator().manual_seed(seed)
    init_weights(model, gen)
    model.train()  # dropout is 0; train() only matters for grads

    input_ids = torch.randint(0, cfg.vocab_size, (BATCH, SEQ), generator=gen)
    labels = input_ids.clone()
    labels[0, 5] = -100
    labels[1, 9] = -100

    routers = {}
    margins = []

    def hook(layer):
        def fn(module, args, output):
            h = args[0].detach().reshape(-1, cfg.hidden_size)
            margins.append(routing_margin(module, h, cfg))
            idx, w = output
            order = idx.argsort(dim=-1)
            routers[layer] = (idx.gather(1, order).detach().clone(), w.gather(1, order).detach().clone())
        return fn

    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(hook(i))

    out = model(input_ids=input_ids, labels=labels, output_hidden_states=True)
    out.loss.backward()
    print(f"seed {seed}: loss {out.loss.item():.6f}; smallest routing margin {min(margins):.4g}")
    return cfg, model, input_ids, labels, out, routers, min(margins)


def write_dtype_fixture(path):
    """Values the C++ test recomputes from the same formulas (see tests/model/safetensors_test.cpp)."""
    x = (torch.arange(12, dtype=torch.float32) - 6) * 0.37
    h = torch.tensor([0.25 * (i - 6) for i in range(8)] + [65504.0, 2.0 ** -14, 2.0 ** -24, 3 * 2.0 ** -20, -0.0,
                                                          float("inf")], dtype=torch.float16)
    tensors = {
        "f32": x.reshape(3, 4),
        "bf16": x.reshape(2, 6).to(torch.bfloat16),
        "f16": h,
        "i64": torch.tensor([-3, 2 ** 40, 7], dtype=torch.int64),
        "i32": torch.tensor([[-2147483648, 0], [5, 2147483647]], dtype=torch.int32),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
    }
    save_file(tensors, str(path), metadata={"purpose": "dtype fixture", "format": "pt"})


def main():
    for seed in range(SEED, SEED + 100):
        cfg, model, input_ids, labels, out, routers, margin = run(seed)
        if margin > MIN_MARGIN:
            break
    else:
        raise SystemExit("no seed gave routing margins above MIN_MARGIN")
    for i, (idx, w) in routers.items():
        counts = torch.bincount(idx.flatten(), minlength=cfg.n_routed_experts)
        print(f"layer {i}: tokens per expert {counts.tolist()}")

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    model.save_pretrained(str(OUT), safe_serialization=True)
    gen_cfg = OUT / "generation_config.json"
    if gen_cfg.exists():
        gen_cfg.unlink()
    meta = {"generator": "tests/reference/hf_model_golden.py", "transformers": transformers.__version__,
            "torch": torch.__version__, "seed": str(seed), "min_routing_margin": f"{margin:.6g}"}
    save_file({"input_ids": input_ids.contiguous(), "labels": labels.contiguous()}, str(OUT / "inputs.safetensors"),
              metadata=meta)
    outputs = {"logits": out.logits.detach().float().contiguous(), "loss": out.loss.detach().float().reshape(())}
    for i, h in enumerate(out.hidden_states):
        outputs[f"hidden_states.{i}"] = h.detach().float().contiguous()
    # The constants transformers derived from the config (softmax scale with YaRN mscale², cos/sin amplitude,
    # YaRN inverse frequencies), so ModelConfig's semantic fields are checked against them.
    attn = model.model.layers[0].self_attn
    outputs["attn_softmax_scale"] = torch.tensor(attn.scaling, dtype=torch.float64)
    outputs["rope_attention_scaling"] = torch.tensor(model.model.rotary_emb.attention_scaling, dtype=torch.float64)
    outputs["rope_inv_freq"] = model.model.rotary_emb.inv_freq.float().contiguous()
    for i, (idx, w) in routers.items():
        outputs[f"router.{i}.topk_indices"] = idx.contiguous()
        outputs[f"router.{i}.topk_weights"] = w.float().contiguous()
    save_file(outputs, str(OUT / "outputs.safetensors"), metadata=meta)
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        grads[name] = p.grad.detach().float().contiguous()
    save_file(grads, str(OUT / "grads.safetensors"), metadata=meta)
    write_dtype_fixture(OUT / "dtypes.safetensors")
    total = sum(f.stat().st_size for f in OUT.iterdir())
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    sys.exit(main())
