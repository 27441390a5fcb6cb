#!/usr/bin/env bash
# `make demo`: preprocess the bundled corpus (data/sotu-slice) with the bundled tiny-4k tokenizer, then show what
# was written and the first training samples in Megatron's order. Needs nothing outside the clone.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-build/demo}
mkdir -p "$OUT"
echo "== dsv3 preprocess (bundled SOTU slice, tiny-4k tokenizer, 2 workers)"
./build/dsv3 preprocess --input data/sotu-slice/sotu-slice.jsonl --output-prefix "$OUT/sotu" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny-4k --workers 2 --append-eod --log-interval 20
echo
echo "== dsv3 data inspect"
./build/dsv3 data inspect "$OUT/sotu_text_document" --tokenizer-model data/tiny-4k --max-tokens 48
if ./build/dsv3 data samples --help >/dev/null 2>&1; then
  echo
  echo "== dsv3 data samples (Megatron GPT dataset order: split 969,30,1, seq 256, seed 1234) -> $OUT/samples.txt"
  ./build/dsv3 data samples --data-path "$OUT/sotu_text_document" --split 969,30,1 --seq-length 256 --seed 1234 \
    --num-samples 8 --index-split train --tokenizer-model data/tiny-4k --data-cache-path "$OUT/cache" \
    --output "$OUT/samples.txt"
  echo "first sample (first 16 of 257 ids): $(head -1 "$OUT/samples.txt" | cut -d' ' -f1-16)"
fi
echo
echo "Outputs are in $OUT/ (Megatron .bin/.idx; pass $OUT/sotu_text_document as --data-path)."
