#!/usr/bin/env bash
# Crashes during a save lose nothing (issue 13 §2). Kills `dsv3 train` with SIGKILL at KILLS random moments during
# its checkpoint saves — one process, and 4 ranks under mpirun writing a sharded (expert-parallel, EP 4) checkpoint —
# and after each kill checks that:
#   - the tracker (latest_checkpointed_iteration.txt) names a complete directory (state.json there, every file it
#     lists present with its recorded size and sha256);
#   - every directory under its final name iter_XXXXXXX is complete (a partial one only ever has a .tmp./.old.
#     suffix), so none can be taken for complete;
#   - nothing the run reported saved ("successfully saved checkpoint from iteration N") is lost: tracker >= N;
#   - `--load` resumes from exactly the tracker's iteration (and trains and saves one more iteration from it).
# Then a full disk (a tmpfs too small for a second checkpoint): a clear error, the previous checkpoint intact
# and loadable, no temporary left behind. Not part of `make test` (minutes); prints one line per kill and a summary.
#   BUILD=build KILLS=20 SEED=1 bash scripts/check-save-crashes.sh
set -uo pipefail
cd "$(dirname "$0")/.."
BUILD=${BUILD:-build}
KILLS=${KILLS:-20}
SEED=${SEED:-$$}
RANDOM=$SEED
BIN=$(realpath "$BUILD/dsv3")
WORK=$(mktemp -d /tmp/dsv3-save-crash.XXXXXX)
MNT=""
cleanup() {
  [[ -n "$MNT" ]] && umount "$MNT" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT
MPIRUN="mpirun --allow-run-as-root --oversubscribe --bind-to none -x OMP_NUM_THREADS=1"
export OMP_NUM_THREADS=1

"$BIN" preprocess --input tests/golden/preprocess/input.jsonl --output-prefix "$WORK/data" \
  --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny-4k --workers 1 --append-eod >/dev/null 2>&1 ||
  { echo "preprocess failed"; exit 1; }
# The demo model in fp32, a save every iteration, so that saves are most of the run's time.
ARGS="train --model-config examples/deepseek/configs/demo-cpu.json --data-path $WORK/data_text_document
  --split 100,0,0 --data-cache-path $WORK/cache --tokenizer-type HuggingFaceTokenizer --tokenizer-model data/tiny-4k
  --seq-length 32 --micro-batch-size 1 --global-batch-size 4 --lr 3e-3 --min-lr 3e-4 --lr-warmup-iters 1
  --moe-router-load-balancing-type seq_aux_loss --moe-aux-loss-coeff 1e-2 --moe-router-enable-expert-bias
  --eval-iters 0 --seed 7 --train-iters 2000 --log-interval 1 --save-interval 1"

FAILS=0
fail() { echo "  FAIL: $*"; FAILS=$((FAILS + 1)); }

# Checks a checkpoint directory; prints "tracker=N|none final=K partial=P" or FAIL lines.
verify_dir() {
  python3 - "$1" <<'EOF'
import hashlib, json, os, re, sys
ck = sys.argv[1]
bad = []
def complete(d):
    st = os.path.join(d, "state.json")
    if not os.path.isfile(st):
        return "no state.json"
    try:
        s = json.load(open(st))
    except Exception as e:
        return "state.json unreadable: %s" % e
    for name, rec in s.get("files", {}).items():
        p = os.path.join(d, name)
        if not os.path.isfile(p):
            return "missing " + name
        if os.path.getsize(p) != rec["bytes"]:
            return "%s has %d bytes, state.json records %d" % (name, os.path.getsize(p), rec["bytes"])
        if hashlib.sha256(open(p, "rb").read()).hexdigest() != rec["sha256"]:
            return name + ": sha256 differs"
    return ""
finals = partial = 0
for e in sorted(os.listdir(ck)) if os.path.isdir(ck) else []:
    if re.fullmatch(r"iter_\d{7}", e):
        finals += 1
        why = complete(os.path.join(ck, e))
        if why:
            bad.append("final-named directory %s is incomplete: %s" % (e, why))
    elif e.startswith("iter_"):
        partial += 1
tracker = os.path.join(ck, "latest_checkpointed_iteration.txt")
t = "none"
if os.path.exists(tracker):
    t = open(tracker).read().strip()
    d = os.path.join(ck, "iter_%07d" % int(t))
    if not os.path.isdir(d):
        bad.append("the tracker names %s, which does not exist" % d)
    elif complete(d):
        bad.append("the tracker names an incomplete directory %s: %s" % (d, complete(d)))
for b in bad:
    print("FAIL " + b)
print("tracker=%s final=%d partial=%d" % (t, finals, partial))
EOF
}

# One kill: runs `$@` (a training command resuming from and saving to $ck) in the background, waits until a save
# is in progress (a temporary iteration directory appears) past the first, sleeps 0–DELAY ms more, and SIGKILLs
# one rank (multi-rank: a random one, or all of them) — then checks the directory and resumes from it.
# Args: label ck np
crash_once() {
  local label=$1 ck=$2 np=$3 log="$WORK/run.log" pids=() victim
  if [[ $np == 1 ]]; then
    "$BIN" $ARGS --load "$ck" --save "$ck" >"$log" 2>&1 &
  else
    $MPIRUN -np "$np" "$BIN" $ARGS --expert-model-parallel-size 4 --moe-token-dispatcher-type alltoall \
      --load "$ck" --save "$ck" >"$log" 2>&1 &
  fi
  local job=$! saves_seen=0 want=$((1 + RANDOM % 2)) t=0
  # Wait for the want-th save to start (a .tmp. directory appears), at most 60 s.
  while ((t < 6000)); do
    if compgen -G "$ck/iter_*.tmp.*" >/dev/null; then
      saves_seen=$((saves_seen + 1))
      ((saves_seen >= want)) && break
      while compgen -G "$ck/iter_*.tmp.*" >/dev/null; do sleep 0.002; done
    fi
    kill -0 $job 2>/dev/null || break
    sleep 0.002
    t=$((t + 1))
  done
  local delay_ms=$((RANDOM % DELAY_MS))
  sleep "$(printf '0.%03d' "$delay_ms")"
  local in_save=no
  compgen -G "$ck/iter_*.tmp.*" >/dev/null && in_save=yes
  compgen -G "$ck/latest_checkpointed_iteration.txt.tmp.*" >/dev/null && in_save=tracker
  if [[ $np == 1 ]]; then
    kill -KILL $job 2>/dev/null
    victim="the process"
  else
    mapfile -t pids < <(pgrep -P $job)
    if ((RANDOM % 2)); then
      kill -KILL "${pids[@]}" 2>/dev/null
      victim="all ${#pids[@]} ranks"
    else
      local p=${pids[$((RANDOM % ${#pids[@]}))]}
      local rk
      rk=$(tr '\0' '\n' </proc/$p/environ 2>/dev/null | sed -n 's/^OMPI_COMM_WORLD_RANK=//p')
      kill -KILL "$p" 2>/dev/null
      victim="rank ${rk:-?}"
    fi
  fi
  wait $job 2>/dev/null
  # mpirun may exit before every rank it signalled has: wait (up to 10 s) until none of them runs, so that the
  # resumed run's cleanup sees them dead (it keeps the temporaries of live processes: their saves in progress).
  for ((i = 0; i < 100; i++)); do
    local alive=0
    for p in "${pids[@]}"; do
      st=$(ps -o stat= -p "$p" 2>/dev/null)
      [[ -n "$st" && "$st" != Z* ]] && alive=1
    done
    ((alive)) || break
    sleep 0.1
  done
  local reported
  reported=$(sed -n 's/.*successfully saved checkpoint from iteration *\([0-9]*\) .*/\1/p' "$log" | tail -1)
  local v
  v=$(verify_dir "$ck")
  local tracker
  tracker=$(echo "$v" | sed -n 's/.*tracker=\([^ ]*\).*/\1/p')
  printf '%-8s kill %2d: %-10s after save #%d +%3d ms (save in progress: %-7s) last reported saved: %-4s %s\n' \
    "$label" "$KILL_NO" "$victim" "$want" "$delay_ms" "$in_save" "${reported:--}" "$(echo "$v" | tail -1)"
  echo "$v" | grep '^FAIL' | while read -r l; do echo "  $l"; done
  echo "$v" | grep -q '^FAIL' && FAILS=$((FAILS + 1))
  if [[ -n "$reported" && "$tracker" != none ]] && ((10#$tracker < 10#$reported)); then
    fail "the run reported iteration $reported saved, but the tracker names $tracker"
  fi
  if [[ -n "$reported" && "$tracker" == none ]]; then fail "iteration $reported was reported saved; no tracker"; fi
  # Resume: one iteration from the tracker's checkpoint, saved (which also clears the dead run's temporaries).
  local rlog="$WORK/resume.log"
  if [[ $np == 1 ]]; then
    "$BIN" $ARGS --load "$ck" --save "$ck" --exit-interval 1 >"$rlog" 2>&1
  else
    timeout 300 $MPIRUN -np "$np" "$BIN" $ARGS --expert-model-parallel-size 4 --moe-token-dispatcher-type alltoall \
      --load "$ck" --save "$ck" --exit-interval 1 >"$rlog" 2>&1
  fi
  local rc=$?
  ((rc == 0)) || { fail "the resumed run failed ($rc)"; tail -5 "$rlog"; }
  if [[ $tracker != none ]]; then
    grep -q "successfully loaded checkpoint from $ck at iteration $((10#$tracker))\$" "$rlog" ||
      fail "the resumed run did not load iteration $tracker: $(grep -m1 'loaded\|WARNING' "$rlog")"
  else
    grep -q "will not load any checkpoints" "$rlog" || fail "no tracker, but the resumed run loaded something"
  fi
  grep -qi "NOTE" "$rlog" && echo "  $(grep -m1 NOTE "$rlog")"
  local after
  after=$(verify_dir "$ck")
  echo "$after" | grep -q '^FAIL' && fail "after the resumed run's save: $after"
  echo "$after" | grep -q 'partial=0' || fail "temporaries left after the resumed run's save: $after"
}

echo "check-save-crashes: seed=$SEED kills=$KILLS per layout, nproc=$(nproc --all)"
# Typical save duration, for the random delays: one plain run of 2 saves.
t0=$(date +%s%N)
"$BIN" $ARGS --train-iters 2 --save "$WORK/probe" >"$WORK/probe.log" 2>&1 || { cat "$WORK/probe.log"; exit 1; }
SAVE_S=$(sed -n 's/.*successfully saved checkpoint.*(\([0-9.]*\) s)$/\1/p' "$WORK/probe.log" | tail -1)
CK_BYTES=$(du -sb "$WORK/probe/iter_0000002" | cut -f1)
echo "one save: ${SAVE_S:-?} s, $CK_BYTES bytes per checkpoint directory"
DELAY_MS=$(python3 -c "print(max(20, min(999, int(float('${SAVE_S:-0.1}') * 1000 * 1.2))))")

for layout in single ep4; do
  ck="$WORK/ck-$layout"
  np=1
  [[ $layout == ep4 ]] && np=4
  for ((KILL_NO = 1; KILL_NO <= KILLS; KILL_NO++)); do crash_once "$layout" "$ck" "$np"; done
done

# A full disk: a tmpfs with room for one checkpoint and a half. The first save fits; the second cannot.
echo "full disk:"
MNT="$WORK/tmpfs"
mkdir -p "$MNT"
size_kb=$((CK_BYTES * 3 / 2 / 1024 + 64))
FULL_DISK="not checked (no tmpfs)"
if mount -t tmpfs -o size=${size_kb}k tmpfs "$MNT" 2>/dev/null; then
  FULL_DISK="checked (tmpfs of ${size_kb}k, single and ep4)"
  for layout in single ep4; do
    ck="$MNT/ck-$layout"
    rm -rf "${MNT:?}"/*  # the whole tmpfs for this layout
    extra=""
    run=("$BIN")
    if [[ $layout == ep4 ]]; then
      run=($MPIRUN -np 4 "$BIN")
      extra="--expert-model-parallel-size 4 --moe-token-dispatcher-type alltoall"
    fi
    timeout 300 "${run[@]}" $ARGS $extra --train-iters 3 --save "$ck" >"$WORK/full.log" 2>&1
    rc=$?
    err=$(grep "error:" "$WORK/full.log" | sort | uniq -c | sed 's/^ *//')
    v=$(verify_dir "$ck")
    echo "  $layout: exit status $rc; error lines (count, text):"
    echo "${err:-none}" | sed 's/^/    /'

    echo "  $layout: after: $(echo "$v" | tail -1); disk: $(df -k "$MNT" | awk 'NR==2{print $3 "k used of " $2 "k"}')"
    ((rc != 0)) || fail "$layout: the run on a full disk succeeded"
    [[ -n "$err" ]] && ! echo "$err" | grep -qv "No space left on device" ||
      fail "$layout: not every error line says the disk is full"
    echo "$v" | grep -q '^FAIL' && fail "$layout: $v"
    echo "$v" | grep -q "tracker=1 " || fail "$layout: the tracker should still name iteration 1: $v"
    echo "$v" | grep -q "partial=0" || fail "$layout: a temporary directory was left on the full disk: $v"
    # The previous checkpoint loads (no --save: nothing more fits).
    timeout 300 "${run[@]}" $ARGS $extra --train-iters 2 --save-interval 1000 --load "$ck" >"$WORK/full-load.log" 2>&1 ||
      fail "$layout: loading the previous checkpoint failed: $(grep -m1 error "$WORK/full-load.log")"
    grep -q "successfully loaded checkpoint from $ck at iteration 1$" "$WORK/full-load.log" &&
      echo "  $layout: iteration 1 loads and trains on" || fail "$layout: iteration 1 did not load"
  done
  umount "$MNT" && MNT=""
else
  echo "  skipped: cannot mount a tmpfs here (not root?)"
fi

echo "summary: $((2 * KILLS)) kills (single process and 4 ranks EP4), full disk: $FULL_DISK, failures: $FAILS"
((FAILS == 0))
