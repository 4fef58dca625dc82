#!/usr/bin/env node
// `vdisk img convert` against `qemu-img convert`: wall time to turn one 1 GiB raw
// file of random data (in the page cache) into a new qcow2 image, and back
// (qcow2 -> raw). Runs alternate inside each round; the best of the rounds
// counts. Target: vdisk's time / qemu-img's time <= 1.0.
//
// Environment:
//   BENCH_ROUNDS  rounds (default 3)
//   BENCH_DIR     where to put the files (default a temp dir under /tmp)
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
const SIZE = 1024 ** 3;

function sh(cmd, args) {
  const r = spawnSync(cmd, args, { encoding: 'utf8', maxBuffer: 16 * 1024 * 1024 });
  if (r.status !== 0) {
    process.stderr.write(`bench: ${cmd} ${args.join(' ')} failed: ${r.stderr}\n`);
    process.exit(1);
  }
  return r.stdout;
}

const dir = process.env.BENCH_DIR ?? fs.mkdtempSync(path.join(os.tmpdir(), 'vdisk-bench-convert-'));
const owned = !process.env.BENCH_DIR;
process.on('exit', () => owned && fs.rmSync(dir, { recursive: true, force: true }));
const src = path.join(dir, 'src.raw');
if (!fs.existsSync(src) || fs.statSync(src).size !== SIZE) {
  process.stderr.write('bench: writing 1 GiB of random data\n');
  sh('sh', ['-c', `head -c ${SIZE} /dev/urandom > '${src}'`]);
}
const tools = {
  'qemu-img': (from, to, fmt) => ['qemu-img', ['convert', '-O', fmt, from, to]],
  vdisk: (from, to, fmt) => [process.execPath, [path.join(ROOT, 'bin', 'vdisk'), 'img', 'convert', '-O', fmt, from, to]],
};

function timeRun([cmd, args], input, output) {
  fs.rmSync(output, { force: true });
  sh('sync', []);
  sh('sh', ['-c', `cat '${input}' > /dev/null`]);
  const t0 = process.hrtime.bigint();
  sh(cmd, args);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  return seconds;
}

const cases = [
  { name: 'raw -> qcow2', input: src, fmt: 'qcow2', out: 'out.qcow2' },
  { name: 'qcow2 -> raw', input: path.join(dir, 'in.qcow2'), fmt: 'raw', out: 'out.raw' },
];
sh('qemu-img', ['convert', '-O', 'qcow2', src, cases[1].input]);
const best = {};
for (let round = 1; round <= ROUNDS; round++) {
  for (const c of cases) {
    for (const [tool, make] of Object.entries(tools)) {
      const out = path.join(dir, `${tool}-${c.out}`);
      const s = timeRun(make(c.input, out, c.fmt), c.input, out);
      process.stderr.write(`bench: round ${round} ${c.name} ${tool}: ${s.toFixed(3)} s\n`);
      const key = `${c.name}|${tool}`;
      best[key] = Math.min(best[key] ?? Infinity, s);
    }
    // Both outputs must hold the same content, or the timing means nothing.
    sh('qemu-img', ['compare', path.join(dir, `qemu-img-${c.out}`), path.join(dir, `vdisk-${c.out}`)]);
  }
}
const rows = cases.map((c) => {
  const q = best[`${c.name}|qemu-img`];
  const v = best[`${c.name}|vdisk`];
  return { case: c.name, vdisk_s: Number(v.toFixed(3)), qemu_img_s: Number(q.toFixed(3)), ratio: Number((v / q).toFixed(2)) };
});
console.log('\n| convert 1 GiB (page cache) | vdisk (s) | qemu-img 7.2 (s) | vdisk/qemu-img (target <= 1.0) |');
console.log('|---|---|---|---|');
for (const r of rows) console.log(`| ${r.case} | ${r.vdisk_s} | ${r.qemu_img_s} | ${r.ratio} |`);
fs.mkdirSync(path.join(ROOT, 'bench', 'results'), { recursive: true });
const file = path.join(ROOT, 'bench', 'results', `convert-${new Date().toISOString().replace(/[:.]/g, '-')}.json`);
fs.writeFileSync(file, JSON.stringify({ date: new Date().toISOString(), rounds: ROUNDS, rows }, null, 2));
process.stderr.write(`bench: results in ${path.relative(ROOT, file)}\n`);
