#!/bin/sh
# The guest's /init (PID 1 in the initramfs that scripts/build-guest.sh makes),
# run by busybox sh under the Debian kernel, with the disk under test as
# /dev/vda (virtio-blk). It prints its progress and exactly one verdict line
# on the console, "VDISK-GUEST: PASS" or "VDISK-GUEST: FAIL <why>", then powers
# the machine off (QEMU exits). The kernel command line chooses the mode:
#
#   vdisk.mode=full     (default) mkfs.ext4 the whole disk, write files of
#                       random data, sha256sum them into /MANIFEST (on the disk
#                       and in memory), sync, umount, drop every cache,
#                       e2fsck -fn, mount again read-only and sha256sum -c.
#   vdisk.mode=verify   the disk already holds that filesystem (the disk may
#                       be read-only): e2fsck -fn, mount read-only (no journal
#                       replay), sha256sum -c its /MANIFEST.
#   vdisk.mode=install  an OS install: mount the install media
#                       (scripts/build-install-media.sh) from the second disk
#                       (/dev/vdb, read-only) and run its install.sh on
#                       /dev/vda (partition, mkfs, unpack, bootloader).
#
# Without a disk, the kernel's NBD client on an export reached over QEMU's user
# networking (virtio-net; the guest is 10.0.2.15/24, the host's loopback is
# 10.0.2.2), attached with Debian's nbd-client as a user would:
#
#   nbd-client SERVER PORT /dev/nbd0 -N EXPORT -C CONNECTIONS -b BLOCKSIZE [EXTRA]
#
#   vdisk.mode=nbd-client   attach; mke2fs -t ext4 (-E nodiscard, so every TRIM
#                       the server sees comes from fstrim); write files of
#                       random data and their /MANIFEST; sync; write and
#                       delete an 8 MiB file and fstrim -v; umount;
#                       nbd-client -d; attach again; e2fsck -fn; mount
#                       read-only; sha256sum -c; umount; nbd-client -d.
#   vdisk.mode=nbd-restart  attach; mke2fs; write files and /MANIFEST; sync;
#                       print "VDISK-GUEST: flushed N files ..." and wait
#                       (idle, still attached) for a line from the host on
#                       the second serial port (/dev/ttyS1), sent once the
#                       host has restarted the server; then read the device
#                       with O_DIRECT, write and fsync a file, and report
#                       what happened ("VDISK-GUEST: direct read of ...
#                       after the restart: ...", "VDISK-GUEST: write after
#                       the restart: ..."); umount; nbd-client -d;
#                       attach again (retrying for up to 60 s); mount (the
#                       journal is replayed); umount; e2fsck -fn; mount
#                       read-only; sha256sum -c the files flushed before
#                       the restart; umount; nbd-client -d.
#                       What it sees (test/guest/nbd-client.test.ts asserts
#                       it, docs/uses-nbd-client.md documents it): the
#                       kernel does not reconnect, so the read after the
#                       restart fails with EIO (and the write with EIO or,
#                       once ext4 has gone read-only, EROFS), with or without
#                       vdisk.nbd-extra=-nonetlink,-persist; reattaching
#                       finds every flushed file intact.
#
#   vdisk.server=10.0.2.2 vdisk.port=10809 vdisk.export=NAME
#   vdisk.connections=4 vdisk.blocksize=4096   (the defaults)
#   vdisk.nbd-extra=OPT,OPT...   more nbd-client options (commas for spaces)
#
# mke2fs and e2fsck are e2fsprogs' (with their shared libraries), not busybox's;
# nbd-client is Debian's (nbd-client 3.24, which configures the device over
# netlink).
PATH=/bin:/sbin:/usr/bin:/usr/sbin
LD_LIBRARY_PATH=/lib/x86_64-linux-gnu
export PATH LD_LIBRARY_PATH
E2FS=/opt/e2fsprogs

/bin/busybox mkdir -p /proc /sys /dev /mnt /tmp
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev
# The initramfs has no /dev/console node, so the kernel could not give PID 1
# a console: take it now.
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
# Kernel messages would land in the middle of this script's lines on the
# console: keep them off it, and print the ones that matter (I/O and
# filesystem errors) before the verdict, as "VDISK-GUEST: kernel: ...".
dmesg -n 1

