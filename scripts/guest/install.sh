#!/bin/sh
# The installer on the install media (scripts/build-install-media.sh), run in
# the guest by init.sh's vdisk.mode=install with busybox's shell and applets:
#
#   sh /media/install.sh DISK
#
# It installs the media's small Debian system onto DISK (all of it is lost)
# the way an OS installer does: a DOS partition table with one bootable
# partition (Debian's sfdisk), an ext4 filesystem on it (MKE2FS, e2fsprogs'
# mke2fs), the packages unpacked onto it and recorded in
# /var/lib/dpkg/status, busybox's applets linked, the kernel and its
# modules (depmod), an initrd made from the installed files, /etc/fstab, and
# extlinux in the partition with syslinux's MBR in front of it. The
# checksums of every installed file go to /var/lib/vdisk/MANIFEST, which the
# installed /sbin/init (installed-init.sh) checks at every boot. It prints
# its steps as "VDISK-GUEST: install: ..." and exits 0 when the disk is
# ready and unmounted, 1 (saying why) otherwise.
#
# sfdisk and extlinux are the packages' own binaries: sfdisk runs before the
# disk has a filesystem, from the packages unpacked in RAM with their loader
# (ld-linux --library-path); extlinux runs chrooted in the installed system.
disk=${1:?usage: install.sh DISK}
media=$(cd "$(dirname "$0")" && pwd)
MKE2FS=${MKE2FS:-mke2fs}
target=/target
stage=/tmp/stage
kver=$(cat "$media/kernel/VERSION")
part=${disk}1

say() { echo "VDISK-GUEST: install: $*"; }
die() {
  echo "VDISK-GUEST: install failed: $*"
  exit 1
}

# --- the packages, unpacked in RAM ------------------------------------------------
mkdir -p $stage || die "mkdir $stage"
for deb in "$media"/debs/*.deb; do
  dpkg-deb -x "$deb" $stage || die "dpkg-deb -x $deb"
done
say "unpacked $(ls "$media"/debs/*.deb | wc -l) packages in RAM"
staged() {
  prog=$1
  shift
  $stage/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
    --library-path $stage/lib/x86_64-linux-gnu:$stage/usr/lib/x86_64-linux-gnu "$stage$prog" "$@"
}

# --- the partition table: DOS, one bootable Linux partition from 1 MiB to the end ---
echo 'label: dos
start=2048, type=83, bootable' | staged /sbin/sfdisk --quiet "$disk" || die "sfdisk $disk"
i=0
while [ ! -b "$part" ]; do
  i=$((i + 1))
  [ "$i" -gt 100 ] && die "no $part 10 s after sfdisk"
  usleep 100000
done
say "sfdisk: $(staged /sbin/sfdisk --dump "$disk" | grep "^$part" | tr -s ' ')"

# --- the filesystem ---------------------------------------------------------------
uuid=$(cat /proc/sys/kernel/random/uuid)
# mke2fs's default ext4 features (64bit, metadata_csum, ...) are ones
# extlinux 6.04 reads. Inode tables and journal are zeroed now, so no kernel
# thread writes them later.
"$MKE2FS" -t ext4 -F -q -L vdisk-root -U "$uuid" -E lazy_itable_init=0,lazy_journal_init=0 "$part" || die "mke2fs $part"
say "mke2fs -t ext4 $part: UUID $uuid"
mkdir -p $target
mount -t ext4 "$part" $target || die "mount $part"

# --- the system: packages, applets, kernel, init ---------------------------------
cp -a $stage/. $target/ || die "copy the packages"
mkdir -p $target/var/lib/dpkg $target/var/lib/vdisk
for deb in "$media"/debs/*.deb; do
  dpkg-deb -f "$deb" | sed '1a Status: install ok installed' || die "dpkg-deb -f $deb"
  echo
done >$target/var/lib/dpkg/status
mkdir -p $target/bin $target/sbin $target/usr/bin $target/usr/sbin
chroot $target /bin/busybox --install -s || die "busybox --install -s"
cp -a "$media/kernel/boot/." $target/boot/ || die "copy the kernel"
mkdir -p $target/lib/modules
cp -a "$media/kernel/lib/modules/$kver" $target/lib/modules/ || die "copy the modules"
chroot $target depmod "$kver" || die "depmod $kver"
rm -f $target/sbin/init
cp "$media/installed-init.sh" $target/sbin/init && chmod 0755 $target/sbin/init || die "install /sbin/init"
mkdir -p $target/proc $target/sys $target/dev $target/tmp $target/run $target/root $target/var/log
echo "UUID=$uuid / ext4 defaults 0 1" >$target/etc/fstab
echo vdisk-installed >$target/etc/hostname
{
  echo "vdisk installed system: kernel $kver, $(ls "$media"/debs/*.deb | wc -l) packages"
  cat "$media/MEDIA"
} >$target/etc/vdisk-release
say "system: $(grep -c '^Package:' $target/var/lib/dpkg/status) packages, kernel $kver"

# --- the initrd (what update-initramfs would make): busybox, the modules, a /init
# that loads them and mounts the root filesystem ---
rd=/tmp/initrd
mkdir -p $rd/bin $rd/lib/modules $rd/etc || die "mkdir $rd"
cp $target/bin/busybox $rd/bin/busybox || die "copy busybox"
cp -a $target/lib/modules/"$kver" $rd/lib/modules/ || die "copy the modules"
cp "$media/kernel/initrd-modules" $rd/etc/modules || die "copy initrd-modules"
cp "$media/initrd-init.sh" $rd/init && chmod 0755 $rd/init || die "install the initrd's /init"
(cd $rd && find . | sort | cpio -o -H newc -R 0:0 2>/dev/null | gzip -9) >$target/boot/initrd.img-"$kver" || die "cpio the initrd"
say "initrd: /boot/initrd.img-$kver, $(wc -c <$target/boot/initrd.img-"$kver") bytes"

# --- the bootloader: extlinux in the partition, syslinux's MBR boot code in front ---
mkdir -p $target/boot/extlinux
cat >$target/boot/extlinux/extlinux.conf <<EOF
SERIAL 0 115200
DEFAULT debian
PROMPT 0
TIMEOUT 0
LABEL debian
  KERNEL /boot/vmlinuz-$kver
  INITRD /boot/initrd.img-$kver
  APPEND root=UUID=$uuid ro console=ttyS0 quiet loglevel=4 panic=-1
EOF
mount --bind /dev $target/dev || die "mount --bind /dev"
mount -t proc proc $target/proc || die "mount proc"
chroot $target extlinux --install /boot/extlinux || die "extlinux --install"
umount $target/proc
umount $target/dev
dd if=$target/usr/lib/syslinux/mbr/mbr.bin of="$disk" bs=440 count=1 conv=notrunc 2>/dev/null || die "dd mbr.bin"
say "extlinux --install /boot/extlinux; mbr.bin on $disk"

# --- the manifest, then done -----------------------------------------------------
(cd $target && find . -xdev -type f | sort | xargs sha256sum >/tmp/MANIFEST) || die "sha256sum"
mv /tmp/MANIFEST $target/var/lib/vdisk/MANIFEST || die "write the manifest"
say "manifest: $(wc -l <$target/var/lib/vdisk/MANIFEST) files"
sync
umount $target || die "umount $target"
say "done"
