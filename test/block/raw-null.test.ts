/**
 * The raw and null-co drivers, and the request path every node shares
 * (src/block/node.ts) seen through a recording node defined here: range
 * windows, maxTransfer splitting, alignment padding, FUA emulation, the
 * write-zeroes fallback, detect-zeroes, drain and close.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { BlockNode, type BlockLimits, type Extent, ReqFlags, Status } from '../../src/block/node.js';
import { BlockGraph } from '../../src/block/graph.js';
import { NullNode } from '../../src/block/drivers/null-co.js';
import { RawNode } from '../../src/block/drivers/raw.js';
import { VdiskError } from '../../src/errors.js';
import { setLogLevel } from '../../src/log.js';
import { patternBuffer, sparseFile, tempDir } from '../helpers/tools.js';

setLogLevel('error');

const KiB = 1024;
const MiB = 1024 * 1024;
const ZERO = Status.ZERO | Status.ALLOCATED;
const DATA = Status.DATA | Status.ALLOCATED;

async function errorOf(p: Promise<unknown>): Promise<VdiskError | undefined> {
  return p.then(
    () => undefined,
    (e) => e,
  );
}

/**
 * A memory disk that records every call reaching its driver hooks and every
 * breach of the hook contract (alignment, maxTransfer, range).
 */
class Recorder extends BlockNode {
  readonly driverName = 'recorder';
  calls: string[] = [];
  violations: string[] = [];
  data: Buffer;
  zeroes: 'fast' | 'enotsup' | 'eio' = 'fast';
  hold: Promise<void> | undefined;
  closes = 0;

  constructor(size: number, limits: Partial<BlockLimits> = {}, nativeFua = false, name = 'rec') {
    super({ nodeName: name });
    this.length = size;
    this.data = Buffer.alloc(size);
    this.limits = { ...this.limits, ...limits };
    this.nativeFua = nativeFua;
  }
  private check(op: string, offset: number, length: number, isIo: boolean): void {
    const a = this.limits.requestAlignment;
    if (offset % a !== 0 || length % a !== 0) this.violations.push(`${op} ${offset} ${length}: not aligned to ${a}`);
    if (isIo && length > this.limits.maxTransfer) this.violations.push(`${op} ${offset} ${length}: over maxTransfer ${this.limits.maxTransfer}`);
    if (offset + length > this.length) this.violations.push(`${op} ${offset} ${length}: past the end ${this.length}`);
  }
  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    this.calls.push(`read ${offset} ${buf.length}`);
    this.check('read', offset, buf.length, true);
    await this.hold;
    this.data.copy(buf, 0, offset, offset + buf.length);
  }
  protected override async doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    this.calls.push(`write ${offset} ${buf.length}${flags & ReqFlags.FUA ? ' fua' : ''}`);
    this.check('write', offset, buf.length, true);
    await this.hold;
    buf.copy(this.data, offset);
  }
  protected override async doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    if (this.zeroes === 'enotsup') throw new VdiskError('ENOTSUP', 'no fast zeroes here');
    if (this.zeroes === 'eio') throw new VdiskError('EIO', 'the disk is on fire');
    this.calls.push(`zero ${offset} ${length}${flags & ReqFlags.MAY_UNMAP ? ' unmap' : ''}${flags & ReqFlags.FUA ? ' fua' : ''}`);
    this.check('zero', offset, length, false);
    this.data.fill(0, offset, offset + length);
  }
  protected override async doDiscard(offset: number, length: number): Promise<void> {
    this.calls.push(`discard ${offset} ${length}`);
    this.check('discard', offset, length, false);
  }
  protected override async doFlush(): Promise<void> {
    this.calls.push('flush');
  }
  protected override async doTruncate(size: number): Promise<void> {
    this.calls.push(`truncate ${size}`);
    const d = Buffer.alloc(size);
    this.data.copy(d, 0, 0, Math.min(size, this.data.length));
    this.data = d;
    this.length = size;
  }
  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    this.check('block-status', offset, length, false);
    return { length: Math.min(length, 4096 - (offset % 4096)), flags: DATA, depth: 1 };
  }
  protected override async doClose(): Promise<void> {
    this.closes++;
    this.calls.push('close');
  }
}

/** Deterministic numbers for the random request mix. */
function rng(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}

