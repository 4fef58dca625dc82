#!/usr/bin/env bash
# Builds the small Linux guest that test/guest/ boots under qemu-system-x86_64:
# Debian's kernel (linux-image-amd64, fetched with `apt-get download`, never
# installed) and an initramfs (about 6 MiB gzipped) holding only what the
# guest's /init (scripts/guest/init.sh) runs:
#
#   - busybox-static: the shell, mount, dd, sha256sum, ip, fstrim, ...
#   - e2fsprogs' mke2fs and e2fsck (busybox's are too old for ext4 checks),
#     copied from the host with the shared libraries ldd names;
#   - Debian's nbd-client 3.24 (the `nbd-client` package, with libnl-3-200
#     and libnl-genl-3-200, fetched with `apt-get download` and unpacked with
#     dpkg-deb -x, never installed) and the libraries ldd names for it: the
#     fetched libnl ones, the rest (libgnutls30 and what it needs, all
#     present on every Debian 12 because apt needs them) from the host;
#   - the kernel modules for a virtio disk (virtio_pci, virtio_blk), ext4
#     (and crc32c_generic), the NBD client (nbd) and a virtio NIC
#     (virtio_net) for QEMU's user networking, each after the modules it
#     depends on, in the order /init loads them.
#
# fio is not in it: Debian's fio links every I/O engine's library (ceph,
# gluster, rdma, ...: about 80 MiB), so the guest checks its data with
# sha256sum instead.
#
#   scripts/build-guest.sh            prints the directory holding vmlinuz and initramfs.gz
#
# The result is cached under ${VDISK_GUEST_CACHE:-${XDG_CACHE_HOME:-~/.cache}/vdisk-guest},
# in a directory named after a hash of everything that goes in (this script,
# the init script, the Debian packages, the host binaries and libraries
# copied), so a second run only hashes and prints; changing any input builds
# again. The Debian packages are kept in the cache too (debs/): delete it (or
# set VDISK_GUEST_REFRESH=1) to take the versions apt offers now. Needs
# busybox-static, e2fsprogs and cpio (scripts/setup.sh --test installs them);
# apt-get update is run (as root, or with sudo) only when apt does not know a
# package yet. Everything but the final path goes to stderr.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
init_script="$here/guest/init.sh"
cache="${VDISK_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vdisk-guest}"
# The modules to load; their dependencies (modinfo's depends=) are added in front.
# ext4 asks the crypto API for "crc32c" at mount time (not a module dependency):
# crc32c_generic provides it (crc32c-intel needs SSE4.2, which TCG's default CPU lacks).
# nbd is the kernel's NBD client (nbd-client configures it over netlink);
# virtio_net drives QEMU's virtio-net-pci NIC (its dependencies net_failover
# and failover come first). Packet sockets, unix sockets and TCP/IP are built in.
root_modules=(virtio_pci virtio_blk crc32c_generic ext4 nbd virtio_net)
# Debian packages whose files go into the guest as they are (not installed on the host).
guest_debs=(nbd-client libnl-3-200 libnl-genl-3-200)

log() { echo "build-guest: $*" >&2; }
die() { echo "build-guest: error: $*" >&2; exit 1; }

for tool in busybox cpio gzip dpkg-deb apt-get apt-cache ldd sha256sum flock; do
  command -v "$tool" >/dev/null || die "$tool is missing (run 'bash scripts/setup.sh --test', or apt-get install busybox-static cpio)"
done
busybox=$(command -v busybox)
# Debian's busybox package is dynamically linked; the guest needs busybox-static's.
file_out=$(LC_ALL=C ldd "$busybox" 2>&1 || true)
case "$file_out" in
  *"not a dynamic executable"*|*"statically linked"*) ;;
  *) die "$busybox is dynamically linked: apt-get install busybox-static" ;;
esac
mke2fs=$(PATH=/usr/sbin:/sbin:$PATH command -v mke2fs) || die "mke2fs is missing: apt-get install e2fsprogs"
e2fsck=$(PATH=/usr/sbin:/sbin:$PATH command -v e2fsck) || die "e2fsck is missing: apt-get install e2fsprogs"

mkdir -p "$cache/debs"
exec 9>"$cache/.lock"
flock 9

