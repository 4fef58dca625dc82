// The machinery of the NBD benchmark (bench/nbd.mjs): running a server pinned to
// one CPU, driving it with fio pinned to the other, printing and saving the
// results. What is benchmarked (servers, formats, workloads) lives in nbd.mjs.
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SERVER_CPU = '1';
const CLIENT_CPU = '0';

let current; // the running server process, for cleanup
const cleanups = [];

/** Runs fn at exit, normal or not. */
export function atCleanup(fn) {
  cleanups.push(fn);
}

export function cleanup() {
  if (current && current.exitCode === null) current.kill('SIGKILL');
  for (const fn of cleanups.splice(0)) fn();
}

export function die(message) {
  process.stderr.write(`bench: ${message}\n`);
  cleanup();
  process.exit(1);
}
process.on('SIGINT', () => die('interrupted'));

export function log(message) {
  process.stderr.write(`bench: ${message}\n`);
}

/** The members of `all` named in the comma list envValue (all of them when unset), in all's order. */
export function pick(all, envValue, what) {
  if (!envValue) return all;
  const wanted = envValue.split(',').map((s) => s.trim());
  for (const w of wanted) if (!all.includes(w)) die(`${what} '${w}' is not one of ${all.join(', ')}`);
  return all.filter((x) => wanted.includes(x));
}

export function requireTools(tools) {
  for (const tool of tools) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) die(`${tool} is not installed (bash scripts/setup.sh --bench)`);
  }
}

