#!/usr/bin/env bash
# Installs every Debian package dsv3's build, demo and tests need, checked on a debootstrap minbase Debian 12 root
# by scripts/check-fresh-machine.sh. Idempotent: does nothing when all are present.
set -euo pipefail
pkgs=(build-essential cmake pkg-config git libgtest-dev libgmock-dev libbenchmark-dev
      nlohmann-json3-dev libsimdjson-dev libcli11-dev libonig-dev libssl-dev zlib1g-dev
      libdnnl-dev ocl-icd-opencl-dev libopenmpi-dev openmpi-bin libicu-dev python3 clang-format)
missing=()
for p in "${pkgs[@]}"; do
  [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)" == *'install ok installed'* ]] || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup: all ${#pkgs[@]} packages present"
  exit 0
fi
echo "setup: installing ${missing[*]}"
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
