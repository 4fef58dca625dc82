#!/usr/bin/env bash
# Builds the install media of the OS-install guest test (test/guest/os-install.test.ts):
# a small ext2 image that the installer guest sees as a second, read-only
# disk, holding a small Debian system to install onto the first disk:
#
#   /debs/*.deb       Debian packages, fetched with `apt-get download` (never
#                     installed on the host) and unpacked by the guest with
#                     busybox's dpkg-deb: busybox-static (the installed
#                     system's whole userland), extlinux and syslinux-common
#                     (the bootloader and its MBR), fdisk (sfdisk) and the
#                     libraries it needs, libc6 included (the guest runs
#                     sfdisk and extlinux from the packages, not from the host);
#   /kernel/          Debian's kernel (the linux-image package build-guest.sh
#                     caches), trimmed to boot/vmlinuz-KVER and the modules
#                     the installed system's initrd loads (virtio_pci,
#                     virtio_blk, crc32c_generic, ext4 and what they depend
#                     on) under lib/modules/KVER/; the full package unpacks to
#                     ~400 MiB, most of it modules no virtio guest needs;
#   /install.sh       the installer (scripts/guest/install.sh), which
#                     init.sh's vdisk.mode=install runs;
#   /initrd-init.sh   the installed system's initrd /init (scripts/guest/initrd-init.sh);
#   /installed-init.sh  the installed system's /sbin/init (scripts/guest/installed-init.sh);
#   /MEDIA            what is in it (package versions, kernel version).
#
#   scripts/build-install-media.sh      prints the directory holding media.img
#
# The kernel package comes from build-guest.sh's cache (it runs build-guest.sh
# first when there is none). Cached like build-guest.sh under
# ${VDISK_GUEST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/vdisk-guest}, as
# media-KEY/ where KEY hashes every input (these scripts and the packages);
# the packages are kept in debs/ (VDISK_GUEST_REFRESH=1 takes what apt offers
# now). Needs e2fsprogs (mke2fs -d) and dpkg-deb. Everything but the final
# path goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
guest_dir="$here/guest"
cache="${VDISK_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vdisk-guest}"
# What the installed system's initrd loads (modprobe resolves the rest from
# modules.dep). crc32c_generic: ext4 asks the crypto API for crc32c at mount time.
root_modules=(virtio_pci virtio_blk crc32c_generic ext4)
# The packages installed onto the guest's disk. fdisk's libraries are listed
# by hand; the check below fails the build if sfdisk or extlinux would miss one.
system_debs=(busybox-static extlinux syslinux-common fdisk libfdisk1 libsmartcols1 libmount1 libblkid1 libuuid1 libselinux1 libpcre2-8-0 libreadline8 libtinfo6 libncursesw6 libc6)
# The installed programs the guest runs, checked for their libraries.
system_programs=(sbin/sfdisk usr/bin/extlinux)
guest_files=(install.sh initrd-init.sh installed-init.sh)

log() { echo "build-install-media: $*" >&2; }
die() { echo "build-install-media: error: $*" >&2; exit 1; }

for tool in dpkg-deb apt-get apt-cache sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool is missing (run 'bash scripts/setup.sh --test')"
done
mke2fs=$(PATH=/usr/sbin:/sbin:$PATH command -v mke2fs) || die "mke2fs is missing: apt-get install e2fsprogs"

mkdir -p "$cache/debs"
newest_kernel_deb() { find "$cache/debs" -maxdepth 1 -name 'linux-image-*-amd64_*.deb' -printf '%f\n' | sort -V | tail -1; }
kdeb=$(newest_kernel_deb)
if [ -z "$kdeb" ]; then
  # build-guest.sh fetches it (it takes the cache lock itself: before ours).
  log "no kernel package in $cache/debs: running build-guest.sh"
  bash "$here/build-guest.sh" >/dev/null
  kdeb=$(newest_kernel_deb)
  [ -n "$kdeb" ] || die "build-guest.sh left no linux-image package in $cache/debs"
fi

exec 9>"$cache/.lock"
flock 9

# --- the Debian packages (as build-guest.sh fetches them) -------------------------
apt_opts=()
[ "$(id -u)" -eq 0 ] && apt_opts=(-o APT::Sandbox::User=root)
apt_updated=0
apt_update() {
  [ "$apt_updated" = 1 ] && return 0
  apt_updated=1
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q >&2
}
cached_deb() {
  [ "${VDISK_GUEST_REFRESH:-0}" = 1 ] && return 0
  find "$cache/debs" -maxdepth 1 -name "$1_*.deb" -printf '%f\n' | sort -V | tail -1
}
download_deb() {
  local pkg=$1 tmpd f
  if ! apt-cache show --no-all-versions "$pkg" >/dev/null 2>&1; then
    log "apt does not know $pkg yet: apt-get update"
    apt_update
  fi
  log "downloading $pkg"
  tmpd=$(mktemp -d "$cache/debs/.dl.XXXXXX")
  (cd "$tmpd" && apt-get "${apt_opts[@]}" download -q "$pkg" >&2) || { rm -rf "$tmpd"; die "apt-get download $pkg failed"; }
  f=$(cd "$tmpd" && ls "${pkg}"_*.deb)
  mv "$tmpd/$f" "$cache/debs/$f"
  rm -rf "$tmpd"
  find "$cache/debs" -maxdepth 1 -name "${pkg}_*.deb" ! -name "$f" -delete
  echo "$f"
}
debs=()
for pkg in "${system_debs[@]}"; do
  f=$(cached_deb "$pkg")
  [ -n "$f" ] || f=$(download_deb "$pkg")
  debs+=("$f")
done

