#!/usr/bin/env node
// RBD benchmark: vdisk's driver=rbd against QEMU's rbd driver (qemu-nbd and
// qemu-storage-daemon), in one run, on the same image.
//
// A throwaway single-node cluster (scripts/ceph-cluster.sh: one monitor, one
// memstore OSD) is started in a temp dir and holds a 1 GiB image made with
// `rbd create` and filled once with `rbd bench`, so every read hits a stored
// object. Each server in turn serves that image over NBD on a unix socket,
// pinned to CPU 1, and fio's nbd engine (pinned to CPU 0) drives it, with
// bench/nbd.mjs's workloads. The Ceph daemons are not pinned: on a 2-core
// machine they share both CPUs with the server and fio, as they would on a
// small host. Servers alternate inside every round and the best of the rounds
// counts. Before every run, the previous server's watch on the image must be
// gone, so no server waits for another's exclusive lock.
//
// All three use librbd's cache (rbd_cache=true): vdisk and QEMU turn it on
// unless cache.direct=on.
//
// rbd-nbd (Ceph's own NBD server) is not measured: it serves the image through
// the kernel's NBD driver (/dev/nbdX), not a socket fio's nbd engine can reach,
// and it is only measurable on a kernel built with it. The run says which.
//
// Environment:
//   BENCH_RUNTIME   seconds per fio run (default 4)
//   BENCH_ROUNDS    rounds per workload (default 2)
//   BENCH_SERVERS   comma list from vdisk,qemu-nbd,qemu-storage-daemon (default all)
//   BENCH_WORKLOADS comma list from randread,randwrite,read,write (default all)
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  ROOT, atCleanup, cleanup, die, formatValue, log, pick, printTable, requireTools, runFio, saveResults, sh,
  startServer, stopServer,
} from './lib.mjs';

const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 4);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);
const IMAGE_SIZE = 1024 ** 3;
const POOL = 'rbd';
const IMAGE = 'disk';
const CLUSTER_SCRIPT = path.join(ROOT, 'scripts', 'ceph-cluster.sh');

const WORKLOADS = [
  { id: 'randread', label: 'randread 4k qd16', rw: 'randread', bs: '4k', iodepth: 16, unit: 'IOPS' },
  { id: 'randwrite', label: 'randwrite 4k qd16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS' },
  { id: 'read', label: 'read 1M qd8', rw: 'read', bs: '1M', iodepth: 8, unit: 'MB/s' },
  { id: 'write', label: 'write 1M qd8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MB/s' },
];

/** Per server: the command serving pool/image (cluster conf `conf`) as NBD export "disk" on sock. */
const SERVERS = {
  vdisk: (conf, sock) => [
    process.execPath,
    [
      path.join(ROOT, 'bin', 'vdisk'),
      'serve',
      '--blockdev', `driver=rbd,node-name=r0,pool=${POOL},image=${IMAGE},conf=${conf}`,
      '--export', 'type=nbd,id=e0,node-name=r0,name=disk,writable=on',
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--log-level', 'warn',
    ],
  ],
  'qemu-nbd': (conf, sock) => [
    'qemu-nbd',
    ['-f', 'raw', '--cache=writeback', '-e', '16', '-t', '-x', 'disk', '-k', sock, `rbd:${POOL}/${IMAGE}:conf=${conf}`],
  ],
  'qemu-storage-daemon': (conf, sock) => [
    'qemu-storage-daemon',
    [
      '--blockdev', `driver=rbd,node-name=r0,pool=${POOL},image=${IMAGE},conf=${conf}`,
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--export', 'type=nbd,id=e0,node-name=r0,name=disk,writable=on',
    ],
  ],
};

const serverNames = pick(Object.keys(SERVERS), process.env.BENCH_SERVERS, 'server');
const workloads = WORKLOADS.filter((w) => pick(WORKLOADS.map((x) => x.id), process.env.BENCH_WORKLOADS, 'workload').includes(w.id));

requireTools(['fio', 'taskset', 'ceph-mon', 'ceph-osd', 'ceph', 'rbd', ...serverNames.filter((s) => s !== 'vdisk')]);
if (!fs.existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) die('vdisk is not built (npm run build)');
if (serverNames.includes('vdisk') && !fs.existsSync(path.join(ROOT, 'build', 'Release', 'vdisk_rbd.node'))) {
  die('vdisk has no RBD addon (build/Release/vdisk_rbd.node): bash scripts/setup.sh --bench installs librbd-dev and builds it');
}
if (serverNames.some((s) => s !== 'vdisk') && !fs.existsSync('/usr/lib/x86_64-linux-gnu/qemu/block-rbd.so')) {
  die("QEMU has no rbd driver (block-rbd.so): install qemu-block-extra (bash scripts/setup.sh --bench)");
}