t.test('raw: an offset and size window over a file', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'a.img');
  const content = patternBuffer(MiB, 5);
  fs.writeFileSync(img, content);
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const f = await g.add({ driver: 'file', 'node-name': 'f', filename: img });
  const w = await g.add({ driver: 'raw', 'node-name': 'w', file: 'f', offset: 65536, size: 131072 });
  t.equal(w.size, 131072);
  t.equal(w.readOnly, false);
  const b = Buffer.alloc(4096);
  await w.read(0, b);
  t.ok(b.equals(content.subarray(65536, 65536 + 4096)), 'window offset 0 is file offset 65536');
  await w.read(131072 - 4096, b);
  t.ok(b.equals(content.subarray(65536 + 131072 - 4096, 65536 + 131072)), 'the last block of the window');
  await w.write(4096, Buffer.alloc(4096, 0xcc));
  await w.write(131072 - 7, Buffer.alloc(7, 0xdd));
  let file = fs.readFileSync(img);
  t.ok(file.subarray(65536 + 4096, 65536 + 8192).equals(Buffer.alloc(4096, 0xcc)), 'a write lands at 65536 + its offset');
  t.ok(file.subarray(65536 + 131072 - 7, 65536 + 131072).equals(Buffer.alloc(7, 0xdd)), 'the last bytes of the window');
  t.ok(file.subarray(65536 + 131072).equals(content.subarray(65536 + 131072)), 'nothing after the window changed');
  t.ok(file.subarray(0, 65536).equals(content.subarray(0, 65536)), 'nothing before the window changed');
  await w.writeZeroes(8192, 4096);
  file = fs.readFileSync(img);
  t.ok(file.subarray(65536 + 8192, 65536 + 12288).equals(Buffer.alloc(4096)), 'write-zeroes lands in the window');
  t.ok(file.subarray(65536 + 12288, 65536 + 16384).equals(content.subarray(65536 + 12288, 65536 + 16384)), 'and stops there');

  for (const [what, fn] of [
    ['read across the end', () => w.read(131072 - 10, Buffer.alloc(20))],
    ['read at the end', () => w.read(131072, Buffer.alloc(1))],
    ['write across the end', () => w.write(131072 - 1, Buffer.alloc(2))],
    ['write-zeroes across the end', () => w.writeZeroes(65536, 131072)],
    ['discard across the end', () => w.discard(131072 - 512, 1024)],
    ['block status at the end', () => w.blockStatus(131072, 1)],
    ['negative offset', () => w.read(-4096, Buffer.alloc(4096))],
  ] as Array<[string, () => Promise<unknown>]>) {
    const err = await errorOf(fn());
    t.equal(err?.errno, 'EINVAL', `${what}: EINVAL`);
  }
  t.equal(f.size, MiB, 'the file did not grow');
  t.ok(fs.readFileSync(img).subarray(65536 + 131072).equals(content.subarray(65536 + 131072)), 'no refused write touched the file');
  await t.rejects(w.truncate(262144), { errno: 'ENOTSUP', message: /raw with offset or size/ });

  // Block status through the window, in the window's coordinates.
  const sparse = sparseFile(path.join(dir, 's.img'), MiB);
  await g.add({ driver: 'file', 'node-name': 'sf', filename: sparse });
  const sw = await g.add({ driver: 'raw', 'node-name': 'sw', file: 'sf', offset: 65536, size: 262144 });
  await sw.write(8192, Buffer.alloc(4096, 1));
  t.match(await sw.blockStatus(0, 262144), { length: 8192, flags: ZERO, depth: 1 }, 'a hole at the start of the window');
  const ext = await sw.blockStatus(8192, 262144 - 8192);
  t.equal(ext.length, 4096, 'the data');
  t.equal(ext.flags, DATA);
  t.match(await sw.blockStatus(12288, 262144 - 12288), { length: 262144 - 12288, flags: ZERO, depth: 1 }, 'a hole to the end of the window, not beyond');
  const raw = fs.readFileSync(sparse);
  t.ok(raw.subarray(65536 + 8192, 65536 + 12288).equals(Buffer.alloc(4096, 1)));

  // A window can end exactly at the end of the file, or be empty.
  const tail = await g.add({ driver: 'raw', 'node-name': 'tail', file: 'f', offset: MiB - 4096 });
  t.equal(tail.size, 4096, 'without size the window runs to the end of the file');
  const empty = await g.add({ driver: 'raw', 'node-name': 'empty', file: 'f', offset: MiB });
  t.equal(empty.size, 0, 'offset = file size: an empty window');
  const whole = await g.add({ driver: 'raw', 'node-name': 'whole', file: 'f', size: MiB });
  t.equal(whole.size, MiB);
});

