#!/usr/bin/env python3
"""Golden files for dsv3's GPT/blended dataset sample order, computed by Megatron-Core's own code.

Writes tests/golden/megatron_dataset/ (see tests/reference/README.md for the environment):
  corpus_a.{bin,idx}, corpus_b.{bin,idx}   built with megatron's IndexedDatasetBuilder from
                                           deterministic synthetic token ids
  cases.json                               every case: data path, split, seed, sizes, and per split
                                           the cache file names megatron wrote and #samples
  <case>/cache/*                           megatron's own index cache (description .txt + .npy)
  <case>/<split>_samples.txt               the first K samples (seq_length+1 ids a line)
  mt19937_shuffle.json                     numpy RandomState shuffles of small vectors

Run from the repository root:  python3 tests/reference/megatron_dataset_golden.py
"""
import hashlib
import json
import os
import shutil
import sys
import tempfile

import numpy
import torch

import megatron.core
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from megatron.core.datasets.megatron_tokenizer import MegatronTokenizer
from megatron.core.datasets.utils import get_blend_from_list

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "golden", "megatron_dataset")
SEQ_LENGTH = 32
NUM_SAMPLES_WRITTEN = 40  # first K samples per split
TOKENIZER_PATH = "tokenizer"  # only its string enters the cache description


class _HuggingFaceTokenizer(MegatronTokenizer):
    """Stands in for Megatron-LM's _HuggingFaceTokenizer: same class name, same unique_identifiers
    ({"class": "_HuggingFaceTokenizer", "tokenizer_path": [path]}), no vocabulary needed."""

    def __init__(self, path):
        super().__init__(path)

    def tokenize(self, text):
        raise NotImplementedError

    def detokenize(self, ids):
        raise NotImplementedError

    @property
    def vocab(self):
        return {}

    @property
    def inv_vocab(self):
        return {}

    @property
    def vocab_size(self):
        return 128815

    @property
    def eod(self):
        return 1


def make_corpus(prefix, num_docs, seed, dtype, vocab):
    """Deterministic documents of varied lengths; every 5th document has two sequences."""
    rng = numpy.random.RandomState(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for d in range(num_docs):
        n_seq = 2 if d % 5 == 3 else 1
        lengths = [int(rng.randint(1, 48)) for _ in range(n_seq)]
        ids = [(d * 7919 + k * 31 + 17) % vocab for k in range(sum(lengths))]
        builder.add_document(ids, lengths)
    builder.finalize(prefix + ".idx")


def make_config(data_path, split, seed, cache):
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=SEQ_LENGTH,
        blend=get_blend_from_list(data_path),
        split=split,
        path_to_cache=cache,
        tokenizer=_HuggingFaceTokenizer(TOKENIZER_PATH),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
    )


def sample_text(ds, i):
    if isinstance(ds, BlendedDataset):
        d = ds.datasets[ds.dataset_index[i]]
        return d._query_document_sample_shuffle_indices(int(ds.dataset_sample_index[i]))[0]
    return ds._query_document_sample_shuffle_indices(i)[0]


def run_case(case):
    name = case["name"]
    case_dir = os.path.join(OUT, name)
    shutil.rmtree(case_dir, ignore_errors=True)
    cache = os.path.join(case_dir, "cache")
    config = make_config(case["data_path"], case["split"], case["seed"], cache)
    datasets = BlendedMegatronDatasetBuilder(
        GPTDataset, case["sizes"], lambda: True, config
    ).build()
    case["splits"] = {}
    for split_name, ds in zip(["train", "valid", "test"], datasets):
        if ds is None:
            continue
        info = {"num_samples": len(ds)}
        gpts = ds.datasets if isinstance(ds, BlendedDataset) else [ds]
        info["gpt"] = [
            {
                "dataset_path": g.dataset_path,
                "num_samples": g.num_samples,
                "length": len(g),
                "md5": g.unique_description_hash,
                "sha256": hashlib.sha256(g.unique_description.encode("utf-8")).hexdigest(),
            }
            for g in gpts
        ]
        if isinstance(ds, BlendedDataset):
            info["blend"] = {
                "size": ds.size,
                "weights": ds.weights,
                "md5": ds.unique_description_hash,
                "sha256": hashlib.sha256(ds.unique_description.encode("utf-8")).hexdigest(),
            }
        k = min(NUM_SAMPLES_WRITTEN, len(ds))
        with open(os.path.join(case_dir, f"{split_name}_samples.txt"), "w") as f:
            for i in range(k):
                f.write(" ".join(str(int(t)) for t in sample_text(ds, i)) + "\n")
        info["samples_written"] = k
        case["splits"][split_name] = info
    return case


