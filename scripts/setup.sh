#!/usr/bin/env bash
# Installs what vdisk needs and builds it, doing only what is missing, so
# `npm start` and `npm test` work on a fresh Debian 12 with Node.js 20 and are
# quick every time after.
#
#   scripts/setup.sh           runtime: build tools, npm ci, native addon, TypeScript
#   scripts/setup.sh --test    also the real peers the tests drive
#   scripts/setup.sh --bench   also the servers and fio the benchmarks compare against
set -euo pipefail
cd "$(dirname "$0")/.."

mode="${1:-run}"
# g++/make/python3 build the native addon (node-gyp). The RBD addon (native/rbd.c) is built
# only where librbd's headers are (librbd-dev, installed by --test): the daemon runs without it
# and loads it only when a node with driver=rbd is opened.
packages=(g++ make python3)
# The tests' peers: nobody here wrote them.
# gnutls-bin's certtool and psktool make the TLS tests' certificates and keys.
# prometheus brings promtool, which checks the --metrics output (test/metrics); Debian has no
# promtool-only package, and on a machine run by systemd the package also enables a Prometheus
# server on :9090 (systemctl disable --now prometheus if it is not wanted).
# busybox-static and cpio go into the initramfs of the guest that test/guest boots
# (scripts/build-guest.sh, which fetches Debian's kernel package itself;
# scripts/build-install-media.sh fetches what the OS-install guest installs).
# ceph-mon, ceph-osd and ceph-common run the throwaway cluster of the RBD tests
# (scripts/ceph-cluster.sh), librbd-dev and librados-dev build the RBD addon, radosgw serves
# the object-store tests. qemu-block-extra is QEMU's rbd driver (qemu-img rbd:pool/image).
test_packages=(qemu-utils qemu-system-x86 libnbd-bin python3-libnbd nbdkit fio e2fsprogs fuse3 libfuse2 util-linux mount coreutils busybox-static cpio gnutls-bin socat systemd prometheus ceph-mon ceph-osd ceph-common librbd-dev librados-dev radosgw qemu-block-extra)
# bench/rbd.mjs: the throwaway cluster (ceph-mon, ceph-osd, ceph-common), the RBD addon's headers
# (librbd-dev, librados-dev) and QEMU's rbd driver (qemu-block-extra) for qemu-nbd and
# qemu-storage-daemon (qemu-system-x86 brings the latter).
bench_packages=(qemu-utils qemu-system-x86 nbdkit fio libnbd-bin util-linux ceph-mon ceph-osd ceph-common librbd-dev librados-dev qemu-block-extra)
case "$mode" in
  run) ;;
  --test) packages+=("${test_packages[@]}") ;;
  --bench) packages+=("${bench_packages[@]}") ;;
  *) echo "usage: $0 [--test|--bench]" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
fi

# npm ci when node_modules is missing or older than the lock file.
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci" >&2
  npm ci --no-audit --no-fund >&2
fi

# The native addons, when missing or older than their source; the RBD one also when librbd's
# headers have been installed since the last build.
addon=build/Release/vdisk_native.node
if [ ! -f "$addon" ] || [ -n "$(find native binding.gyp -newer "$addon" 2>/dev/null | head -1)" ] ||
   { [ -f /usr/include/rbd/librbd.h ] && [ ! -f build/Release/vdisk_rbd.node ]; }; then
  echo "setup: building the native addons" >&2
  npx --no-install node-gyp rebuild >&2
fi

# TypeScript, when dist is missing or any source is newer.
stamp=dist/.built
if [ ! -f "$stamp" ] || [ -n "$(find src tsconfig.json package.json -newer "$stamp" 2>/dev/null | head -1)" ]; then
  echo "setup: compiling TypeScript" >&2
  rm -rf dist
  npx --no-install tsc -p . >&2
  touch "$stamp"
fi

# The guest kernel and initramfs for test/guest, and the OS-install guest's
# media (Debian packages fetched with apt-get download, not installed), when
# missing or out of date (the tests build them too; done here so a download
# is not timed by tap).
if [ "$mode" = --test ]; then
  bash scripts/build-guest.sh >/dev/null
  bash scripts/build-install-media.sh >/dev/null
fi