t.test("raw: QEMU's errors for a bad window", async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), MiB);
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  await g.add({ driver: 'file', 'node-name': 'f', filename: img });
  let k = 0;
  const refused = async (opts: Record<string, unknown>, message: string | RegExp, what: string) => {
    const name = `x${k++}`;
    const err = await errorOf(g.add({ driver: 'raw', 'node-name': name, file: 'f', ...opts }));
    if (typeof message === 'string') t.equal(err?.message, message, what);
    else t.match(err?.message, message, what);
    t.equal(err?.errno, 'EINVAL', `${what}: EINVAL`);
    const made = g.get(name);
    t.equal(made && `a node of size ${made.size}`, undefined, `${what}: no node`);
    if (made) await g.delete(name);
  };
  // The texts of QEMU's raw_apply_options (the double space is QEMU's).
  await refused({ offset: 2 * MiB }, 'Offset (2097152) cannot be greater than size of the containing file (1048576)', 'offset past the file');
  await refused({ offset: MiB / 2, size: MiB }, 'The sum of offset (524288) and size (1048576) has to be smaller or equal to the  actual size of the containing file (1048576)', 'window past the file');
  await refused({ size: 2 * MiB }, 'The sum of offset (0) and size (2097152) has to be smaller or equal to the  actual size of the containing file (1048576)', 'size past the file');
  await refused({ size: 1000 }, 'Specified size is not multiple of 512', 'size not a multiple of 512');
  await refused({ offset: '4096' }, "Invalid parameter type for 'offset', expected: integer", 'a string offset in JSON');
});

t.test('raw: a negative offset or size is refused', async (t) => {
  // qemu-img info 'json:{"driver":"raw","offset":-4096,...}' -> Parameter 'offset' expects a non-negative number below 2^64
  const img = sparseFile(path.join(tempDir(t), 'a.img'), MiB);
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  await g.add({ driver: 'file', 'node-name': 'f', filename: img });
  for (const [name, opts, word] of [
    ['neg-offset', { offset: -4096 }, 'offset'],
    ['neg-size', { size: -512 }, 'size'],
  ] as const) {
    const err = await errorOf(g.add({ driver: 'raw', 'node-name': name, file: 'f', ...opts }));
    t.equal(err?.errno, 'EINVAL', `${word} < 0: EINVAL`);
    t.match(err?.message, new RegExp(word), `${word} < 0: the message names '${word}'`);
    const made = g.get(name);
    t.equal(made && `a node of size ${made.size}`, undefined, `${word} < 0: no node was made`);
  }
});

t.test('raw: passes requests, FUA, flush and truncate to its child', async (t) => {
  const rec = new Recorder(64 * KiB, {}, false, 'child');
  const raw = new RawNode({ nodeName: 'r', file: rec, offset: 4096, size: 32 * KiB });
  t.equal(raw.size, 32 * KiB);
  t.same(raw.limits, rec.limits, "raw takes its child's limits");
  await raw.write(0, Buffer.alloc(512, 1), ReqFlags.FUA);
  t.same(rec.calls, ['write 4096 512', 'flush'], 'FUA reaches the child, which emulates it by a flush');
  rec.calls = [];
  await raw.flush();
  t.same(rec.calls, ['flush'], 'flush reaches the child');
  rec.calls = [];
  await raw.writeZeroes(512, 512, ReqFlags.MAY_UNMAP);
  await raw.discard(1024, 1024);
  await raw.cache(0, 4096);
  t.same(rec.calls, ['zero 4608 512 unmap', 'discard 5120 1024'], 'write-zeroes flags and discard are shifted by the offset');
  const plain = new RawNode({ nodeName: 'p', file: rec });
  t.equal(plain.size, 64 * KiB);
  await plain.truncate(128 * KiB);
  t.equal(plain.size, 128 * KiB, 'raw without a window follows a truncate');
  t.equal(rec.size, 128 * KiB, 'of its child');
  const roChild = new NullNode({ nodeName: 'n', size: 4096, readOnly: true });
  const ro = new RawNode({ nodeName: 'ro', file: roChild });
  t.equal(ro.readOnly, true, 'raw over a read-only child is read-only');
  await t.rejects(ro.write(0, Buffer.alloc(1)), { name: 'VdiskError', errno: 'EROFS' });
});

