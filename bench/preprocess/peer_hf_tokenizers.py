#!/usr/bin/env python3
"""Peer figure for bench/preprocess: HF `tokenizers` encode_batch on the same documents and thread count.

Only encode_batch is timed (JSON parsing and file reading are excluded), which favours the peer.
Prints one line: `hf: threads=<n> seconds=<s> mb_per_s=<x> tokens_per_s=<y> tokens=<t>`.
"""
import json
import os
import sys
import time

threads = int(sys.argv[3])
os.environ["RAYON_NUM_THREADS"] = str(threads)  # must be set before tokenizers starts its pool
os.environ["TOKENIZERS_PARALLELISM"] = "true"
from tokenizers import Tokenizer  # noqa: E402

tok = Tokenizer.from_file(os.path.join(sys.argv[1], "tokenizer.json"))
with open(sys.argv[2], encoding="utf-8") as f:
    texts = [json.loads(line)["text"] for line in f]
nbytes = sum(len(t.encode("utf-8")) for t in texts)
runs = []
for _ in range(int(sys.argv[4]) if len(sys.argv) > 4 else 3):
    t0 = time.perf_counter()
    enc = tok.encode_batch(texts, add_special_tokens=False)
    runs.append(time.perf_counter() - t0)
sec = sorted(runs)[len(runs) // 2]
ntok = sum(len(e.ids) for e in enc)
print(f"hf: threads={threads} seconds={sec:.3f} mb_per_s={nbytes / sec / 1e6:.2f} "
      f"tokens_per_s={ntok / sec:.0f} tokens={ntok}")