def shuffle_vectors():
    """numpy RandomState.shuffle on small arrays (int32 and uint32/int64 give the same order)."""
    out = []
    for seed, n, dtype in [(1234, 10, "int32"), (0, 17, "uint32"), (42, 100, "int64"),
                           (2**32 - 1, 33, "int32")]:
        rs = numpy.random.RandomState(seed)
        a = numpy.arange(n, dtype=dtype)
        rs.shuffle(a)
        b = numpy.arange(n + 5, dtype=dtype)
        rs.shuffle(b)  # second shuffle from the same state
        raw = numpy.random.RandomState(seed).randint(0, 2**32, size=5, dtype=numpy.uint64)
        out.append({"seed": seed, "n": n, "dtype": dtype, "first": a.tolist(),
                    "second": b.tolist(), "first_uint32": raw.tolist()})
    return out


def main():
    if megatron.core.__version__ != "0.8.0":  # see README.md: the release closest to the seed system
        sys.exit(f"need megatron-core==0.8.0, found {megatron.core.__version__} (tests/reference/README.md)")
    os.makedirs(OUT, exist_ok=True)
    if not torch.distributed.is_initialized():  # BlendedDataset asks for the rank
        init = "file://" + os.path.join(tempfile.mkdtemp(), "pg")
        torch.distributed.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    os.chdir(OUT)  # the prefixes below are relative: they enter the description as written
    make_corpus("corpus_a", 640, 7, numpy.int32, 128815)
    make_corpus("corpus_b", 300, 11, numpy.uint16, 50000)

    lengths = numpy.fromfile("corpus_a.idx", dtype=numpy.int32, offset=34,
                             count=int(numpy.fromfile("corpus_a.idx", numpy.uint64, 1, offset=18)[0]))
    tpe = int(lengths.sum())
    per_epoch = (tpe - 1) // SEQ_LENGTH
    cases = [
        {"name": "one_epoch", "data_path": ["corpus_a"], "split": "1", "seed": 1234,
         "sizes": [100, None, None]},
        {"name": "epochs_separate", "data_path": ["corpus_a"], "split": "1", "seed": 5,
         "sizes": [2 * per_epoch + 40, None, None]},
        {"name": "epochs_joint", "data_path": ["corpus_a"], "split": "1", "seed": 99,
         "sizes": [2 * per_epoch + per_epoch * 9 // 10, None, None]},
        {"name": "split_80_15_5", "data_path": ["corpus_a"], "split": "80,15,5", "seed": 1234,
         "sizes": [300, 60, 20]},
        {"name": "split_969_30_1", "data_path": ["corpus_a"], "split": "969, 30, 1", "seed": 3,
         "sizes": [200, 50, 3]},
        {"name": "blend", "data_path": ["0.4", "corpus_a", "0.9", "corpus_b"], "split": "90,10,0",
         "seed": 1234, "sizes": [500, 30, 0]},
    ]
    cases = [run_case(c) for c in cases]
    manifest = {
        "generator": "tests/reference/megatron_dataset_golden.py",
        "megatron_core": megatron.core.__version__,
        "numpy": numpy.__version__,
        "seq_length": SEQ_LENGTH,
        "tokenizer_path": TOKENIZER_PATH,
        "tokens_per_epoch_corpus_a": tpe,
        "cases": cases,
    }
    with open("cases.json", "w") as f:
        json.dump(manifest, f, indent=1)
    with open("mt19937_shuffle.json", "w") as f:
        json.dump(shuffle_vectors(), f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