t.test('null-co: reads zeroes, drops writes, 1 GiB by default', async (t) => {
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const n = await g.add({ driver: 'null-co', 'node-name': 'n' });
  t.equal(n.size, 1 << 30, 'size defaults to 1 GiB');
  t.equal(n.filename, 'json:{"driver": "null-co"}', 'named by the options it was given, as QEMU does');
  await n.write(0, Buffer.alloc(4096, 1));
  await n.write((1 << 30) - 512, Buffer.alloc(512, 2), ReqFlags.FUA);
  const b = Buffer.alloc(4096, 9);
  await n.read(0, b);
  t.ok(b.equals(Buffer.alloc(4096)), 'a read returns zeroes even after a write, and overwrites the whole buffer');
  await n.read((1 << 30) - 512, b.subarray(0, 512).fill(9));
  t.ok(b.subarray(0, 512).equals(Buffer.alloc(512)));
  t.same(await n.blockStatus(0, MiB), { length: MiB, flags: ZERO, depth: 1 }, 'block status: zero');
  await n.writeZeroes(0, MiB);
  await n.discard(0, MiB);
  await n.flush();
  await t.rejects(n.read(1 << 30, Buffer.alloc(1)), { name: 'VdiskError', errno: 'EINVAL' }, 'past the end');
  const small = await g.add({ driver: 'null-co', 'node-name': 's', size: 8192, 'read-zeroes': false });
  t.equal(small.size, 8192);
  const c = Buffer.alloc(512, 7);
  await small.read(0, c);
  t.ok(c.equals(Buffer.alloc(512)), 'read-zeroes=false still returns zeroes (never stale bytes)');
  const ro = await g.add({ driver: 'null-co', 'node-name': 'ro', 'read-only': true, size: 4096 });
  await t.rejects(ro.write(0, Buffer.alloc(1)), { name: 'VdiskError', errno: 'EROFS' });
  await small.truncate(16384);
  t.equal(small.size, 16384, 'truncate sets the size');
  const slow = await g.add({ driver: 'null-co', 'node-name': 'slow', size: 4096, 'latency-ns': 30_000_000 });
  const t0 = performance.now();
  await slow.read(0, Buffer.alloc(512));
  t.ok(performance.now() - t0 >= 25, 'latency-ns delays a read');
  const t1 = performance.now();
  await slow.write(0, Buffer.alloc(512));
  t.ok(performance.now() - t1 >= 25, 'and a write');
});

t.test('null-co: a negative size is refused', async (t) => {
  // qemu-storage-daemon --blockdev driver=null-co,node-name=n,size=-1 -> Parameter 'size' expects a non-negative number below 2^64
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const neg = await errorOf(g.add({ driver: 'null-co', 'node-name': 'neg', size: -1 }));
  t.equal(neg?.errno, 'EINVAL', 'a negative size is refused');
  t.equal(g.get('neg')?.size, undefined, 'and no node with a negative size exists');
});

t.test('raw over null-co', async (t) => {
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const r = await g.add({ driver: 'raw', 'node-name': 'r', offset: 4096, size: 8192, file: { driver: 'null-co', size: 65536 } });
  t.equal(r.size, 8192);
  t.equal(r.child('file')?.driverName, 'null-co');
  await r.write(0, Buffer.alloc(8192, 1), ReqFlags.FUA);
  const b = Buffer.alloc(8192, 3);
  await r.read(0, b);
  t.ok(b.equals(Buffer.alloc(8192)), 'writes are dropped below, reads are zero');
  t.same(await r.blockStatus(0, 8192), { length: 8192, flags: ZERO, depth: 1 }, "the child's block status");
  await t.rejects(r.read(8192, Buffer.alloc(1)), { name: 'VdiskError', errno: 'EINVAL' });
  const whole = await g.add({ driver: 'raw', 'node-name': 'w', file: { driver: 'null-co' } });
  t.equal(whole.size, 1 << 30, 'raw without a window has the 1 GiB of null-co');
});

