#!/usr/bin/env bash
# `make demo`: preprocess the bundled corpus (data/sotu-slice) with the bundled tiny-4k tokenizer, then pretrain a
# small DeepSeek-V3 (examples/deepseek/configs/demo-cpu.json: MLA, 1 dense + 3 MoE layers with 8 sigmoid-routed
# experts and a shared expert, MTP depth 1) with Megatron's flags, saving a checkpoint and TensorBoard logs.
# Needs nothing outside the clone. DSV3: the program to run (default ./build/dsv3; scripts/device-check.sh runs the
# packed one on the GPU machine, where `dsv3 train` picks the GPU by default).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-build/demo}
ITERS=${DEMO_ITERS:-300}
DSV3=${DSV3:-./build/dsv3}
rm -rf "$OUT"
mkdir -p "$OUT"
echo "== dsv3 preprocess (bundled SOTU slice, tiny-4k tokenizer, 2 workers)"
$DSV3 preprocess --input data/sotu-slice/sotu-slice.jsonl --output-prefix "$OUT/sotu" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny-4k --workers 2 --append-eod --log-interval 40
echo
echo "== dsv3 data inspect"
$DSV3 data inspect "$OUT/sotu_text_document" --tokenizer-model data/tiny-4k --max-tokens 32
echo
echo "== dsv3 train ($ITERS iterations, seq 128, global batch 8, bf16, 2 threads)"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} $DSV3 train \
  --model-config examples/deepseek/configs/demo-cpu.json \
  --data-path "$OUT/sotu_text_document" --split 90,8,2 --data-cache-path "$OUT/cache" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny-4k \
  --seq-length 128 --micro-batch-size 4 --global-batch-size 8 --train-iters "$ITERS" \
  --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 20 --lr-decay-style cosine --weight-decay 0.1 \
  --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 \
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-3 --moe-router-enable-expert-bias \
  --log-interval 20 --eval-interval 100 --eval-iters 2 \
  --save "$OUT/checkpoints" --save-interval 100 --tensorboard-dir "$OUT/tensorboard" \
  | grep -v -E '^  [a-z_0-9]+ \.+ ' 
echo
echo "Data:        $OUT/sotu_text_document.{bin,idx}  (Megatron format)"
echo "Checkpoints: $OUT/checkpoints/iter_*/  (model.safetensors + config.json load in transformers)"
echo "TensorBoard: tensorboard --logdir $OUT/tensorboard"
