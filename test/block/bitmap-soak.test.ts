/**
 * kill -9 soak for crash-safe bitmaps: vdisk serves an image (qcow2, and raw
 * with its sidecar) with a persistent crash-safe bitmap; a writer (nbdsh,
 * libnbd) writes, zeroes and flushes 4 KiB slots over NBD, one request at a
 * time, logging each before it is sent and after it is answered; the daemon
 * is killed with SIGKILL at a random moment. After each restart:
 *   - every flushed write is there: each slot holds the value of its last
 *     write that a completed flush covers, or of a later write (which may or
 *     may not have landed), never anything else;
 *   - the bitmap is never inconsistent and is a superset of every write
 *     issued since it was last cleared, acknowledged or not (read through the
 *     qemu:dirty-bitmap NBD context);
 *   - after a clean stop, `qemu-img check` finds nothing (qcow2).
 * Every third round starts with a clear (what a backup does). The number of
 * rounds per format is VDISK_SOAK_ROUNDS (default 3); scripts/bitmap-soak.sh
 * runs many. The seed is VDISK_SEED (printed), so a failure reproduces.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { nbdsh, requireTool, rng, run, sparseFile, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;
const SLOT = 4096;
const SLOTS = SIZE / SLOT;
const GRANULE = 65536;
const ROUNDS = Number(process.env.VDISK_SOAK_ROUNDS ?? 3);
const SEED = Number(process.env.VDISK_SEED ?? Date.now() % 100000);

t.before(() => {
  for (const tool of ['qemu-img', 'nbdsh']) requireTool(t, tool);
  t.comment(`seed ${SEED} (VDISK_SEED), ${ROUNDS} rounds per format (VDISK_SOAK_ROUNDS)`);
});

interface Op {
  seq: number;
  slot: number;
  /** The byte every byte of the slot holds after this op (0 for a zero write). */
  value: number;
  /** The server answered it. */
  acked: boolean;
}

/** The writer: ops from a seeded generator, a line before each request and after each answer. */
function writerScript(uri: string, seed: number, ops: number): string {
  return `
import random, sys
random.seed(${seed})
h.connect_uri(${JSON.stringify(uri)})
seq = 0
for i in range(${ops}):
    seq += 1
    r = random.random()
    if r < 0.1:
        print("S", seq, flush=True)
        h.flush()
        print("F", seq, flush=True)
        continue
    slot = random.randrange(${SLOTS})
    if r < 0.25:
        print("W", seq, slot, 0, flush=True)
        h.zero(${SLOT}, slot * ${SLOT})
    else:
        value = random.randrange(1, 256)
        print("W", seq, slot, value, flush=True)
        h.pwrite(bytes([value]) * ${SLOT}, slot * ${SLOT})
    print("A", seq, flush=True)
`;
}

function parseLog(text: string): { ops: Op[]; flushedBefore: number } {
  const ops: Op[] = [];
  let flushedBefore = 0;
  let lastSync = 0;
  for (const line of text.split('\n')) {
    const f = line.trim().split(/\s+/);
    if (f[0] === 'W') ops.push({ seq: Number(f[1]), slot: Number(f[2]), value: Number(f[3]), acked: false });
    else if (f[0] === 'A' && ops.length && ops[ops.length - 1].seq === Number(f[1])) ops[ops.length - 1].acked = true;
    else if (f[0] === 'S') lastSync = Number(f[1]);
    // A completed flush covers every write issued before it (they were all answered: one at a time).
    else if (f[0] === 'F' && Number(f[1]) === lastSync) flushedBefore = lastSync;
  }
  return { ops, flushedBefore };
}

