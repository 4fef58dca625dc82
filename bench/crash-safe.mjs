#!/usr/bin/env node
// The cost of crash-safe bitmaps: fio randwrite 4k (nbd engine, qd16) on vdisk's NBD export of a
// 1 GiB qcow2 image, and of a 1 GiB raw image (bitmap in its sidecar), with:
//   none        no bitmap
//   qemu-mode   a persistent bitmap in QEMU's mode (in use while open, stored at close)
//   crash-safe  a persistent crash-safe bitmap (vdisk's default)
// Two phases per run, on a fresh bitmap each time:
//   first pass  the first BENCH_RUNTIME seconds after the bitmap is added or cleared: most writes
//               land in granules whose bit is not yet on disk (the worst case: one backup cycle's
//               first touches)
//   steady      BENCH_RUNTIME seconds after a sequential pass over the whole disk: every bit is
//               durable already (the rest of a backup cycle)
// The ratio crash-safe / qemu-mode is the price. Configurations alternate inside every round and
// the best of the rounds counts. The server runs pinned to CPU 1, fio to CPU 0.
//
// Environment: BENCH_RUNTIME (seconds per phase, default 5), BENCH_ROUNDS (default 2),
// BENCH_FORMATS (qcow2,raw), BENCH_DIR.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, atCleanup, cleanup, die, log, pick, qmpConnect, requireTools, runFio, saveResults, settle, sh, startServer, stopServer } from './lib.mjs';

const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 5);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);
const SIZE = 1024 ** 3;
const W = { rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS' };
const MODES = ['none', 'qemu-mode', 'crash-safe'];
const formats = pick(['qcow2', 'raw'], process.env.BENCH_FORMATS, 'format');
requireTools(['taskset', 'qemu-img', 'fio']);
if (!fs.existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) die('vdisk is not built (npm run build)');

const dir = process.env.BENCH_DIR ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-bench-cs-'));
if (!process.env.BENCH_DIR) atCleanup(() => fs.rmSync(dir, { recursive: true, force: true }));
const qmpSock = path.join(dir, 'qmp.sock');
const nbdSock = path.join(dir, 'nbd.sock');

/** A fully allocated image (so qcow2 allocation does not dominate the writes). */
function makeImage(format) {
  const img = path.join(dir, `img.${format}`);
  fs.rmSync(img, { force: true });
  fs.rmSync(`${img}.vdisk-bitmaps`, { force: true });
  if (format === 'qcow2') sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'preallocation=full', img, String(SIZE)]);
  else sh('qemu-img', ['create', '-q', '-f', 'raw', '-o', 'preallocation=full', img, String(SIZE)]);
  settle(img);
  return img;
}

async function runOne(format, mode) {
  const img = makeImage(format);
  const args = [path.join(ROOT, 'bin', 'vdisk'), 'serve', '--log-level', 'warn',
    '--blockdev', `driver=${format},node-name=d,file.driver=file,file.filename=${img}`,
    '--nbd-server', `addr.type=unix,addr.path=${nbdSock}`,
    '--export', 'type=nbd,id=e,node-name=d,name=disk,writable=on',
    '--qmp', `unix:${qmpSock}`];
  const proc = await startServer('vdisk', [process.execPath, args], nbdSock);
  const qmp = await qmpConnect(qmpSock);
  try {
    if (mode !== 'none') await qmp.cmd('block-dirty-bitmap-add', { node: 'd', name: 'b', persistent: true, 'x-crash-safe': mode === 'crash-safe' });
    const first = runFio(W, nbdSock, { size: SIZE, runtime: RUNTIME });
    // Every granule touched once (a sequential pass), so what follows is the steady state.
    runFio({ rw: 'write', bs: '1M', iodepth: 8, unit: 'MB/s' }, nbdSock, { size: SIZE, runtime: 4 });
    const steady = runFio(W, nbdSock, { size: SIZE, runtime: RUNTIME });
    return { first, steady };
  } finally {
    qmp.close();
    await stopServer(proc);
  }
}

async function main() {
  const results = {};
  for (let round = 0; round < ROUNDS; round++) {
    for (const format of formats) {
      const order = round % 2 ? [...MODES].reverse() : MODES;
      for (const mode of order) {
        const r = await runOne(format, mode);
        log(`${format} ${mode.padEnd(10)} round ${round + 1}: first pass ${Math.round(r.first)} IOPS, steady ${Math.round(r.steady)} IOPS`);
        const key = `${format}/${mode}`;
        results[key] ??= { first: 0, steady: 0 };
        results[key].first = Math.max(results[key].first, r.first);
        results[key].steady = Math.max(results[key].steady, r.steady);
      }
    }
  }
  saveResults('crash-safe', { rounds: ROUNDS, runtime: RUNTIME }, results);
  console.log(`\n| randwrite 4k qd16, 1 GiB (IOPS) | none | qemu-mode | crash-safe | crash-safe / qemu-mode |`);
  console.log('|---|---|---|---|---|');
  for (const format of formats) {
    for (const phase of ['first', 'steady']) {
      const v = (m) => results[`${format}/${m}`][phase];
      console.log(`| ${format}, ${phase === 'first' ? 'first pass' : 'steady'} | ${Math.round(v('none'))} | ${Math.round(v('qemu-mode'))} | ${Math.round(v('crash-safe'))} | ${(v('crash-safe') / v('qemu-mode')).toFixed(2)} |`);
    }
  }
  console.log(`\nload average at the end: ${os.loadavg().map((x) => x.toFixed(2)).join(' ')} (${os.cpus().length} CPUs)`);
}

main()
  .then(() => cleanup())
  .catch((err) => die(err.stack ?? String(err)));
