#!/usr/bin/env node
// NBD benchmark: vdisk against qemu-nbd and nbdkit, in one run, on one file.
//
// One 1 GiB raw file full of random data sits in the page cache. Each server
// in turn serves it on a unix socket, pinned to CPU 1, and fio's nbd engine
// (pinned to CPU 0) drives it. Servers alternate inside every round and the
// best of the rounds counts: this machine is noisy, and only a comparison
// made in one run, A/B alternated, means anything.
//
// Environment:
//   BENCH_RUNTIME   seconds per fio run (default 4)
//   BENCH_ROUNDS    rounds per workload (default 2)
//   BENCH_SERVERS   comma list from vdisk,qemu-nbd,nbdkit (default all)
//   BENCH_WORKLOADS comma list from randread,randwrite,read,write (default all)
//   BENCH_DIR       where to put the 1 GiB file (default a temp dir under /tmp)
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 4);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);
const IMAGE_SIZE = 1024 ** 3;
const SERVER_CPU = '1';
const CLIENT_CPU = '0';

/** How each server serves IMG on SOCK as export "disk". */
const SERVERS = {
  vdisk: (img, sock) => [
    process.execPath,
    [
      path.join(ROOT, 'bin', 'vdisk'),
      'serve',
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on',
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--log-level', 'warn',
    ],
  ],
  'qemu-nbd': (img, sock) => ['qemu-nbd', ['-f', 'raw', '--cache=writeback', '-e', '16', '-t', '-x', 'disk', '-k', sock, img]],
  // nbdkit serves one export whatever the name.
  nbdkit: (img, sock) => ['nbdkit', ['-f', '-U', sock, 'file', img]],
};

const WORKLOADS = [
  { id: 'randread', label: 'randread 4k qd16', rw: 'randread', bs: '4k', iodepth: 16, unit: 'IOPS' },
  { id: 'randwrite', label: 'randwrite 4k qd16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS' },
  { id: 'read', label: 'read 1M qd8', rw: 'read', bs: '1M', iodepth: 8, unit: 'MB/s' },
  { id: 'write', label: 'write 1M qd8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MB/s' },
];

function pick(all, envValue, what) {
  if (!envValue) return all;
  const wanted = envValue.split(',').map((s) => s.trim());
  for (const w of wanted) if (!all.includes(w)) die(`${what} '${w}' is not one of ${all.join(', ')}`);
  return all.filter((x) => wanted.includes(x));
}

function die(message) {
  process.stderr.write(`bench: ${message}\n`);
  cleanup();
  process.exit(1);
}

const serverNames = pick(Object.keys(SERVERS), process.env.BENCH_SERVERS, 'server');
const workloads = WORKLOADS.filter((w) => pick(WORKLOADS.map((x) => x.id), process.env.BENCH_WORKLOADS, 'workload').includes(w.id));

for (const tool of ['fio', 'taskset', ...serverNames.filter((s) => s !== 'vdisk')]) {
  if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) die(`${tool} is not installed (bash scripts/setup.sh --bench)`);
}
if (!fs.existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) die("vdisk is not built (npm run build)");

let tempDir;
let current; // the running server process, for cleanup
function cleanup() {
  if (current && current.exitCode === null) current.kill('SIGKILL');
  if (tempDir && !process.env.BENCH_DIR) fs.rmSync(tempDir, { recursive: true, force: true });
}
process.on('SIGINT', () => die('interrupted'));

