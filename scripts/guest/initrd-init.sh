#!/bin/busybox sh
# The installed system's initrd /init (install.sh puts it in
# /boot/initrd.img-KVER with busybox and the modules): Debian's kernel has
# virtio and ext4 as modules, so something must load them before the root
# filesystem can be mounted. It loads /etc/modules with modprobe (their
# dependencies from modules.dep), finds root= (UUID=... or a device) with
# findfs, mounts it read-only and switch_root's to its /sbin/init. A failure
# prints "VDISK-GUEST: FAIL initrd: ..." and powers off.
/bin/busybox mkdir -p /proc /sys /dev /root /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t devtmpfs devtmpfs /dev
exec 0</dev/console 1>/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
dmesg -n 1

fail() {
  echo "VDISK-GUEST: FAIL initrd: $*"
  poweroff -f
  sleep 10
}

root=""
for arg in $(cat /proc/cmdline); do
  case "$arg" in
    root=*) root="${arg#root=}" ;;
  esac
done
[ -n "$root" ] || fail "no root= on the kernel command line"
echo "VDISK-GUEST: initrd: kernel $(uname -r), root=$root"
for m in $(cat /etc/modules); do
  modprobe "$m" || fail "modprobe $m"
done
i=0
until dev=$(findfs "$root" 2>/dev/null); do
  i=$((i + 1))
  [ "$i" -gt 200 ] && fail "$root not found in 20 s"
  usleep 100000
done
mount -t ext4 -o ro "$dev" /root || fail "mount $dev"
echo "VDISK-GUEST: initrd: mounted $dev read-only, switch_root to its /sbin/init"
mount --move /dev /root/dev || fail "mount --move /dev"
umount /proc /sys
exec switch_root /root /sbin/init
fail "switch_root"
