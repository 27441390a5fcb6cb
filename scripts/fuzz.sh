#!/usr/bin/env bash
# `make fuzz`: builds the libFuzzer targets of fuzz/ with clang (address + undefined sanitizers) in
# $FUZZ_BUILD (default build-fuzz, apart from the GCC build) and runs each for FUZZ_SECONDS (default 60) on
# one core, starting from the committed seeds in fuzz/corpus/<target>/. New inputs the fuzzer keeps go to
# $FUZZ_BUILD/corpus/<target>/ (the committed seeds stay as they are); a crash, hang or sanitizer report stops
# that target, leaves its input in $FUZZ_BUILD/artifacts/<target>/ and makes the script exit non-zero.
# FUZZ_TARGETS="config safetensors" runs a subset; extra libFuzzer flags go in FUZZ_FLAGS.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${FUZZ_BUILD:-$root/build-fuzz}
seconds=${FUZZ_SECONDS:-60}
targets=${FUZZ_TARGETS:-"tokenizer jsonl indexed_dataset safetensors config checkpoint"}
cxx=${FUZZ_CXX:-clang++}
command -v "$cxx" >/dev/null || { echo "fuzz: $cxx not found (Debian: apt-get install -y clang)" >&2; exit 1; }

cmake -S "$root/fuzz" -B "$build" -DCMAKE_CXX_COMPILER="$cxx" >/dev/null
cmake --build "$build" -j "${JOBS:-$(nproc)}"

mkdir -p "${TMPDIR:-/tmp}"
failed=()
summary=()
for t in $targets; do
  mkdir -p "$build/corpus/$t" "$build/artifacts/$t"
  log="$build/fuzz_$t.log"
  echo "== fuzz_$t: ${seconds}s"
  # One in-process fuzzer (no -jobs/-fork: the machine is shared, targets run one after another).
  # -timeout: an input slower than 10 s is reported as a hang; -rss_limit_mb bounds what a hostile header
  # may make a reader allocate (2 GB, as libFuzzer's default).
  set +e
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
    "$build/fuzz_$t" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 -artifact_prefix="$build/artifacts/$t/" ${FUZZ_FLAGS:-} \
      "$build/corpus/$t" "$root/fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  set -e
  # libFuzzer's final stats: stat::number_of_executed_units and the run time.
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 || true)
  line="fuzz_$t: rc=$rc execs=${execs:-?} ${cov:-} seconds=$seconds"
  summary+=("$line")
  echo "$line"
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    grep -E 'ERROR|SUMMARY|Test unit written|terminate called|what\(\)' "$log" | head -20 || true
  fi
done
echo "== summary"
printf '%s\n' "${summary[@]}"
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: FAILED: ${failed[*]} (inputs under $build/artifacts/, logs $build/fuzz_<target>.log)"
  exit 1
fi
echo "fuzz: no crash, hang or sanitizer report"