export function sh(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) die(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

/** Same starting state for every run: no dirty pages left over, the image in the page cache. */
export function settle(img) {
  sh('sync', []);
  sh('sh', ['-c', `cat '${img}' > /dev/null`]);
}

function socketReady(sock) {
  return new Promise((resolve) => {
    const s = net.connect(sock);
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
}

/** Starts [cmd, args] pinned to the server CPU and waits until it listens on sock. */
export async function startServer(name, [cmd, args], sock) {
  fs.rmSync(sock, { force: true });
  const proc = spawn('taskset', ['-c', SERVER_CPU, cmd, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  proc.stderrText = '';
  proc.stderr.on('data', (d) => (proc.stderrText += d));
  // 'close', not 'exit': by then all of stderr has been read.
  proc.closed = new Promise((r) => proc.once('close', r));
  current = proc;
  const deadline = Date.now() + 15000;
  while (!(await socketReady(sock))) {
    if (proc.exitCode !== null) {
      await proc.closed;
      die(`${name} exited at start: ${proc.stderrText}`);
    }
    if (Date.now() > deadline) die(`${name} did not start listening on ${sock}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return proc;
}

/** Stops the server; returns false when it had already exited by itself (crashed). */
export async function stopServer(proc) {
  current = undefined;
  const wasRunning = proc.exitCode === null && proc.signalCode === null;
  if (wasRunning) proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 10000);
  await proc.closed;
  clearTimeout(timer);
  return wasRunning;
}

/**
 * Runs workload w for `runtime` seconds against export "disk" on sock, fio
 * pinned to the client CPU; returns IOPS or MB/s (w.unit). Throws when fio fails.
 */
export function runFio(w, sock, { size, runtime }) {
  return fioJob(w, ['--ioengine=nbd', `--uri=nbd+unix:///disk?socket=${sock}`, `--iodepth=${w.iodepth}`, '--numjobs=1', `--size=${size}`, `--runtime=${runtime}`]);
}

/**
 * Runs one fio job pinned to the client CPU with the given engine arguments
 * and returns the workload's figure (IOPS or MB/s, as w.unit says).
 */
export function fioJob(w, engineArgs) {
  const args = ['-c', CLIENT_CPU, 'fio', '--name=bench', `--rw=${w.rw}`, `--bs=${w.bs}`, ...engineArgs, '--time_based', '--output-format=json'];
  const r = spawnSync('taskset', args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`fio failed (exit ${r.status}): ${r.stderr}${r.stdout}`);
  // fio's nbd engine prints a line of its own before the JSON.
  const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
  if (job.error) throw new Error(`fio failed: error ${job.error}: ${r.stderr}`);
  const io = w.rw.includes('read') ? job.read : job.write;
  return w.unit === 'IOPS' ? io.iops : io.bw_bytes / 1e6;
}

/** A seeded PRNG (mulberry32), so every run and every server sees the same "random" choices. */
export function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = Math.imul(a ^ (a >>> 15), a | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

export function formatValue(v, unit) {
  return unit === 'IOPS' ? `${Math.round(v)} IOPS` : `${v.toFixed(0)} MB/s`;
}

/**
 * Prints one table: a row per workload, a column per server, then vdisk's
 * ratio to each other server. title names the first column.
 */
export function printTable(title, workloads, serverNames, results) {
  const others = serverNames.filter((s) => s !== 'vdisk');
  const withRatios = serverNames.includes('vdisk');
  const header = [title, ...serverNames, ...(withRatios ? others.map((o) => `vdisk/${o}`) : [])];
  const rows = workloads.map((w) => {
    const r = results[w.id];
    const cells = [`${w.label} (${w.unit})`, ...serverNames.map((s) => (w.unit === 'IOPS' ? Math.round(r[s]).toString() : r[s].toFixed(0)))];
    if (withRatios) for (const o of others) cells.push((r.vdisk / r[o]).toFixed(2));
    return cells;
  });
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells) => '| ' + cells.map((c, i) => c.padEnd(widths[i])).join(' | ') + ' |';
  console.log(line(header));
  console.log('|' + widths.map((n) => '-'.repeat(n + 2)).join('|') + '|');
  for (const row of rows) console.log(line(row));
}

/** Writes bench/results/<prefix>-<date>.json: the date, fields, the host, then results. */
export function saveResults(prefix, fields, results) {
  const outDir = path.join(ROOT, 'bench', 'results');
  fs.mkdirSync(outDir, { recursive: true });
  const date = new Date().toISOString();
  const file = path.join(outDir, `${prefix}-${date.replace(/[:.]/g, '-')}.json`);
  const doc = { date, ...fields, host: os.hostname(), cpus: os.cpus().length, results };
  fs.writeFileSync(file, JSON.stringify(doc, null, 2) + '\n');
  log(`results saved to ${path.relative(ROOT, file)}`);
}

/**
 * A minimal QMP client on the unix socket sock: reads the greeting, sends
 * qmp_capabilities. Returns { cmd(execute, args) -> Promise<return value>
 * (rejects with the error's class and desc), waitEvent(name, pred) ->
 * Promise<event> (also finds events already received), close() }.
 */
export async function qmpConnect(sock) {
  const s = net.connect(sock);
  await new Promise((resolve, reject) => {
    s.once('connect', resolve);
    s.once('error', reject);
  });
  s.setEncoding('utf8');
  let buf = '';
  let greeted;
  const greeting = new Promise((r) => (greeted = r));
  const pending = []; // replies arrive in command order
  const events = [];
  const waiters = [];
  let failed;
  const fail = (err) => {
    failed = err;
    for (const p of pending.splice(0)) p.reject(err);
    for (const w of waiters.splice(0)) w.reject(err);
  };
  s.on('error', fail);
  s.on('close', () => fail(new Error('QMP connection closed')));
  s.on('data', (d) => {
    buf += d;
    let nl;
    while ((nl = buf.indexOf('\n')) >= 0) {
      const line = buf.slice(0, nl).replace(/\r$/, '');
      buf = buf.slice(nl + 1);
      if (!line.trim()) continue;
      const msg = JSON.parse(line);
      if (msg.QMP) greeted(msg);
      else if (msg.event) {
        const i = waiters.findIndex((w) => w.name === msg.event && w.pred(msg));
        if (i >= 0) waiters.splice(i, 1)[0].resolve(msg);
        else events.push(msg);
      } else if ('return' in msg || msg.error) {
        const p = pending.shift();
        if (!p) continue;
        if (msg.error) p.reject(new Error(`${p.execute}: ${msg.error.class}: ${msg.error.desc}`));
        else p.resolve(msg.return);
      }
    }
  });
  const cmd = (execute, args) =>
    new Promise((resolve, reject) => {
      if (failed) return reject(failed);
      pending.push({ execute, resolve, reject });
      s.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    });
  const waitEvent = (name, pred = () => true) => {
    const i = events.findIndex((e) => e.event === name && pred(e));
    if (i >= 0) return Promise.resolve(events.splice(i, 1)[0]);
    if (failed) return Promise.reject(failed);
    return new Promise((resolve, reject) => waiters.push({ name, pred, resolve, reject }));
  };
  await greeting;
  await cmd('qmp_capabilities');
  return { cmd, waitEvent, close: () => s.destroy() };
}

/**
 * Starts fio's workload w (time-based, `runtime` seconds at most) against export
 * "disk" on sock in the background, pinned to the client CPU, logging IOPS every
 * logMs into logPrefix_iops.1.log. Returns { stop() -> Promise<{ job, log }> }:
 * stop() interrupts fio (SIGINT) and resolves with fio's JSON job and the log
 * samples as [{ t: epoch ms, iops }]. Throws from stop() when fio failed.
 */
export function startFio(w, sock, { size, runtime, logPrefix, logMs = 200 }) {
  const args = [
    '-c', CLIENT_CPU, 'fio', '--name=bench', '--ioengine=nbd', `--uri=nbd+unix:///disk?socket=${sock}`,
    `--rw=${w.rw}`, `--bs=${w.bs}`, `--iodepth=${w.iodepth}`, '--numjobs=1', `--size=${size}`,
    '--time_based', `--runtime=${runtime}`, '--output-format=json',
    `--write_iops_log=${logPrefix}`, `--log_avg_msec=${logMs}`, '--log_unix_epoch=1',
  ];
  const proc = spawn('taskset', args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  proc.stdout.on('data', (d) => (out += d));
  proc.stderr.on('data', (d) => (err += d));
  const closed = new Promise((r) => proc.once('close', (code) => r(code)));
  atCleanup(() => proc.exitCode === null && proc.kill('SIGKILL'));
  return {
    proc,
    async stop() {
      if (proc.exitCode === null) proc.kill('SIGINT');
      const code = await closed;
      const at = out.indexOf('{');
      if (at < 0) throw new Error(`fio failed (exit ${code}): ${err}${out}`);
      const job = JSON.parse(out.slice(at)).jobs[0];
      if (job.error) throw new Error(`fio failed: error ${job.error}: ${err}`);
      const logFile = `${logPrefix}_iops.1.log`;
      const samples = fs.existsSync(logFile)
        ? fs.readFileSync(logFile, 'utf8').trim().split('\n').filter(Boolean).map((l) => {
          const [t, v] = l.split(',').map((x) => Number(x.trim()));
          return { t, iops: v };
        })
        : [];
      return { job, samples };
    },
  };
}
