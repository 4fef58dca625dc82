#!/usr/bin/env node
// Backup benchmark: drive-backup on vdisk against qemu-storage-daemon, both
// driven over QMP on a unix socket, in one run. Servers alternate inside every
// round (pinned to CPU 1; fio and the other tools run elsewhere) and the best
// of the rounds counts. Times run from sending drive-backup to its
// BLOCK_JOB_COMPLETED event.
//
//   full         sync=full of a 1 GiB qcow2 image fully allocated with random
//                data (qemu-img convert of a random raw file) into a new qcow2
//                target (mode=absolute-paths); checked with qemu-img compare.
//   incremental  a 4 GiB qcow2 image with a dirty bitmap (64 KiB granularity);
//                5% of its 64 KiB clusters, at random places (fixed seed), are
//                written through an NBD export of the node with qemu-io before
//                the clock starts; then sync=incremental into an existing qcow2
//                target whose backing file is an empty image of the same size.
//                The source held nothing else, so the target must read the
//                same as the source: checked with qemu-img compare.
//   under load   fio randwrite 4k qd8 runs on an NBD export of a fresh copy of
//                the 1 GiB image while the full backup runs: the backup's MB/s
//                and fio's IOPS during the backup (no compare: the source moves).
//
// Environment:
//   BENCH_ROUNDS   rounds (default 2)
//   BENCH_SERVERS  comma list from vdisk,qemu-storage-daemon (default both)
//   BENCH_CASES    comma list from full,incremental,load (default all)
//   BENCH_DIR      where to put the images (default a temp dir under /tmp, removed at the end)
//   BENCH_WARMUP   1: before the timed job, each server runs the same kind of job untimed on an
//                  image of its own (a full backup of 256 MiB of data, or an incremental of 5%
//                  of a 4 GiB image's clusters, other ones), so the figure is that of a daemon
//                  that has backed up before: vdisk's JIT has compiled the copy path, which a
//                  fresh daemon's first backup pays for
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  rng,
  ROOT, atCleanup, cleanup, die, log, pick, qmpConnect, requireTools, saveResults, settle, sh, startFio,
  startServer, stopServer,
} from './lib.mjs';

const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);
const WARMUP = process.env.BENCH_WARMUP === '1';
const GiB = 1024 ** 3;
const CLUSTER = 64 * 1024;
const INCR_SIZE = 4 * GiB;
const DIRTY_FRACTION = 0.05;
const LOAD = { rw: 'randwrite', bs: '4k', iodepth: 8, unit: 'IOPS' };
const QSD = 'qemu-storage-daemon';

