#!/usr/bin/env node
// Where a backup job's time goes, in-process (no QMP, no second server): the
// incremental case of bench/backup.mjs (a 4 GiB qcow2 source, 5% of its 64 KiB
// clusters dirty at the same places, sync=incremental into a qcow2 overlay of
// an empty 4 GiB image) or the full one (1 GiB of random data into a new
// qcow2), run through runTransaction on the built code (dist/, npm run build).
// Each round is one job, timed in phases: prepare (the transaction), copy
// (until the last flush of the target starts; it includes waiting for a flush
// started during the copy), the final flush before BLOCK_JOB_COMPLETED, and
// the rest; plus GC time and how many flushes ran during the copy. The first
// round runs on cold code (as the benchmark's fresh daemon does), later ones
// on code the JIT has compiled. Every target is checked with qemu-img compare.
//
//   taskset -c 1 node bench/backup-phases.mjs [incremental|full] [rounds]
//
// (bench/backup.mjs pins the servers to CPU 1; pin this too to compare.)
//
// Environment:
//   PHASES_MICRO=1                   also time single operations (block status, reads, writes)
//   PHASES_PROFILE=file.cpuprofile   write a V8 CPU profile of the last round's job (main thread only)
//   PHASES_PERF_CTL=ctl,ack          perf's control fifos, so perf samples only the jobs:
//     mkfifo /tmp/ctl /tmp/ack; PHASES_PERF_CTL=/tmp/ctl,/tmp/ack perf record -D -1 \
//       --control=fifo:/tmp/ctl,/tmp/ack -g -- node --perf-basic-prof bench/backup-phases.mjs
//   PHASES_PERF_ROUND=n              with PHASES_PERF_CTL: only round n (from 1) is sampled
//   PHASES_MARK=1                    print "=== job start" / "=== job end" (to cut --trace-opt output)
//   PHASES_SETUP=qemu-io             dirty the source with qemu-io (a persistent bitmap vdisk loads)
//                                    instead of through vdisk in this process, as the benchmark's
//                                    daemon does (over NBD): the job then runs on the coldest code
//   PHASES_ROOT                      measure the build in this directory (its dist/) instead
//   PHASES_DIR                       where to put the images (default a temp dir, removed at the end)
process.env.UV_THREADPOOL_SIZE ??= '16';
const { spawnSync } = await import('node:child_process');
const fs = await import('node:fs');
const os = await import('node:os');
const path = await import('node:path');
const { performance, PerformanceObserver } = await import('node:perf_hooks');
const { ROOT, rng } = await import('./lib.mjs');

const dist = (m) => import(path.join(process.env.PHASES_ROOT ?? ROOT, 'dist', m));
const { Daemon } = await dist('daemon.js');
const { runTransaction } = await dist('backup/transaction.js');
const { setLogLevel } = await dist('log.js');
const { addBitmap } = await dist('block/bitmap-ops.js');
setLogLevel('warn');

const mode = process.argv[2] ?? 'incremental';
const rounds = Number(process.argv[3] ?? 3);
const GiB = 1024 ** 3;
const CLUSTER = 65536;
const dir = process.env.PHASES_DIR ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-phases-'));
const p = (n) => path.join(dir, n);

