#!/usr/bin/env python3
"""Multi-token prediction golden (Megatron-Core semantics, spec megatron-deepseek-system.md §7.4), built from
HuggingFace transformers' own DeepSeek-V3 modules (HF has the layer types but no MTP training path).

Main model: tests/golden/hf_tiny (DeepseekV3ForCausalLM, fp32). MTP depth 1 at layer index L = num_hidden_layers:
  h_prev = main model's final-normed hidden state (Megatron's decoder output)
  ids_1  = ids rolled left by 1 within each sequence, the vacated last position 0 (Megatron roll_tensor)
  z      = eh_proj([enorm(embed(ids_1)) | hnorm(h_prev)])          embedding first, as the released weights
  z      = DeepseekV3DecoderLayer(layer_idx=L)(z)                  same positions 0..S-1, causal
  h_1    = shared_head.norm(z);  logits = lm_head(h_1)             embedding and head shared with the main model
  mtp    = CE(logits[s], token s+2) averaged over the positions whose rolled label is valid
  total  = main_loss + mtp_loss_scaling_factor / D · mtp,  factor 0.1, D = 1
Writes tests/golden/mtp/{model.safetensors (main + MTP weights, HF names), outputs.safetensors (main_loss,
mtp_loss, total, and d total / d param for every parameter)}.

Run from the repository root after hf_model_golden.py:  python3 tests/reference/mtp_golden.py
"""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/reference"))
from hf_model_golden import routing_margin  # noqa: E402

GOLDEN = ROOT / "tests/golden/hf_tiny"
OUT = ROOT / "tests/golden/mtp"
SCALE = 0.1  # --mtp-loss-scaling-factor default
MIN_MARGIN = 1e-3


def build(seed):
    model = DeepseekV3ForCausalLM.from_pretrained(str(GOLDEN), dtype=torch.float32, attn_implementation="eager")
    cfg = model.config
    L, D = cfg.num_hidden_layers, cfg.hidden_size
    gen = torch.Generator().manual_seed(seed)
    mtp = torch.nn.ModuleDict({
        "enorm": DeepseekV3RMSNorm(D, eps=cfg.rms_norm_eps),
        "hnorm": DeepseekV3RMSNorm(D, eps=cfg.rms_norm_eps),
        "eh_proj": torch.nn.Linear(2 * D, D, bias=False),
        "layer": DeepseekV3DecoderLayer(cfg, layer_idx=L),
        "norm": DeepseekV3RMSNorm(D, eps=cfg.rms_norm_eps),
    }).float()
    with torch.no_grad():
        for name, p in sorted(mtp.named_parameters()):
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / p.shape[1] ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / p.shape[1] ** 0.5))
        mtp["layer"].mlp.gate.e_score_correction_bias.copy_(0.3 * torch.rand(cfg.n_routed_experts, generator=gen))
    return model, mtp


def mtp_names(L):
    """Our module name -> HF checkpoint name (layer L's prefix; decoder layer params keep their HF suffixes)."""
    p = f"model.layers.{L}."
    return {"enorm.weight": p + "enorm.weight", "hnorm.weight": p + "hnorm.weight",
            "eh_proj.weight": p + "eh_proj.weight", "norm.weight": p + "shared_head.norm.weight"}


def run(seed):
    model, mtp = build(seed)
    cfg = model.config
    L = cfg.num_hidden_layers
    inputs = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(GOLDEN / "inputs.safetensors"))
    ids, labels = inputs["input_ids"], inputs["labels"]
    B, S = ids.shape
    out = model(input_ids=ids, labels=labels, output_hidden_states=True)
    main_loss = out.loss
    h_prev = out.hidden_states[-1]  # after model.norm
    # Megatron's roll_tensor: shift left by one, zero the vacated position; labels rolled once more than HF's.
    ids_1 = torch.roll(ids, -1, dims=-1)
    ids_1[:, -1] = 0
    next_labels = torch.full_like(labels, -100)
    next_labels[:, :-1] = labels[:, 1:]  # label of position s: token s+1 (Megatron's labels)
    mtp_labels = torch.full_like(labels, -100)
    mtp_labels[:, :-1] = next_labels[:, 1:]  # token s+2
    emb = model.model.embed_tokens(ids_1)
    z = mtp["eh_proj"](torch.cat([mtp["enorm"](emb), mtp["hnorm"](h_prev)], dim=-1))
    pos = torch.arange(S).unsqueeze(0).expand(B, S)
    cos_sin = model.model.rotary_emb(z, pos)
    mask = torch.full((S, S), float("-inf")).triu(1).view(1, 1, S, S).expand(B, 1, S, S)
    margins = []
    gate = mtp["layer"].mlp.gate
    gate.register_forward_hook(lambda m, a, o: margins.append(routing_margin(m, a[0].detach().reshape(-1, cfg.hidden_size), cfg)))
    z = mtp["layer"](z, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
    z = z[0] if isinstance(z, tuple) else z
    logits = model.lm_head(mtp["norm"](z)).float()
    mtp_loss = torch.nn.functional.cross_entropy(logits.view(-1, cfg.vocab_size), mtp_labels.view(-1),
                                                 ignore_index=-100)
    total = main_loss + SCALE / 1 * mtp_loss
    total.backward()
    return model, mtp, main_loss, mtp_loss, total, min(margins)


def main():
    for seed in range(7, 107):
        model, mtp, main_loss, mtp_loss, total, margin = run(seed)
        if margin > MIN_MARGIN:
            break
    else:
        raise SystemExit("no seed gave routing margins above MIN_MARGIN")
    L = model.config.num_hidden_layers
    print(f"seed {seed}: main {main_loss.item():.6f} mtp {mtp_loss.item():.6f} total {total.item():.6f} margin {margin:.4g}")
    names = mtp_names(L)
    weights, grads = {}, {}
    for n, p in model.named_parameters():
        weights[n] = p.detach().contiguous()
        grads["grad." + n] = p.grad.detach().contiguous()
    for n, b in model.named_buffers():
        if n.endswith("e_score_correction_bias"):
            weights[n] = b.detach().contiguous()
    for n, p in mtp.named_parameters():
        hf = names.get(n, f"model.layers.{L}." + n[len("layer."):] if n.startswith("layer.") else None)
        weights[hf] = p.detach().contiguous()
        grads["grad." + hf] = p.grad.detach().contiguous()
    weights[f"model.layers.{L}.mlp.gate.e_score_correction_bias"] = mtp["layer"].mlp.gate.e_score_correction_bias.detach().contiguous()
    OUT.mkdir(parents=True, exist_ok=True)
    meta = {"generator": "tests/reference/mtp_golden.py", "seed": str(seed), "min_routing_margin": f"{margin:.6g}"}
    save_file(weights, str(OUT / "model.safetensors"), metadata=meta)
    grads.update({"main_loss": main_loss.detach().reshape(()), "mtp_loss": mtp_loss.detach().reshape(()),
                  "total": total.detach().reshape(())})
    save_file(grads, str(OUT / "outputs.safetensors"), metadata=meta)


if __name__ == "__main__":
    main()
