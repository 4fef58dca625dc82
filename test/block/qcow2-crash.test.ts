/**
 * Crash safety of the qcow2 driver: a child process
 * (test/fixtures/qcow2-writer.ts) runs a random write / write-zeroes /
 * discard / flush load on an image and is killed with SIGKILL after a random
 * 0.3 to 1.5 s, several times over on the same image (each new child opens
 * the dirty image, so vdisk's own repair on open runs too). After every
 * kill:
 *   - `qemu-img check` finds no corruption (exit 0, or 3: leaks only);
 *   - every byte written by an op that completed before a flush that
 *     completed reads back exactly (read with qemu-img convert);
 *   - every byte touched by an op that was not flushed reads as its flushed
 *     value, zero, or the data of one of those ops: never anything else;
 *   - bytes no op touched are unchanged.
 * Finally both repairs are checked: `qemu-img check -r all` on a copy and
 * vdisk's repair on open on the image; both leave a clean image with the
 * same content.
 *
 * The child runs the TypeScript sources with tap's own loader, so it tests
 * the code in src/, not a possibly stale dist/.
 *
 * Discards: the images have no backing file and are version 3, where vdisk
 * (like QEMU) makes a discarded whole cluster read as zeroes; the partial
 * clusters at the edges of a discard keep their data.
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { pathToFileURL } from 'node:url';
import { setLogLevel } from '../../src/log.js';
import { ROOT, patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';
import { describeDifference, dirtyBitOnDisk, openQcow2, qemuImg, readAll, rng } from '../helpers/qcow2.js';

setLogLevel('error');

const KiB = 1024;
const MiB = 1024 * KiB;
const SEED = process.env.VDISK_SEED ? Number(process.env.VDISK_SEED) : 20261122;
const KILLS = 5;
const WRITER = path.join(ROOT, 'test', 'fixtures', 'qcow2-writer.ts');
const TS_LOADER = pathToFileURL(path.join(ROOT, 'node_modules', '@tapjs', 'typescript', 'dist', 'esm', 'import.mjs')).href;

interface LoggedOp {
  i: number;
  kind: 'w' | 'z' | 'd';
  off: number;
  len: number;
  arg: number;
}

/** Runs the writer until it has been busy for `ms`, then SIGKILLs it; returns its stdout. */
async function runWriter(img: string, seed: number, ms: number): Promise<{ out: string; err: string; code: number | null; signal: string | null }> {
  const child = spawn(process.execPath, ['--import', TS_LOADER, WRITER, img, String(seed)], {
    cwd: ROOT,
    env: { ...process.env, TS_NODE_TRANSPILE_ONLY: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  let timer: NodeJS.Timeout | undefined;
  const guard = setTimeout(() => child.kill('SIGKILL'), 30_000);
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    out += d;
    if (!timer && out.startsWith('ready\n')) timer = setTimeout(() => child.kill('SIGKILL'), ms);
  });
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  return new Promise((resolve) => {
    child.on('close', (code, signal) => {
      clearTimeout(guard);
      if (timer) clearTimeout(timer);
      resolve({ out, err, code, signal });
    });
  });
}

function parseLog(out: string): { ops: LoggedOp[]; flushed: number; ready: boolean } {
  const lines = out.split('\n');
  // The last line may have been cut by the kill: only whole lines count.
  lines.pop();
  const ops: LoggedOp[] = [];
  let flushed = 0;
  for (const l of lines) {
    const f = l.split(' ');
    if (f[0] === 'B') ops.push({ i: Number(f[1]), kind: f[2] as LoggedOp['kind'], off: Number(f[3]), len: Number(f[4]), arg: Number(f[5] ?? 0) });
    else if (f[0] === 'F') flushed = Math.max(flushed, Number(f[1]));
  }
  ops.sort((a, b) => a.i - b.i);
  return { ops, flushed, ready: lines[0] === 'ready' };
}

/** Applies one op to a model exactly as vdisk defines it (no backing file, v3). */
function apply(model: Buffer, op: LoggedOp, cs: number): void {
  if (op.kind === 'w') patternBuffer(op.len, op.arg).copy(model, op.off);
  else if (op.kind === 'z') model.fill(0, op.off, op.off + op.len);
  else {
    const first = Math.ceil(op.off / cs) * cs;
    const end = Math.floor((op.off + op.len) / cs) * cs;
    if (end > first) model.fill(0, first, end);
  }
}

async function qemuContent(t: Test, img: string, dir: string): Promise<Buffer> {
  const raw = path.join(dir, 'content.raw');
  await qemuImg('convert', '-f', 'qcow2', '-O', 'raw', img, raw);
  const b = fs.readFileSync(raw);
  fs.rmSync(raw);
  return b;
}

/**
 * Checks the content after a crash: ops before the last flush exactly; bytes touched by later ops: the
 * flushed value, zero or one of those ops' data. Returns a description of the first bad byte, or ''.
 */
function verify(actual: Buffer, before: Buffer, ops: LoggedOp[], flushed: number, cs: number): string {
  const expected = Buffer.from(before);
  const durable = ops.filter((o) => o.i < flushed);
  const pending = ops.filter((o) => o.i >= flushed);
  for (const op of durable) apply(expected, op, cs);
  const loose = new Uint8Array(actual.length); // 1: a pending op touched this byte
  for (const op of pending) loose.fill(1, op.off, op.off + op.len);
  // Bytes no pending op touched: exact.
  for (let pos = 0; pos < actual.length; ) {
    if (loose[pos]) {
      pos++;
      continue;
    }
    let end = pos;
    while (end < actual.length && !loose[end] && end - pos < 65536) end++;
    if (!actual.subarray(pos, end).equals(expected.subarray(pos, end))) {
      for (let k = pos; k < end; k++) {
        if (actual[k] !== expected[k]) {
          const lastOp = [...durable].reverse().find((o) => o.off <= k && k < o.off + o.len);
          return `byte ${k}: got ${actual[k]}, expected ${expected[k]} (last flushed op there: ${JSON.stringify(lastOp) ?? 'none'})`;
        }
      }
    }
    pos = end;
  }
  // Bytes pending ops touched: one of the candidates.
  const datas = pending.map((o) => (o.kind === 'w' ? patternBuffer(o.len, o.arg) : undefined));
  for (const [n, op] of pending.entries()) {
    for (let k = op.off; k < op.off + op.len; k++) {
      const a = actual[k];
      if (a === expected[k] || a === 0) continue;
      let ok = false;
      for (const [m, o] of pending.entries()) {
        if (o.kind === 'w' && o.off <= k && k < o.off + o.len && datas[m]![k - o.off] === a) {
          ok = true;
          break;
        }
      }
      if (!ok) return `byte ${k} (touched by unflushed op ${JSON.stringify(pending[n])}): got ${a}, which is neither ${expected[k]}, 0 nor data of an unflushed op`;
    }
  }
  return '';
}

for (const cs of [4 * KiB, 64 * KiB]) {
  t.test(`kill -9 during a random load, cluster ${cs}, seed ${SEED} (VDISK_SEED=${SEED})`, async (t) => {
    if (!requireTool(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = path.join(dir, 'crash.qcow2');
    const size = 16 * MiB;
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(size));
    const rand = rng(SEED + cs);
    let content = Buffer.alloc(size);
    let totalOps = 0;
    let totalFlushed = 0;
    for (let k = 0; k < KILLS; k++) {
      const ms = 300 + Math.floor(rand() * 1200);
      const childSeed = SEED * 31 + cs + k;
      const r = await runWriter(img, childSeed, ms);
      const what = `cluster ${cs}, run ${k} (child seed ${childSeed}, killed after ${ms} ms)`;
      if (r.signal !== 'SIGKILL') {
        t.fail(`${what}: the writer ended by itself (${r.code ?? r.signal}): ${r.err}`);
        return;
      }
      const { ops, flushed, ready } = parseLog(r.out);
      t.ok(ready, `${what}: the writer opened the image${ready ? '' : `: ${r.err}`}`);
      if (!ready) return;
      totalOps += ops.length;
      totalFlushed += flushed;
      t.ok(ops.length > 0, `${what}: ${ops.length} ops, ${flushed} of them flushed`);
      t.equal(dirtyBitOnDisk(img), true, `${what}: the image is left dirty`);
      const check = await run('qemu-img', ['check', img], { timeoutMs: 60_000 });
      t.ok(check.code === 0 || check.code === 3, `${what}: qemu-img check finds no corruption (exit ${check.code})${check.code === 0 || check.code === 3 ? '' : `\n${check.stdout}${check.stderr}`}`);
      const actual = await qemuContent(t, img, dir);
      const bad = verify(actual, content, ops, flushed, cs);
      t.equal(bad, '', `${what}: flushed data is there, unflushed data is old or new`);
      if (bad) return;
      content = actual;
    }
    t.comment(`cluster ${cs}: ${totalOps} ops in ${KILLS} runs, ${totalFlushed} flushed`);

    // Repair by QEMU, on a copy.
    const copy = path.join(dir, 'copy.qcow2');
    fs.copyFileSync(img, copy);
    const repaired = await run('qemu-img', ['check', '-r', 'all', copy], { timeoutMs: 60_000 });
    t.equal(repaired.code, 0, `qemu-img check -r all repairs it${repaired.code === 0 ? '' : `\n${repaired.stdout}${repaired.stderr}`}`);
    const after = await run('qemu-img', ['check', copy], { timeoutMs: 60_000 });
    t.equal(after.code, 0, 'after qemu-img check -r all: clean');
    const c1 = await qemuContent(t, copy, dir);
    t.ok(c1.equals(content), `after qemu-img's repair the content is the same: ${describeDifference(c1, content)}`);

    // Repair by vdisk: opening a dirty image writable rebuilds its refcounts.
    {
      const { g, q } = await openQcow2(t, img);
      const got = await readAll(q);
      t.ok(got.equals(content), `vdisk reads the same content: ${describeDifference(got, content)}`);
      await g.closeAll();
    }
    t.equal(dirtyBitOnDisk(img), false, 'vdisk closed it clean');
    const clean = await run('qemu-img', ['check', img], { timeoutMs: 60_000 });
    t.equal(clean.code, 0, `after vdisk's repair on open: qemu-img check exits 0${clean.code === 0 ? '' : `\n${clean.stdout}${clean.stderr}`}`);
    t.match(clean.stdout, /No errors were found/, 'after vdisk\'s repair: no errors, no leaks');
    const c2 = await qemuContent(t, img, dir);
    t.ok(c2.equals(content), `after vdisk's repair the content is the same: ${describeDifference(c2, content)}`);
  });
}
