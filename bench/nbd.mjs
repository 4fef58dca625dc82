#!/usr/bin/env node
// NBD benchmark: vdisk against qemu-nbd and nbdkit, in one run, on the same images.
//
// Each server in turn serves a 1 GiB image on a unix socket, pinned to CPU 1,
// and fio's nbd engine (pinned to CPU 0) drives it. Servers alternate inside
// every round and the best of the rounds counts: this machine is noisy, and
// only a comparison made in one run, A/B alternated, means anything. Before
// every run the image is synced and read whole, so it starts in the page cache
// with no dirty pages.
//
// Formats:
//   raw    one file of random data, served by vdisk (driver=file), qemu-nbd -f raw
//          and nbdkit file. Writes land in place in allocated blocks, so every
//          server runs on the same file.
//   qcow2  the same data converted to a fully allocated qcow2 image (64 KiB
//          clusters), served by vdisk (driver=qcow2 over driver=file) and
//          qemu-nbd -f qcow2. Reads run on that image; every write run gets a
//          fresh copy of it, so each server starts from the same image.
//          randwrite-alloc is randwrite on a freshly created empty image:
//          it measures cluster allocation (until the image fills up).
//
// Environment:
//   BENCH_RUNTIME   seconds per fio run (default 4)
//   BENCH_ROUNDS    rounds per workload (default 2)
//   BENCH_FORMATS   comma list from raw,qcow2 (default all)
//   BENCH_SERVERS   comma list from vdisk,qemu-nbd,nbdkit (default all; nbdkit serves raw only)
//   BENCH_WORKLOADS comma list from randread,randwrite,randwrite-alloc,read,write
//                   (default all; randwrite-alloc is qcow2 only)
//   BENCH_DIR       where to put the images (default a temp dir under /tmp, removed at the end)
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import {
  ROOT, atCleanup, cleanup, die, formatValue, log, pick, printTable, requireTools, runFio, saveResults, settle, sh,
  startServer, stopServer,
} from './lib.mjs';

const RUNTIME = Number(process.env.BENCH_RUNTIME ?? 4);
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 2);
const IMAGE_SIZE = 1024 ** 3;

const WORKLOADS = [
  { id: 'randread', label: 'randread 4k qd16', rw: 'randread', bs: '4k', iodepth: 16, unit: 'IOPS' },
  { id: 'randwrite', label: 'randwrite 4k qd16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS' },
  { id: 'randwrite-alloc', label: 'randwrite-alloc 4k qd16', rw: 'randwrite', bs: '4k', iodepth: 16, unit: 'IOPS', empty: true },
  { id: 'read', label: 'read 1M qd8', rw: 'read', bs: '1M', iodepth: 8, unit: 'MB/s' },
  { id: 'write', label: 'write 1M qd8', rw: 'write', bs: '1M', iodepth: 8, unit: 'MB/s' },
];

/** vdisk serving the node named node, made by the --blockdev blockdev(img), as export "disk". */
const vdisk = (node, blockdev) => (img, sock) => [
  process.execPath,
  [
    path.join(ROOT, 'bin', 'vdisk'),
    'serve',
    '--blockdev', blockdev(img),
    '--export', `type=nbd,id=e0,node-name=${node},name=disk,writable=on`,
    '--nbd-server', `addr.type=unix,addr.path=${sock}`,
    '--log-level', 'warn',
  ],
];
const qemuNbd = (format) => (img, sock) => ['qemu-nbd', ['-f', format, '--cache=writeback', '-e', '16', '-t', '-x', 'disk', '-k', sock, img]];

/**
 * Per format: how each server serves IMG on SOCK as export "disk", which
 * workloads run, setup(dir) making the images once, and image(dir, w) giving
 * the image for one server's run of w (called before every run).
 */