t.test('maxTransfer splitting and alignment padding: what reaches the driver', async (t) => {
  const r = new Recorder(MiB, { maxTransfer: 65536, requestAlignment: 512 });
  r.data.fill(1);
  await r.read(0, Buffer.alloc(200 * KiB));
  t.same(r.calls, ['read 0 65536', 'read 65536 65536', 'read 131072 65536', 'read 196608 8192'], 'a 200 KiB read arrives as 64 KiB pieces');
  r.calls = [];
  await r.write(0, Buffer.alloc(65536 * 2, 2));
  t.same(r.calls, ['write 0 65536', 'write 65536 65536'], 'an aligned write is split, not padded');
  r.calls = [];
  await r.write(0, Buffer.alloc(200000, 3));
  // 200000 is not a multiple of 512: the last block is read, then the padded range is written in 64 KiB pieces.
  t.same(r.calls, ['read 199680 512', 'write 0 65536', 'write 65536 65536', 'write 131072 65536', 'write 196608 3584']);
  t.ok(r.data.subarray(0, 200000).equals(Buffer.alloc(200000, 3)));
  t.equal(r.data[200000], 1, 'the padding kept the old bytes');
  r.calls = [];
  await r.read(1000, Buffer.alloc(100));
  t.same(r.calls, ['read 512 1024'], 'an unaligned read arrives aligned');
  r.calls = [];
  await r.write(1000, Buffer.alloc(100, 9));
  t.same(r.calls, ['read 512 512', 'read 1024 512', 'write 512 1024'], 'an unaligned write: read-modify-write of the two blocks it touches');
  t.ok(r.data.subarray(1000, 1100).equals(Buffer.alloc(100, 9)));
  t.equal(r.data[999], 3, 'the byte before is kept');
  t.equal(r.data[1100], 3, 'the byte after is kept');
  r.calls = [];
  await r.write(1024, Buffer.alloc(1000, 5));
  t.same(r.calls, ['read 1536 512', 'write 1024 1024'], 'aligned head, unaligned tail: one block read');
  r.calls = [];
  await r.write(1030, Buffer.alloc(10, 6));
  t.same(r.calls, ['read 1024 512', 'write 1024 512'], 'both edges in one block: that block is read once');
  r.calls = [];
  await r.read(100, Buffer.alloc(150 * KiB));
  t.ok(
    r.calls.every((c) => Number(c.split(' ')[2]) <= 65536),
    `an unaligned read larger than maxTransfer arrives in pieces of at most 64 KiB (${r.calls.join(', ')})`,
  );
  r.calls = [];
  r.zeroes = 'enotsup';
  await r.writeZeroes(0, 3 * 65536);
  t.same(r.calls, ['write 0 65536', 'write 65536 65536', 'write 131072 65536'], 'the write-zeroes fallback respects maxTransfer too');
  t.same(r.violations, [], 'no call broke the contract');
});

t.test('the driver contract holds for a random mix of requests, and the data matches a model', async (t) => {
  for (const [align, max] of [
    [512, 4096],
    [4096, 8192],
    [1, 1000],
  ]) {
    const size = 256 * KiB;
    const r = new Recorder(size, { requestAlignment: align, maxTransfer: max });
    const model = Buffer.alloc(size);
    const rand = rng(align * 7 + max);
    for (let i = 0; i < 400; i++) {
      const off = rand(size - 1);
      const len = 1 + rand(Math.min(3 * max, size - off));
      const kind = rand(4);
      if (kind === 0) {
        const buf = patternBuffer(len, i + 1);
        await r.write(off, buf, rand(2) ? ReqFlags.FUA : 0);
        buf.copy(model, off);
      } else if (kind === 1) {
        await r.writeZeroes(off, len, rand(2) ? ReqFlags.MAY_UNMAP : 0);
        model.fill(0, off, off + len);
      } else if (kind === 2) {
        const b = Buffer.alloc(len);
        await r.read(off, b);
        if (!b.equals(model.subarray(off, off + len))) {
          t.fail(`align ${align}: read ${off}+${len} differs from the model`);
          break;
        }
      } else {
        await r.discard(off, len);
      }
    }
    t.ok(r.data.equals(model), `align ${align}, maxTransfer ${max}: the disk equals the model`);
    t.same(r.violations, [], `align ${align}, maxTransfer ${max}: every driver call was aligned, in range and small enough`);
  }
});

