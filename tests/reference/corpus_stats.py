#!/usr/bin/env python3
"""Reference tokenization statistics for the bundled corpus slices, made by HuggingFace `tokenizers`.

Writes tests/golden/corpus/<slice>.<tokenizer>.stats.jsonl in the format of shared/data/corpus/*.stats.jsonl:
one line per document, {"doc": i, "n_tokens": n, "sha256_u32le": hex} (hex: sha256 of that document's ids as
uint32 little-endian, no BOS, add_special_tokens=False), then
{"total": {"docs", "n_tokens", "utf8_bytes", "sha256_u32le_concat", "reference"}}.

Usage (from the repository root; ~1 min on 2 cores):
  python3 -m venv /tmp/venv-tok && /tmp/venv-tok/bin/pip install tokenizers==0.23.2
  /tmp/venv-tok/bin/python tests/reference/corpus_stats.py
"""
import gzip, hashlib, json, os, struct

import tokenizers

# (corpus slice, tokenizer directory) pairs; the tokenizer's directory name ends up in the output name.
CASES = [
    ("data/sotu-slice/sotu-slice.jsonl", "data/deepseek-v3-tokenizer"),
    ("data/foldoc-slice/foldoc-slice.jsonl.gz", "data/deepseek-v3-tokenizer"),
    ("data/sotu-slice/sotu-slice.jsonl", "data/gpt2-tokenizer"),
]
OUT = "tests/golden/corpus"


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        return f.read()


def docs(path):
    return [json.loads(line)["text"] for line in read(path).decode("utf-8").splitlines()]


def main():
    os.makedirs(OUT, exist_ok=True)
    for corpus, tok_dir in CASES:
        tok = tokenizers.Tokenizer.from_str(read(os.path.join(tok_dir, "tokenizer.json.gz")).decode("utf-8"))
        texts = docs(corpus)
        lines, concat, n_tokens = [], hashlib.sha256(), 0
        for i, enc in enumerate(tok.encode_batch(texts, add_special_tokens=False)):
            raw = struct.pack(f"<{len(enc.ids)}I", *enc.ids)
            concat.update(raw)
            n_tokens += len(enc.ids)
            lines.append({"doc": i, "n_tokens": len(enc.ids), "sha256_u32le": hashlib.sha256(raw).hexdigest()})
        lines.append({"total": {"docs": len(texts), "n_tokens": n_tokens,
                                "utf8_bytes": sum(len(t.encode("utf-8")) for t in texts),
                                "sha256_u32le_concat": concat.hexdigest(),
                                "reference": f"tokenizers {tokenizers.__version__} (Python)"}})
        name = os.path.basename(corpus).split(".")[0]
        tok_name = os.path.basename(tok_dir).removesuffix("-tokenizer")
        out = os.path.join(OUT, f"{name}.{tok_name}.stats.jsonl")
        with open(out, "w", newline="\n") as f:
            f.writelines(json.dumps(l, separators=(",", ":")) + "\n" for l in lines)
        print(f"{out}: {len(texts)} docs, {n_tokens} tokens")


if __name__ == "__main__":
    main()
