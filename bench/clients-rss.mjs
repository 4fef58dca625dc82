#!/usr/bin/env node
// Memory with many busy clients: 64 fio nbd-engine jobs (64 connections),
// each keeping 64 requests of 1 MiB in flight (the per-connection cap: 64 MiB,
// so 4 GiB in flight if nothing else bounded it), writing then reading a
// 1 GiB raw image. The server's RSS is sampled from /proc/PID/status every
// 100 ms. Then a slow-reader scenario: 16 clients each send 100 000 READs of
// 1 MiB and never read a reply; the RSS once they have stalled is what a
// client that does not read can make the server hold.
//
// Servers: vdisk (default 256 MiB buffer budget), vdisk with x-buffer-limit=0
// (per-connection caps only, for comparison), qemu-nbd and qemu-storage-daemon.
// The server is pinned to CPU 1, fio to CPU 0, as in bench/nbd.mjs.
//
// Environment:
//   BENCH_RUNTIME   seconds per fio phase (default 6)
//   BENCH_SERVERS   comma list from vdisk,vdisk-nobudget,qemu-nbd,qsd (default all)
//   BENCH_DIR       where to put the image (default a temp dir under /tmp, removed at the end)
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { ROOT, atCleanup, cleanup, die, log, pick, requireTools, saveResults, sh, startServer } from './lib.mjs';

const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 6);
const IMAGE_SIZE = 1024 ** 3;
const CLIENTS = 64;
const IODEPTH = 64;
const SLOW_CLIENTS = 16;
const SLOW_REQUESTS = 100_000;
const MiB = 1024 * 1024;

const vdisk = (extra) => (img, sock) => [
  process.execPath,
  [
    path.join(ROOT, 'bin', 'vdisk'), 'serve',
    '--blockdev', `driver=file,node-name=f0,filename=${img}`,
    // 64 fio threads sharing one busy CPU can take longer than the default 10 s to finish
    // their handshakes (one run had a connection reset at fio's start, most likely this); qemu-nbd
    // 7.2 has no such limit.
    '--nbd-server', `addr.type=unix,addr.path=${sock},handshake-timeout=60${extra}`,
    '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on',
    '--log-level', 'warn',
  ],
];
const SERVERS = {
  vdisk: vdisk(''),
  'vdisk-nobudget': vdisk(',x-buffer-limit=0'),
  'qemu-nbd': (img, sock) => ['qemu-nbd', ['-f', 'raw', '--cache=writeback', '-e', String(CLIENTS + SLOW_CLIENTS + 4), '-t', '-x', 'disk', '-k', sock, img]],
  qsd: (img, sock) => [
    'qemu-storage-daemon',
    [
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on',
    ],
  ],
};

function rssKiB(pid) {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, 'utf8');
    return { rss: Number(/VmRSS:\s+(\d+)/.exec(status)[1]), hwm: Number(/VmHWM:\s+(\d+)/.exec(status)[1]) };
  } catch {
    return undefined;
  }
}

/** Samples the RSS of pid every 100 ms until stop() is called; returns the samples in KiB. */
function sampler(pid) {
  const samples = [];
  const timer = setInterval(() => {
    const r = rssKiB(pid);
    if (r) samples.push(r.rss);
  }, 100);
  return () => (clearInterval(timer), samples);
}

/** 64 fio nbd jobs, IODEPTH 1 MiB requests each; resolves with MB/s summed over jobs. */
function fio(rw, sock) {
  return new Promise((resolve, reject) => {
    const args = [
      '-c', '0', 'fio', '--name=clients', '--ioengine=nbd', `--uri=nbd+unix:///disk?socket=${sock}`, `--rw=${rw}`, '--bs=1M',
      `--iodepth=${IODEPTH}`, `--numjobs=${CLIENTS}`, '--thread', `--size=${IMAGE_SIZE}`, '--time_based', `--runtime=${RUNTIME}`,
      '--group_reporting', '--output-format=json',
    ];
    const proc = spawn('taskset', args, { stdio: ['ignore', 'pipe', 'pipe'] });
    atCleanup(() => proc.exitCode === null && proc.kill('SIGKILL'));
    let out = '';
    let err = '';
    proc.stdout.on('data', (d) => (out += d));
    proc.stderr.on('data', (d) => (err += d));
    proc.on('close', (code) => {
      const at = out.indexOf('{');
      if (code !== 0 || at < 0) return reject(new Error(`fio ${rw} failed (exit ${code}): ${err}${out.slice(-2000)}`));
      const job = JSON.parse(out.slice(at)).jobs[0];
      const io = rw.includes('read') ? job.read : job.write;
      resolve(io.bw_bytes / 1e6);
    });
  });
}