t.test('a node whose size is not a multiple of its alignment: the last block reaches the driver aligned', async (t) => {
  // QEMU hands the driver the whole aligned block at the end (bdrv_aligned_preadv); the
  // driver's contract here says both offset and length are multiples of requestAlignment.
  const r = new Recorder(5000, { requestAlignment: 4096 });
  r.data = Buffer.concat([patternBuffer(5000, 1), Buffer.alloc(8192 - 5000)]);
  const b = Buffer.alloc(100);
  await errorOf(r.read(4900, b));
  // Reaching past the end is unavoidable for the partial last block; an unaligned length is not.
  t.same(
    r.violations.filter((v) => v.includes('not aligned')),
    [],
    'no driver call with an unaligned length',
  );
  t.ok(b.equals(patternBuffer(5000, 1).subarray(4900)), 'and the read returns the data');
});

t.test('FUA: emulated by a flush when the driver lacks it, passed through when it has it', async (t) => {
  const emulated = new Recorder(65536);
  await emulated.write(0, Buffer.alloc(512), ReqFlags.FUA);
  t.same(emulated.calls, ['write 0 512', 'flush'], 'write, then flush; the driver never sees FUA');
  emulated.calls = [];
  await emulated.write(0, Buffer.alloc(512));
  t.same(emulated.calls, ['write 0 512'], 'no flush without FUA');
  emulated.calls = [];
  await emulated.writeZeroes(0, 4096, ReqFlags.FUA);
  t.same(emulated.calls, ['zero 0 4096', 'flush'], 'write-zeroes with FUA: zero, then flush');
  emulated.calls = [];
  emulated.zeroes = 'enotsup';
  await emulated.writeZeroes(0, 4096, ReqFlags.FUA);
  t.same(emulated.calls, ['write 0 4096', 'flush'], 'the zero-buffer fallback with FUA: one flush after the writes');

  const split = new Recorder(65536, { maxTransfer: 4096 });
  await split.write(0, Buffer.alloc(12288), ReqFlags.FUA);
  t.same(split.calls, ['write 0 4096', 'write 4096 4096', 'write 8192 4096', 'flush'], 'a split FUA write: one flush after all pieces');

  const native = new Recorder(65536, {}, true);
  await native.write(0, Buffer.alloc(512), ReqFlags.FUA);
  await native.writeZeroes(0, 512, ReqFlags.FUA);
  t.same(native.calls, ['write 0 512 fua', 'zero 0 512 fua'], 'a driver with native FUA gets the flag and no flush');

  // Flush of a parent flushes its children.
  const child = new Recorder(65536, {}, false, 'c');
  const parent = new RawNode({ nodeName: 'p', file: child });
  await parent.flush();
  t.same(child.calls, ['flush']);
});

t.test('write-zeroes: efficient when possible, zero buffers when the driver says ENOTSUP, never with NO_FALLBACK', async (t) => {
  const r = new Recorder(2 * MiB);
  r.data.fill(7);
  await r.writeZeroes(4096, 8192, ReqFlags.MAY_UNMAP);
  t.same(r.calls, ['zero 4096 8192 unmap'], 'the driver zeroes, with MAY_UNMAP');
  t.ok(r.data.subarray(4096, 12288).equals(Buffer.alloc(8192)));
  r.zeroes = 'enotsup';
  r.calls = [];
  await r.writeZeroes(0, 1.5 * MiB);
  t.same(r.calls, ['write 0 1048576', 'write 1048576 524288'], 'fell back to writes of zero buffers (1 MiB at a time)');
  t.ok(r.data.subarray(0, 1.5 * MiB).equals(Buffer.alloc(1.5 * MiB)), 'the range is zero');
  t.equal(r.data[1.5 * MiB], 7, 'and nothing after it');

  r.data.fill(7);
  r.calls = [];
  const err = await errorOf(r.writeZeroes(0, 4096, ReqFlags.NO_FALLBACK));
  t.type(err, VdiskError);
  t.equal(err?.errno, 'ENOTSUP', 'NO_FALLBACK: the ENOTSUP reaches the caller');
  t.same(r.calls, [], 'and nothing was written');
  t.ok(r.data.subarray(0, 4096).equals(Buffer.alloc(4096, 7)), 'the data is unchanged');

  const a = new Recorder(65536, { requestAlignment: 512 });
  const e2 = await errorOf(a.writeZeroes(100, 1000, ReqFlags.NO_FALLBACK));
  t.equal(e2?.errno, 'ENOTSUP', 'an unaligned fast zero is refused, even when the driver could zero the middle');
  t.same(a.calls, []);
  await a.writeZeroes(100, 1000);
  t.same(a.calls, ['read 0 512', 'write 0 512', 'zero 512 512', 'read 1024 512', 'write 1024 512'], 'unaligned: edges by read-modify-write, the middle by the driver');

  const broken = new Recorder(65536);
  broken.zeroes = 'eio';
  broken.data.fill(7);
  const e3 = await errorOf(broken.writeZeroes(0, 4096));
  t.equal(e3?.errno, 'EIO', 'an error other than ENOTSUP is not hidden by the fallback');
  t.same(broken.calls, []);
});