say() { echo "VDISK-GUEST: $*"; }
finish() {
  cd /
  umount /mnt 2>/dev/null
  sync
  dmesg | grep -E 'I/O error|EXT4-fs (error|warning)|JBD2|blk_update_request|critical' | sed 's/^/VDISK-GUEST: kernel: /'
  # The NBD driver's own lines (a connection timed out and was given up, ...), for diagnosis.
  dmesg | grep -E 'nbd[0-9]+: ' | sed 's/^/VDISK-GUEST: nbd-kernel: /'
  say "$@"
  poweroff -f
  sleep 10
}
fail() { finish "FAIL $*"; }

# The disk under test: /dev/vda, or /dev/nbd0 in the nbd modes.
dev=/dev/vda

# Reads the disk again from the device, not from the guest's caches.
drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  blockdev --flushbufs $dev || fail "blockdev --flushbufs"
}

mode=full
server=10.0.2.2
port=10809
export_name=""
connections=4
blocksize=4096
nbd_extra=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vdisk.mode=*) mode="${arg#vdisk.mode=}" ;;
    vdisk.server=*) server="${arg#vdisk.server=}" ;;
    vdisk.port=*) port="${arg#vdisk.port=}" ;;
    vdisk.export=*) export_name="${arg#vdisk.export=}" ;;
    vdisk.connections=*) connections="${arg#vdisk.connections=}" ;;
    vdisk.blocksize=*) blocksize="${arg#vdisk.blocksize=}" ;;
    vdisk.nbd-extra=*) nbd_extra=$(echo "${arg#vdisk.nbd-extra=}" | tr ',' ' ') ;;
  esac
done
say "booted, mode=$mode, kernel $(uname -r)"

while read -r m; do
  insmod "/lib/modules/$m.ko" || fail "insmod $m"
done </lib/modules/load-order

wait_vda() {
  i=0
  while [ ! -b /dev/vda ]; do
    i=$((i + 1))
    [ "$i" -gt 200 ] && fail "no /dev/vda after 20 s"
    usleep 100000
  done
  q=/sys/block/vda/queue
  say "disk /dev/vda: $(cat /sys/block/vda/size) sectors, ro=$(cat /sys/block/vda/ro), discard_max_bytes=$(cat $q/discard_max_bytes), write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes)"
}

fsck_disk() {
  "$E2FS/e2fsck" -fn $dev
  rc=$?
  [ "$rc" -eq 0 ] || fail "e2fsck -fn exited with $rc"
  say "e2fsck -fn: clean"
}

