#!/usr/bin/env bash
# Preprocess throughput: `dsv3 preprocess` (whole process: startup, JSON, tokenize, write) vs HF tokenizers'
# encode_batch (tokenization only) on sotu.jsonl with the real DeepSeek-V3 tokenizer, 1 and 2 threads.
# MB are 10^6 bytes of document text (UTF-8), the same bytes for both. Median of $RUNS runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=${DSV3_SHARED_DATA:-../shared/data}
TOK=$SHARED/deepseek-v3-tokenizer
CORPUS=${CORPUS:-$SHARED/corpus/sotu.jsonl}
RUNS=${RUNS:-3}
[ -f "$TOK/tokenizer.json" ] && [ -f "$CORPUS" ] || { echo "bench/preprocess: needs $TOK and $CORPUS"; exit 1; }
python3 -c "import tokenizers" 2>/dev/null || python3 -m pip install -q tokenizers
out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
text_bytes=$(python3 -c "import json,sys; print(sum(len(json.loads(l)['text'].encode()) for l in open(sys.argv[1], encoding='utf-8')))" "$CORPUS")
for threads in 1 2; do
  times=()
  for _ in $(seq "$RUNS"); do
    s=$(date +%s.%N)
    ./build/dsv3 preprocess --input "$CORPUS" --output-prefix "$out/sotu" --tokenizer-type HuggingFaceTokenizer \
      --tokenizer-model "$TOK" --workers "$threads" --log-interval 100000 >"$out/log" 2>&1
    e=$(date +%s.%N)
    times+=("$(echo "$e - $s" | bc -l)")
  done
  sec=$(printf '%s\n' "${times[@]}" | sort -g | sed -n "$(( (RUNS + 1) / 2 ))p")
  tokens=$(python3 -c "import sys; n=int(open(sys.argv[1],'rb').read()[18:26][::-1].hex(),16); import os; print(os.path.getsize(sys.argv[2])//4)" "$out/sotu_text_document.idx" "$out/sotu_text_document.bin")
  ours_mb=$(echo "$text_bytes / $sec / 1000000" | bc -l)
  ours_tok=$(echo "$tokens / $sec" | bc -l)
  hf=$(python3 bench/preprocess/peer_hf_tokenizers.py "$TOK" "$CORPUS" "$threads" "$RUNS")
  hf_mb=$(echo "$hf" | sed -E 's/.*mb_per_s=([0-9.]+).*/\1/')
  printf 'preprocess: threads=%d dsv3_mb_per_s=%.2f dsv3_tokens_per_s=%.0f hf_tokenizers_mb_per_s=%.2f ratio=%.2f\n' \
    "$threads" "$ours_mb" "$ours_tok" "$hf_mb" "$(echo "$ours_mb / $hf_mb" | bc -l)"
  echo "  ($hf)"
done
