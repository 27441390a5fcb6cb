#!/usr/bin/env python3
"""Checks that HuggingFace transformers loads a dsv3 checkpoint iteration directory as DeepseekV3ForCausalLM.

    python3 tests/reference/ckpt_load_hf.py DIR/iter_0000042

Loads the directory with DeepseekV3ForCausalLM.from_pretrained (its config.json and model.safetensors, or the
shards model-*-of-*.safetensors named by model.safetensors.index.json of an expert-parallel save; fp32) and checks,
exiting non-zero with a message on the first failure:
  - transformers reports no missing and no mismatched keys; the only unexpected keys are the MTP layer's
    (model.layers.{num_hidden_layers + k}.*), which transformers' class does not have;
  - every parameter and persistent buffer of the loaded model (mlp.gate.e_score_correction_bias included) equals
    the tensor of the same name in model.safetensors bit for bit;
  - every tensor in model.safetensors is either loaded or an MTP tensor;
  - the MTP layer's stored copies (embed_tokens, shared_head.head) equal model.embed_tokens and lm_head;
  - a forward pass on a few tokens gives finite logits.
Exits 0 when all hold, 1 on a failure, 77 when torch or transformers cannot be imported (the C++ test
tests/train/checkpoint_test.cpp, CheckpointHf.*, then reports the sub-check as skipped: CI has no torch).
Checked with torch 2.15, transformers 4.57.6, safetensors.
"""
import json
import re
import sys
from pathlib import Path

try:
    import torch
    import transformers
    from safetensors import safe_open
    from transformers import DeepseekV3ForCausalLM
except ImportError as e:  # python3 -c 'import transformers, torch' would fail: skip
    print(f"SKIP: {e}")
    sys.exit(77)


def read_stored(d: Path) -> dict:
    """Every tensor of the directory's model file(s), through the shard index when there is one."""
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(d / name), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    d = Path(sys.argv[1])
    cfg = json.loads((d / "config.json").read_text())
    L = cfg["num_hidden_layers"]
    mtp = re.compile(r"^model\.layers\.(\d+)\.")

    def is_mtp(name: str) -> bool:
        m = mtp.match(name)
        return m is not None and int(m.group(1)) >= L

    transformers.logging.set_verbosity_error()  # the MTP keys it drops are checked below instead
    model, info = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing keys: {sorted(info['missing_keys'])[:10]}")
    if info.get("mismatched_keys"):
        problems.append(f"mismatched keys: {sorted(info['mismatched_keys'])[:10]}")
    bad_unexpected = [k for k in info["unexpected_keys"] if not is_mtp(k)]
    if bad_unexpected:
        problems.append(f"unexpected non-MTP keys: {sorted(bad_unexpected)[:10]}")

    loaded = dict(model.named_parameters())
    loaded.update({n: b for n, b in model.named_buffers() if n in model.state_dict()})
    stored = read_stored(d)
    names = set(stored)
    for n, t in sorted(loaded.items()):
        if n not in names:
            problems.append(f"{n}: in the loaded model but not in the checkpoint's model file(s)")
            continue
        ref = stored[n]
        if ref.dtype != torch.float32 or tuple(ref.shape) != tuple(t.shape):
            problems.append(f"{n}: stored {ref.dtype} {tuple(ref.shape)}, model has {tuple(t.shape)}")
        elif not torch.equal(ref, t.detach()):
            problems.append(f"{n}: values differ (max |diff| {(ref - t.detach()).abs().max().item()})")
    extra = sorted(n for n in names if n not in loaded and not is_mtp(n))
    if extra:
        problems.append(f"stored tensors that transformers did not load: {extra[:10]}")
    n_mtp = sum(1 for n in names if is_mtp(n))
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        for copy, src in ((f"model.layers.{L + k}.embed_tokens.weight", "model.embed_tokens.weight"),
                          (f"model.layers.{L + k}.shared_head.head.weight", "lm_head.weight")):
            if copy not in names:
                problems.append(f"{copy}: missing")
            elif not torch.equal(stored[copy], stored[src]):
                problems.append(f"{copy}: differs from {src}")
    biases = [n for n in loaded if n.endswith("mlp.gate.e_score_correction_bias")]
    if not biases:
        problems.append("no e_score_correction_bias was loaded")

    model.eval()
    with torch.no_grad():
        ids = torch.arange(8).remainder(cfg["vocab_size"]).unsqueeze(0)
        logits = model(input_ids=ids).logits
    if not torch.isfinite(logits).all():
        problems.append("non-finite logits")

    if problems:
        print(f"FAIL {d}:")
        for p in problems:
            print("  " + p)
        return 1
    print(f"OK {d}: transformers loaded {len(loaded)} tensors ({len(biases)} e_score_correction_bias buffers) "
          f"bit-identical to the stored tensors; {n_mtp} MTP tensors ignored by transformers as expected; "
          f"logits {tuple(logits.shape)} finite")
    return 0


if __name__ == "__main__":
    sys.exit(main())