const SERVERS = {
  vdisk: (sock) => [process.execPath, [path.join(ROOT, 'bin', 'vdisk'), 'serve', '--qmp', `unix:${sock}`, '--log-level', 'warn']],
  [QSD]: (sock) => [QSD, ['--chardev', `socket,path=${sock},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0']],
};
const CASES = ['full', 'incremental', 'load'];

const serverNames = pick(Object.keys(SERVERS), process.env.BENCH_SERVERS, 'server');
const caseNames = pick(CASES, process.env.BENCH_CASES, 'case');
requireTools(['taskset', 'qemu-img', 'qemu-io', 'fio', ...serverNames.filter((s) => s !== 'vdisk')]);
if (serverNames.includes('vdisk') && !fs.existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) die('vdisk is not built (npm run build)');

const dir = process.env.BENCH_DIR ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-bench-backup-'));
if (!process.env.BENCH_DIR) atCleanup(() => fs.rmSync(dir, { recursive: true, force: true }));
const p = (name) => path.join(dir, name);
const qmpSock = p('qmp.sock');
const nbdSock = p('nbd.sock');
const SRC = p('src.qcow2'); // 1 GiB, fully allocated, random
const EMPTY4 = p('empty4g.qcow2'); // the incremental target's backing file


/** DIRTY_FRACTION of the clusters of INCR_SIZE, distinct, in random order. */
function dirtyClusters() {
  const n = INCR_SIZE / CLUSTER;
  const want = Math.round(n * DIRTY_FRACTION);
  const random = rng(42);
  const chosen = new Set();
  while (chosen.size < want) chosen.add(Math.floor(random() * n));
  return [...chosen];
}

function setup() {
  if (!fs.existsSync(SRC)) {
    const raw = p('src.raw');
    log(`writing 1 GiB of random data, converting it to a fully allocated qcow2 image`);
    sh('sh', ['-c', `head -c ${GiB} /dev/urandom > '${raw}'`]);
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, SRC]);
    fs.rmSync(raw);
  }
  fs.rmSync(EMPTY4, { force: true });
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', EMPTY4, String(INCR_SIZE)]);
}

const qcow2Node = (node, filename) => ({ driver: 'qcow2', 'node-name': node, file: { driver: 'file', filename } });

/** Starts drive-backup and resolves with [seconds, BLOCK_JOB_COMPLETED event] at its end. */
async function timedBackup(qmp, args) {
  const done = qmp.waitEvent('BLOCK_JOB_COMPLETED', (e) => e.data.device === args['job-id']);
  const t0 = process.hrtime.bigint();
  await qmp.cmd('drive-backup', args);
  const ev = await done;
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  if (ev.data.error) throw new Error(`backup job failed: ${ev.data.error}`);
  if (ev.data.offset !== ev.data.len) throw new Error(`backup job ended at ${ev.data.offset} of ${ev.data.len}`);
  return [seconds, ev];
}

async function exportNode(qmp, node) {
  await qmp.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: nbdSock } } });
  await qmp.cmd('block-export-add', { type: 'nbd', id: 'e0', 'node-name': node, name: 'disk', writable: true });
}

/**
 * BENCH_WARMUP: the same kind of job, untimed, on an image of its own (node 'warm'): an
 * incremental of a 4 GiB image with 5% of its clusters dirtied over NBD (the NBD server must be
 * running), or a full backup of 256 MiB of data.
 */
async function warmUp(qmp, kind) {
  const src = p('warm-src.qcow2');
  const target = p('warm-target.qcow2');
  const base = p('warm-base.qcow2');
  for (const f of [src, target, base]) fs.rmSync(f, { force: true });
  const size = kind === 'full' ? 256 * 2 ** 20 : INCR_SIZE;
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(size)]);
  if (kind === 'full') sh('qemu-io', ['-f', 'qcow2', '-c', `write -q -P 0x33 0 ${size}`, src]);
  await qmp.cmd('blockdev-add', qcow2Node('warm', src));
  let args = { 'job-id': 'warm', device: 'warm', sync: 'full', format: 'qcow2', target, mode: 'absolute-paths' };
  if (kind === 'incremental') {
    await qmp.cmd('block-dirty-bitmap-add', { node: 'warm', name: 'w0', granularity: CLUSTER });
    await qmp.cmd('block-export-add', { type: 'nbd', id: 'e-warm', 'node-name': 'warm', name: 'warm', writable: true });
    const random = rng(7);
    const clusters = [];
    for (let c = 0; c < size / CLUSTER; c++) if (random() < DIRTY_FRACTION) clusters.push(c);
    for (let i = 0; i < clusters.length; i += 1000) {
      const cmds = clusters.slice(i, i + 1000).flatMap((c) => ['-c', `aio_write -q -P 0x55 ${c * CLUSTER} 64k`]);
      sh('qemu-io', ['-f', 'raw', ...cmds, '-c', 'aio_flush', `nbd+unix:///warm?socket=${nbdSock}`]);
    }
    await qmp.cmd('block-export-del', { id: 'e-warm' });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(size)]);
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', target, String(size)]);
    args = { 'job-id': 'warm', device: 'warm', sync: 'incremental', bitmap: 'w0', format: 'qcow2', target, mode: 'existing' };
  }
  await timedBackup(qmp, args);
  // The export goes away asynchronously; the node is busy until it has.
  for (let i = 0; ; i++) {
    try {
      await qmp.cmd('blockdev-del', { 'node-name': 'warm' });
      break;
    } catch (err) {
      if (i > 100) throw err;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
  for (const f of [src, target, base]) fs.rmSync(f, { force: true });
  sh('sync', []);
}

/** One case on one server: starts it, runs fn(qmp), stops it; fn's result. */
async function withServer(name, what, fn) {
  fs.rmSync(nbdSock, { force: true });
  const proc = await startServer(name, SERVERS[name](qmpSock), qmpSock);
  let qmp;
  let result;
  try {
    qmp = await qmpConnect(qmpSock);
    result = await fn(qmp);
  } catch (err) {
    qmp?.close();
    await stopServer(proc);
    die(`${what} on ${name}: ${err.message}\n${name} stderr:\n${proc.stderrText}`);
  }
  qmp.close();
  if (!(await stopServer(proc))) die(`${name} exited during ${what}: ${proc.stderrText}`);
  return result;
}

function compare(a, b, what) {
  sh('qemu-img', ['compare', '-q', a, b]);
  log(`${what}: qemu-img compare: identical`);
}

const run = {
  async full(name) {
    const target = p('full-target.qcow2');
    fs.rmSync(target, { force: true });
    settle(SRC);
    const [s, ev] = await withServer(name, 'full backup', async (qmp) => {
      await qmp.cmd('blockdev-add', qcow2Node('src', SRC));
      if (WARMUP) await warmUp(qmp, 'full');
      return timedBackup(qmp, { 'job-id': 'bk', device: 'src', sync: 'full', format: 'qcow2', target, mode: 'absolute-paths' });
    });
    compare(SRC, target, `full ${name}`);
    fs.rmSync(target);
    return { seconds: s, len: ev.data.len };
  },

  async incremental(name) {
    const src = p('incr-src.qcow2');
    const target = p('incr-target.qcow2');
    for (const f of [src, target]) fs.rmSync(f, { force: true });
    sh('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(INCR_SIZE)]);
    const clusters = dirtyClusters();
    const [s, ev] = await withServer(name, 'incremental backup', async (qmp) => {
      await qmp.cmd('blockdev-add', qcow2Node('src', src));
      await qmp.cmd('block-dirty-bitmap-add', { node: 'src', name: 'b0', granularity: CLUSTER });
      await exportNode(qmp, 'src');
      // Batches of writes per qemu-io run; aio_write keeps several in flight.
      const uri = `nbd+unix:///disk?socket=${nbdSock}`;
      const t0 = Date.now();
      for (let i = 0; i < clusters.length; i += 1000) {
        const cmds = clusters.slice(i, i + 1000).flatMap((c) => ['-c', `aio_write -q -P 0x55 ${c * CLUSTER} 64k`]);
        sh('qemu-io', ['-f', 'raw', ...cmds, '-c', 'aio_flush', uri]);
      }
      log(`incremental ${name}: dirtied ${clusters.length} clusters in ${((Date.now() - t0) / 1000).toFixed(1)} s`);
      if (WARMUP) await warmUp(qmp, 'incremental');
      sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', EMPTY4, '-F', 'qcow2', target, String(INCR_SIZE)]);
      sh('sync', []);
      return timedBackup(qmp, { 'job-id': 'bk', device: 'src', sync: 'incremental', bitmap: 'b0', format: 'qcow2', target, mode: 'existing' });
    });
    if (ev.data.len !== clusters.length * CLUSTER) log(`incremental ${name}: job len ${ev.data.len}, expected ${clusters.length * CLUSTER}`);
    compare(src, target, `incremental ${name}`);
    for (const f of [src, target]) fs.rmSync(f);
    return { seconds: s, len: ev.data.len };
  },

  async load(name) {
    const src = p('load-src.qcow2');
    const target = p('load-target.qcow2');
    fs.rmSync(target, { force: true });
    sh('cp', ['--reflink=never', SRC, src]);
    settle(src);
    const r = await withServer(name, 'backup under load', async (qmp) => {
      await qmp.cmd('blockdev-add', qcow2Node('src', src));
      await exportNode(qmp, 'src');
      const logPrefix = p(`fio-${name}`);
      const fio = startFio(LOAD, nbdSock, { size: GiB, runtime: 120, logPrefix });
      await new Promise((res) => setTimeout(res, 1500)); // fio connected and running
      if (fio.proc.exitCode !== null) throw new Error(`fio exited early: ${JSON.stringify((await fio.stop()).job?.error)}`);
      const start = Date.now();
      let backup;
      try {
        backup = await timedBackup(qmp, { 'job-id': 'bk', device: 'src', sync: 'full', format: 'qcow2', target, mode: 'absolute-paths' });
      } catch (err) {
        await fio.stop().catch(() => {});
        throw err;
      }
      const end = Date.now();
      const [seconds, ev] = backup;
      const out = await fio.stop();
      // fio's IOPS over the samples that fall inside the backup.
      const inside = out.samples.filter((x) => x.t > start && x.t <= end);
      const iops = inside.length ? inside.reduce((a, x) => a + x.iops, 0) / inside.length : out.job.write.iops;
      if (!inside.length) log(`load ${name}: no fio samples inside the backup; using fio's whole-run IOPS`);
      for (const f of fs.readdirSync(dir)) if (f.startsWith(`fio-${name}`)) fs.rmSync(p(f));
      return { seconds, len: ev.data.len, mbps: ev.data.len / seconds / 1e6, iops, fioTotalIops: out.job.write.iops };
    });
    for (const f of [src, target]) fs.rmSync(f, { force: true });
    return r;
  },
};

async function main() {
  setup();
  const results = {};
  for (let round = 0; round < ROUNDS; round++) {
    for (const c of caseNames) {
      results[c] ??= {};
      const order = round % 2 ? [...serverNames].reverse() : serverNames;
      for (const name of order) {
        const r = await run[c](name);
        const extra = r.mbps ? `, ${r.mbps.toFixed(0)} MB/s, fio ${Math.round(r.iops)} IOPS during (${Math.round(r.fioTotalIops)} whole run)` : '';
        log(`${c.padEnd(11)} ${name.padEnd(19)} round ${round + 1}: ${r.seconds.toFixed(3)} s (${(r.len / 2 ** 20).toFixed(0)} MiB)${extra}`);
        const best = results[c][name];
        if (!best || r.seconds < best.seconds) results[c][name] = r;
      }
    }
  }
  saveResults('backup', { rounds: ROUNDS, warmup: WARMUP, load: os.loadavg() }, results);

  const labels = {
    full: 'full, 1 GiB allocated qcow2',
    incremental: 'incremental, 4 GiB qcow2, 5% dirty',
    load: 'full 1 GiB under fio randwrite 4k qd8',
  };
  if (WARMUP) for (const k of Object.keys(labels)) labels[k] += ', after a warm-up job';
  const v = 'vdisk';
  const q = QSD;
  const cell = (r) => (r ? r.seconds.toFixed(3) : '-');
  console.log(`\n| backup case | vdisk (s) | ${q} 7.2 (s) | vdisk/qsd (target <= 1.0) |`);
  console.log('|---|---|---|---|');
  for (const c of caseNames) {
    const r = results[c];
    const ratio = r[v] && r[q] ? (r[v].seconds / r[q].seconds).toFixed(2) : '-';
    console.log(`| ${labels[c]} | ${cell(r[v])} | ${cell(r[q])} | ${ratio} |`);
  }
  if (results.load) {
    const r = results.load;
    const lc = (x) => (x ? `${x.mbps.toFixed(0)} MB/s, ${Math.round(x.iops)} IOPS` : '-');
    const ratio = (k) => (r[v] && r[q] ? (r[v][k] / r[q][k]).toFixed(2) : '-');
    console.log(`\n| under load (backup MB/s, fio IOPS during it) | vdisk | ${q} | vdisk/qsd (higher is better) |`);
    console.log('|---|---|---|---|');
    console.log(`| ${labels.load} | ${lc(r[v])} | ${lc(r[q])} | ${ratio('mbps')} MB/s, ${ratio('iops')} IOPS |`);
  }
  console.log(`\nload average at the end: ${os.loadavg().map((x) => x.toFixed(2)).join(' ')} (${os.cpus().length} CPUs)`);
}

main()
  .then(() => cleanup())
  .catch((err) => die(err.stack ?? String(err)));
