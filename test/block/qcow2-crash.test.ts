/**
 * Crash safety of the qcow2 driver: a child process
 * (test/fixtures/qcow2-writer.ts) runs a random write / write-zeroes /
 * discard / flush load on an image and is killed with SIGKILL after a random
 * 0.3 to 1.5 s, several times over on the same image (each new child opens
 * the dirty image, so vdisk's own repair on open runs too). After every
 * kill:
 *   - `qemu-img check` finds no corruption (exit 0, or 3: leaks only);
 *   - every byte written by an op that had completed when a flush began
 *     (and that flush completed) reads back exactly (read with qemu-img
 *     convert); flushes run alone and also among concurrent writes, so
 *     metadata is written back while allocations go on;
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
import { describeDifference, dirtyBitOnDisk, openQcow2, qemuImg, qemuIo, readAll, rng } from '../helpers/qcow2.js';

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

/** Runs the writer until it has been busy for `ms`, then SIGKILLs it; returns its log. */
async function runWriter(img: string, seed: number, ms: number): Promise<{ out: string; err: string; code: number | null; signal: string | null }> {
  const logFile = `${img}.log`;
  fs.rmSync(logFile, { force: true });
  const child = spawn(process.execPath, ['--import', TS_LOADER, WRITER, img, String(seed), logFile], {
    cwd: ROOT,
    env: { ...process.env, TS_NODE_TRANSPILE_ONLY: '1' },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let err = '';
  let timer: NodeJS.Timeout | undefined;
  const guard = setTimeout(() => child.kill('SIGKILL'), 30_000);
  child.stdout.setEncoding('utf8').on('data', (d: string) => {
    stdout += d;
    if (!timer && stdout.startsWith('ready\n')) timer = setTimeout(() => child.kill('SIGKILL'), ms);
  });
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  return new Promise((resolve) => {
    child.on('close', (code, signal) => {
      clearTimeout(guard);
      if (timer) clearTimeout(timer);
      const out = fs.existsSync(logFile) ? fs.readFileSync(logFile, 'utf8') : '';
      fs.rmSync(logFile, { force: true });
      resolve({ out, err, code, signal });
    });
  });
}

/**
 * Which ops were begun, and which of them are durable: those that had completed (E line) before the
 * start (S line) of the last flush that completed (F line).
 */
function parseLog(out: string): { ops: LoggedOp[]; durable: Set<number>; ready: boolean } {
  const lines = out.split('\n');
  // The last line may have been cut by the kill: only whole lines count.
  lines.pop();
  const ops: LoggedOp[] = [];
  const endedAt = new Map<number, number>();
  const flushStart = new Map<number, number>();
  let lastFlush = -1;
  for (const [n, l] of lines.entries()) {
    const f = l.split(' ');
    if (f[0] === 'B') ops.push({ i: Number(f[1]), kind: f[2] as LoggedOp['kind'], off: Number(f[3]), len: Number(f[4]), arg: Number(f[5] ?? 0) });
    else if (f[0] === 'E') endedAt.set(Number(f[1]), n);
    else if (f[0] === 'S') flushStart.set(Number(f[1]), n);
    else if (f[0] === 'F') lastFlush = Math.max(lastFlush, Number(f[1]));
  }
  ops.sort((a, b) => a.i - b.i);
  const cut = lastFlush < 0 ? -1 : flushStart.get(lastFlush)!;
  const durable = new Set(ops.filter((o) => (endedAt.get(o.i) ?? Infinity) < cut).map((o) => o.i));
  return { ops, durable, ready: lines[0] === 'ready' };
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
function verify(actual: Buffer, before: Buffer, ops: LoggedOp[], isDurable: Set<number>, cs: number): string {
  const expected = Buffer.from(before);
  // Overlapping ops never ran at once, so index order is their order; a durable op never overlaps a
  // later-begun op that was still running, so the pending ones are all "after" the durable ones.
  const durable = ops.filter((o) => isDurable.has(o.i));
  const pending = ops.filter((o) => !isDurable.has(o.i));
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

for (const cs of [512, 4 * KiB, 64 * KiB]) {
  t.test(`kill -9 during a random load, cluster ${cs}, seed ${SEED} (VDISK_SEED=${SEED})`, async (t) => {
    if (!requireTool(t, 'qemu-img')) return;
    const dir = tempDir(t);
    const img = path.join(dir, 'crash.qcow2');
    const size = 16 * MiB;
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(size));
    const rand = rng(SEED + cs);
    let content: Buffer = Buffer.alloc(size);
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
      const { ops, durable, ready } = parseLog(r.out);
      const flushed = durable.size;
      t.ok(ready, `${what}: the writer opened the image${ready ? '' : `: ${r.err}`}`);
      if (!ready) return;
      totalOps += ops.length;
      totalFlushed += flushed;
      t.ok(ops.length > 0, `${what}: ${ops.length} ops, ${flushed} of them flushed`);
      t.equal(dirtyBitOnDisk(img), true, `${what}: the image is left dirty`);
      const check = await run('qemu-img', ['check', img], { timeoutMs: 60_000 });
      t.ok(check.code === 0 || check.code === 3, `${what}: qemu-img check finds no corruption (exit ${check.code})${check.code === 0 || check.code === 3 ? '' : `\n${check.stdout}${check.stderr}`}`);
      const actual = await qemuContent(t, img, dir);
      const bad = verify(actual, content, ops, durable, cs);
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

t.test('an image QEMU left dirty (lazy refcounts, qemu-io abort): vdisk reads it, and repairs it when opened writable', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  for (const cs of [4 * KiB, 64 * KiB]) {
    const img = path.join(dir, `lazy-${cs}.qcow2`);
    const size = 8 * MiB;
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `lazy_refcounts=on,cluster_size=${cs}`, img, String(size));
    await qemuIo(img, ['write -P 0x21 0 1M']); // a clean session first: allocations with proper refcounts
    // Then a session that dies without writing its refcounts (QEMU relies on the dirty bit for them).
    const r = await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 512k 1M', '-c', 'write -P 0x23 5M 300k', '-c', 'write -z 100k 8k', '-c', 'abort', img], { timeoutMs: 60_000 });
    t.not(r.code, 0, `cluster ${cs}: qemu-io aborted`);
    t.equal(dirtyBitOnDisk(img), true, `cluster ${cs}: QEMU left the dirty bit set`);
    const before = await run('qemu-img', ['check', img], { timeoutMs: 60_000 });
    t.equal(before.code, 2, `cluster ${cs}: qemu-img check sees the missing refcounts (exit 2)`);
    const model = Buffer.alloc(size);
    model.fill(0x21, 0, MiB).fill(0x22, 512 * KiB, 1536 * KiB).fill(0x23, 5 * MiB, 5 * MiB + 300 * KiB).fill(0, 100 * KiB, 108 * KiB);
    {
      const { g, q } = await openQcow2(t, img, { readOnly: true });
      const got = await readAll(q);
      t.ok(got.equals(model), `cluster ${cs}: read-only, vdisk reads it without repairing: ${describeDifference(got, model)}`);
      await g.closeAll();
      t.equal(dirtyBitOnDisk(img), true, `cluster ${cs}: a read-only open leaves it dirty`);
    }
    {
      const { g, q } = await openQcow2(t, img);
      const got = await readAll(q);
      t.ok(got.equals(model), `cluster ${cs}: after vdisk's repair on open the content is the same: ${describeDifference(got, model)}`);
      // New allocations after the repair must not land on clusters QEMU used.
      const b = patternBuffer(2 * MiB, 3);
      await q.write(6 * MiB, b);
      b.copy(model, 6 * MiB);
      await g.closeAll();
    }
    const after = await run('qemu-img', ['check', img], { timeoutMs: 60_000 });
    t.equal(after.code, 0, `cluster ${cs}: clean after vdisk${after.code === 0 ? '' : `\n${after.stdout}${after.stderr}`}`);
    const c = await qemuContent(t, img, dir);
    t.ok(c.equals(model), `cluster ${cs}: qemu reads the content: ${describeDifference(c, model)}`);
  }
});

t.test('a lost refcount block in a dirty image: vdisk rebuilds it somewhere free, not over data in its range', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const img = path.join(dir, 'lost.qcow2');
  // 512-byte clusters and 16-bit refcounts: one block covers 256 clusters (128 KiB of the file).
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'cluster_size=512', img, String(8 * MiB));
  await qemuIo(img, ['write -P 0x21 0 3M']);
  const fd = fs.openSync(img, 'r+');
  const h = Buffer.alloc(112);
  fs.readSync(fd, h, 0, 112, 0);
  const table = Number(h.readBigUInt64BE(48));
  // Forget refcount block 5 (clusters 1280..1535, all data) and say the image was not closed cleanly.
  fs.writeSync(fd, Buffer.alloc(8), 0, 8, table + 5 * 8);
  h.writeBigUInt64BE(h.readBigUInt64BE(72) | 1n, 72);
  fs.writeSync(fd, h, 72, 8, 72);
  fs.closeSync(fd);
  const broken = await run('qemu-img', ['check', img], { timeoutMs: 60_000 });
  t.equal(broken.code, 2, 'qemu-img check sees the missing refcounts');
  const model = Buffer.alloc(8 * MiB);
  model.fill(0x21, 0, 3 * MiB);
  {
    const { g, q } = await openQcow2(t, img);
    const got = await readAll(q);
    t.ok(got.equals(model), `after vdisk's repair on open the data is intact: ${describeDifference(got, model)}`);
    const b = patternBuffer(MiB, 5);
    await q.write(4 * MiB, b);
    b.copy(model, 4 * MiB);
    await g.closeAll();
  }
  const after = await run('qemu-img', ['check', img], { timeoutMs: 60_000 });
  t.equal(after.code, 0, `clean after vdisk${after.code === 0 ? '' : `\n${after.stdout.slice(0, 2000)}`}`);
  const c = await qemuContent(t, img, dir);
  t.ok(c.equals(model), `qemu reads the content: ${describeDifference(c, model)}`);
});