const FORMATS = {
  raw: {
    servers: {
      vdisk: vdisk('f0', (img) => `driver=file,node-name=f0,filename=${img}`),
      'qemu-nbd': qemuNbd('raw'),
      // nbdkit serves one export whatever the name.
      nbdkit: (img, sock) => ['nbdkit', ['-f', '-U', sock, 'file', img]],
    },
    workloads: ['randread', 'randwrite', 'read', 'write'],
    setup: randomRaw,
    image: (dir) => path.join(dir, 'disk.img'),
  },
  qcow2: {
    servers: {
      vdisk: vdisk('q0', (img) => `driver=qcow2,node-name=q0,file.driver=file,file.filename=${img}`),
      'qemu-nbd': qemuNbd('qcow2'),
    },
    workloads: ['randread', 'randwrite', 'randwrite-alloc', 'read', 'write'],
    tools: ['qemu-img'],
    setup(dir) {
      const full = path.join(dir, 'disk.qcow2');
      if (!fs.existsSync(full)) {
        const raw = randomRaw(dir);
        log(`converting ${raw} to a fully allocated qcow2 image ${full}`);
        sh('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, full]);
      }
    },
    image(dir, w) {
      const full = path.join(dir, 'disk.qcow2');
      if (!w.rw.includes('write')) return full;
      const scratch = path.join(dir, 'scratch.qcow2');
      fs.rmSync(scratch, { force: true });
      if (w.empty) sh('qemu-img', ['create', '-q', '-f', 'qcow2', scratch, String(IMAGE_SIZE)]);
      else sh('cp', ['--reflink=never', full, scratch]);
      return scratch;
    },
  },
};

/** The 1 GiB raw file of random data in dir, made if missing. */
function randomRaw(dir) {
  const img = path.join(dir, 'disk.img');
  if (!fs.existsSync(img) || fs.statSync(img).size !== IMAGE_SIZE) {
    log(`writing ${IMAGE_SIZE} bytes of random data to ${img}`);
    sh('dd', ['if=/dev/urandom', `of=${img}`, 'bs=1M', `count=${IMAGE_SIZE / 1024 ** 2}`, 'status=none']);
  }
  return img;
}

const allServers = [...new Set(Object.values(FORMATS).flatMap((f) => Object.keys(f.servers)))];
const formatNames = pick(Object.keys(FORMATS), process.env.BENCH_FORMATS, 'format');
const serverNames = pick(allServers, process.env.BENCH_SERVERS, 'server');
const workloadIds = pick(WORKLOADS.map((w) => w.id), process.env.BENCH_WORKLOADS, 'workload');

/** What runs: per selected format, its selected servers and workloads. */
const plan = formatNames
  .map((name) => {
    const format = FORMATS[name];
    const servers = serverNames.filter((s) => s in format.servers);
    const workloads = WORKLOADS.filter((w) => format.workloads.includes(w.id) && workloadIds.includes(w.id));
    return { name, format, servers, workloads };
  })
  .filter((p) => p.servers.length > 0 && p.workloads.length > 0);
if (plan.length === 0) die('nothing to run: no selected server serves a selected format and workload');

requireTools(['fio', 'taskset', ...new Set(plan.flatMap((p) => [...(p.format.tools ?? []), ...p.servers.filter((s) => s !== 'vdisk')]))]);
if (!fs.existsSync(path.join(ROOT, 'dist', 'cli', 'main.js'))) die('vdisk is not built (npm run build)');

async function main() {
  const dir = process.env.BENCH_DIR ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-bench-'));
  if (!process.env.BENCH_DIR) atCleanup(() => fs.rmSync(dir, { recursive: true, force: true }));
  const sock = path.join(dir, 'nbd.sock');
  for (const { format } of plan) format.setup(dir);

  const tables = [];
  for (const { name: formatName, format, servers, workloads } of plan) {
    const results = {};
    for (const w of workloads) {
      results[w.id] = {};
      for (let round = 0; round < ROUNDS; round++) {
        // Alternate the order so no server always runs right after another.
        const order = round % 2 ? [...servers].reverse() : servers;
        for (const name of order) {
          const img = format.image(dir, w);
          settle(img);
          const proc = await startServer(name, format.servers[name](img, sock), sock);
          let value;
          try {
            value = runFio(w, sock, { size: IMAGE_SIZE, runtime: RUNTIME });
          } catch (err) {
            await stopServer(proc);
            die(`${formatName} ${w.label} on ${name}: ${err.message}\n${name} stderr:\n${proc.stderrText}`);
          }
          if (!(await stopServer(proc))) die(`${name} exited during ${formatName} ${w.label}: ${proc.stderrText}`);
          log(`${formatName.padEnd(5)} ${w.label.padEnd(23)} ${name.padEnd(9)} round ${round + 1}: ${formatValue(value, w.unit)}`);
          results[w.id][name] = Math.max(results[w.id][name] ?? 0, value);
        }
      }
    }
    saveResults(`nbd-${formatName}`, { format: formatName, runtime: RUNTIME, rounds: ROUNDS }, results);
    tables.push([`${formatName} workload`, workloads, servers, results]);
  }
  tables.forEach((table, i) => {
    if (i > 0) console.log();
    printTable(...table);
  });
}

main()
  .then(() => cleanup())
  .catch((err) => die(err.stack ?? String(err)));
