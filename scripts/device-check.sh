#!/usr/bin/env bash
# The GPU check, in two halves (the GPU machine has no compiler for our Debian libraries and no network):
#
#   here:          scripts/device-check.sh pack     builds, then packs dsv3, the test binaries and mpirun into
#                                                   .devpack/ with ../shared/tools/device-pack.sh
#   on the GPU:    scripts/device-check.sh          (through the device tool, carry: [".devpack"]) prints what
#                                                   the machine has, runs every CUDA test and writes a summary
#
# Results go to $OUT (the device tool brings it back), or ./device-check-out when OUT is unset. Budget: under 8
# minutes in all; each step has its own timeout so one hang cannot eat the rest.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = pack ]; then
  set -e
  make build
  bash ../shared/tools/device-pack.sh build/dsv3 build/libdsv3_cuda.so build/dsv3_tests build/dsv3_cuda_tests build/bench_gpu \
    "$(command -v mpirun)"
  grep -qx '/.devpack/' .git/info/exclude 2>/dev/null || echo '/.devpack/' >> .git/info/exclude
  echo "packed: $(du -h .devpack/pack.tar.gz | cut -f1); run on the GPU machine: scripts/device-check.sh (carry .devpack)"
  exit 0
fi

out=${OUT:-device-check-out}
mkdir -p "$out"
summary="$out/summary.txt"
: > "$summary"
say() { echo "$*" | tee -a "$summary"; }
[ -f .devpack/run.sh ] || { say "no .devpack/: run 'scripts/device-check.sh pack' here first and carry .devpack"; exit 2; }
run() { bash .devpack/run.sh "$@"; }
# The tests find the checkout and the packed dsv3 (which run.sh unpacks into /tmp/devpack) through these.
export DSV3_SOURCE_DIR=$PWD DSV3_BINARY=/tmp/devpack/bin/dsv3 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

say "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$summary"
python3 - <<'PY' 2>&1 | tee -a "$summary"
import glob, site
for d in sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/*/lib")): print("wheel libs:", d)
try:
    import torch, transformers
    print("torch", torch.__version__, "cuda", torch.version.cuda, "| transformers", transformers.__version__)
except Exception as e:
    print("torch/transformers:", e)
PY
timeout 60 bash .devpack/run.sh dsv3 device-info 2>&1 | tee -a "$summary"

say "== CUDA op tests (each CUDA op against the CPU op)"
timeout 300 bash .devpack/run.sh dsv3_cuda_tests --gtest_output="xml:$out/cuda_tests.xml" > "$out/cuda_tests.log" 2>&1
rc=$?
grep -E '^\[  (PASSED|FAILED) |^\[==========\]|FAILED  \]|Failure|error' "$out/cuda_tests.log" | head -60 | tee -a "$summary"
say "cuda tests exit code: $rc, skipped: $(grep -oP '^\[  SKIPPED \] \K[0-9]+(?= tests?,)' "$out/cuda_tests.log" || echo 0) (a skip here means no GPU was visible)"
grep -E '^(fp32|bf16|moe|cuda|cpu)[a-z0-9 ]*(->|:)' "$out/cuda_tests.log" | tee -a "$summary"  # the measured differences
say "== the attention tests again on the CUDA-core kernel (DSV3_ATTENTION=cuda-cores)"
DSV3_ATTENTION=cuda-cores timeout 60 bash .devpack/run.sh dsv3_cuda_tests --gtest_filter='CudaOps.Attention*:CudaModel.*' \
  2>&1 | grep -E '^\[  (PASSED|FAILED) |FAILED  \]|^(fp32|bf16|moe)[a-z0-9 ]*:' | tee -a "$summary"

say "== the attention and model tests again through cuDNN's fused attention (DSV3_ATTENTION=cudnn)"
DSV3_ATTENTION=cudnn timeout 90 bash .devpack/run.sh dsv3_cuda_tests --gtest_filter='CudaOps.Attention*:CudaModel.*' \
  2>&1 | grep -E '^\[  (PASSED|FAILED) |FAILED  \]|Failure|error|^(fp32|bf16|moe)[a-z0-9 ]*:' | head -30 | tee -a "$summary"

say "== make demo's training on the GPU (its flags; dsv3 train picks the GPU by default; bf16: grouped expert GEMMs)"
DSV3="bash .devpack/run.sh dsv3" DEMO_ITERS=${DEMO_ITERS:-100} DEMO_OUT="$out/demo" timeout 180 bash scripts/demo.sh \
  > "$out/demo.log" 2>&1
say "demo exit code: $?"
grep -E '^device|iteration +(20|100)/|^moe:|validation loss|successfully saved' "$out/demo.log" | tail -10 | tee -a "$summary"
rm -rf "$out/demo"

say "== bench-gpu (PyTorch peer and the measured roofline)"
CONFIGS="${CONFIGS:-examples/deepseek/configs/proxy-gpu-dense.json examples/deepseek/configs/proxy-gpu-moe.json}" \
  RUN="bash .devpack/run.sh" timeout 300 bash bench/gpu.sh 2>&1 | tee "$out/bench_gpu.log" | grep -vE '^\s*$' | tee -a "$summary"
exit $rc
