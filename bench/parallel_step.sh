#!/usr/bin/env bash
# Data-, expert-, tensor- (± sequence-) and pipeline-parallel step time on this machine: `dsv3 train` on 1, 2 and 4 ranks (mpirun; 4 ranks
# oversubscribe the 2 cores, so their compute is twice as slow by construction) at the same global batch, split by
# Megatron's timers (--timing-log-level 1): compute (forward-backward minus the MoE dispatch/combine, per rank), dispatch/
# combine (the expert-parallel token exchange, including any wait for the slower rank), all-grads-sync (bucketed
# gradient all-reduce, also including waits) and optimizer. The last lines are a table (ms per iteration, mean over
# the second half of the run; min–max across ranks).
#   BUILD=build CONFIG=examples/deepseek/configs/proxy-cpu.json SEQ=128 MBS=2 GBS=8 ITERS=10 bash bench/parallel_step.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
CONFIG=${CONFIG:-examples/deepseek/configs/proxy-cpu.json}
SEQ=${SEQ:-128}
MBS=${MBS:-2}
GBS=${GBS:-8}
ITERS=${ITERS:-10}
BIN="$BUILD/dsv3"
WORK=$(mktemp -d /tmp/dsv3-parallel-bench.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
"$BIN" preprocess --input tests/golden/preprocess/input.jsonl --output-prefix "$WORK/data" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny-4k --workers 1 --append-eod >/dev/null 2>&1
ARGS="train --model-config $CONFIG --data-path $WORK/data_text_document --split 100,0,0 --data-cache-path $WORK/cache
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny-4k --seq-length $SEQ --micro-batch-size $MBS
  --global-batch-size $GBS --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 1 --weight-decay 0.1 --clip-grad 1.0
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-2 --moe-router-enable-expert-bias
  --eval-iters 0 --seed 7 --train-iters $ITERS --log-interval $((ITERS / 2)) --timing-log-level 1"
MPIRUN="mpirun --allow-run-as-root --oversubscribe --bind-to none"

# Timer "name" of the last log block: "min–max" across ranks, or "-" when absent.
timer() { echo "$2" | sed -n "s/.*$1[ .]*: (\([0-9.]*\), \([0-9.]*\)).*/\1 \2/p" | tail -1; }
range() { [[ -n "$1" ]] && echo "$1" | awk '{printf "%.1f–%.1f", $1, $2}' || echo "-"; }

# name, command; prints "name | iter ms | compute | dispatch/combine | all-grads-sync | optimizer"
run() {
  local name=$1; shift
  local out last it fb dc
  out=$("$@" 2>&1) || { echo "$name: failed"; echo "$out" | tail -5; return 1; }
  last=$(echo "$out" | awk '/\] iteration/{buf=""} {buf=buf"\n"$0} END{print buf}')
  it=$(echo "$last" | sed -n 's/.*elapsed time per iteration (ms): \([0-9.]*\).*/\1/p' | tail -1)
  fb=$(timer forward-backward "$last")
  dc=$(timer moe-dispatch-combine "$last")
  local compute
  compute=$(timer forward-backward-compute "$last")
  compute=$(range "${compute:-$fb}")
  printf '%-34s | %8s | %13s | %16s | %14s | %11s\n' "$name" "$it" "$compute" "$(range "$dc")" \
    "$(range "$(timer all-grads-sync "$last")")" "$(range "$(timer optimizer "$last")")"
}
echo "parallel_step: config=$CONFIG seq=$SEQ mbs=$MBS gbs=$GBS iters=$ITERS nproc=$(nproc) load=$(cut -d' ' -f1 /proc/loadavg)"
printf '%-34s | %8s | %13s | %16s | %14s | %11s\n' "layout" "iter ms" "compute" "dispatch/combine" "all-grads-sync" "optimizer"
EP="--expert-model-parallel-size"
A2A="--moe-token-dispatcher-type alltoall"
AG="--moe-token-dispatcher-type allgather"
run "1 rank x 1 thread" env OMP_NUM_THREADS=1 "$BIN" $ARGS
run "1 rank x 2 threads" env OMP_NUM_THREADS=2 "$BIN" $ARGS
run "2 ranks DP2" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS
run "2 ranks DP2 distributed optimizer" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS --use-distributed-optimizer
run "2 ranks DP2 x EP2 alltoall" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS $EP 2 $A2A
run "2 ranks DP2 x EP2 allgather" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS $EP 2 $AG
run "2 ranks TP2" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS --tensor-model-parallel-size 2
run "2 ranks TP2 + SP" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS --tensor-model-parallel-size 2 --sequence-parallel
run "2 ranks TP2 + SP, ETP1" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1
run "2 ranks TP2 + SP, ETP1 x EP2 a2a" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS --tensor-model-parallel-size 2 --sequence-parallel --expert-tensor-parallel-size 1 $EP 2 $A2A
run "2 ranks PP2 (1F1B)" $MPIRUN -np 2 -x OMP_NUM_THREADS=1 "$BIN" $ARGS --pipeline-model-parallel-size 2
run "4 ranks PP2 x DP2 x EP2 alltoall" $MPIRUN -np 4 -x OMP_NUM_THREADS=1 "$BIN" $ARGS --pipeline-model-parallel-size 2 $EP 2 $A2A
run "4 ranks TP2 x DP2 x EP2 alltoall" $MPIRUN -np 4 -x OMP_NUM_THREADS=1 "$BIN" $ARGS --tensor-model-parallel-size 2 $EP 2 $A2A
run "4 ranks TP2 x DP2 x EP2 a2a + SP" $MPIRUN -np 4 -x OMP_NUM_THREADS=1 "$BIN" $ARGS --tensor-model-parallel-size 2 $EP 2 $A2A --sequence-parallel
run "4 ranks DP4 x EP4 alltoall" $MPIRUN -np 4 -x OMP_NUM_THREADS=1 "$BIN" $ARGS $EP 4 $A2A
run "4 ranks DP4 x EP4 allgather" $MPIRUN -np 4 -x OMP_NUM_THREADS=1 "$BIN" $ARGS $EP 4 $AG
run "4 ranks DP4 x EP2 (EDP2) alltoall" $MPIRUN -np 4 -x OMP_NUM_THREADS=1 "$BIN" $ARGS $EP 2 $A2A