# --- the Debian packages ---------------------------------------------------------
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
# The newest cached .deb of a package (its file name), or "".
cached_deb() {
  [ "${VDISK_GUEST_REFRESH:-0}" = 1 ] && return 0
  find "$cache/debs" -maxdepth 1 -name "$1_*.deb" -printf '%f\n' | sort -V | tail -1
}
# Downloads a package into the cache (dropping its older versions); prints the file name.
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

kdeb=""
if [ "${VDISK_GUEST_REFRESH:-0}" != 1 ]; then
  kdeb=$(find "$cache/debs" -maxdepth 1 -name 'linux-image-*-amd64_*.deb' -printf '%f\n' | sort -V | tail -1)
fi
if [ -z "$kdeb" ]; then
  resolve() { apt-cache depends linux-image-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ && !found { print $2; found = 1 }'; }
  pkg=$(resolve)
  if [ -z "$pkg" ]; then
    log "apt does not know linux-image-amd64 yet: apt-get update"
    apt_update
    pkg=$(resolve)
  fi
  [ -n "$pkg" ] || die "apt-cache cannot resolve linux-image-amd64 to a kernel package"
  f=$(download_deb "$pkg")
  find "$cache/debs" -maxdepth 1 -name 'linux-image-*.deb' ! -name "$f" -delete
  kdeb="$f"
fi

debs=()
for pkg in "${guest_debs[@]}"; do
  f=$(cached_deb "$pkg")
  [ -n "$f" ] || f=$(download_deb "$pkg")
  debs+=("$f")
done

work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
# The guest packages unpacked (small, so every run does it: their libraries are resolved here).
debroot="$work/debroot"
mkdir -p "$debroot"
for f in "${debs[@]}"; do dpkg-deb -x "$cache/debs/$f" "$debroot"; done
nbd_client="$debroot/sbin/nbd-client"
[ -x "$nbd_client" ] || die "no sbin/nbd-client in ${debs[0]}"

# --- the host files that go in, and the cache key ------------------------------
# Shared libraries as ldd resolves them; the unpacked packages' come first.
deb_libdirs="$debroot/lib/x86_64-linux-gnu:$debroot/usr/lib/x86_64-linux-gnu"
libs() {
  local out
  out=$(LC_ALL=C LD_LIBRARY_PATH="$deb_libdirs" ldd "$1") || die "ldd $1 failed"
  if grep -q 'not found' <<<"$out"; then
    die "libraries of ${1#"$debroot"} not found on the host nor in the fetched packages: $(grep 'not found' <<<"$out" | awk '{ print $1 }' | tr '\n' ' ')"
  fi
  awk '/=> \// { print $3 } /^[[:space:]]*\/[^ ]*ld-linux/ { print $1 }' <<<"$out"
}
host_files=("$busybox" "$mke2fs" "$e2fsck" /etc/mke2fs.conf)
# Each library's place in the guest -> where it comes from. The host's keep
# their paths; the fetched packages' go to /lib/x86_64-linux-gnu (on
# LD_LIBRARY_PATH in the guest).
all_libs=$( { libs "$mke2fs"; libs "$e2fsck"; libs "$nbd_client"; } | sort -u)
declare -A lib_src=()
while IFS= read -r f; do
  case "$f" in
    "$debroot"/*) lib_src["/lib/x86_64-linux-gnu/${f##*/}"]=$f ;;
    *) lib_src["$f"]=$f ;;
  esac
