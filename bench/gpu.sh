#!/usr/bin/env bash
# `make bench-gpu`: the dense (and MoE) DeepSeek-V3 proxies sized for one H200, PyTorch (HF transformers, eager and
# torch.compile) beside dsv3, as tokens/s, TFLOP/s (Megatron's formula) and MFU against the cuBLASLt bf16 GEMM
# roofline measured in the same run (PEER=0 skips PyTorch; PEER_TIMEOUT, default 180 s, bounds each peer run). BIN_DIR: where bench_gpu is (build/, or a device pack's bin/); RUN: a wrapper
# (e.g. "bash .devpack/run.sh") for the packed binary.
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
RUN=${RUN:-}
BATCH=${BATCH:-1}
SEQ=${SEQ:-4096}
CONFIGS=${CONFIGS:-examples/deepseek/configs/proxy-gpu-dense.json}
bench=${RUN:+bench_gpu}; bench=${bench:-$BUILD/bench_gpu}
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" | head -1; }
for cfg in $CONFIGS; do
  # MoE configs: the untrained routing (the initialised router) and the balanced one (fixed normal logits, both
  # sides: bench_gpu and the peer's --routing balanced).
  moe=$(python3 -c "import json,sys; c=json.load(open(sys.argv[1])); print(int(c.get('n_routed_experts', 0) > 0 and c.get('first_k_dense_replace', 0) < c['num_hidden_layers']))" "$cfg")
  routings=untrained
  [ "$moe" = 1 ] && routings="untrained balanced"
  for routing in $routings; do
    echo "== $cfg (batch $BATCH, seq $SEQ, bf16$([ "$moe" = 1 ] && echo ", $routing routing"))"
    ours=$($RUN $bench --config "$cfg" --batch "$BATCH" --seq "$SEQ" --routing "$routing"); echo "$ours"
    if echo "$ours" | grep -q '^gpu: unavailable'; then continue 2; fi
    # A/B of implementation choices, ours only: cuDNN's fused attention against dsv3's (first routing of each
    # config), and for the balanced MoE the per-expert GEMMs against the grouped one.
    variants="DSV3_ATTENTION=cudnn"
    [ "$routing" = balanced ] && variants="DSV3_EXPERT_GEMM=per-expert"
    for var in $variants; do
      alt=$(env "$var" $RUN $bench --config "$cfg" --batch "$BATCH" --seq "$SEQ" --routing "$routing" 2>&1 |
        grep '^ours: mode=' | sed "s/mode=dsv3/mode=dsv3[$var]/")
      echo "${alt:-ours: $var did not run}"
      ours=$(printf '%s\n%s\n' "$ours" "$alt")
    done
    peer=""
    [ "${PEER:-1}" = 1 ] && peer=$(timeout "${PEER_TIMEOUT:-180}" python3 bench/peer_pytorch_gpu.py --config "$cfg" --batch "$BATCH" --seq "$SEQ" \
      --routing "$routing" 2>&1 | grep '^pytorch:')
    echo "$peer"
    flops=$(echo "$ours" | field flops_per_iteration)
    peak=$(echo "$ours" | grep 'm=8192 n=8192' | field tflops)
    printf '%s\n%s\n' "$(echo "$ours" | grep '^ours:')" "$peer" | grep tokens_per_s | while read -r line; do
      mode=$(echo "$line" | field mode); tps=$(echo "$line" | field tokens_per_s)
      python3 -c "f=$flops;t=$tps/($BATCH*$SEQ);tf=f*t/1e12;print(f'{\"$mode\"} ($routing): {$tps:.0f} tok/s, {tf:.1f} TFLOP/s, MFU {tf/$peak:.3f} of measured {$peak} TFLOP/s')"
    done
  done
done
