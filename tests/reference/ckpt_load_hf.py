#!/usr/bin/env python3
"""Loads a dsv3 checkpoint iteration directory with HuggingFace transformers' DeepseekV3ForCausalLM and runs it.

    python3 tests/reference/ckpt_load_hf.py ITER_DIR [INPUTS.safetensors OUTPUTS.safetensors]

Loads ITER_DIR with from_pretrained (its config.json and model.safetensors, or the shards named by
model.safetensors.index.json of an expert-parallel save; fp32; transformers' default expert implementation, the
one a user gets) and checks, exiting 1 with a message on the first failure:
  - transformers reports no missing and no mismatched keys, and the only unexpected keys are the MTP layer's
    (model.layers.{num_hidden_layers + k}.*), which its class does not have. Parameter names are not compared
    otherwise: transformers 5 fuses each layer's experts on load (mlp.experts.gate_up_proj, mlp.experts.down_proj)
    where 4.57 keeps the checkpoint's names. Whether the weights landed where they belong is shown by the numbers:
  - with INPUTS (input_ids, int64 [B, S]) it writes OUTPUTS: logits (fp32 [B, S, V]) and loss (fp32 [1],
    transformers' mean next-token cross-entropy with labels = input_ids), which the C++ tests compare with
    dsv3's own forward on the same weights (tests/hf_interop.h);
  - the logits are finite;
  - the MTP layer's stored copies (embed_tokens, shared_head.head) equal model.embed_tokens and lm_head.
Exits 0 when all hold, 1 on a failure, 77 when torch, transformers or safetensors cannot be imported (the C++
tests then skip: CI has no torch). Checked with transformers 4.57.6 and 5.25.0 on torch 2.15.0
(`make check-interop`).
"""
import json
import re
import sys
from pathlib import Path

try:
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import DeepseekV3ForCausalLM
except ImportError as e:
    print(f"cannot import: {e}")
    sys.exit(77)


def stored_tensor(d: Path, name: str):
    """One tensor of the directory's model file(s), through the shard index when there is one."""
    index = d / "model.safetensors.index.json"
    file = json.loads(index.read_text())["weight_map"][name] if index.exists() else "model.safetensors"
    with safe_open(str(d / file), framework="pt") as f:
        return f.get_tensor(name) if name in f.keys() else None


def main() -> int:
    if len(sys.argv) not in (2, 4):
        print(__doc__)
        return 2
    d = Path(sys.argv[1])
    cfg = json.loads((d / "config.json").read_text())
    L = cfg["num_hidden_layers"]

    def is_mtp(name: str) -> bool:
        m = re.match(r"^model\.layers\.(\d+)\.", name)
        return m is not None and int(m.group(1)) >= L

    transformers.logging.set_verbosity_error()  # the MTP keys it drops are checked below instead
    transformers.logging.disable_progress_bar()
    model, info = DeepseekV3ForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing keys: {sorted(info['missing_keys'])[:10]}")
    if info.get("mismatched_keys"):
        problems.append(f"mismatched keys: {sorted(info['mismatched_keys'])[:10]}")
    bad_unexpected = [k for k in info["unexpected_keys"] if not is_mtp(k)]
    if bad_unexpected:
        problems.append(f"unexpected non-MTP keys: {sorted(bad_unexpected)[:10]}")
    for k in range(cfg.get("num_nextn_predict_layers", 0)):
        for copy, src in ((f"model.layers.{L + k}.embed_tokens.weight", "model.embed_tokens.weight"),
                          (f"model.layers.{L + k}.shared_head.head.weight", "lm_head.weight")):
            a, b = stored_tensor(d, copy), stored_tensor(d, src)
            if a is None or b is None or not torch.equal(a, b):
                problems.append(f"{copy}: missing or differs from {src}")

    if len(sys.argv) == 4:
        ids = load_file(sys.argv[2])["input_ids"].long()
    else:
        ids = torch.arange(8).remainder(cfg["vocab_size"]).unsqueeze(0)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    if not torch.isfinite(out.logits).all():
        problems.append("non-finite logits")
    if len(sys.argv) == 4:
        save_file({"logits": out.logits.float().contiguous(), "loss": out.loss.float().reshape(1)}, sys.argv[3])

    experts = getattr(model.config, "_experts_implementation", None) or "per-expert modules"
    versions = f"transformers {transformers.__version__}, torch {torch.__version__}, experts: {experts}"
    if problems:
        print(f"FAIL {d} ({versions}):")
        for p in problems:
            print("  " + p)
        return 1
    print(f"OK {d} ({versions}): loaded with no missing or mismatched keys, {len(info['unexpected_keys'])} "
          f"MTP keys left out as expected; logits {tuple(out.logits.shape)} finite, loss {out.loss.item():.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
