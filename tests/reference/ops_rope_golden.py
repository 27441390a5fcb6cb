#!/usr/bin/env python3
"""Golden fixture for dsv3's RoPE/YaRN kernel, produced by HF transformers' own DeepSeek-V3 code.

For each case, builds DeepseekV3Config, runs DeepseekV3RotaryEmbedding (inv_freq, attention_scaling, cos/sin) and
apply_rotary_pos_emb_interleave on random fp32 q [B,H,S,dr] and k [B,1,S,dr] with position_ids = arange(S) for every
batch row, and backpropagates random upstream gradients with autograd.

Writes tests/golden/ops/rope.json (cases, configs, tensor offsets/shapes) and rope.bin (little-endian float32).
Token-major tensors are stored in dsv3's layout [B*S, H, dr] (t = b*S + s); cos is HF's [S, dr] for batch row 0.
Environment: torch 2.x (CPU), transformers 4.57.6.  Run from the repository root:
  python3 tests/reference/ops_rope_golden.py
"""
import json
import os

import numpy as np
import torch
import transformers
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (DeepseekV3RotaryEmbedding,
                                                                  apply_rotary_pos_emb_interleave)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "ops")

CASES = [
    # name, dr, theta, max_position_embeddings, rope_scaling, B, H, S
    ("yarn_mscale", 16, 10000.0, 64,
     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
      "mscale": 1.0, "mscale_all_dim": 0.707}, 2, 2, 24),
    # No mscale keys: HF then scales cos/sin by get_mscale(factor) = 1 + 0.1 ln 4; truncate=False keeps the
    # fractional correction range.
    ("yarn_plain_mscale_no_truncate", 16, 10000.0, 64,
     {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0,
      "truncate": False}, 2, 2, 24),
    ("plain", 16, 50000.0, 64, None, 2, 2, 24),
    # DeepSeek-V3's released rope_scaling at its real rope dim (64), short sequence.
    ("v3", 64, 10000.0, 163840,
     {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0,
      "mscale": 1.0, "mscale_all_dim": 1.0}, 1, 1, 8),
]


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(1234)
    blobs, offset, manifest = [], 0, {"transformers": transformers.__version__, "torch": torch.__version__,
                                      "cases": []}

    def put(entry, name, t):
        nonlocal offset
        a = t.detach().to(torch.float32).contiguous().numpy().astype("<f4")
        entry["tensors"][name] = {"offset": offset, "shape": list(a.shape)}
        blobs.append(a.tobytes())
        offset += a.size

    for name, dr, theta, max_pos, scaling, B, H, S in CASES:
        cfg = DeepseekV3Config(qk_rope_head_dim=dr, rope_theta=theta, max_position_embeddings=max_pos,
                               rope_scaling=dict(scaling) if scaling else None, hidden_size=32,
                               num_attention_heads=H)
        rot = DeepseekV3RotaryEmbedding(cfg)
        q = torch.randn(B, H, S, dr, dtype=torch.float32, requires_grad=True)
        k = torch.randn(B, 1, S, dr, dtype=torch.float32, requires_grad=True)
        pos = torch.arange(S).unsqueeze(0).expand(B, S)
        cos, sin = rot(q, pos)
        qo, ko = apply_rotary_pos_emb_interleave(q, k, cos, sin)
        gq, gk = torch.randn_like(qo), torch.randn_like(ko)
        (qo * gq).sum().add_((ko * gk).sum()).backward()
        entry = {"name": name, "dim": dr, "theta": theta, "max_position_embeddings": max_pos, "rope_scaling": scaling,
                 "batch": B, "heads": H, "seq_len": S, "attention_scaling": float(rot.attention_scaling),
                 "tensors": {}}
        tok = lambda t: t.permute(0, 2, 1, 3).reshape(B * S, t.shape[1], dr)  # [B,H,S,dr] -> [B*S,H,dr]
        put(entry, "inv_freq", rot.inv_freq)
        put(entry, "cos", cos[0])
        put(entry, "sin", sin[0])
        for n, t in [("q", q), ("k", k), ("q_out", qo), ("k_out", ko), ("dq_out", gq), ("dk_out", gk),
                     ("dq", q.grad), ("dk", k.grad)]:
            put(entry, n, tok(t))
        manifest["cases"].append(entry)

    with open(os.path.join(OUT, "rope.bin"), "wb") as f:
        for b in blobs:
            f.write(b)
    with open(os.path.join(OUT, "rope.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    print(f"wrote {offset} floats for {len(CASES)} cases")


if __name__ == "__main__":
    main()