/** The 1, 5 and 15 minute load averages, as uptime prints them. */
const loadNow = () => os.loadavg().map((l) => l.toFixed(2)).join(' ');

/** Why rbd-nbd is not in the table, said about this machine. */
function rbdNbdNote() {
  const kernelHasNbd = fs.existsSync('/sys/module/nbd') || fs.existsSync('/dev/nbd0');
  return kernelHasNbd
    ? 'rbd-nbd: not measured: it serves through the kernel\'s /dev/nbdX, which fio\'s nbd engine cannot drive'
    : `rbd-nbd: not measured: it needs the kernel's NBD driver (/dev/nbdX), and this kernel (${os.release()}) has none (no /sys/module/nbd, no /dev/nbd0)`;
}

/** Waits until nobody watches the image (the last server has closed it), at most 40 s. */
async function waitImageFree(conf) {
  const deadline = Date.now() + 40_000;
  for (;;) {
    const out = sh('rbd', ['-c', conf, 'status', '--format', 'json', `${POOL}/${IMAGE}`]);
    if (JSON.parse(out).watchers.length === 0) return;
    if (Date.now() > deadline) die(`${POOL}/${IMAGE} is still watched by ${out.trim()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

async function main() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-bench-rbd-'));
  const clusterDir = path.join(dir, 'cluster');
  // Registered before the start: a start that fails half-way stops what it started itself, and
  // stopping twice is harmless. Cleanups run in order: the cluster stops before the dir goes.
  atCleanup(() => spawnSync('bash', [CLUSTER_SCRIPT, 'stop', clusterDir], { stdio: 'inherit', timeout: 60_000 }));
  atCleanup(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sock = path.join(dir, 'nbd.sock');

  log(`load average before: ${loadNow()}`);
  log(rbdNbdNote());
  log(`starting a throwaway Ceph cluster in ${clusterDir}`);
  const conf = sh('bash', [CLUSTER_SCRIPT, 'start', clusterDir]).trim().split('\n').pop();
  sh('rbd', ['-c', conf, 'create', '--size', `${IMAGE_SIZE / 1024 ** 2}M`, `${POOL}/${IMAGE}`]);
  log(`filling ${POOL}/${IMAGE} (${IMAGE_SIZE} bytes) with rbd bench`);
  sh('rbd', ['-c', conf, 'bench', '--io-type', 'write', '--io-pattern', 'seq', '--io-size', '4M', '--io-threads', '4',
    '--io-total', String(IMAGE_SIZE), `${POOL}/${IMAGE}`]);

  const results = {};
  for (const w of workloads) {
    results[w.id] = {};
    for (let round = 0; round < ROUNDS; round++) {
      const order = round % 2 ? [...serverNames].reverse() : serverNames;
      for (const name of order) {
        await waitImageFree(conf);
        const proc = await startServer(name, SERVERS[name](conf, sock), sock);
        let value;
        try {
          value = runFio(w, sock, { size: IMAGE_SIZE, runtime: RUNTIME });
        } catch (err) {
          await stopServer(proc);
          die(`${w.label} on ${name}: ${err.message}\n${name} stderr:\n${proc.stderrText}`);
        }
        if (!(await stopServer(proc))) die(`${name} exited during ${w.label}: ${proc.stderrText}`);
        log(`rbd ${w.label.padEnd(18)} ${name.padEnd(19)} round ${round + 1}: ${formatValue(value, w.unit)} (load ${loadNow()})`);
        results[w.id][name] = Math.max(results[w.id][name] ?? 0, value);
      }
    }
  }
  const load = loadNow();
  saveResults('rbd', {
    format: 'rbd', runtime: RUNTIME, rounds: ROUNDS, load, osd: 'memstore, 1 OSD, 1 replica',
    rbdNbd: rbdNbdNote(),
  }, results);
  printTable('rbd workload', workloads, serverNames, results);
  console.log(`\nload average at the end: ${load} (${os.cpus().length} CPUs)`);
  console.log(rbdNbdNote());
}

main()
  .then(() => cleanup())
  .catch((err) => die(err.stack ?? String(err)));
