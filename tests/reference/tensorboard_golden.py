"""Writes tests/golden/tensorboard/: an event file written by torch.utils.tensorboard.SummaryWriter (the writer
Megatron uses) with fixed wall times, and calls.json listing the same calls, so the C++ test can replay them
through dsv3::EventWriter and compare every record after the first byte for byte.

Run from the repository root: python3 tests/reference/tensorboard_golden.py   (needs torch + tensorboard)
"""
import glob
import json
import os
import shutil
import tempfile

from torch.utils.tensorboard import SummaryWriter

OUT = os.path.join("tests", "golden", "tensorboard")

# (kind, tag, value-or-text, step, wall_time). Values are exact in float32 or not (float32 rounding is part of
# the check); steps include 0 (omitted by proto3), large and multi-byte varints; texts include UTF-8 and an
# empty string; tags are Megatron's names (spec §5.2) and add_text's argument tags.
CALLS = [
    ("scalar", "learning-rate", 0.0, 0, 1700000000.0),
    ("scalar", "learning-rate", 2.2e-4, 1, 1700000000.25),
    ("scalar", "learning-rate vs samples", 2.2e-4, 8, 1700000000.5),
    ("scalar", "lm loss", 11.93456789, 1, 1700000001.125),
    ("scalar", "lm loss vs tokens", 11.93456789, 32768, 1700000001.125),
    ("scalar", "lm-loss-training/lm loss vs tokens", 11.93456789, 32768, 1700000001.125),
    ("scalar", "grad-norm", 3.0e38, 127, 1700000002.0),
    ("scalar", "grad-norm/grad-norm vs tokens", -1.5e-40, 128, 1700000002.0),
    ("scalar", "load_balancing_loss", 1.0000001192092896, 300, 1700000003.0),
    ("scalar", "iteration-time", 1234.5678, 16384, 1700000004.0),
    ("scalar", "throughput", 0.1, 2**40 + 3, 1700000005.0),
    ("text", "seq_length", "4096", 0, 1700000006.0),
    ("text", "lr", "0.00022", 0, 1700000006.0),
    ("text", "moe_layer_freq", "[0, 0, 0, 1]", 10, 1700000006.5),
    ("text", "tokenizer_model", "/data/déjà vu/ü", 10, 1700000007.0),
    ("text", "empty", "", 10, 1700000007.0),
]


def main():
    tmp = tempfile.mkdtemp()
    try:
        w = SummaryWriter(tmp)
        for kind, tag, val, step, wt in CALLS:
            if kind == "scalar":
                w.add_scalar(tag, val, step, walltime=wt)
            else:
                w.add_text(tag, val, step, walltime=wt)
        w.close()
        (path,) = glob.glob(os.path.join(tmp, "events.out.tfevents.*"))
        os.makedirs(OUT, exist_ok=True)
        shutil.copyfile(path, os.path.join(OUT, "summarywriter.tfevents"))
    finally:
        shutil.rmtree(tmp)
    calls = [
        {"kind": k, "tag": t, "value": (float(v).hex() if k == "scalar" else v), "step": s, "wall_time": wt.hex()}
        for k, t, v, s, wt in CALLS
    ]
    with open(os.path.join(OUT, "calls.json"), "w", encoding="utf-8") as f:
        json.dump(calls, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