/** Reads every slot's first byte and whether it is uniform; and the bitmap's dirty granules. */
async function inspect(uri: string, bitmap: string): Promise<{ slots: number[]; uniform: boolean[]; dirty: Set<number> }> {
  const ctx = `qemu:dirty-bitmap:${bitmap}`;
  const r = await nbdsh(
    `
h.add_meta_context(${JSON.stringify(ctx)})
h.connect_uri(${JSON.stringify(uri)})
size = h.get_size()
data = bytearray()
pos = 0
while pos < size:
    data += h.pread(min(4 << 20, size - pos), pos)
    pos = len(data)
first = []
uniform = []
for s in range(${SLOTS}):
    b = data[s * ${SLOT}:(s + 1) * ${SLOT}]
    first.append(b[0])
    uniform.append(1 if b.count(b[0]) == ${SLOT} else 0)
dirty = []
covered = [0]
def cb(c, off, entries, err):
    if c != ${JSON.stringify(ctx)}:
        return 0
    o = off
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            g = o // ${GRANULE}
            while g * ${GRANULE} < o + entries[i]:
                dirty.append(g)
                g += 1
        o += entries[i]
    covered[0] = o
    return 0
pos = 0
while pos < size:
    h.block_status(size - pos, pos, cb)
    pos = covered[0]
print("FIRST", " ".join(map(str, first)))
print("UNIFORM", "".join(map(str, uniform)))
print("DIRTY", " ".join(map(str, dirty)))
`,
    undefined,
    120_000,
  );
  if (r.code !== 0) throw new Error(`nbdsh inspect: ${r.stderr}`);
  const line = (tag: string) => r.stdout.split('\n').find((l) => l.startsWith(tag + ' ') || l === tag)!.slice(tag.length + 1);
  return {
    slots: line('FIRST').split(' ').map(Number),
    uniform: [...line('UNIFORM')].map((c) => c === '1'),
    dirty: new Set(line('DIRTY').trim() ? line('DIRTY').trim().split(' ').map(Number) : []),
  };
}

