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
#
# mke2fs and e2fsck are e2fsprogs' (with their shared libraries), not busybox's.
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
  say "$@"
  poweroff -f
  sleep 10
}
fail() { finish "FAIL $*"; }

# Reads the disk again from the device, not from the guest's caches.
drop_caches() {
  sync
  echo 3 >/proc/sys/vm/drop_caches
  blockdev --flushbufs /dev/vda || fail "blockdev --flushbufs"
}

mode=full
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    vdisk.mode=*) mode="${arg#vdisk.mode=}" ;;
  esac
done
say "booted, mode=$mode, kernel $(uname -r)"

while read -r m; do
  insmod "/lib/modules/$m.ko" || fail "insmod $m"
done </lib/modules/load-order

i=0
while [ ! -b /dev/vda ]; do
  i=$((i + 1))
  [ "$i" -gt 200 ] && fail "no /dev/vda after 20 s"
  usleep 100000
done
q=/sys/block/vda/queue
say "disk /dev/vda: $(cat /sys/block/vda/size) sectors, ro=$(cat /sys/block/vda/ro), discard_max_bytes=$(cat $q/discard_max_bytes), write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes)"

fsck_disk() {
  "$E2FS/e2fsck" -fn /dev/vda
  rc=$?
  [ "$rc" -eq 0 ] || fail "e2fsck -fn exited with $rc"
  say "e2fsck -fn: clean"
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
    "$E2FS/mke2fs" -V 2>&1 | head -1
    "$E2FS/mke2fs" -t ext4 -F -q -L vdisk-guest /dev/vda || fail "mke2fs"
    say "mke2fs -t ext4: done"
    mount -t ext4 /dev/vda /mnt || fail "mount"
    mkdir -p /mnt/data /mnt/data/small || fail "mkdir"
    # About 7 MiB of random data: a few large files and some small ones.
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
    fsck_disk
    drop_caches
    mount -t ext4 -o ro,noload /dev/vda /mnt || fail "mount -o ro,noload"
    [ -f /mnt/MANIFEST ] || fail "no /MANIFEST on the disk"
    cp /mnt/MANIFEST /tmp/MANIFEST || fail "read MANIFEST"
    check_files /tmp/MANIFEST
    umount /mnt || fail "umount"
    finish PASS
    ;;
  *)
    fail "unknown vdisk.mode=$mode"
    ;;
esac
