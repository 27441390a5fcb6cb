#!/usr/bin/env python3
"""Golden fixtures for the MoE layer from HuggingFace transformers 4.57.6 `DeepseekV3MoE` in fp32.

Writes tests/golden/moe/hf_<case>.safetensors holding the input, every parameter (routed experts stacked as
[E,F,D] / [E,D,F], the layout of src/model/moe.h), the routing HF chose (indices sorted ascending per token, with
their weights), the output, and the gradients of sum(out * dout) w.r.t. the input and every parameter.

The e_score_correction_bias is non-zero and changes the selection of some tokens (asserted). It is kept small enough
that every biased score stays > 0, so HF's 0.0 group mask selects the same experts a −inf mask would and torch.topk's
tie order never matters; the 0.0-vs-−inf difference is tested in C++ on a hand-made case instead.

Run: python3 tests/reference/moe_golden.py   (torch, transformers==4.57.6, safetensors)
"""
import os

import torch
import transformers
from safetensors.torch import save_file
from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "moe")

CASES = {
    # name: (D, E, n_group, topk_group, K, F, n_shared, B, S, norm_topk_prob, routed_scaling_factor, seed)
    "main": (16, 8, 4, 2, 3, 12, 1, 2, 5, True, 2.5, 1),
    "nonorm_k2": (16, 8, 4, 2, 2, 12, 2, 1, 10, False, 1.0, 2),
    "e16_g8": (16, 16, 8, 3, 4, 6, 1, 2, 4, True, 2.5, 3),
}


def idx_neg_inf(choice, G, TG, K):
    """HF get_topk_indices with the official -inf group mask, indices sorted ascending."""
    T, E = choice.shape
    gs = choice.view(T, G, E // G).topk(2, dim=-1)[0].sum(-1)
    keep = torch.zeros_like(gs).scatter_(1, gs.topk(TG, dim=-1)[1], 1).bool()
    masked = choice.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    return torch.sort(masked.topk(K, dim=-1)[1], dim=-1)[0]


def build(name, D, E, G, TG, K, F, NS, B, S, norm, scale, seed):
    cfg = DeepseekV3Config(hidden_size=D, n_routed_experts=E, n_group=G, topk_group=TG, num_experts_per_tok=K,
                           moe_intermediate_size=F, n_shared_experts=NS, norm_topk_prob=norm,
                           routed_scaling_factor=scale, hidden_act="silu")
    moe = DeepseekV3MoE(cfg).float()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in moe.named_parameters():
            std = 0.3 if n == "gate.weight" else 0.2
            p.copy_(torch.randn(p.shape, generator=g) * std)
        bias = (torch.rand(E, generator=g) - 0.5) * 0.3
        moe.gate.e_score_correction_bias.copy_(bias)
    x = torch.randn(B, S, D, generator=g, requires_grad=True)
    dout = torch.randn(B, S, D, generator=g)

    # The bias must change the selection for some token, and biased scores must stay positive (see docstring).
    with torch.no_grad():
        s = torch.sigmoid(x.reshape(-1, D) @ moe.gate.weight.T)
        assert torch.equal(idx_neg_inf(s + bias, G, TG, K), torch.sort(moe.gate.get_topk_indices(s), dim=-1)[0]), \
            f"{name}: HF's 0.0 group mask selects differently from -inf here (tie order would matter)"
        idx_b = torch.sort(moe.gate.get_topk_indices(s), dim=-1)[0]
        moe.gate.e_score_correction_bias.zero_()
        idx_0 = torch.sort(moe.gate.get_topk_indices(s), dim=-1)[0]
        moe.gate.e_score_correction_bias.copy_(bias)
        assert (idx_b != idx_0).any(), f"{name}: the bias does not change any selection"

    out = moe(x)
    (out * dout).sum().backward()
    with torch.no_grad():
        idx, w = moe.gate(x)
        order = torch.argsort(idx, dim=-1)
        idx_sorted = torch.gather(idx, 1, order).to(torch.int32)
        w_sorted = torch.gather(w, 1, order)

    def stack(fmt, grad=False):
        ts = [dict(moe.named_parameters())[fmt.format(e)] for e in range(E)]
        return torch.stack([(t.grad if t.grad is not None else torch.zeros_like(t)) if grad else t.detach()
                            for t in ts]).contiguous()

    P = dict(moe.named_parameters())
    t = {
        "config": torch.tensor([D, E, G, TG, K, F, NS, B, S, int(norm)], dtype=torch.int64),
        "scaling": torch.tensor([scale], dtype=torch.float32),
        "x": x.detach().reshape(B * S, D),
        "dout": dout.reshape(B * S, D),
        "gate_w": P["gate.weight"].detach(),
        "expert_bias": moe.gate.e_score_correction_bias.detach().clone(),
        "gate_proj": stack("experts.{}.gate_proj.weight"),
        "up_proj": stack("experts.{}.up_proj.weight"),
        "down_proj": stack("experts.{}.down_proj.weight"),
        "shared_gate": P["shared_experts.gate_proj.weight"].detach(),
        "shared_up": P["shared_experts.up_proj.weight"].detach(),
        "shared_down": P["shared_experts.down_proj.weight"].detach(),
        "idx_sorted": idx_sorted,
        "weight_sorted": w_sorted,
        "out": out.detach().reshape(B * S, D),
        "dx": x.grad.reshape(B * S, D),
        "d_gate_w": P["gate.weight"].grad,
        "d_gate_proj": stack("experts.{}.gate_proj.weight", True),
        "d_up_proj": stack("experts.{}.up_proj.weight", True),
        "d_down_proj": stack("experts.{}.down_proj.weight", True),
        "d_shared_gate": P["shared_experts.gate_proj.weight"].grad,
        "d_shared_up": P["shared_experts.up_proj.weight"].grad,
        "d_shared_down": P["shared_experts.down_proj.weight"].grad,
    }
    t = {k: v.contiguous() for k, v in t.items()}
    save_file(t, os.path.join(OUT, f"hf_{name}.safetensors"),
              metadata={"generator": "tests/reference/moe_golden.py", "transformers": transformers.__version__,
                        "torch": torch.__version__})


def main():
    assert transformers.__version__ == "4.57.6", transformers.__version__
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    for name, args in CASES.items():
        build(name, *args)
        print("wrote", name)


if __name__ == "__main__":
    main()
