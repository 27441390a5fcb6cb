#!/usr/bin/env python3
"""Golden .bin/.idx files for `dsv3 preprocess`, made by the reference stack Megatron uses.

Token ids come from `transformers.AutoTokenizer` (what Megatron's _HuggingFaceTokenizer.tokenize calls), the
bytes from Megatron-Core's own `IndexedDatasetBuilder` (add_document / add_index / finalize). The per-line
logic below is tools/preprocess_data.py's Encoder.encode and its partition/merge step (spec section 2),
which live in the Megatron-LM repository rather than the megatron-core package.

  pip install "transformers==4.57.6" torch numpy && pip install --no-deps megatron-core==0.8.0
  (0.16.1 writes the same bytes; 0.8.0 is the version the dataset goldens pin, see README.md here)
  python3 tests/reference/preprocess_golden.py ../shared/data

transformers 5.x loads this tokenizer_config (LlamaTokenizerFast over a ByteLevel tokenizer.json) as
`TokenizersBackend`, which ignores add_bos_token; the 4.x line prepends BOS as Megatron users see it.

Writes tests/golden/preprocess/{input.jsonl, <case>_text_document.{bin,idx}, ...}.
"""
import json
import os
import sys

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "golden", "preprocess")
REPO_TINY = os.path.join(HERE, "..", "..", "data", "tiny-4k")


def make_input(shared):
    """A small JSONL fixture: public-domain SOTU paragraphs plus the edge cases Megatron handles specially."""
    docs = []
    with open(os.path.join(shared, "corpus", "sotu.jsonl"), encoding="utf-8") as f:
        speeches = [json.loads(l)["text"] for l in f]
    for s in (speeches[0], speeches[120], speeches[-1]):
        sentences = s.split(". ")
        docs += [". ".join(sentences[i:i + 5]) for i in range(0, 60, 5)]  # 12 short documents per speech
    rows = [{"text": d, "title": d[:24]} for d in docs]
    rows.insert(3, {"text": "", "title": "empty document"})  # Megatron: a zero-sequence document
    rows.insert(7, {"text": ["First sentence.", "", "Third one, after an empty one."], "title": "list"})
    rows.insert(11, {"text": "caf\u00e9 \u2615 \u6bd5\u8001\u5e08 1234567 <\uff5cUser\uff5c>hi\r\n\ttabs", "title": ""})
    with open(os.path.join(OUT, "input.jsonl"), "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def encode(tok, line, keys, append_eod):
    data = json.loads(line)
    out = {}
    for key in keys:
        text = data[key]
        sentences = text if isinstance(text, list) else [text]
        doc_ids, lens = [], []
        for s in sentences:
            ids = tok(s).input_ids
            if len(ids) > 0:
                doc_ids.extend(ids)
                lens.append(len(ids))
        if len(doc_ids) > 0 and append_eod:
            doc_ids.append(tok.eos_token_id)
            lens[-1] += 1
        out[key] = (doc_ids, lens)
    return out


def run_case(name, tok_dir, keys, append_eod, partitions):
    tok = AutoTokenizer.from_pretrained(tok_dir)
    dtype = DType.optimal_dtype(len(tok))
    with open(os.path.join(OUT, "input.jsonl"), encoding="utf-8") as f:
        lines = f.readlines()
    parts = [lines[p::partitions] for p in range(partitions)]  # round-robin, as preprocess_data.py splits
    prefix = os.path.join(OUT, name)
    for key in keys:
        part_prefixes = []
        for p, plines in enumerate(parts):
            pp = f"{prefix}_{p}_{key}_document" if partitions > 1 else f"{prefix}_{key}_document"
            b = IndexedDatasetBuilder(pp + ".bin", dtype=dtype)
            for line in plines:
                ids, lens = encode(tok, line, keys, append_eod)[key]
                b.add_document(ids, lens)
            b.finalize(pp + ".idx")
            part_prefixes.append(pp)
        if partitions > 1:
            b = IndexedDatasetBuilder(f"{prefix}_{key}_document.bin", dtype=dtype)
            for pp in part_prefixes:
                b.add_index(pp)
            b.finalize(f"{prefix}_{key}_document.idx")
            for pp in part_prefixes:
                os.remove(pp + ".bin")
                os.remove(pp + ".idx")


def main():
    shared = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "..", "..", "shared", "data")
    os.makedirs(OUT, exist_ok=True)
    make_input(shared)
    run_case("tiny_p1_eod", REPO_TINY, ["text"], True, 1)
    run_case("tiny_p3_eod", REPO_TINY, ["text"], True, 3)
    run_case("full_p1_two_keys", os.path.join(shared, "deepseek-v3-tokenizer"), ["text", "title"], False, 1)


if __name__ == "__main__":
    main()
