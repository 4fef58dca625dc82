#!/usr/bin/env bash
# A throwaway single-node Ceph cluster for tests: one monitor on 127.0.0.1, one OSD whose
# objects live in memory (memstore), a pool `rbd` with one replica. Everything (conf, keyring,
# data, logs, pid files, admin sockets) lives under DIR: no systemd, nothing under /etc/ceph.
#
#   scripts/ceph-cluster.sh start DIR [--addr IP]
#                                       prints DIR/ceph.conf once the pool takes I/O. With
#                                       --addr, the monitor and the OSD listen on IP (an IPv4
#                                       address of this host) instead of 127.0.0.1, so clients in
#                                       other network namespaces can reach them.
#   scripts/ceph-cluster.sh stop DIR    stops the daemons started under DIR and waits for them
#   scripts/ceph-cluster.sh rgw-start DIR [--https CERT KEY]
#                                       adds a radosgw (S3, beast frontend on 127.0.0.1, a free
#                                       port) and an S3 user to the running cluster under DIR;
#                                       prints the endpoint URL once it answers, and with --https
#                                       a second line, the https endpoint (another free port,
#                                       serving CERT with KEY). The user's keys are in
#                                       DIR/rgw/access-key and DIR/rgw/secret-key.
#
# Clients use `-c DIR/ceph.conf` (or CEPH_CONF); the conf names DIR/keyring, which holds
# client.admin. No manager is started: RBD I/O, pool creation and `rbd pool init` are the
# monitor's and the OSD's work, and a manager would add seconds to every start.
set -euo pipefail