async function soak(t: Test, format: 'qcow2' | 'raw'): Promise<void> {
  const dir = tempDir(t);
  const img = path.join(dir, `disk.${format}`);
  if (format === 'qcow2') t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, String(SIZE)])).code, 0);
  else sparseFile(img, SIZE);
  const qmp = path.join(dir, 'qmp.sock');
  const start = (): Promise<DaemonHandle> =>
    startDaemon(t, {
      dir,
      args: [
        '--blockdev', `driver=${format},node-name=d,file.driver=file,file.filename=${img}`,
        '--export', 'type=nbd,id=e,node-name=d,name=d,writable=on',
        '--qmp', `unix:${qmp}`, '--log-level', 'warn',
      ],
    });
  const random = rng(SEED + (format === 'raw' ? 1 : 0));
  // What each slot holds for sure (after the last verified round), and every slot written since the last clear.
  let base = new Array<number>(SLOTS).fill(0);
  const writtenSinceClear = new Set<number>();
  let d = await start();
  let w = await QmpWire.connect(qmp);
  await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'b', persistent: true });
  for (let round = 0; round < ROUNDS; round++) {
    if (round % 3 === 2) {
      await w.ok('block-dirty-bitmap-clear', { node: 'd', name: 'b' });
      writtenSinceClear.clear();
    }
    const log = path.join(dir, `writer-${round}.log`);
    const out = fs.openSync(log, 'w');
    const { spawn } = await import('node:child_process');
    const writer = spawn('nbdsh', ['-c', writerScript(d.uri('d'), SEED * 100 + round, 100000)], {
      stdio: ['ignore', out, 'ignore'],
      env: { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` },
    });
    const writerDone = new Promise((r) => writer.on('exit', r));
    await new Promise((r) => setTimeout(r, 300 + random() * 1200));
    w.close();
    d.proc.kill('SIGKILL');
    await new Promise((r) => (d.proc.exitCode !== null || d.proc.signalCode !== null ? r(undefined) : d.proc.on('exit', r)));
    await writerDone;
    fs.closeSync(out);
    const { ops, flushedBefore } = parseLog(fs.readFileSync(log, 'utf8'));

    d = await start();
    w = await QmpWire.connect(qmp);
    const nodes = (await w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
    const b = ((nodes.find((n) => n['node-name'] === 'd')!['dirty-bitmaps'] ?? []) as Array<Record<string, unknown>>).find((x) => x.name === 'b');
    t.ok(b && b.inconsistent === undefined, `round ${round}: the bitmap is there and consistent after kill -9 (${ops.length} writes, flushed up to #${flushedBefore})`);
    // Writable because the bitmap is enabled (QEMU refuses it on a read-only export); nothing writes to it.
    await w.ok('block-export-add', { type: 'nbd', id: 'v', 'node-name': 'd', name: 'v', writable: true, bitmaps: ['b'] });
    const seen = await inspect(d.uri('v'), 'b');
    await w.ok('block-export-del', { id: 'v', mode: 'hard' });

    const bad: string[] = [];
    const bySlot = new Map<number, Op[]>();
    for (const op of ops) {
      if (!bySlot.has(op.slot)) bySlot.set(op.slot, []);
      bySlot.get(op.slot)!.push(op);
      // The bitmap must cover a write the server answered, and one whose data is on disk. The last
      // write, sent but unanswered when the daemon died, may never have reached it: then its slot
      // still holds the old value and it need not be covered.
      const last = op === ops[ops.length - 1] && !op.acked;
      if (!last) writtenSinceClear.add(op.slot);
    }
    // The last write's data is on disk when the slot shows its value and that value is new there.
    const lastOp = ops[ops.length - 1];
    if (lastOp && !lastOp.acked && seen.uniform[lastOp.slot] && seen.slots[lastOp.slot] === lastOp.value) {
      const earlier = (bySlot.get(lastOp.slot) ?? []).filter((o) => o !== lastOp);
      const before = earlier.length ? earlier[earlier.length - 1].value : base[lastOp.slot];
      if (before !== lastOp.value) writtenSinceClear.add(lastOp.slot);
    }
    for (let s = 0; s < SLOTS; s++) {
      const mine = bySlot.get(s) ?? [];
      const durable = mine.filter((o) => o.seq < flushedBefore);
      const allowed = new Set<number>(durable.length ? [durable[durable.length - 1].value] : [base[s]]);
      for (const o of mine) if (!durable.includes(o)) allowed.add(o.value);
      if (!seen.uniform[s] || !allowed.has(seen.slots[s])) {
        bad.push(`slot ${s}: ${seen.uniform[s] ? seen.slots[s] : 'torn'}, allowed ${[...allowed].join('/')}`);
      }
    }
    t.same(bad.slice(0, 5), [], `round ${round}: every flushed write is there, nothing else appears`);
    const missing = [...writtenSinceClear].filter((s) => !seen.dirty.has(Math.floor((s * SLOT) / GRANULE)));
    const why = missing.slice(0, 5).map((m) => ({ slot: m, ops: (bySlot.get(m) ?? []).map((o) => `#${o.seq}${o.acked ? '' : '?'}=${o.value}`), now: seen.slots[m], last: lastOp?.seq, flushed: flushedBefore }));
    t.same(why, [], `round ${round}: the bitmap covers every write issued since the last clear (${writtenSinceClear.size} slots)`);
    base = seen.slots;
    // The restart repaired what the crash left; after a clean stop QEMU must find nothing wrong.
    w.close();
    t.equal(await d.stop(), 0, `round ${round}: a clean stop`);
    if (format === 'qcow2') {
      const c = await run('qemu-img', ['check', img]);
      t.equal(c.code, 0, `round ${round}: qemu-img check is clean: ${c.stdout.trim()}`);
      const info = JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout);
      t.same(info['format-specific'].data.bitmaps.map((x: Record<string, unknown>) => [x.name, x.flags]), [['b', ['auto']]], `round ${round}: QEMU sees the bitmap, not in use`);
    }
    if (round < ROUNDS - 1) {
      d = await start();
      w = await QmpWire.connect(qmp);
    }
  }
}

t.test('qcow2', (t) => soak(t, 'qcow2'));
t.test('raw with its sidecar', (t) => soak(t, 'raw'));
