#!/bin/sh
# The installed system's /sbin/init (install.sh puts it there), started by
# its initrd with the root filesystem mounted read-only. It says which kernel
# and root it runs on; when the disk is writable it appends a line to
# /var/log/vdisk-boots (remounting read-write, then read-only again), so a
# boot writes to the disk too; it checks every installed file against
# /var/lib/vdisk/MANIFEST (sha256sum -c, written by the installer), then
# prints one verdict, "VDISK-GUEST: PASS" or "VDISK-GUEST: FAIL <why>"
# (after any I/O or filesystem error the kernel logged), and powers off.
PATH=/sbin:/bin:/usr/sbin:/usr/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
[ -c /dev/null ] || mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
exec 0</dev/console 1>/dev/console 2>&1
dmesg -n 1

say() { echo "VDISK-GUEST: $*"; }
finish() {
  cd /
  mount -o remount,ro / 2>/dev/null
  sync
  dmesg | grep -E 'I/O error|EXT4-fs (error|warning)|JBD2|blk_update_request|critical' | sed 's/^/VDISK-GUEST: kernel: /'
  say "$@"
  poweroff -f
  sleep 10
}
fail() { finish "FAIL $*"; }

rootdev=$(awk '$2 == "/" && $1 != "rootfs" { print $1 }' /proc/mounts | tail -1)
disk=${rootdev#/dev/}
disk=${disk%%[0-9]*}
say "installed system up: kernel $(uname -r), root $rootdev, $(head -1 /etc/vdisk-release)"
say "packages: $(awk '/^Package:/ { p = $2 } /^Version:/ { printf "%s=%s ", p, $2 }' /var/lib/dpkg/status)"

if [ "$(cat /sys/block/"$disk"/ro)" = 0 ]; then
  mount -o remount,rw / || fail "mount -o remount,rw /"
  echo "boot $(cat /proc/sys/kernel/random/boot_id) kernel $(uname -r)" >>/var/log/vdisk-boots || fail "write /var/log/vdisk-boots"
  sync
  mount -o remount,ro / || fail "mount -o remount,ro /"
  say "wrote /var/log/vdisk-boots: $(wc -l </var/log/vdisk-boots) boot(s)"
else
  say "$disk is read-only: nothing written"
fi

cd / || fail "cd /"
sha256sum -c /var/lib/vdisk/MANIFEST >/tmp/check.out 2>&1
rc=$?
grep -v ': OK$' /tmp/check.out
if [ "$rc" -ne 0 ]; then
  fail "sha256sum -c exited with $rc: $(grep -v ': OK$' /tmp/check.out | tr '\n' ';')"
fi
say "sha256sum -c /var/lib/vdisk/MANIFEST: $(grep -c ': OK$' /tmp/check.out) files OK"
finish PASS
