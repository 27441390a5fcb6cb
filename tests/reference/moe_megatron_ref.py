#!/usr/bin/env python3
"""Megatron-Core fixtures for the router/MoE pieces HF lacks, computed with megatron-core 0.16.1's own functions.

Uses megatron.core.transformer.moe.moe_utils: topk_routing_with_score_function (sigmoid, expert bias, group-limited
top-k with group score = top-(topk/group_topk) sum, −inf group mask, renormalise for topk > 1, scaling),
apply_router_token_dropping (capacity, policies probs/position, pad-to-capacity), compute_routing_scores_for_aux_loss
+ switch_load_balancing_loss_func (the body of TopKRouter._apply_seq_aux_loss, tp_cp group of size 1), and
permute/unpermute (the non-fused token dispatcher path). Experts are SwiGLU with the prob applied before fc2 as in
Megatron's experts (moe_apply_probs_on_input=False); the shared expert is added after unpermute.

Two deliberate deviations, both documented in src/kernels/cpu/router.h:
  * Token layout: dsv3 uses t = b*S + s; Megatron's tokens are [S, B] (t = s*B + b). Tensors are converted before
    calling Megatron and converted back before saving.
  * Ties: torch.topk on CPU does not return the lowest index first among equal values. Megatron's `position` policy
    is torch.topk over the 0/1 routing map, i.e. ALL ties, so on CPU it does not keep "the first tokens" as its
    docstring says. For `position` we therefore build the capacity mask with a stable descending sort (Megatron's
    formula with the intended tie order: the first tokens in Megatron's [S, B] token order, i.e. earlier positions
    of all sequences before later ones) and report how Megatron's own CPU result differs. For `probs` the real
    function is used; the padding slots it picks among the zero-prob tokens are arbitrary, so fixtures store only
    tie-free quantities: final probs, kept pairs (final_map & topk_map) and per-expert counts (final_map.sum(0)).

Needs megatron-core 0.16.1 importable, e.g.:
    pip install --no-deps --target /tmp/mcore016 megatron-core==0.16.1
    MCORE_PATH=/tmp/mcore016 python3 tests/reference/moe_megatron_ref.py
"""
import math
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.environ.get("MCORE_PATH", "/tmp/mcore016"))

import megatron.core  # noqa: E402
import torch  # noqa: E402
from megatron.core.transformer.moe import moe_utils as mu  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "golden", "moe")


def to_meg(x, B, S):  # [B*S, ...] (t = b*S + s) -> [S*B, ...] (t = s*B + b)
    return x.reshape(B, S, *x.shape[1:]).transpose(0, 1).reshape(B * S, *x.shape[1:])


def from_meg(x, B, S):
    return x.reshape(S, B, *x.shape[1:]).transpose(0, 1).reshape(B * S, *x.shape[1:])


def position_drop(probs, rmap, topk, cf, pad):
    """apply_router_token_dropping for drop_policy='position' with a stable (lowest-index-first) tie order."""
    T, E = probs.shape
    cap = mu.get_capacity(num_tokens=T * topk, num_experts=E, capacity_factor=cf)
    if cap > T:
        cmask = torch.ones_like(rmap)
    else:
        order = torch.argsort(rmap.int(), dim=0, descending=True, stable=True)[:cap]
        cmask = torch.zeros_like(probs).scatter(0, order, 1).bool()
    fmap = cmask if pad else rmap & cmask
    return probs * fmap, fmap


