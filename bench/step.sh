#!/usr/bin/env bash
# `make bench-step`: our training step (bench_step) and PyTorch eager (peer_pytorch.py) on the same config, batch,
# sequence length and threads, both precisions; the last line compares bf16 tokens/s.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
CONFIG=${CONFIG:-examples/deepseek/configs/proxy-cpu.json}
BATCH=${BATCH:-8}
SEQ=${SEQ:-256}
THREADS=${THREADS:-2}
STEPS=${STEPS:-3}
export OMP_NUM_THREADS=$THREADS
python3 -c 'import torch, transformers' 2>/dev/null || pip install torch transformers
ours=$("$BUILD/bench_step" --config "$CONFIG" --batch "$BATCH" --seq "$SEQ" --threads "$THREADS" --steps "$STEPS" \
  --precisions bf16,fp32)
echo "$ours"
peer=$(python3 bench/peer_pytorch.py --config "$CONFIG" --batch "$BATCH" --seq "$SEQ" --threads "$THREADS" \
  --steps "$STEPS" --precisions bf16,fp32)
echo "$peer"
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" | head -1; }
x=$(echo "$ours" | grep '^ours: precision=bf16' | field tokens_per_s)
y=$(echo "$ours" | grep '^ours: precision=bf16' | field mfu)
z=$(echo "$peer" | grep '^pytorch: precision=bf16' | field tokens_per_s)
x32=$(echo "$ours" | grep '^ours: precision=fp32' | field tokens_per_s)
z32=$(echo "$peer" | grep '^pytorch: precision=fp32' | field tokens_per_s)
echo "fp32: dsv3_tokens_per_s=$x32 pytorch_fp32_tokens_per_s=$z32 ratio=$(python3 -c "print(f'{$x32/$z32:.2f}')")"
echo "step: dsv3_tokens_per_s=$x mfu=$y pytorch_bf16_tokens_per_s=$z ratio=$(python3 -c "print(f'{$x/$z:.2f}')")"
