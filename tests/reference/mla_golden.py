#!/usr/bin/env python3
"""Golden fixtures for the MLA layer (tests/model/mla_test.cpp) from HF transformers' DeepseekV3Attention in fp32.

Runs the HF attention module (eager) on a tiny config with YaRN rope scaling (factor > 1, mscale != mscale_all_dim,
so both the softmax mscale² and the cos/sin attention factor are exercised), position_ids = arange(S) per row and
a causal mask, then backward of sum(out * w_out). Saves inputs, weights, outputs and gradients.

Usage: python3 tests/reference/mla_golden.py   (writes tests/golden/mla/{qlora,noqlora}.safetensors)
Requires torch, transformers==4.57.x, safetensors.
"""
import os

import torch
from safetensors.torch import save_file
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "mla")


def make(name, q_lora_rank, seed):
    torch.manual_seed(seed)
    B, S, D, H = 2, 7, 32, 2
    cfg = DeepseekV3Config(
        hidden_size=D, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=q_lora_rank, kv_lora_rank=12,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, rope_theta=10000.0, max_position_embeddings=64,
        rope_scaling={"type": "yarn", "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 1.0},
        attention_bias=False, attention_dropout=0.0, rope_interleave=True,
        num_hidden_layers=1, vocab_size=16, intermediate_size=8, moe_intermediate_size=8,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1)
    cfg._attn_implementation = "eager"
    attn = DeepseekV3Attention(cfg, layer_idx=0).float()
    rope = DeepseekV3RotaryEmbedding(cfg)
    # Weights ~ 1/sqrt(fan_in) so the attention is far from uniform; norm weights around 1.
    with torch.no_grad():
        for pname, prm in attn.named_parameters():
            if prm.dim() == 2:
                prm.copy_(torch.randn_like(prm) / prm.shape[1] ** 0.5)
            else:
                prm.copy_(1.0 + 0.3 * torch.randn_like(prm))
    x = torch.randn(B, S, D, requires_grad=True)
    w_out = torch.randn(B, S, D)
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    cos, sin = rope(x, pos)
    mask = torch.full((S, S), torch.finfo(torch.float32).min).triu(1)[None, None].expand(B, 1, S, S)
    out, _ = attn(x, (cos, sin), mask)
    (out * w_out).sum().backward()

    t = {"x": x.detach(), "w_out": w_out, "out": out.detach(),
         "grad.x": x.grad,
         "inv_freq": rope.inv_freq.float(),
         "attention_factor": torch.tensor([rope.attention_scaling], dtype=torch.float32),
         "softmax_scale": torch.tensor([attn.scaling], dtype=torch.float32)}
    for pname, prm in attn.named_parameters():
        t[pname] = prm.detach()
        t["grad." + pname] = prm.grad
    t = {k: v.contiguous().float() for k, v in t.items()}
    meta = {"B": str(B), "S": str(S), "D": str(D), "H": str(H), "q_lora_rank": str(q_lora_rank or 0),
            "kv_lora_rank": "12", "qk_nope_head_dim": "8", "qk_rope_head_dim": "4", "v_head_dim": "6",
            "generator": "tests/reference/mla_golden.py", "transformers": __import__("transformers").__version__,
            "torch": torch.__version__}
    os.makedirs(OUT, exist_ok=True)
    save_file(t, os.path.join(OUT, name + ".safetensors"), metadata=meta)
    print(name, {k: tuple(v.shape) for k, v in t.items()}, "scale", attn.scaling, "af", rope.attention_scaling)


if __name__ == "__main__":
    torch.set_default_dtype(torch.float32)
    make("qlora", 16, 1234)
    make("noqlora", None, 4321)