/** A client that completes the handshake (OPT_GO "disk"), sends `count` 1 MiB READs and never reads a reply. */
function slowReader(sock, count) {
  return new Promise((resolve, reject) => {
    const s = net.connect(sock);
    let buf = Buffer.alloc(0);
    let stage = 0;
    s.on('error', reject);
    const onData = (d) => {
      buf = Buffer.concat([buf, d]);
      if (stage === 0 && buf.length >= 18) {
        buf = buf.subarray(18);
        stage = 1;
        const flags = Buffer.alloc(4);
        flags.writeUInt32BE(3); // fixed newstyle, no zeroes
        const name = Buffer.from('disk');
        const opt = Buffer.alloc(16 + 4 + name.length + 2);
        opt.writeBigUInt64BE(0x49484156454f5054n, 0);
        opt.writeUInt32BE(7, 8); // NBD_OPT_GO
        opt.writeUInt32BE(4 + name.length + 2, 12);
        opt.writeUInt32BE(name.length, 16);
        name.copy(opt, 20);
        s.write(Buffer.concat([flags, opt]));
      }
      // Option replies until the ACK (type 1).
      while (stage === 1 && buf.length >= 20) {
        const len = buf.readUInt32BE(16);
        if (buf.length < 20 + len) return;
        const type = buf.readUInt32BE(12);
        buf = buf.subarray(20 + len);
        if (type === 1) {
          stage = 2;
          s.removeListener('data', onData);
          s.pause();
          const req = Buffer.alloc(28 * count);
          for (let i = 0; i < count; i++) {
            req.writeUInt32BE(0x25609513, 28 * i);
            req.writeUInt32BE(i, 28 * i + 12);
            req.writeUInt32BE(((i * MiB) % IMAGE_SIZE) >>> 0, 28 * i + 20);
            req.writeUInt32BE(MiB, 28 * i + 24);
          }
          s.write(req);
          resolve(s);
        } else if (type >= 2 ** 31) {
          reject(new Error(`OPT_GO refused: ${type}`));
        }
      }
    };
    s.on('data', onData);
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const MB = (kib) => (kib / 1024).toFixed(0);

async function stopProc(proc) {
  if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 3000);
  await proc.closed;
  clearTimeout(timer);
}

async function main() {
  requireTools(['fio', 'taskset', 'qemu-nbd', 'qemu-storage-daemon']);
  const servers = pick(Object.keys(SERVERS), process.env.BENCH_SERVERS, 'server');
  const dir = process.env.BENCH_DIR ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-bench-rss-'));
  if (!process.env.BENCH_DIR) atCleanup(() => fs.rmSync(dir, { recursive: true, force: true }));
  const img = path.join(dir, 'disk.img');
  const sock = path.join(dir, 'nbd.sock');
  // Allocated, so writes land in place and every server sees the same file.
  sh('fallocate', ['-l', String(IMAGE_SIZE), img]);
  const results = {};
  for (const name of servers) {
    const proc = await startServer(name, SERVERS[name](img, sock), sock);
    const idle = rssKiB(proc.pid).rss;
    const r = { idle };
    for (const rw of ['randwrite', 'randread']) {
      const stop = sampler(proc.pid);
      r[rw] = await fio(rw, sock).catch((e) => die(`${name}: ${e.message.slice(0, 600)}\n${name}'s stderr:\n${proc.stderrText.slice(-3000)}`));
      const samples = stop();
      // Steady: the median of the second half of the run, once every client is busy.
      const half = samples.slice(Math.floor(samples.length / 2)).sort((a, b) => a - b);
      r[`${rw}-peak`] = Math.max(...samples);
      r[`${rw}-steady`] = half[Math.floor(half.length / 2)];
      log(`${name} ${rw}: ${r[rw].toFixed(0)} MB/s, RSS peak ${MB(r[`${rw}-peak`])} MiB, steady ${MB(r[`${rw}-steady`])} MiB`);
    }
    // Slow readers: connect, flood with READs, never read; RSS once nothing moves any more.
    const clients = [];
    for (let i = 0; i < SLOW_CLIENTS; i++) clients.push(await slowReader(sock, SLOW_REQUESTS));
    const stop = sampler(proc.pid);
    await sleep(6000);
    const samples = stop();
    r['slow-peak'] = Math.max(...samples);
    r['slow-end'] = samples[samples.length - 1];
    r.hwm = rssKiB(proc.pid).hwm;
    log(`${name} slow readers: RSS peak ${MB(r['slow-peak'])} MiB, after 6 s ${MB(r['slow-end'])} MiB`);
    for (const c of clients) c.destroy();
    await stopProc(proc);
    results[name] = r;
  }
  const header = ['server', 'idle RSS', 'randwrite MB/s', 'RSS peak/steady', 'randread MB/s', 'RSS peak/steady', `${SLOW_CLIENTS} slow readers RSS peak`, 'VmHWM'];
  const rows = servers.map((s) => {
    const r = results[s];
    return [
      s, `${MB(r.idle)} MiB`,
      r.randwrite.toFixed(0), `${MB(r['randwrite-peak'])} / ${MB(r['randwrite-steady'])} MiB`,
      r.randread.toFixed(0), `${MB(r['randread-peak'])} / ${MB(r['randread-steady'])} MiB`,
      `${MB(r['slow-peak'])} MiB`, `${MB(r.hwm)} MiB`,
    ];
  });
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells) => '| ' + cells.map((c, i) => c.padEnd(widths[i])).join(' | ') + ' |';
  console.log(`${CLIENTS} clients x ${IODEPTH} x 1 MiB in flight, ${RUNTIME} s per phase; ${SLOW_CLIENTS} slow readers x ${SLOW_REQUESTS} READs of 1 MiB`);
  console.log(line(header));
  console.log('|' + widths.map((n) => '-'.repeat(n + 2)).join('|') + '|');
  for (const row of rows) console.log(line(row));
  saveResults('clients-rss', { runtime: RUNTIME, clients: CLIENTS, iodepth: IODEPTH, slowClients: SLOW_CLIENTS }, results);
  cleanup();
}

main().catch((err) => die(err.stack ?? String(err)));