t.test('detect-zeroes: zero writes become write-zeroes', async (t) => {
  const on = new Recorder(65536);
  on.detectZeroes = 'on';
  await on.write(0, Buffer.alloc(4096));
  await on.write(4096, Buffer.alloc(4096, 1));
  await on.write(8192, Buffer.alloc(4096), ReqFlags.FUA);
  t.same(on.calls, ['zero 0 4096', 'write 4096 4096', 'zero 8192 4096', 'flush'], "'on': write-zeroes without MAY_UNMAP; FUA kept");
  const unmap = new Recorder(65536);
  unmap.detectZeroes = 'unmap';
  await unmap.write(0, Buffer.alloc(4096));
  const big = Buffer.alloc(3 * MiB / 2);
  const bigNode = new Recorder(2 * MiB);
  bigNode.detectZeroes = 'unmap';
  await bigNode.write(0, big);
  big[big.length - 1] = 1;
  await bigNode.write(0, big);
  t.same(unmap.calls, ['zero 0 4096 unmap'], "'unmap': write-zeroes with MAY_UNMAP");
  t.same(bigNode.calls, [`zero 0 ${3 * MiB / 2} unmap`, `write 0 ${3 * MiB / 2}`], 'a buffer over 1 MiB is checked to its last byte');
  const off = new Recorder(65536);
  await off.write(0, Buffer.alloc(4096));
  t.same(off.calls, ['write 0 4096'], "'off' (the default): a plain write");
});

t.test('detect-zeroes on a real file: holes with unmap, allocated zeroes with on, data with off', async (t) => {
  const dir = tempDir(t);
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const nodes: Record<string, BlockNode> = {};
  const files: Record<string, string> = {};
  for (const dz of ['off', 'on', 'unmap'] as const) {
    files[dz] = path.join(dir, `${dz}.img`);
    fs.writeFileSync(files[dz], patternBuffer(4 * MiB, 20));
    nodes[dz] = await g.add({ driver: 'raw', 'node-name': `r-${dz}`, 'detect-zeroes': dz, discard: 'unmap', file: { driver: 'file', filename: files[dz] } });
  }
  const before = fs.statSync(files.unmap).blocks * 512;
  for (const n of Object.values(nodes)) await n.write(MiB, Buffer.alloc(MiB));
  const freed = before - fs.statSync(files.unmap).blocks * 512;
  t.ok(freed >= MiB - 8 * KiB, `detect-zeroes=unmap punched the zero write (freed ${freed})`);
  t.match(await nodes.unmap.blockStatus(MiB, MiB), { length: MiB, flags: ZERO, depth: 1 }, 'and block status shows a hole');
  t.ok(fs.statSync(files.on).blocks * 512 >= before, 'detect-zeroes=on keeps the space (zero range, no unmap)');
  const ext = await nodes.off.blockStatus(MiB, MiB);
  t.equal(ext.flags, DATA, 'detect-zeroes=off wrote data');
  t.ok(fs.statSync(files.off).blocks * 512 >= before);
  for (const [dz, n] of Object.entries(nodes)) {
    const b = Buffer.alloc(MiB, 1);
    await n.read(MiB, b);
    t.ok(b.equals(Buffer.alloc(MiB)), `${dz}: the range reads zero`);
    await n.read(0, b);
    t.ok(b.equals(patternBuffer(4 * MiB, 20).subarray(0, MiB)), `${dz}: the data before is intact`);
  }
});