done <<<"$all_libs"
[ ${#lib_src[@]} -gt 0 ] || die "ldd found no libraries for $mke2fs"
mapfile -t lib_dests < <(printf '%s\n' "${!lib_src[@]}" | LC_ALL=C sort)
key=$( {
  sha256sum "$0" "$init_script" | awk '{ print $1 }'
  echo "$kdeb"
  printf '%s\n' "${root_modules[@]}"
  for f in "${debs[@]}"; do echo "$f $(sha256sum <"$cache/debs/$f" | awk '{ print $1 }')"; done
  for f in "${host_files[@]}"; do echo "$f $(sha256sum <"$f" | awk '{ print $1 }')"; done
  for f in "${lib_dests[@]}"; do echo "$f $(sha256sum <"${lib_src[$f]}" | awk '{ print $1 }')"; done
} | sha256sum | cut -c1-16)
out="$cache/guest-$key"
if [ -f "$out/initramfs.gz" ] && [ -f "$out/vmlinuz" ]; then
  touch "$out"
  log "cached: $out"
  echo "$out"
  exit 0
fi

# --- build ----------------------------------------------------------------------
start=$(date +%s)
log "extracting $kdeb"
dpkg-deb -x "$cache/debs/$kdeb" "$work/kernel"
vmlinuz=$(ls "$work"/kernel/boot/vmlinuz-* | head -1)
[ -f "$vmlinuz" ] || die "no /boot/vmlinuz-* in $kdeb"
kver=${vmlinuz##*/vmlinuz-}
moddir="$work/kernel/lib/modules/$kver"
[ -d "$moddir" ] || die "no lib/modules/$kver in $kdeb"

# Module name (as in depends=, '-' read as '_') -> file.
declare -A modfile=()
while IFS= read -r f; do
  b=${f##*/}
  b=${b%%.ko*}
  modfile[${b//-/_}]=$f
done < <(find "$moddir" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst')
builtin_mods=$(sed -e 's#.*/##' -e 's#\.ko$##' -e 's#-#_#g' "$moddir/modules.builtin" 2>/dev/null || true)

modinfo_depends() {
  # The .modinfo strings are NUL-separated key=value pairs; depends= lists module names.
  local f=$1
  case "$f" in
    *.xz) xz -dc "$f" ;;
    *.zst) zstd -dc "$f" ;;
    *) cat "$f" ;;
  esac | tr '\0' '\n' | grep -a '^depends=' | head -1 | sed 's/^depends=//' | tr ',' ' '
}

declare -A seen=()
order=()
add_module() {
  local name=${1//-/_} dep
  [ -n "${seen[$name]:-}" ] && return 0
  seen[$name]=1
  if grep -qx "$name" <<<"$builtin_mods"; then return 0; fi
  [ -n "${modfile[$name]:-}" ] || die "module $name is neither built in nor in $kdeb"
  for dep in $(modinfo_depends "${modfile[$name]}"); do add_module "$dep"; done
  order+=("$name")
}
for m in "${root_modules[@]}"; do add_module "$m"; done
log "kernel $kver; modules in load order: ${order[*]}"

rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,mnt,tmp,etc,lib/modules,opt/e2fsprogs}
cp "$busybox" "$rootfs/bin/busybox"
ln -s busybox "$rootfs/bin/sh"
cp "$mke2fs" "$rootfs/opt/e2fsprogs/mke2fs"
cp "$e2fsck" "$rootfs/opt/e2fsprogs/e2fsck"
cp /etc/mke2fs.conf "$rootfs/etc/mke2fs.conf"
cp "$nbd_client" "$rootfs/sbin/nbd-client"
for f in "${lib_dests[@]}"; do
  mkdir -p "$rootfs$(dirname "$f")"
  cp -L "${lib_src[$f]}" "$rootfs$f"
done
for m in "${order[@]}"; do
  f=${modfile[$m]}
  case "$f" in
    *.xz) xz -dc "$f" >"$rootfs/lib/modules/$m.ko" ;;
    *.zst) zstd -dc "$f" >"$rootfs/lib/modules/$m.ko" ;;
    *) cp "$f" "$rootfs/lib/modules/$m.ko" ;;
  esac
done
printf '%s\n' "${order[@]}" >"$rootfs/lib/modules/load-order"
install -m 0755 "$init_script" "$rootfs/init"

mkdir -p "$work/out"
cp "$vmlinuz" "$work/out/vmlinuz"
(cd "$rootfs" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet | gzip -6n) >"$work/out/initramfs.gz"
{
  echo "kernel-package $kdeb"
  echo "kernel $kver"
  echo "packages ${debs[*]}"
  echo "modules ${order[*]}"
  echo "built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $(( $(date +%s) - start )) s"
} >"$work/out/MANIFEST"
rm -rf "$out"
mv "$work/out" "$out"
# Older builds: keep the three used last (other checkouts of the repository
# may be on other versions of the inputs), drop the rest.
find "$cache" -maxdepth 1 -name 'guest-*' ! -name "guest-$key" -printf '%T@ %p\n' | sort -rn | tail -n +4 | cut -d' ' -f2- | xargs -r rm -rf
log "built $out ($(du -sh "$out/initramfs.gz" | cut -f1) initramfs, $(( $(date +%s) - start )) s)"
echo "$out"