def route(logits, bias, c, B, S):
    """Megatron routing on dsv3-layout logits; returns dsv3-layout (final_probs, final_map, topk_map, aux)."""
    lm = to_meg(logits, B, S)
    probs, rmap = mu.topk_routing_with_score_function(
        lm, c["K"], num_groups=c["G"] if c["TG"] else None, group_topk=c["TG"] or None,
        scaling_factor=c["scale"], score_function="sigmoid", expert_bias=bias)
    fprobs, fmap = probs, rmap
    if c["cf"] > 0:
        if c["policy"] == "probs":
            fprobs, fmap = mu.apply_router_token_dropping(probs, rmap, router_topk=c["K"], capacity_factor=c["cf"],
                                                          drop_policy="probs", pad_to_capacity=c["pad"])
        else:
            mp, mm = mu.apply_router_token_dropping(probs, rmap, router_topk=c["K"], capacity_factor=c["cf"],
                                                    drop_policy="position", pad_to_capacity=c["pad"])
            fprobs, fmap = position_drop(probs, rmap, c["K"], c["cf"], c["pad"])
            diff = int(((mm & rmap) != (fmap & rmap)).sum())
            print(f"    position policy: Megatron's CPU torch.topk tie order keeps {diff} (token, expert) pairs "
                  f"differently from keep-the-first-tokens")
            assert torch.equal(mm.sum(0), fmap.sum(0))
    aux = None
    if c["aux"] > 0:
        amap, ascores = mu.compute_routing_scores_for_aux_loss(lm, c["K"], "sigmoid")
        # TopKRouter._apply_seq_aux_loss with a tp_cp group of size 1:
        tpe = amap.reshape(S, -1).sum(dim=0)
        aux = mu.switch_load_balancing_loss_func(probs=ascores.reshape(S, -1), tokens_per_expert=tpe,
                                                 total_num_tokens=S, topk=c["K"], num_experts=c["E"],
                                                 moe_aux_loss_coeff=c["aux"]) / B
    return from_meg(fprobs, B, S), from_meg(fmap, B, S), from_meg(rmap, B, S), aux


def common(c):
    return torch.tensor([c["E"], c["K"], c["G"], c["TG"], c["B"], c["S"], int(c["cf"] > 0),
                         int(c["policy"] == "position"), int(c["pad"])], dtype=torch.int64), \
        torch.tensor([c["scale"], c["cf"], c["aux"]], dtype=torch.float64)


def router_case(name, c, seed, make_logits=None, bias=None):
    g = torch.Generator().manual_seed(seed)
    T, E = c["B"] * c["S"], c["E"]
    logits = make_logits(g) if make_logits else torch.randn(T, E, generator=g) * 1.5
    logits.requires_grad_(True)
    if bias is None:
        bias = (torch.rand(E, generator=g) - 0.5) * 0.6  # includes negative values: −inf vs 0.0 masks differ
    G_up = torch.randn(T, E, generator=g)
    fprobs, fmap, rmap, aux = route(logits, bias, c, c["B"], c["S"])
    loss = (fprobs * G_up).sum() + (aux if aux is not None else 0.0)
    loss.backward()
    ints, floats = common(c)
    t = {"ints": ints, "floats": floats, "logits": logits.detach(), "bias": bias.float(), "dprobs": G_up,
         "final_probs": fprobs.detach(), "kept": (fmap & rmap).to(torch.int32), "topk_map": rmap.to(torch.int32),
         "tokens_per_expert": fmap.sum(0).to(torch.int64), "routed_per_expert": rmap.sum(0).to(torch.int64),
         "aux_loss": torch.tensor([float(aux) if aux is not None else 0.0], dtype=torch.float32),
         "dlogits": logits.grad}
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, f"mcore_router_{name}.safetensors"),
              metadata={"generator": "tests/reference/moe_megatron_ref.py", "megatron_core": megatron.core.__version__})
    print("wrote router", name, "capacity", mu.get_capacity(T * c["K"], E, c["cf"]) if c["cf"] > 0 else None,
          "kept", int((fmap & rmap).sum()), "/", int(rmap.sum()))


