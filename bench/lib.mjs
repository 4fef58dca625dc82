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
  const args = [
    '-c', CLIENT_CPU, 'fio', '--name=bench', '--ioengine=nbd', `--uri=nbd+unix:///disk?socket=${sock}`,
    `--rw=${w.rw}`, `--bs=${w.bs}`, `--iodepth=${w.iodepth}`, '--numjobs=1', `--size=${size}`,
    '--time_based', `--runtime=${runtime}`, '--output-format=json',
  ];
  const r = spawnSync('taskset', args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) throw new Error(`fio failed (exit ${r.status}): ${r.stderr}${r.stdout}`);
  // fio's nbd engine prints a line of its own before the JSON.
  const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
  if (job.error) throw new Error(`fio failed: error ${job.error}: ${r.stderr}`);
  const io = w.rw.includes('read') ? job.read : job.write;
  return w.unit === 'IOPS' ? io.iops : io.bw_bytes / 1e6;
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