# About 7 MiB of random data in /mnt/data: a few large files and some small
# ones; their checksums in /tmp/MANIFEST and /mnt/MANIFEST.
write_files() {
  mkdir -p /mnt/data /mnt/data/small || fail "mkdir"
  for spec in a:3072 b:2048 c:1024 d:512 e:300; do
    name=${spec%%:*}
    kib=${spec#*:}
    dd if=/dev/urandom of="/mnt/data/$name" bs=1024 count="$kib" 2>/dev/null || fail "dd $name"
  done
  for n in 1 2 3 4 5 6 7 8 9 10; do
    dd if=/dev/urandom of="/mnt/data/small/s$n" bs=$((n * 411)) count=1 2>/dev/null || fail "dd s$n"
  done
  (cd /mnt && find data -type f | sort | xargs sha256sum >/tmp/MANIFEST) || fail "sha256sum"
  cp /tmp/MANIFEST /mnt/MANIFEST || fail "cp MANIFEST"
  say "wrote $(wc -l </tmp/MANIFEST) files"
}

# --- the nbd modes -------------------------------------------------------------
net_up() {
  i=0
  while [ ! -e /sys/class/net/eth0 ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && fail "no eth0 after 10 s"
    usleep 100000
  done
  ip link set lo up || fail "ip link set lo up"
  ip link set eth0 up || fail "ip link set eth0 up"
  ip addr add 10.0.2.15/24 dev eth0 || fail "ip addr add"
  ip route add default via 10.0.2.2 || fail "ip route add"
  say "network: eth0 10.0.2.15/24 via 10.0.2.2"
}

nbd_cmd() { echo "nbd-client $server $port /dev/nbd0 -N $export_name -C $connections -b $blocksize${nbd_extra:+ $nbd_extra}"; }

# Attaches /dev/nbd0, trying once a second for up to $1 s (the server may be
# starting, the device may still be tearing down a previous connection).
nbd_attach() {
  tries=0
  # shellcheck disable=SC2046
  until $(nbd_cmd) >/tmp/nbd-client.out 2>&1; do
    tries=$((tries + 1))
    if [ "$tries" -ge "$1" ]; then
      cat /tmp/nbd-client.out
      fail "$(nbd_cmd): $(tail -1 /tmp/nbd-client.out | tr -d '\n') ($tries tries)"
    fi
    sleep 1
  done
  cat /tmp/nbd-client.out
  i=0
  while [ "$(cat /sys/block/nbd0/size)" = 0 ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && fail "/dev/nbd0 has no size 10 s after nbd-client"
    usleep 100000
  done
  q=/sys/block/nbd0/queue
  say "attached ($((tries + 1)) tries): $(nbd_cmd): $(cat /sys/block/nbd0/size) sectors, logical_block_size=$(cat $q/logical_block_size), discard_max_bytes=$(cat $q/discard_max_bytes), pid=$(nbd-client -c /dev/nbd0)"
}

nbd_detach() {
  nbd-client -d /dev/nbd0 || fail "nbd-client -d /dev/nbd0 exited with $?"
  i=0
  while nbd-client -c /dev/nbd0 >/dev/null || [ "$(cat /sys/block/nbd0/size)" != 0 ]; do
    i=$((i + 1))
    [ "$i" -gt 100 ] && fail "/dev/nbd0 still attached 10 s after nbd-client -d"
    usleep 100000
  done
  say "detached: nbd-client -d /dev/nbd0"
}

mkfs_nbd() {
  "$E2FS/mke2fs" -V 2>&1 | head -1
  # -E nodiscard: mke2fs would discard the whole device; then the TRIMs the
  # server counts come from fstrim alone.
  "$E2FS/mke2fs" -t ext4 -F -q -E nodiscard -L vdisk-nbd $dev || fail "mke2fs"
  say "mke2fs -t ext4 -E nodiscard $dev: done"
}

check_files() {
  # $1: the manifest to check against.
  cd /mnt || fail "cd /mnt"
  sha256sum -c "$1" >/tmp/check.out 2>&1
  rc=$?
  cat /tmp/check.out
  if [ "$rc" -ne 0 ]; then
    bad=$(grep -v ': OK$' /tmp/check.out | tr '\n' ';')
    fail "sha256sum -c exited with $rc: $bad"
  fi
  say "sha256sum -c: $(grep -c ': OK$' /tmp/check.out) files OK"
  cd /
}

case "$mode" in
  full)
    wait_vda
    "$E2FS/mke2fs" -V 2>&1 | head -1
    "$E2FS/mke2fs" -t ext4 -F -q -L vdisk-guest /dev/vda || fail "mke2fs"
    say "mke2fs -t ext4: done"
    mount -t ext4 /dev/vda /mnt || fail "mount"
    write_files
    sync
    umount /mnt || fail "umount"
    drop_caches
    fsck_disk
    drop_caches
    mount -t ext4 -o ro /dev/vda /mnt || fail "mount again"
    cmp /mnt/MANIFEST /tmp/MANIFEST || fail "the manifest read back differs"
    check_files /tmp/MANIFEST
    umount /mnt || fail "umount"
    finish PASS
    ;;
  verify)
    wait_vda
    fsck_disk
    drop_caches
    mount -t ext4 -o ro,noload /dev/vda /mnt || fail "mount -o ro,noload"
    [ -f /mnt/MANIFEST ] || fail "no /MANIFEST on the disk"
    cp /mnt/MANIFEST /tmp/MANIFEST || fail "read MANIFEST"
    check_files /tmp/MANIFEST
    umount /mnt || fail "umount"
    finish PASS
    ;;
  nbd-client)
    dev=/dev/nbd0
    [ -n "$export_name" ] || fail "no vdisk.export="
    net_up
    nbd_attach 10
    mkfs_nbd
    mount -t ext4 $dev /mnt || fail "mount"
    write_files
    sync -f /mnt || fail "sync -f /mnt"
    # Blocks that held data, then freed: fstrim sends them to the server as TRIM.
    dd if=/dev/urandom of=/mnt/trash bs=1M count=8 conv=fsync 2>/dev/null || fail "dd trash"
    rm /mnt/trash || fail "rm trash"
    sync -f /mnt || fail "sync -f /mnt"
    fstrim -v /mnt >/tmp/fstrim.out 2>&1 || { cat /tmp/fstrim.out; fail "fstrim -v /mnt exited with $?"; }
    say "fstrim -v /mnt: $(cat /tmp/fstrim.out)"
    umount /mnt || fail "umount"
    nbd_detach
    nbd_attach 10
    fsck_disk
    mount -t ext4 -o ro $dev /mnt || fail "mount again"
    cmp /mnt/MANIFEST /tmp/MANIFEST || fail "the manifest read back differs"
    check_files /tmp/MANIFEST
    umount /mnt || fail "umount"
    nbd_detach
    finish PASS
    ;;
  nbd-restart)
    dev=/dev/nbd0
    [ -n "$export_name" ] || fail "no vdisk.export="
    [ -c /dev/ttyS1 ] || fail "no /dev/ttyS1 (the host's line comes on the second serial port)"
    stty -F /dev/ttyS1 raw -echo || fail "stty /dev/ttyS1"
    net_up
    nbd_attach 10
    mkfs_nbd
    mount -t ext4 $dev /mnt || fail "mount"
    write_files
    sync -f /mnt || fail "sync -f /mnt"
    # The checksums the host compares with: every file above is on the server now.
    sed 's/^/VDISK-GUEST: manifest: /' /tmp/MANIFEST
    say "flushed $(wc -l </tmp/MANIFEST) files: waiting for the host to restart the server"
    read -r -t 120 word </dev/ttyS1 || fail "no line from the host on /dev/ttyS1 in 120 s"
    say "the host says: $word"
    say "nbd-client -c after the restart: $(nbd-client -c /dev/nbd0; echo "exit $?" | tr '\n' ' ')"
    # The device itself, past every cache: does it still reach a server?
    if dd if=$dev of=/dev/null bs=4096 count=1 iflag=direct >/tmp/dd.out 2>&1; then
      say "direct read of $dev after the restart: OK"
    else
      say "direct read of $dev after the restart: failed: $(grep -v records /tmp/dd.out | tr '\n' ' ')"
    fi
    # Then the filesystem: EIO, or EROFS if ext4 already hit the dead device and went read-only.
    if dd if=/dev/urandom of=/mnt/after bs=64k count=4 conv=fsync >/tmp/dd.out 2>&1; then
      say "write after the restart: OK"
    else
      say "write after the restart: failed: $(grep -v records /tmp/dd.out | tr '\n' ' ')"
    fi
    dmesg | grep -E 'nbd|EXT4-fs|I/O error' | tail -n 20 | sed 's/^/VDISK-GUEST: dmesg: /'
    dmesg -c >/dev/null
    umount /mnt || fail "umount after the restart"
    nbd_detach
    nbd_attach 60
    # The journal holds what was committed before the restart: mount replays it.
    mount -t ext4 $dev /mnt || fail "mount after reattaching"
    umount /mnt || fail "umount"
    fsck_disk
    mount -t ext4 -o ro $dev /mnt || fail "mount read-only"
    check_files /tmp/MANIFEST
    umount /mnt || fail "umount"
    nbd_detach
    finish PASS
    ;;
  install)
    wait_vda
    [ -b /dev/vdb ] || fail "no /dev/vdb (the install media)"
    mkdir -p /media
    mount -t ext2 -o ro /dev/vdb /media || fail "mount the install media /dev/vdb"
    MKE2FS=$E2FS/mke2fs sh /media/install.sh /dev/vda || fail "install.sh exited with $?"
    umount /media
    finish PASS
    ;;
  *)
    fail "unknown vdisk.mode=$mode"
    ;;
esac