function sh(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024 });
  if (r.status !== 0) die(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

function socketReady(sock) {
  return new Promise((resolve) => {
    const s = net.connect(sock);
    s.once('connect', () => (s.destroy(), resolve(true)));
    s.once('error', () => resolve(false));
  });
}

async function startServer(name, img, sock) {
  fs.rmSync(sock, { force: true });
  const [cmd, args] = SERVERS[name](img, sock);
  const proc = spawn('taskset', ['-c', SERVER_CPU, cmd, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  proc.stderr.on('data', (d) => (stderr += d));
  current = proc;
  const deadline = Date.now() + 15000;
  while (!(await socketReady(sock))) {
    if (proc.exitCode !== null) die(`${name} exited at start: ${stderr}`);
    if (Date.now() > deadline) die(`${name} did not start listening on ${sock}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return proc;
}

async function stopServer(proc) {
  if (proc.exitCode !== null) return;
  const exited = new Promise((r) => proc.once('exit', r));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 10000);
  await exited;
  clearTimeout(timer);
  current = undefined;
}

function runFio(w, sock) {
  const out = sh('taskset', [
    '-c', CLIENT_CPU, 'fio', '--name=bench', '--ioengine=nbd', `--uri=nbd+unix:///disk?socket=${sock}`,
    `--rw=${w.rw}`, `--bs=${w.bs}`, `--iodepth=${w.iodepth}`, '--numjobs=1', `--size=${IMAGE_SIZE}`,
    '--time_based', `--runtime=${RUNTIME}`, '--output-format=json',
  ]);
  // fio's nbd engine prints a line of its own before the JSON.
  const job = JSON.parse(out.slice(out.indexOf('{'))).jobs[0];
  const io = w.rw.includes('read') ? job.read : job.write;
  if (job.error) die(`fio failed on ${sock}: error ${job.error}`);
  return w.unit === 'IOPS' ? io.iops : io.bw_bytes / 1e6;
}

async function main() {
  tempDir = process.env.BENCH_DIR ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-bench-'));
  const img = path.join(tempDir, 'disk.img');
  if (!fs.existsSync(img) || fs.statSync(img).size !== IMAGE_SIZE) {
    process.stderr.write(`bench: writing ${IMAGE_SIZE} bytes of random data to ${img}\n`);
    sh('dd', ['if=/dev/urandom', `of=${img}`, 'bs=1M', `count=${IMAGE_SIZE / 1024 ** 2}`, 'status=none']);
  }
  const sock = path.join(tempDir, 'nbd.sock');
  const results = {};
  for (const w of workloads) {
    results[w.id] = {};
    for (let round = 0; round < ROUNDS; round++) {
      // Alternate the order so no server always runs right after another's writes.
      const order = round % 2 ? [...serverNames].reverse() : serverNames;
      for (const name of order) {
        // Same starting state for everyone: no dirty pages left over, the image in the page cache.
        sh('sync', []);
        sh('sh', ['-c', `cat '${img}' > /dev/null`]);
        const proc = await startServer(name, img, sock);
        const value = runFio(w, sock);
        await stopServer(proc);
        process.stderr.write(`bench: ${w.label.padEnd(18)} ${name.padEnd(9)} round ${round + 1}: ${format(value, w.unit)}\n`);
        results[w.id][name] = Math.max(results[w.id][name] ?? 0, value);
      }
    }
  }
  printTable(results);
  const outDir = path.join(ROOT, 'bench', 'results');
  fs.mkdirSync(outDir, { recursive: true });
  const file = path.join(outDir, `nbd-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
  fs.writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), runtime: RUNTIME, rounds: ROUNDS, host: os.hostname(), cpus: os.cpus().length, results }, null, 2) + '\n');
  process.stderr.write(`bench: results saved to ${path.relative(ROOT, file)}\n`);
}

function format(v, unit) {
  return unit === 'IOPS' ? `${Math.round(v)} IOPS` : `${v.toFixed(0)} MB/s`;
}

function printTable(results) {
  const others = serverNames.filter((s) => s !== 'vdisk');
  const header = ['workload', ...serverNames, ...(serverNames.includes('vdisk') ? others.map((o) => `vdisk/${o}`) : [])];
  const rows = workloads.map((w) => {
    const r = results[w.id];
    const cells = [`${w.label} (${w.unit})`, ...serverNames.map((s) => (w.unit === 'IOPS' ? Math.round(r[s]).toString() : r[s].toFixed(0)))];
    if (serverNames.includes('vdisk')) for (const o of others) cells.push((r.vdisk / r[o]).toFixed(2));
    return cells;
  });
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((row) => row[i].length)));
  const line = (cells) => '| ' + cells.map((c, i) => c.padEnd(widths[i])).join(' | ') + ' |';
  console.log(line(header));
  console.log('|' + widths.map((n) => '-'.repeat(n + 2)).join('|') + '|');
  for (const row of rows) console.log(line(row));
}

main()
  .then(() => cleanup())
  .catch((err) => die(err.stack ?? String(err)));