t.test('drain waits for every request in flight', async (t) => {
  const r = new Recorder(65536);
  await r.drain();
  t.pass('drain of an idle node resolves at once');
  let release!: () => void;
  r.hold = new Promise((res) => (release = res));
  const w1 = r.write(0, Buffer.alloc(512, 3));
  const w2 = r.read(4096, Buffer.alloc(512));
  let drained = 0;
  const d1 = r.drain().then(() => drained++);
  const d2 = r.drain().then(() => drained++);
  await new Promise((res) => setTimeout(res, 30));
  t.equal(drained, 0, 'drain waits while requests are in flight');
  release();
  await Promise.all([w1, w2, d1, d2]);
  t.equal(drained, 2, 'every drain resolves once they are done');
  t.equal(r.data[0], 3);
  // A failed request is not counted forever.
  r.hold = Promise.reject(new VdiskError('EIO', 'x'));
  r.hold.catch(() => undefined);
  await t.rejects(r.read(0, Buffer.alloc(1)), { name: 'VdiskError', errno: 'EIO' });
  r.hold = undefined;
  const quick = await Promise.race([r.drain().then(() => 'drained'), new Promise((res) => setTimeout(() => res('stuck'), 200))]);
  t.equal(quick, 'drained', 'a failed request still leaves the in-flight count');
});

t.test('close waits for requests, and later requests fail with ESHUTDOWN', async (t) => {
  const r = new Recorder(65536);
  let release!: () => void;
  r.hold = new Promise((res) => (release = res));
  const pending = r.write(0, Buffer.alloc(512, 3));
  const closing = r.close();
  await new Promise((res) => setTimeout(res, 20));
  t.equal(r.closes, 0, 'close waits for the request in flight');
  t.equal(r.isClosed, false);
  release();
  await pending;
  await closing;
  t.equal(r.isClosed, true);
  t.same(r.calls.slice(-2), ['write 0 512', 'close'], 'the driver is closed after the request');
  await r.close();
  t.equal(r.closes, 1, 'a second close later does nothing');
  for (const [what, fn] of [
    ['read', () => r.read(0, Buffer.alloc(1))],
    ['write', () => r.write(0, Buffer.alloc(1))],
    ['write-zeroes', () => r.writeZeroes(0, 512)],
    ['discard', () => r.discard(0, 512)],
    ['flush', () => r.flush()],
    ['block status', () => r.blockStatus(0, 512)],
    ['cache', () => r.cache(0, 512)],
  ] as Array<[string, () => Promise<unknown>]>) {
    const err = await errorOf(fn());
    t.type(err, VdiskError, `${what}: a VdiskError`);
    t.equal(err?.errno, 'ESHUTDOWN', `${what} after close: ESHUTDOWN`);
  }
});

t.test('two close() calls at once close the driver once', async (t) => {
  const r = new Recorder(65536);
  let release!: () => void;
  r.hold = new Promise((res) => (release = res));
  const pending = r.write(0, Buffer.alloc(512, 3));
  const both = Promise.all([r.close(), r.close()]);
  release();
  await pending;
  await both;
  t.equal(r.closes, 1, 'doClose ran once');
});

t.test('truncate after close: ESHUTDOWN, and the size stays', async (t) => {
  const r = new Recorder(65536);
  await r.close();
  const err = await errorOf(r.truncate(4096));
  t.type(err, VdiskError, 'a VdiskError');
  t.equal(err?.errno, 'ESHUTDOWN');
  t.equal(r.size, 65536, 'a closed node was not resized');
  t.notOk(r.calls.includes('truncate 4096'), 'the driver was not asked');
  const n = new NullNode({ nodeName: 'n', size: 4096 });
  await n.close();
  await t.rejects(n.truncate(8192), { name: 'VdiskError', errno: 'ESHUTDOWN' }, 'null-co: truncate after close');
  t.equal(n.size, 4096);
});

t.test('errors that are not VdiskErrors become EIO with the cause and the place', async (t) => {
  class Broken extends BlockNode {
    readonly driverName = 'broken';
    constructor() {
      super({ nodeName: 'b' });
      this.length = 4096;
    }
    protected override async doRead(): Promise<void> {
      throw new TypeError('boom');
    }
  }
  const err = await errorOf(new Broken().read(0, Buffer.alloc(1)));
  t.type(err, VdiskError);
  t.equal(err?.errno, 'EIO');
  t.equal(err?.message, "read at 0 on node 'b': boom");
  t.type(err?.cause, TypeError);
  const w = await errorOf(new Broken().write(0, Buffer.alloc(1)));
  t.equal(w?.errno, 'ENOTSUP', 'a node without doWrite refuses writes with ENOTSUP');
  t.match(w?.message, /does not support writes/);
});
