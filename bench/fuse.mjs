#!/usr/bin/env node
// FUSE benchmark: vdisk's fuse export against qemu-storage-daemon's, in one run, on the same image.
//
// Each server in turn exports a 1 GiB raw image of random data through FUSE onto a regular file,
// pinned to CPU 1; fio with the psync engine (pinned to CPU 0) reads and writes that file.
// Servers alternate inside every round and the best of the rounds counts (this machine is noisy).
// Before every run the image is synced and read whole, so it starts in the page cache with no
// dirty pages.
//
// Servers:
//   vdisk        vdisk serve --blockdev driver=file --export type=fuse (the FUSE export in the daemon)
//   qsd          qemu-storage-daemon --blockdev driver=file --export type=fuse
//   vdisk-split  the FUSE export in a second vdisk process whose node is an NBD client of the
//                first one (driver=nbd): what serving FUSE from a child process would cost
//
// Environment:
//   BENCH_RUNTIME   seconds per fio run (default 4)
//   BENCH_ROUNDS    rounds per workload (default 2)
//   BENCH_SERVERS   comma list from vdisk,qsd,vdisk-split (default vdisk,qsd)
//   BENCH_WORKLOADS comma list from randread,randwrite,read,write (default all)
//   BENCH_DIR       where to put the image (default a temp dir under /tmp, removed at the end)
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { ROOT, atCleanup, cleanup, die, fioJob, formatValue, log, pick, printTable, requireTools, saveResults, settle, sh } from './lib.mjs';

const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 4);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);
const IMAGE_SIZE = 1024 ** 3;
const SERVER_CPU = '1';
const CLIENT_CPU = '0';

const WORKLOADS = [
  { id: 'randread', label: 'randread 4k psync x2', rw: 'randread', bs: '4k', numjobs: 2, unit: 'IOPS' },
  { id: 'randwrite', label: 'randwrite 4k psync x2', rw: 'randwrite', bs: '4k', numjobs: 2, unit: 'IOPS' },
  { id: 'read', label: 'read 1M psync', rw: 'read', bs: '1M', numjobs: 1, unit: 'MB/s' },
  { id: 'write', label: 'write 1M psync', rw: 'write', bs: '1M', numjobs: 1, unit: 'MB/s' },
];

const VDISK = path.join(ROOT, 'bin', 'vdisk');
const SERVERS = {
  vdisk: (img, mnt) => [[process.execPath, [VDISK, 'serve', '--blockdev', `driver=file,node-name=f0,filename=${img}`,
    '--export', `type=fuse,id=e0,node-name=f0,mountpoint=${mnt},writable=on`, '--log-level', 'warn']]],
  qsd: (img, mnt) => [['qemu-storage-daemon', ['--blockdev', `driver=file,node-name=f0,filename=${img}`,
    '--export', `type=fuse,id=e0,node-name=f0,mountpoint=${mnt},writable=on`]]],
  'vdisk-split': (img, mnt, dir) => {
    const sock = path.join(dir, 'split.sock');
    return [
      [process.execPath, [VDISK, 'serve', '--blockdev', `driver=file,node-name=f0,filename=${img}`,
        '--nbd-server', `addr.type=unix,addr.path=${sock}`, '--export', 'type=nbd,id=n0,node-name=f0,name=disk,writable=on', '--log-level', 'warn'], sock],
      [process.execPath, [VDISK, 'serve', '--blockdev', `driver=nbd,node-name=c0,server.type=unix,server.path=${sock},export=disk`,
        '--export', `type=fuse,id=e0,node-name=c0,mountpoint=${mnt},writable=on`, '--log-level', 'warn']],
    ];
  },
};

function isMounted(mnt) {
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.split(' ')[4] === mnt);
}

const running = new Set();
atCleanup(() => {
  for (const p of running) if (p.exitCode === null) p.kill('SIGKILL');
});

/** Starts the processes of a server (each pinned to the server CPU) and waits for the mount. */
async function start(name, procs, mnt) {
  const started = [];
  for (const [cmd, args, sock] of procs) {
    const p = spawn('taskset', ['-c', SERVER_CPU, cmd, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
    p.stderrText = '';
    p.stderr.on('data', (d) => (p.stderrText += d));
    p.closed = new Promise((r) => p.once('close', r));
    running.add(p);
    started.push(p);
    const deadline = Date.now() + 15000;
    const ready = () => (sock ? fs.existsSync(sock) : isMounted(mnt));
    while (!ready()) {
      if (p.exitCode !== null) {
        await p.closed;
        die(`${name} exited at start: ${p.stderrText}`);
      }
      if (Date.now() > deadline) die(`${name} did not become ready`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return started;
}

async function stop(procs, mnt) {
  for (const p of [...procs].reverse()) {
    if (p.exitCode === null) p.kill('SIGTERM');
    const timer = setTimeout(() => p.kill('SIGKILL'), 10000);
    await p.closed;
    clearTimeout(timer);
    running.delete(p);
  }
  if (isMounted(mnt)) spawnSync('umount', ['-l', mnt]);
}

function runFio(w, file) {
  return fioJob(w, ['--ioengine=psync', `--filename=${file}`, `--numjobs=${w.numjobs}`, '--group_reporting', `--size=${IMAGE_SIZE}`, `--runtime=${RUNTIME}`]);
}

async function main() {
  requireTools(['fio', 'taskset', 'qemu-storage-daemon']);
  if (os.cpus().length < 2) die('needs 2 CPUs (server and fio are pinned apart)');
  const servers = pick(Object.keys(SERVERS), process.env.BENCH_SERVERS ?? 'vdisk,qsd', 'server');
  const workloads = pick(WORKLOADS.map((w) => w.id), process.env.BENCH_WORKLOADS, 'workload').map((id) => WORKLOADS.find((w) => w.id === id));
  const dir = process.env.BENCH_DIR ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-bench-fuse-'));
  if (!process.env.BENCH_DIR) atCleanup(() => fs.rmSync(dir, { recursive: true, force: true }));
  const img = path.join(dir, 'disk.raw');
  const mnt = path.join(dir, 'fuse-mount');
  if (!fs.existsSync(img) || fs.statSync(img).size !== IMAGE_SIZE) {
    log(`creating ${img}`);
    sh('dd', ['if=/dev/urandom', `of=${img}`, 'bs=1M', `count=${IMAGE_SIZE >> 20}`, 'status=none']);
  }
  fs.writeFileSync(mnt, '');
  const results = {};
  for (const w of workloads) {
    results[w.id] = {};
    for (let round = 0; round < ROUNDS; round++) {
      const order = round % 2 ? [...servers].reverse() : servers;
      for (const name of order) {
        settle(img);
        const procs = await start(name, SERVERS[name](img, mnt, dir), mnt);
        let v;
        try {
          v = runFio(w, mnt);
        } catch (err) {
          await stop(procs, mnt);
          die(`${name} ${w.label}: ${err.message}`);
        }
        await stop(procs, mnt);
        log(`${w.label} round ${round + 1} ${name}: ${formatValue(v, w.unit)}`);
        results[w.id][name] = Math.max(results[w.id][name] ?? 0, v);
      }
    }
  }
  saveResults('fuse', { runtime: RUNTIME, rounds: ROUNDS }, results);
  printTable('workload (fio psync on the FUSE file, 1 GiB raw)', workloads, servers, results);
  cleanup();
}

main().catch((err) => die(err.stack ?? String(err)));