usage() { echo "usage: $0 start DIR [--addr IP] | stop DIR | rgw-start DIR [--https CERT KEY]" >&2; exit 2; }
[ $# -eq 2 ] || { [ $# -eq 5 ] && [ "$1" = rgw-start ] && [ "$3" = --https ]; } \
  || { [ $# -eq 4 ] && [ "$1" = start ] && [ "$3" = --addr ]; } || usage
cmd=$1
dir=$2
https_cert=
https_key=
# The address the cluster's daemons listen on: loopback unless `start ... --addr IP`.
addr=127.0.0.1
if [ "$cmd" = rgw-start ]; then https_cert=${4:-}; https_key=${5:-}; fi
if [ "$cmd" = start ] && [ $# -eq 4 ]; then
  addr=$4
  [[ $addr =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+$ ]] || { echo "$0: --addr expects an IPv4 address, not '$addr'" >&2; exit 2; }
fi

# Waits up to $1 seconds for the command after it to succeed.
wait_for() {
  local limit=$1; shift
  local deadline=$((SECONDS + limit))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then return 1; fi
    sleep 0.2
  done
}

# Stops the daemons whose pid files match $1 (each daemon writes its own, `pid file` below, once
# it has forked) and waits for them to exit: SIGTERM, then SIGKILL after 10 seconds.
stop_daemons() {
  local pids=() f pid
  shopt -s nullglob
  for f in "$dir"/run/$1.pid; do
    pid=$(cat "$f" 2>/dev/null || true)
    # Only a live process still running a Ceph daemon: a stale pid file may name a reused pid.
    if [ -n "$pid" ] && grep -qsE '^(ceph-|radosgw)' "/proc/$pid/comm"; then pids+=("$pid"); fi
    rm -f "$f"
  done
  shopt -u nullglob
  [ ${#pids[@]} -gt 0 ] || return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  local deadline=$((SECONDS + 10)) alive
  while :; do
    alive=()
    for pid in "${pids[@]}"; do [ -d "/proc/$pid" ] && alive+=("$pid"); done
    [ ${#alive[@]} -gt 0 ] || break
    if [ $SECONDS -ge $deadline ]; then
      # A daemon that ignores SIGTERM this long is hung; nothing under DIR is worth keeping.
      kill -KILL "${alive[@]}" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.05
  done
}

# OSDs first: a stopping OSD tells the monitor it is going and waits up to 5 seconds for the
# answer (osd_mon_shutdown_timeout), so with the monitor already gone every stop took 5 s more.
stop_cluster() {
  # The gateway first: it is a client of the OSD, and requests in flight would wait for an OSD
  # that is gone.
  stop_daemons 'client.rgw.*'
  stop_daemons 'osd.*'
  stop_daemons 'mgr.*'
  stop_daemons 'mon.*'
}

# Two TCP ports nobody listens on now on $addr (the kernel picks them; the monitor binds them a
# moment later).
free_ports() {
  python3 -c '
import socket, sys
a, b = socket.socket(), socket.socket()
a.bind((sys.argv[1], 0)); b.bind((sys.argv[1], 0))
print(a.getsockname()[1], b.getsockname()[1])' "$addr"
}

start_cluster() {
  if [ -e "$dir/ceph.conf" ]; then echo "$0: $dir already holds a cluster" >&2; exit 1; fi
  mkdir -p "$dir"
  dir=$(cd "$dir" && pwd)
  mkdir -p "$dir/run" "$dir/log" "$dir/mon/a" "$dir/osd/0"
  # Any step failing stops what was started, so a failed start leaves no daemon behind.
  trap 'echo "$0: start failed; logs in $dir/log" >&2; stop_cluster' ERR
  local fsid port port_v1 conf
  fsid=$(cat /proc/sys/kernel/random/uuid)
  # The monitor speaks both protocols: msgr2 for Ceph's tools, and msgr1 on its own port for a
  # client given a bare host:port (QEMU's and vdisk's `server` option), which means msgr1.
  read -r port port_v1 < <(free_ports)
  # The OSD picks the address it listens on from the public network: loopback's, or exactly
  # --addr's (a /32, so it never picks another address of this host).
  local public_network=127.0.0.0/8
  [ "$addr" = 127.0.0.1 ] || public_network=$addr/32
  conf="$dir/ceph.conf"
  cat >"$conf" <<EOF
[global]
fsid = $fsid
mon host = [v2:$addr:$port,v1:$addr:$port_v1]
mon initial members = a
public network = $public_network
ms bind ipv6 = false
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = $dir/run
pid file = $dir/run/\$name.pid
admin socket = $dir/run/\$name.asok
log file = $dir/log/\$name.log
# One OSD on one host: one replica, placed without a host failure domain.
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 1
osd pool default pgp num = 1
# No manager runs to scale placement groups.
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# The test machine's disk may be fuller than a production monitor would accept.
mon data avail warn = 1
mon data avail crit = 0
# The monitor batches map changes for a second by default; pool creation and the OSD's boot
# each take a few map changes, which made a start 4 s longer.
paxos propose interval = 0.05
paxos min wait = 0.01
osd objectstore = memstore
memstore device bytes = 4294967296
# Small and quick: this cluster lives for one test.
osd op num shards = 1
osd op num threads per shard = 2
crash dir = $dir/crash

[mon]
mon data = $dir/mon/\$id
keyring = $dir/mon/\$id/keyring

[osd]
osd data = $dir/osd/\$id
keyring = $dir/osd/\$id/keyring
osd max object name len = 256
osd max object namespace len = 64

[client]
keyring = $dir/keyring
# Clients (rbd, qemu-img, vdisk) need no admin socket; each would fight for client.admin.asok.
admin socket =
EOF

  # Keys: the monitors' own, and client.admin with every capability (tests run as it).
  ceph-authtool --create-keyring "$dir/mon.keyring" --gen-key -n mon. --cap mon 'allow *' >/dev/null
  ceph-authtool --create-keyring "$dir/keyring" --gen-key -n client.admin \
    --cap mon 'allow *' --cap osd 'allow *' --cap mgr 'allow *' --cap mds 'allow *' >/dev/null
  ceph-authtool "$dir/mon.keyring" --import-keyring "$dir/keyring" >/dev/null
  monmaptool --create --fsid "$fsid" --addv a "[v2:$addr:$port,v1:$addr:$port_v1]" "$dir/monmap" >/dev/null
  ceph-mon -c "$conf" --mkfs -i a --monmap "$dir/monmap" --keyring "$dir/mon.keyring"
  ceph-mon -c "$conf" -i a
  local c=(ceph -c "$conf" --connect-timeout 10)
  if ! wait_for 20 "${c[@]}" mon stat; then
    echo "$0: the monitor did not answer; see $dir/log/mon.a.log" >&2
    stop_cluster
    exit 1
  fi

  # The OSD: its key made here, registered with the monitor together with that key (one
  # `osd new` call: each `ceph` command is a Python start, a third of a second), its store made.
  local osd_uuid osd_key id
  osd_uuid=$(cat /proc/sys/kernel/random/uuid)
  osd_key=$(ceph-authtool --gen-print-key)
  printf '{"cephx_secret": "%s"}' "$osd_key" >"$dir/osd-new.json"
  id=$("${c[@]}" osd new "$osd_uuid" -i "$dir/osd-new.json")
  ceph-authtool --create-keyring "$dir/osd/$id/keyring" -n "osd.$id" --add-key "$osd_key" >/dev/null
  # --no-mon-config: mkfs needs nothing from the monitor.
  ceph-osd -c "$conf" -i "$id" --mkfs --no-mon-config --osd-uuid "$osd_uuid" 2>>"$dir/log/osd-mkfs.log"
  # The pool is created while the OSD boots (ceph-osd returns once it has initialised, about
  # two seconds): its placement group is made as soon as the OSD is up.
  ceph-osd -c "$conf" -i "$id" 2>>"$dir/log/osd-start.log" &
  local osd_starter=$!
  "${c[@]}" osd pool create rbd 1 1 >/dev/null 2>&1
  wait "$osd_starter"
  # `rbd pool init` tags the pool for RBD and writes its first object, so it returns only once
  # the placement group is active: the cluster takes I/O.
  if ! timeout 30 rbd -c "$conf" pool init rbd; then
    echo "$0: 'rbd pool init' did not finish; see $dir/log" >&2
    stop_cluster
    exit 1
  fi
  trap - ERR
  echo "$conf"
}

# A random string of $2 characters from the set $1 (radosgw takes the S3 keys it is given). Bash
# and coreutils only: a Python start costs about a second on the test machine. 1024 random bytes
# hold ~140 of the 36 upper-case letters and digits on average, far more than the 40 asked for.
random_key() {
  local raw
  raw=$(head -c 1024 /dev/urandom | LC_ALL=C tr -dc "$1")
  echo "${raw:0:$2}"
}

# radosgw on the cluster under DIR (made by `start`). It makes its own pools (.rgw.root,
# default.rgw.*) on first start with the cluster's one-replica defaults; no manager is needed.
# Beast listens on 127.0.0.1 only, on a port the kernel picked a moment before.
start_rgw() {
  if [ ! -e "$dir/ceph.conf" ]; then echo "$0: no cluster under $dir (run start first)" >&2; exit 1; fi
  dir=$(cd "$dir" && pwd)
  if [ -e "$dir/rgw" ]; then echo "$0: $dir already has a radosgw" >&2; exit 1; fi
  mkdir -p "$dir/rgw"
  local conf="$dir/ceph.conf" port ssl_port access secret frontend
  read -r port ssl_port < <(free_ports)
  frontend="beast endpoint=127.0.0.1:$port"
  if [ -n "$https_cert" ]; then
    frontend+=" ssl_endpoint=127.0.0.1:$ssl_port ssl_certificate=$(realpath "$https_cert") ssl_private_key=$(realpath "$https_key")"
  fi
  # Appended: [client.rgw.gw] applies to the gateway only (other clients keep [client]'s settings).
  {
    echo
    echo '[client.rgw.gw]'
    echo "keyring = $dir/rgw/keyring"
    echo "rgw data = $dir/rgw"
    echo "rgw frontends = $frontend"
  } >>"$conf"
  trap 'echo "$0: rgw-start failed; logs in $dir/log" >&2; stop_daemons "client.rgw.*"' ERR
  ceph -c "$conf" auth get-or-create client.rgw.gw mon 'allow rw' osd 'allow rwx' -o "$dir/rgw/keyring" >/dev/null
  # radosgw forks once it has initialised (pools made, zone set up); beast listens soon after.
  radosgw -c "$conf" -n client.rgw.gw
  if ! wait_for 30 curl -sf -o /dev/null "http://127.0.0.1:$port/"; then
    echo "$0: radosgw did not answer on 127.0.0.1:$port; see $dir/log/client.rgw.gw.log" >&2
    stop_daemons 'client.rgw.*'
    exit 1
  fi
  access=$(random_key A-Z0-9 20)
  secret=$(random_key A-Za-z0-9 40)
  radosgw-admin -c "$conf" user create --uid=vdisk-test --display-name='vdisk tests' \
    --access-key="$access" --secret="$secret" >/dev/null
  printf '%s\n' "$access" >"$dir/rgw/access-key"
  printf '%s\n' "$secret" >"$dir/rgw/secret-key"
  trap - ERR
  echo "http://127.0.0.1:$port"
  if [ -n "$https_cert" ]; then echo "https://127.0.0.1:$ssl_port"; fi
}

case "$cmd" in
  start) start_cluster ;;
  rgw-start) start_rgw ;;
  stop) [ -d "$dir" ] || exit 0; stop_cluster ;;
  *) usage ;;
esac