function sh(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}`);
  return r.stdout;
}

/** The same clusters bench/backup.mjs dirties (same seed, same order). */
function dirtyClusters(size) {
  const n = size / CLUSTER;
  const want = Math.round(n * 0.05);
  const random = rng(42);
  const chosen = new Set();
  while (chosen.size < want) chosen.add(Math.floor(random() * n));
  return [...chosen];
}

/**
 * With PHASES_PERF_CTL=fifo,ackfifo, tells `perf record --control=fifo:fifo,ackfifo -D -1` to
 * sample only while a job runs.
 */
function perfControl(cmd) {
  const ctl = process.env.PHASES_PERF_CTL;
  if (!ctl || (process.env.PHASES_PERF_ROUND && Number(process.env.PHASES_PERF_ROUND) !== currentRound)) return;
  const [fifo, ack] = ctl.split(',');
  perfFds ??= { ctl: fs.openSync(fifo, 'w'), ack: ack ? fs.openSync(ack, 'r') : undefined };
  fs.writeSync(perfFds.ctl, `${cmd}\n`);
  if (perfFds.ack !== undefined) fs.readSync(perfFds.ack, Buffer.alloc(5));
}
let perfFds;

let gcMs = 0;
new PerformanceObserver((l) => {
  for (const e of l.getEntries()) gcMs += e.duration;
}).observe({ entryTypes: ['gc'] });

/** Times phases of the next backup job on daemon: wraps the target's flush. */
async function timedJob(daemon, args) {
  const t = { start: performance.now() };
  const done = new Promise((resolve, reject) => {
    daemon.on('event', (e) => {
      if (e.event === 'BLOCK_JOB_COMPLETED') {
        t.completed = performance.now();
        if (e.data.error) reject(new Error(e.data.error));
        else resolve(e);
      }
    });
  });
  // The target node is made by the job's prepare: catch its flush through the prototype.
  const { Qcow2Node } = await dist('block/drivers/qcow2/qcow2.js');
  const proto = Qcow2Node.prototype;
  const origFlush = proto.flush;
  // Every flush of the target; the last one is the flush before BLOCK_JOB_COMPLETED.
  t.flushes = [];
  proto.flush = async function (...a) {
    if (this.filename === args.target && t.completed === undefined) {
      const f = { start: performance.now() };
      t.flushes.push(f);
      try {
        return await origFlush.apply(this, a);
      } finally {
        f.end = performance.now();
      }
    }
    return origFlush.apply(this, a);
  };
  const gc0 = gcMs;
  perfControl('enable');
  if (process.env.PHASES_MARK) console.log('=== job start');
  try {
    await runTransaction(daemon, [{ type: 'drive-backup', data: args }], 'individual');
    t.started = performance.now();
    await done;
  } finally {
    perfControl('disable');
    if (process.env.PHASES_MARK) console.log('=== job end');
    proto.flush = origFlush;
  }
  const last = t.flushes.at(-1);
  return {
    total: t.completed - t.start,
    prepare: t.started - t.start,
    copy: (last?.start ?? t.completed) - t.started,
    flush: last ? last.end - last.start : 0,
    afterFlush: last ? t.completed - last.end : 0,
    earlierFlushes: t.flushes.length - 1,
    gc: gcMs - gc0,
  };
}

async function incrementalRound(round, profile) {
  const src = p('incr-src.qcow2');
  const base = p('empty4g.qcow2');
  const target = p('incr-target.qcow2');
  for (const f of [src, base, target]) fs.rmSync(f, { force: true });
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(4 * GiB)]);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(4 * GiB)]);
  const clusters = dirtyClusters(4 * GiB);
  const byQemuIo = process.env.PHASES_SETUP === 'qemu-io';
  if (byQemuIo) {
    // Written by qemu-io, marking a persistent bitmap that vdisk loads: the process runs the job
    // and nothing else (its code is as cold as it gets).
    sh('qemu-img', ['bitmap', '--add', '-g', String(CLUSTER), src, 'b0']);
    for (let i = 0; i < clusters.length; i += 1000) {
      const cmds = clusters.slice(i, i + 1000).flatMap((c) => ['-c', `aio_write -q -P 0x55 ${c * CLUSTER} 64k`]);
      sh('qemu-io', ['-f', 'qcow2', ...cmds, '-c', 'aio_flush', src]);
    }
  }
  const daemon = new Daemon();
  const node = await daemon.blockdevAdd({ driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
  if (!byQemuIo) {
    // As the benchmark's daemon: the writes go through vdisk (qemu-io over NBD there), several in
    // flight, in the same order.
    addBitmap(daemon.graph, 'src', 'b0', { granularity: CLUSTER });
    const data = Buffer.alloc(CLUSTER, 0x55);
    for (let i = 0; i < clusters.length; i += 16) await Promise.all(clusters.slice(i, i + 16).map((c) => node.write(c * CLUSTER, data)));
    await node.flush();
  }
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', target, String(4 * GiB)]);
  sh('sync', []);
  const session = profile ? await startProfile() : undefined;
  const r = await timedJob(daemon, { 'job-id': 'bk', device: 'src', sync: 'incremental', bitmap: 'b0', format: 'qcow2', target, mode: 'existing' });
  if (session) await stopProfile(session, profile);
  await daemon.shutdown();
  sh('qemu-img', ['compare', '-q', src, target]);
  return r;
}

async function fullRound(round, profile) {
  const src = p('full-src.qcow2');
  const target = p('full-target.qcow2');
  if (!fs.existsSync(src)) {
    sh('sh', ['-c', `head -c ${GiB} /dev/urandom > '${p('src.raw')}'`]);
    sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', p('src.raw'), src]);
    fs.rmSync(p('src.raw'));
  }
  fs.rmSync(target, { force: true });
  sh('sync', []);
  sh('sh', ['-c', `cat '${src}' > /dev/null`]);
  const daemon = new Daemon();
  await daemon.blockdevAdd({ driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
  const session = profile ? await startProfile() : undefined;
  const r = await timedJob(daemon, { 'job-id': 'bk', device: 'src', sync: 'full', format: 'qcow2', target, mode: 'absolute-paths' });
  if (session) await stopProfile(session, profile);
  await daemon.shutdown();
  sh('qemu-img', ['compare', '-q', src, target]);
  fs.rmSync(target);
  return r;
}

async function startProfile() {
  const { Session } = await import('node:inspector');
  const s = new Session();
  s.connect();
  const post = (m, a) => new Promise((res, rej) => s.post(m, a, (e, r) => (e ? rej(e) : res(r))));
  await post('Profiler.enable');
  await post('Profiler.setSamplingInterval', { interval: 200 });
  await post('Profiler.start');
  return { s, post };
}

async function stopProfile({ s, post }, file) {
  const { profile } = await post('Profiler.stop');
  fs.writeFileSync(file, JSON.stringify(profile));
  s.disconnect();
  // Self time by function, top 25.
  const self = new Map();
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const dt = profile.timeDeltas;
  for (let i = 0; i < profile.samples.length; i++) {
    const n = byId.get(profile.samples[i]);
    const cf = n.callFrame;
    const key = `${cf.functionName || '(anon)'} ${path.basename(cf.url)}:${cf.lineNumber + 1}`;
    self.set(key, (self.get(key) ?? 0) + (dt[i] ?? 0) / 1000);
  }
  const total = [...self.values()].reduce((a, b) => a + b, 0);
  console.log(`profile (${file}), self time, ms of ${total.toFixed(0)}:`);
  for (const [k, v] of [...self].sort((a, b) => b[1] - a[1]).slice(0, 25)) console.log(`  ${v.toFixed(1).padStart(8)}  ${k}`);
}

/** Single-operation costs on the incremental images: block status, 64 KiB reads, allocating 64 KiB writes. */
async function micro() {
  const src = p('m-src.qcow2');
  const base = p('m-base.qcow2');
  const target = p('m-target.qcow2');
  for (const f of [src, base, target]) fs.rmSync(f, { force: true });
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', src, String(4 * GiB)]);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', base, String(4 * GiB)]);
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', base, '-F', 'qcow2', target, String(4 * GiB)]);
  const daemon = new Daemon();
  const s = await daemon.blockdevAdd({ driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: src } });
  const clusters = dirtyClusters(4 * GiB);
  const data = Buffer.alloc(CLUSTER, 0x55);
  for (let i = 0; i < clusters.length; i += 16) await Promise.all(clusters.slice(i, i + 16).map((c) => s.write(c * CLUSTER, data)));
  await s.flush();
  const tg = await daemon.blockdevAdd({ driver: 'qcow2', 'node-name': 'tg', file: { driver: 'file', filename: target } });
  const sorted = [...clusters].sort((a, b) => a - b);
  const time = async (what, fn, conc = 1) => {
    const t0 = performance.now();
    for (let i = 0; i < sorted.length; i += conc) await Promise.all(sorted.slice(i, i + conc).map(fn));
    const ms = performance.now() - t0;
    console.log(`  ${what.padEnd(44)} ${ms.toFixed(0).padStart(5)} ms  ${((ms * 1000) / sorted.length).toFixed(1).padStart(6)} us/cluster`);
  };
  console.log(`single operations, ${sorted.length} clusters in ascending order:`);
  await time('source block status', (c) => s.blockStatus(c * CLUSTER, CLUSTER));
  const one = Buffer.allocUnsafe(CLUSTER);
  await time('source read 64 KiB into one buffer', (c) => s.read(c * CLUSTER, one));
  await time('source read 64 KiB into a fresh buffer each', (c) => s.read(c * CLUSTER, Buffer.allocUnsafe(CLUSTER)));
  await time('source read 64 KiB into one buffer, again', (c) => s.read(c * CLUSTER, one));
  const eight = Array.from({ length: 8 }, () => Buffer.allocUnsafe(CLUSTER));
  await time('source read 64 KiB, 8 at once, 8 buffers', (c) => s.read(c * CLUSTER, eight[c % 8]), 8);
  await time('target allocating write 64 KiB, 8 at once', (c) => tg.write(c * CLUSTER, data), 8);
  await time('target rewrite in place 64 KiB, 8 at once', (c) => tg.write(c * CLUSTER, data), 8);
  let t0 = performance.now();
  await tg.flush();
  console.log(`  ${'target flush'.padEnd(44)} ${(performance.now() - t0).toFixed(0).padStart(5)} ms`);
  t0 = performance.now();
  await tg.flush();
  console.log(`  ${'target flush again (nothing to do)'.padEnd(44)} ${(performance.now() - t0).toFixed(0).padStart(5)} ms`);
  await daemon.shutdown();
  for (const f of [src, base, target]) fs.rmSync(f, { force: true });
}

const results = [];
console.log(`${mode}, ${rounds} rounds, load average ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`);
if (mode !== 'incremental' && mode !== 'full') throw new Error(`unknown case '${mode}' (incremental or full)`);
let currentRound = 0;
for (let r = 0; r < rounds; r++) {
  currentRound = r + 1;
  const profile = r === rounds - 1 ? process.env.PHASES_PROFILE : undefined;
  const res = mode === 'full' ? await fullRound(r, profile) : await incrementalRound(r, profile);
  results.push(res);
  console.log(
    `round ${r + 1}: total ${res.total.toFixed(0)} ms = prepare ${res.prepare.toFixed(0)} + copy ${res.copy.toFixed(0)} + flush ${res.flush.toFixed(0)} + after ${res.afterFlush.toFixed(0)}; GC ${res.gc.toFixed(0)} ms; ${res.earlierFlushes} flushes during the copy`,
  );
}
if (results.length > 1) {
  const later = results.slice(1).map((r) => r.total).sort((a, b) => a - b);
  console.log(`first job ${results[0].total.toFixed(0)} ms; later jobs median ${later[Math.floor((later.length - 1) / 2)].toFixed(0)} ms`);
}
if (process.env.PHASES_MICRO) await micro();
if (!process.env.PHASES_DIR) fs.rmSync(dir, { recursive: true, force: true });
console.log(`load average at the end: ${os.loadavg().map((x) => x.toFixed(2)).join(' ')}`);