def moe_case(name, c, D, F, NS, seed):
    """Full MoE layer (Megatron semantics) forward + backward, fixtures in the layout of src/model/moe.h."""
    g = torch.Generator().manual_seed(seed)
    B, S, E, K = c["B"], c["S"], c["E"], c["K"]
    T = B * S
    x = torch.randn(T, D, generator=g, requires_grad=True)
    W = {"gate_w": torch.randn(E, D, generator=g) * 0.3, "gate_proj": torch.randn(E, F, D, generator=g) * 0.2,
         "up_proj": torch.randn(E, F, D, generator=g) * 0.2, "down_proj": torch.randn(E, D, F, generator=g) * 0.2,
         "shared_gate": torch.randn(NS * F, D, generator=g) * 0.2, "shared_up": torch.randn(NS * F, D, generator=g) * 0.2,
         "shared_down": torch.randn(D, NS * F, generator=g) * 0.2}
    for v in W.values():
        v.requires_grad_(True)
    bias = (torch.rand(E, generator=g) - 0.5) * 0.6
    dout = torch.randn(T, D, generator=g)
    logits = x @ W["gate_w"].T
    fprobs, fmap, rmap, aux = route(logits, bias, c, B, S)
    # Megatron dispatcher path (non-fused): permute by the final routing map, experts, unpermute (scatter-add).
    pin, pprobs, sidx = mu.permute(x, fmap, probs=fprobs)[:3]
    counts = fmap.sum(0).tolist()
    outs, o = [], 0
    for e in range(E):
        xe, pe = pin[o:o + counts[e]], pprobs[o:o + counts[e]]
        h = torch.nn.functional.silu(xe @ W["gate_proj"][e].T) * (xe @ W["up_proj"][e].T)
        outs.append((h * pe.unsqueeze(-1)) @ W["down_proj"][e].T)
        o += counts[e]
    routed = mu.unpermute(torch.cat(outs), sidx, restore_shape=x.shape, routing_map=fmap)
    shared = (torch.nn.functional.silu(x @ W["shared_gate"].T) * (x @ W["shared_up"].T)) @ W["shared_down"].T
    out = routed + shared
    loss = (out * dout).sum() + (aux if aux is not None else 0.0)
    loss.backward()
    ints, floats = common(c)
    t = {"ints": ints, "floats": floats, "dims": torch.tensor([D, F, NS], dtype=torch.int64), "x": x.detach(),
         "dout": dout, "bias": bias, "out": out.detach(), "dx": x.grad,
         "aux_loss": torch.tensor([float(aux) if aux is not None else 0.0]),
         "kept": (fmap & rmap).to(torch.int32), "tokens_per_expert": fmap.sum(0).to(torch.int64)}
    for k, v in W.items():
        t[k] = v.detach()
        t["d_" + k] = v.grad
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, f"mcore_moe_{name}.safetensors"),
              metadata={"generator": "tests/reference/moe_megatron_ref.py", "megatron_core": megatron.core.__version__})
    print("wrote moe", name, "kept", int((fmap & rmap).sum()), "/", int(rmap.sum()))


def cfg(E=8, K=3, G=4, TG=2, B=2, S=8, scale=2.5, cf=-1.0, policy="probs", pad=False, aux=0.0):
    return dict(E=E, K=K, G=G, TG=TG, B=B, S=S, scale=scale, cf=cf, policy=policy, pad=pad, aux=aux)


def main():
    assert megatron.core.__version__ == "0.16.1", megatron.core.__version__
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    # Group score = top-(3//2 = 1) sum, −inf mask, renormalise, seq aux loss.
    router_case("dropless_aux", cfg(aux=0.01), 11)
    router_case("probs", cfg(cf=1.0), 12)
    router_case("probs_pad", cfg(cf=1.0, pad=True), 13)
    router_case("position", cfg(cf=1.0, policy="position"), 14)
    router_case("position_pad", cfg(cf=1.25, policy="position", pad=True, aux=0.001), 15)
    router_case("cap_over_T", cfg(E=4, K=2, G=2, TG=1, B=1, S=6, cf=4.0, pad=True), 16)
    # Deliberately unbalanced: expert 5's bias wins every token's selection; dropping keeps `capacity` of them.
    hot = torch.zeros(8)
    hot[5] = 10.0
    router_case("hot_probs", cfg(cf=1.0, aux=0.01), 17, bias=hot)
    router_case("hot_position_pad", cfg(cf=1.0, policy="position", pad=True), 18, bias=hot)
    # top-1, no groups, no renormalisation (Megatron: topk == 1): every token routed to expert 2.
    router_case("top1_all_one", cfg(K=1, G=1, TG=0, scale=1.0, cf=2.0),
                19, make_logits=lambda g: torch.randn(16, 8, generator=g) * 0.5 + 8.0 * torch.eye(8)[2])
    moe_case("probs_aux", cfg(cf=1.0, aux=0.01), D=16, F=12, NS=1, seed=21)
    moe_case("dropless", cfg(K=2, B=1, S=10), D=16, F=12, NS=2, seed=22)


if __name__ == "__main__":
    main()
