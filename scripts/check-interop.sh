#!/usr/bin/env bash
# `make check-interop`: the tests that check dsv3's files with Python peers (transformers loading a checkpoint
# and computing dsv3's logits, TensorBoard reading an event file), run against each pinned transformers version
# in its own virtual environment under $BUILD (made once, reused when its pins are unchanged). Not part of
# `make test`: CI has no torch, and the peers take about 6 GB and a few minutes to install.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=$(realpath -m "${BUILD:-build}")
TORCH=2.15.0
TRANSFORMERS=(4.57.6 5.25.0)
PEERS="safetensors==0.8.0 tensorboard==2.21.0"
TESTS=(CheckpointHf.TransformersLoadsTheIterationDirectory ExpertParallel.CheckpointsMoveBetweenLayouts
       TensorBoard.TensorBoardPackageReadsOurFile)

# Debian's python3 makes virtual environments only with python3-venv (ensurepip).
if ! python3 -c 'import ensurepip' 2>/dev/null; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get install -y -qq --no-install-recommends python3-venv
fi

# torch from PyPI needs its CUDA wheels even to import on a CPU (about 5 GB; PyPI has no CPU-only build), and
# both transformers versions run on the same torch: it is installed once, outside the environments, and each
# environment sees it through a .pth file.
torch_dir=$BUILD/interop-torch-$TORCH
if [ ! -f "$torch_dir/.ready" ]; then
  rm -rf "$torch_dir"
  python3 -m pip install --quiet --target "$torch_dir" "torch==$TORCH"
  touch "$torch_dir/.ready"
fi

summary=()
failed=0
for tf in "${TRANSFORMERS[@]}"; do
  venv=$BUILD/interop-venv-${tf%.*}
  pins="transformers==$tf $PEERS torch==$TORCH"
  if [ "$(cat "$venv/.pins" 2>/dev/null)" != "$pins" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    echo "$torch_dir" >"$site/interop-torch.pth"
    # shellcheck disable=SC2086
    "$venv/bin/pip" install --quiet "transformers==$tf" $PEERS
    echo "$pins" >"$venv/.pins"
  fi
  versions=$("$venv/bin/python" -c 'import transformers, torch, safetensors, tensorboard as tb
print(f"transformers {transformers.__version__}, torch {torch.__version__}, safetensors {safetensors.__version__}, tensorboard {tb.__version__}")')
  echo "=== $versions"
  log=$BUILD/interop-${tf%.*}.log
  filter=$(IFS=:; echo "${TESTS[*]}")
  # The peers must run here: DSV3_REQUIRE_PYTHON_PEERS turns "package missing" from a skip into a failure.
  # A private TMPDIR: the tests' scratch directories are $TMPDIR/dsv3-tests/<test>, and another checkout
  # running the same tests at the same time would delete ours under /tmp.
  tmp=$BUILD/interop-tmp
  mkdir -p "$tmp"
  TMPDIR=$tmp DSV3_PYTHON=$venv/bin/python DSV3_REQUIRE_PYTHON_PEERS=1 OMP_NUM_THREADS=1 \
    "$BUILD/dsv3_tests" --gtest_filter="$filter" 2>&1 | tee "$log" || true
  summary+=("$versions:")
  for t in "${TESTS[@]}"; do
    if grep -qF "[       OK ] $t " "$log"; then
      summary+=("  PASS $t")
    else
      summary+=("  FAIL $t (see $log)")
      failed=1
    fi
  done
done
echo "=== check-interop summary"
printf '%s\n' "${summary[@]}"
exit $failed
