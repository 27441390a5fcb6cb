#!/usr/bin/env bash
# Data-parallel step time on this machine: `dsv3 train` with 1 rank and with 2 ranks (mpirun) at the same global
# batch, split by Megatron's timers (--timing-log-level 1) into forward-backward (compute), all-grads-sync (the
# bucketed gradient all-reduce, including any wait for the slower rank) and optimizer. The last lines are a table
# (ms per iteration, mean over the second half of the run; min–max across ranks).
#   BUILD=build-mpi CONFIG=examples/deepseek/configs/demo-cpu.json SEQ=128 MBS=2 GBS=8 ITERS=10 bash bench/dp_step.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
CONFIG=${CONFIG:-examples/deepseek/configs/demo-cpu.json}
SEQ=${SEQ:-128}
MBS=${MBS:-2}
GBS=${GBS:-8}
ITERS=${ITERS:-10}
BIN="$BUILD/dsv3"
WORK=$(mktemp -d /tmp/dsv3-dp-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$BIN" preprocess --input tests/golden/preprocess/input.jsonl --output-prefix "$WORK/data" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny-4k --workers 1 --append-eod >/dev/null 2>&1
ARGS="train --model-config $CONFIG --data-path $WORK/data_text_document --split 100,0,0 --data-cache-path $WORK/cache
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny-4k --seq-length $SEQ --micro-batch-size $MBS
  --global-batch-size $GBS --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 1 --weight-decay 0.1 --clip-grad 1.0
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-2 --moe-router-enable-expert-bias
  --eval-iters 0 --seed 7 --train-iters $ITERS --log-interval $((ITERS / 2)) --timing-log-level 1"
MPIRUN="mpirun --allow-run-as-root --oversubscribe --bind-to none"

# name, command; prints "name | iter ms | forward-backward | all-grads-sync | optimizer"
run() {
  local name=$1; shift
  local out
  out=$("$@" 2>&1)
  local last
  last=$(echo "$out" | awk '/\] iteration/{buf=""} {buf=buf"\n"$0} END{print buf}')
  local it fb ag op
  it=$(echo "$last" | sed -n 's/.*elapsed time per iteration (ms): \([0-9.]*\).*/\1/p' | tail -1)
  fb=$(echo "$last" | sed -n 's/.*forward-backward[ .]*: (\([0-9.]*\), \([0-9.]*\)).*/\1–\2/p' | tail -1)
  ag=$(echo "$last" | sed -n 's/.*all-grads-sync[ .]*: (\([0-9.]*\), \([0-9.]*\)).*/\1–\2/p' | tail -1)
  op=$(echo "$last" | sed -n 's/.*optimizer[ .]*: (\([0-9.]*\), \([0-9.]*\)).*/\1–\2/p' | tail -1)
  printf '%-28s | %9s | %17s | %15s | %13s\n' "$name" "$it" "$fb" "$ag" "$op"
}
echo "dp_step: config=$CONFIG seq=$SEQ mbs=$MBS gbs=$GBS iters=$ITERS nproc=$(nproc) load=$(cut -d' ' -f1 /proc/loadavg)"
printf '%-28s | %9s | %17s | %15s | %13s\n' "layout" "iter ms" "forward-backward" "all-grads-sync" "optimizer"
run "1 rank x 1 thread" env OMP_NUM_THREADS=1 "$BIN" $ARGS
run "1 rank x 2 threads" env OMP_NUM_THREADS=2 "$BIN" $ARGS
run "2 ranks (DP2) x 1 thread" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS
