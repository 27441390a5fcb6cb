#!/usr/bin/env bash
# Runs the README's `make demo` and `make test` on a fresh Debian 12 root, as a new user would: debootstrap
# (minbase) into a temporary folder, `apt-get install git make` only, a clone of this repository's HEAD with no
# ../shared beside it, then both commands in a chroot. Prints both results and removes the root.
# Not part of CI (it takes minutes). Run it as root before resolving an issue that changes setup, build or
# dependencies. Needs debootstrap, unshare (util-linux) and Debian's archive.
#   KEEP_ROOT=1  keep the root afterwards (to look inside);  MIRROR=URL  another Debian mirror.
set -euo pipefail
repo=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
commit=$(git -C "$repo" rev-parse HEAD)
mirror=${MIRROR:-http://deb.debian.org/debian}
[ "$(id -u)" -eq 0 ] || { echo "check-fresh-machine: run as root (debootstrap, chroot, mount)" >&2; exit 2; }
command -v debootstrap >/dev/null || PATH=$PATH:/usr/sbin
command -v debootstrap >/dev/null || { echo "check-fresh-machine: apt-get install debootstrap" >&2; exit 2; }
if [ -n "$(git -C "$repo" status --porcelain --untracked-files=no)" ]; then
  echo "check-fresh-machine: uncommitted changes are not checked; checking HEAD $commit"
fi

root=$(mktemp -d /tmp/dsv3-fresh.XXXXXX)
logs=$(mktemp -d /tmp/dsv3-fresh-logs.XXXXXX)
start=$(date +%s)

cleanup() {
  # The mounts live in a private mount namespace (below) and vanish with it; refuse to delete anything that is
  # still mounted all the same, and never cross into another file system.
  if grep -q " $root/" /proc/mounts; then
    echo "check-fresh-machine: something is still mounted under $root; not removing it" >&2
  elif [ "${KEEP_ROOT:-0}" = 1 ]; then
    echo "check-fresh-machine: kept the root at $root"
  else
    rm -rf --one-file-system "$root"
  fi
}
trap cleanup EXIT

echo "== debootstrap --variant=minbase bookworm $root ($mirror)"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$logs/debootstrap.log" 2>&1 ||
  { tail -n 20 "$logs/debootstrap.log"; exit 1; }
# A real install also has the updates and security suites.
cat >"$root/etc/apt/sources.list" <<EOF
deb $mirror bookworm main
deb $mirror bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# The clone comes from a bundle of HEAD: it works for worktrees too and leaves no path back to this checkout.
git -C "$repo" bundle create "$root/tmp/dsv3.bundle" HEAD 2>"$logs/bundle.log"

# Everything that runs inside the root, in its own mount namespace (so no mount can leak out or outlive it);
# the trap unmounts on the way out regardless.
cat >"$logs/inner.sh" <<'EOF'
set -euo pipefail
trap 'for m in sys dev/shm dev/pts dev proc; do mountpoint -q "$R/$m" && umount -l "$R/$m"; done' EXIT
mount -t proc proc "$R/proc"
mount -t sysfs sysfs "$R/sys"
mount --bind /dev "$R/dev"
mount --bind /dev/pts "$R/dev/pts"
mount -t tmpfs tmpfs "$R/dev/shm"      # OpenMPI's shared-memory transport
in_root() { chroot "$R" /usr/bin/env -i HOME=/root TERM=dumb DEBIAN_FRONTEND=noninteractive \
              PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin bash -c "$1"; }
echo "== apt-get install git make (nothing else)"
in_root 'apt-get update -qq && apt-get install -y -qq --no-install-recommends git make' >"$L/apt.log" 2>&1 ||
  { tail -n 20 "$L/apt.log"; exit 1; }
echo "== git clone (HEAD $C) into /root/dsv3; no /root/shared"
in_root "git -c advice.detachedHead=false clone -q /tmp/dsv3.bundle /root/dsv3 && git -C /root/dsv3 checkout -q $C"
t0=$(date +%s); set +e
in_root 'cd /root/dsv3 && make demo' >"$L/demo.log" 2>&1; demo_rc=$?
t1=$(date +%s)
in_root 'cd /root/dsv3 && make test' >"$L/test.log" 2>&1; test_rc=$?
t2=$(date +%s); set -e
echo "== make demo: exit $demo_rc ($((t1 - t0)) s); last lines:"
tail -n 8 "$L/demo.log" | sed 's/^/   | /'
echo "== make test: exit $test_rc ($((t2 - t1)) s); last lines:"
tail -n 12 "$L/test.log" | sed 's/^/   | /'
echo "== test counts: $(grep -E '^tests: ' "$L/test.log" | tail -n 1 || echo 'none printed')"
[ "$demo_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
EOF
set +e
R=$root L=$logs C=$commit unshare --mount --propagation private bash "$logs/inner.sh"
rc=$?
set -e
echo "== check-fresh-machine: $([ $rc -eq 0 ] && echo PASSED || echo FAILED) for $commit in $(( $(date +%s) - start )) s;" \
     "logs in $logs"
exit $rc