key=$( {
  sha256sum "$0" | awk '{ print $1 }'
  for f in "${guest_files[@]}"; do sha256sum "$guest_dir/$f" | awk '{ print $1 }'; done
  echo "$kdeb $(stat -c %s "$cache/debs/$kdeb")"
  printf '%s\n' "${root_modules[@]}"
  for f in "${debs[@]}"; do echo "$f $(sha256sum <"$cache/debs/$f" | awk '{ print $1 }')"; done
} | sha256sum | cut -c1-16)
out="$cache/media-$key"
if [ -f "$out/media.img" ]; then
  touch "$out"
  log "cached: $out"
  echo "$out"
  exit 0
fi

# --- build ----------------------------------------------------------------------
start=$(date +%s)
work=$(mktemp -d "$cache/.media.XXXXXX")
trap 'rm -rf "$work"' EXIT

# The packages unpacked here only to check that the programs the guest runs
# find every library among them (as the guest runs them: with the packages'
# loader and --library-path, the host's libraries never count).
tree="$work/tree"
mkdir -p "$tree"
for f in "${debs[@]}"; do dpkg-deb -x "$cache/debs/$f" "$tree"; done
ld="$tree/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
[ -x "$ld" ] || die "no lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 in the libc6 package"
[ -f "$tree/usr/lib/syslinux/mbr/mbr.bin" ] || die "no usr/lib/syslinux/mbr/mbr.bin in syslinux-common"
[ -x "$tree/bin/busybox" ] || die "no bin/busybox in busybox-static"
libpath="$tree/lib/x86_64-linux-gnu:$tree/usr/lib/x86_64-linux-gnu"
for p in "${system_programs[@]}"; do
  [ -x "$tree/$p" ] || die "no $p in the packages"
  listed=$(LC_ALL=C "$ld" --library-path "$libpath" --list "$tree/$p") || die "$ld --list $p failed"
  outside=$(awk -v t="$tree/" '$2 == "=>" && index($3, t) != 1 { print $1 }' <<<"$listed")
  [ -z "$outside" ] || die "$p needs $(echo $outside), which none of the packages has (add their packages to system_debs)"
done

# The kernel: vmlinuz and the modules the initrd loads, with their dependencies.
log "extracting $kdeb"
dpkg-deb -x "$cache/debs/$kdeb" "$work/kernel-full"
vmlinuz=$(ls "$work"/kernel-full/boot/vmlinuz-* | head -1)
[ -f "$vmlinuz" ] || die "no /boot/vmlinuz-* in $kdeb"
kver=${vmlinuz##*/vmlinuz-}
moddir="$work/kernel-full/lib/modules/$kver"
declare -A modfile=()
while IFS= read -r f; do
  b=${f##*/}
  b=${b%%.ko*}
  modfile[${b//-/_}]=$f
done < <(find "$moddir" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')
builtin_mods=$(sed -e 's#.*/##' -e 's#\.ko$##' -e 's#-#_#g' "$moddir/modules.builtin" 2>/dev/null || true)
uncompressed() {
  case "$1" in
    *.xz) xz -dc "$1" ;;
    *.zst) zstd -dc "$1" ;;
    *) cat "$1" ;;
  esac
}
declare -A seen=()
kept=()
add_module() {
  local name=${1//-/_} dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  if grep -qx "$name" <<<"$builtin_mods"; then return 0; fi
  [ -n "${modfile[$name]:-}" ] || die "module $name is neither built in nor in $kdeb"
  for dep in $(uncompressed "${modfile[$name]}" | tr '\0' '\n' | grep -a '^depends=' | head -1 | sed 's/^depends=//' | tr ',' ' '); do add_module "$dep"; done
  kept+=("$name")
}
for m in "${root_modules[@]}"; do add_module "$m"; done
media="$work/media"
mkdir -p "$media/debs" "$media/kernel/boot" "$media/kernel/lib/modules/$kver"
cp "$vmlinuz" "$media/kernel/boot/"
for m in "${kept[@]}"; do
  f=${modfile[$m]}
  rel=${f#"$moddir"/}
  rel=${rel%%.ko*}.ko
  mkdir -p "$media/kernel/lib/modules/$kver/$(dirname "$rel")"
  uncompressed "$f" >"$media/kernel/lib/modules/$kver/$rel"
done
cp "$moddir/modules.builtin" "$moddir/modules.order" "$media/kernel/lib/modules/$kver/" 2>/dev/null || true
printf '%s\n' "${root_modules[@]}" >"$media/kernel/initrd-modules"
echo "$kver" >"$media/kernel/VERSION"
rm -rf "$work/kernel-full" "$tree"

for f in "${debs[@]}"; do cp "$cache/debs/$f" "$media/debs/"; done
for f in "${guest_files[@]}"; do install -m 0755 "$guest_dir/$f" "$media/$f"; done
{
  echo "kernel $kver ($kdeb)"
  echo "modules ${kept[*]}"
  echo "packages ${debs[*]}"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ)"
} >"$media/MEDIA"

# ext2 (no journal: the guest only reads it), sized to its files plus room for the metadata.
kib=$(du -sk "$media" | cut -f1)
mkdir -p "$work/out"
: >"$work/out/media.img"
"$mke2fs" -q -t ext2 -L vdisk-media -E root_owner=0:0 -d "$media" "$work/out/media.img" "$(( kib * 12 / 10 + 4096 ))k" >&2 || die "mke2fs -d failed"
cp "$media/MEDIA" "$work/out/MEDIA"
rm -rf "$out"
mv "$work/out" "$out"
find "$cache" -maxdepth 1 -name 'media-*' ! -name "media-$key" -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2- | xargs -r rm -rf
log "built $out ($(du -sh "$out/media.img" | cut -f1), $(( $(date +%s) - start )) s)"
echo "$out"
