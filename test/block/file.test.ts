/**
 * The file driver (src/block/drivers/file.ts, native/vdisk_native.c) on a
 * real ext4 file, a tmpfs file and a loop block device: data, holes and
 * block status, punching and zeroing, FUA and flush, read-only and
 * auto-read-only, truncate, range checks, O_DIRECT with read-modify-write,
 * and locking that real QEMU (qemu-io) sees and honours.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { type ChildProcess, spawn } from 'node:child_process';
import { FileNode, type FileOptions } from '../../src/block/drivers/file.js';
import { ReqFlags, Status } from '../../src/block/node.js';
import { native } from '../../src/native.js';
import { VdiskError } from '../../src/errors.js';
import { setLogLevel } from '../../src/log.js';
import { patternBuffer, requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';

setLogLevel('error');

const KiB = 1024;
const MiB = 1024 * 1024;
const ZERO = Status.ZERO | Status.ALLOCATED;
const DATA = Status.DATA | Status.ALLOCATED;

/** Bytes the file system has allocated for the file. */
const allocated = (file: string) => fs.statSync(file).blocks * 512;

async function open(t: Test, filename: string, extra: Partial<FileOptions> = {}): Promise<FileNode> {
  const node = await FileNode.open({ nodeName: 'f0', filename, ...extra });
  t.teardown(() => node.close());
  return node;
}

async function errorOf(p: Promise<unknown>): Promise<VdiskError | undefined> {
  return p.then(
    () => undefined,
    (e) => e,
  );
}

/** Whether a lock of QEMU's "write" permission byte (101) is held by any open file description. */
function writeLockHeld(file: string): boolean {
  const fd = fs.openSync(file, 'r');
  try {
    return native.ofdTest(fd, 101, 1, 2) === 1;
  } finally {
    fs.closeSync(fd);
  }
}

t.test('data round trip with patterns; a sparse file reads zeroes', async (t) => {
  const img = sparseFile(path.join(tempDir(t), 'a.img'), 16 * MiB);
  const f = await open(t, img);
  t.equal(f.size, 16 * MiB);
  t.equal(f.driverName, 'file');
  t.equal(f.filename, img);
  t.equal(f.readOnly, false);
  t.equal(f.limits.requestAlignment, 1, 'buffered I/O needs no alignment');
  const hole = Buffer.alloc(MiB, 0xff);
  await f.read(3 * MiB, hole);
  t.ok(hole.equals(Buffer.alloc(MiB)), 'a hole reads as zeroes (the buffer is overwritten)');

  // Small (event loop), large (thread pool) and odd-sized writes.
  const pieces: Array<[number, Buffer]> = [
    [0, patternBuffer(512, 1)],
    [4 * MiB, patternBuffer(2 * MiB, 2)],
    [7 * MiB + 3, patternBuffer(1234567, 3)],
    [16 * MiB - 100, patternBuffer(100, 4)],
  ];
  for (const [off, buf] of pieces) await f.write(off, buf);
  const file = fs.readFileSync(img);
  t.equal(file.length, 16 * MiB, 'writes inside the file do not change its size');
  for (const [off, buf] of pieces) {
    const back = Buffer.alloc(buf.length);
    await f.read(off, back);
    t.ok(back.equals(buf), `read back ${buf.length} bytes at ${off}`);
    t.ok(file.subarray(off, off + buf.length).equals(buf), `and they are in the file at ${off}`);
  }
  // A read spanning data and hole.
  const span = Buffer.alloc(2048, 0xee);
  await f.read(6 * MiB - 1024, span);
  t.ok(span.subarray(0, 1024).equals(pieces[1][1].subarray(2 * MiB - 1024)), 'data part');
  t.ok(span.subarray(1024).equals(Buffer.alloc(1024)), 'hole part');
  // Reads that miss the page cache go to the thread pool: drop the cache and read again.
  await f.flush();
  try {
    fs.writeFileSync('/proc/sys/vm/drop_caches', '1');
  } catch {
    // Not root: the read below may still come from the cache.
  }
  const cold = Buffer.alloc(2 * MiB);
  await f.read(4 * MiB, cold);
  t.ok(cold.equals(pieces[1][1]), 'a cold read returns the same data');
  // Many concurrent reads and writes on distinct ranges.
  await Promise.all(Array.from({ length: 32 }, (_, i) => f.write(8 * MiB + i * 65536, patternBuffer(65536, 100 + i))));
  const all = await Promise.all(
    Array.from({ length: 32 }, async (_, i) => {
      const b = Buffer.alloc(65536);
      await f.read(8 * MiB + i * 65536, b);
      return b.equals(patternBuffer(65536, 100 + i));
    }),
  );
  t.same(all, Array(32).fill(true), '32 concurrent writes then reads');
  t.equal(f.size, 16 * MiB);
});

t.test('a file on tmpfs (no RWF_NOWAIT there) reads and writes', async (t) => {
  const dir = tempDir(t);
  const mnt = path.join(dir, 'tmpfs');
  fs.mkdirSync(mnt);
  const m = await run('mount', ['-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', mnt]);
  t.equal(m.code, 0, `mount tmpfs: ${m.stderr}`);
  if (m.code !== 0) return;
  t.teardown(() => run('umount', [mnt]));
  const img = path.join(mnt, 'a.img');
  fs.writeFileSync(img, patternBuffer(MiB, 9));
  const f = await open(t, img);
  const b = Buffer.alloc(4096);
  const err = await errorOf(f.read(4096, b));
  t.equal(err?.message, undefined, 'a read of a tmpfs file succeeds');
  t.ok(b.equals(patternBuffer(MiB, 9).subarray(4096, 8192)), 'and returns the data');
  await f.write(0, Buffer.alloc(512, 0x11));
  const c = Buffer.alloc(512);
  await errorOf(f.read(0, c));
  t.ok(c.equals(Buffer.alloc(512, 0x11)), 'a write is read back');
  await f.close();
});

t.test('block status: holes are ZERO, data is DATA, at 4 KiB file system granularity', async (t) => {
  const img = sparseFile(path.join(tempDir(t), 'a.img'), 16 * MiB);
  const f = await open(t, img);
  t.match(await f.blockStatus(0, 16 * MiB), { length: 16 * MiB, flags: ZERO, depth: 1 }, 'all hole at first');
  await f.write(4 * MiB, patternBuffer(2 * MiB, 1));
  let ext = await f.blockStatus(0, 16 * MiB);
  t.match(ext, { length: 4 * MiB, flags: ZERO, depth: 1 }, 'hole before the data');
  ext = await f.blockStatus(4 * MiB, 12 * MiB);
  t.same(ext, { length: 2 * MiB, flags: DATA, depth: 1, hostOffset: 4 * MiB }, 'the data, at its own offset in the file');
  ext = await f.blockStatus(6 * MiB, 10 * MiB);
  t.same(ext, { length: 10 * MiB, flags: ZERO, depth: 1, hostOffset: 6 * MiB }, 'hole to the end, with its place in the file (qemu-img map shows it)');
  ext = await f.blockStatus(5 * MiB, 4096);
  t.equal(ext.length, 4096, 'never longer than asked');
  t.equal(ext.flags, DATA);
  ext = await f.blockStatus(5 * MiB + 1, 10);
  t.same(ext, { length: 10, flags: DATA, depth: 1, hostOffset: 5 * MiB + 1 }, 'an unaligned query inside data');

  // 100 bytes at 10000 allocate the whole 4 KiB block 8192..12288 and nothing else.
  await f.write(10000, Buffer.alloc(100, 1));
  t.match(await f.blockStatus(0, 4 * MiB), { length: 8192, flags: ZERO, depth: 1 }, 'hole up to the block');
  t.same(await f.blockStatus(8192, 4 * MiB), { length: 4096, flags: DATA, depth: 1, hostOffset: 8192 }, 'one 4 KiB block of data');
  t.same(await f.blockStatus(10000, 4 * MiB), { length: 2288, flags: DATA, depth: 1, hostOffset: 10000 }, 'from inside the block');
  t.match(await f.blockStatus(12288, 4 * MiB - 12288), { length: 4 * MiB - 12288, flags: ZERO, depth: 1 }, 'hole after it');
  // Walking the whole file by extents finds exactly the written ranges.
  const map: string[] = [];
  for (let off = 0; off < f.size; ) {
    const e = await f.blockStatus(off, f.size - off);
    map.push(`${off}+${e.length}:${e.flags & Status.DATA ? 'data' : 'zero'}`);
    off += e.length;
  }
  t.same(map, ['0+8192:zero', '8192+4096:data', `12288+${4 * MiB - 12288}:zero`, `${4 * MiB}+${2 * MiB}:data`, `${6 * MiB}+${10 * MiB}:zero`]);
  await t.rejects(f.blockStatus(0, 0), { name: 'VdiskError', errno: 'EINVAL' }, 'zero length is refused');
});

t.test('discard: punches a hole with discard=unmap, does nothing with discard=ignore', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'a.img');
  const content = patternBuffer(8 * MiB, 2);
  fs.writeFileSync(img, content);
  const f = await open(t, img, { discard: 'unmap' });
  const before = allocated(img);
  t.ok(before >= 8 * MiB, 'the file is fully allocated');
  await f.discard(MiB, MiB);
  const after = allocated(img);
  t.ok(before - after >= MiB - 8 * KiB && before - after <= MiB, `discard freed 1 MiB (freed ${before - after})`);
  const b = Buffer.alloc(MiB, 1);
  await f.read(MiB, b);
  t.ok(b.equals(Buffer.alloc(MiB)), 'the punched range reads zero');
  t.match(await f.blockStatus(MiB, MiB), { length: MiB, flags: ZERO, depth: 1 }, 'and is a hole');
  t.same(await f.blockStatus(0, MiB), { length: MiB, flags: DATA, depth: 1, hostOffset: 0 }, 'the data before it stays');
  await f.read(2 * MiB, b);
  t.ok(b.equals(content.subarray(2 * MiB, 3 * MiB)), 'the data after it is intact');
  // An unaligned discard frees only whole blocks and never changes bytes outside it.
  await f.discard(3 * MiB + 100, 10000);
  const edge = Buffer.alloc(200);
  await f.read(3 * MiB, edge);
  t.ok(edge.subarray(0, 100).equals(content.subarray(3 * MiB, 3 * MiB + 100)), 'bytes before an unaligned discard are kept');
  t.equal(fs.statSync(img).size, 8 * MiB, 'discard never changes the file size');
  await f.close();

  const g = await open(t, img, { discard: 'ignore' });
  const now = allocated(img);
  await g.discard(4 * MiB, 2 * MiB);
  t.equal(allocated(img), now, 'discard=ignore frees nothing');
  const c = Buffer.alloc(MiB);
  await g.read(4 * MiB, c);
  t.ok(c.equals(content.subarray(4 * MiB, 5 * MiB)), 'and the data is still there');
  const def = await FileNode.open({ nodeName: 'd', filename: img, locking: 'off' });
  t.teardown(() => def.close());
  await def.discard(4 * MiB, 2 * MiB);
  t.equal(allocated(img), now, 'ignore is the default');
});

t.test('write-zeroes: MAY_UNMAP punches (discard=unmap), otherwise zero range keeps the space', async (t) => {
  const img = path.join(tempDir(t), 'a.img');
  const content = patternBuffer(8 * MiB, 5);
  fs.writeFileSync(img, content);
  const f = await open(t, img, { discard: 'unmap' });
  const before = allocated(img);
  const b = Buffer.alloc(MiB, 1);
  await f.writeZeroes(2 * MiB, MiB, ReqFlags.MAY_UNMAP);
  const punched = before - allocated(img);
  t.ok(punched >= MiB - 8 * KiB && punched <= MiB, `MAY_UNMAP punched 1 MiB (freed ${punched})`);
  await f.read(2 * MiB, b);
  t.ok(b.equals(Buffer.alloc(MiB)), 'reads zero');
  t.match(await f.blockStatus(2 * MiB, MiB), { length: MiB, flags: ZERO, depth: 1 }, 'a hole');

  const mid = allocated(img);
  await f.writeZeroes(3 * MiB, MiB, 0);
  t.ok(allocated(img) >= mid, 'without MAY_UNMAP the space stays allocated (FALLOC_FL_ZERO_RANGE)');
  b.fill(1);
  await f.read(3 * MiB, b);
  t.ok(b.equals(Buffer.alloc(MiB)), 'and reads zero');
  await f.writeZeroes(4 * MiB, MiB, ReqFlags.NO_FALLBACK | ReqFlags.FUA);
  b.fill(1);
  await f.read(4 * MiB, b);
  t.ok(b.equals(Buffer.alloc(MiB)), 'a fast zero (NO_FALLBACK) with FUA works on ext4');
  await f.writeZeroes(5 * MiB + 100, 1000);
  const small = Buffer.alloc(1200);
  await f.read(5 * MiB, small);
  t.ok(small.subarray(0, 100).equals(content.subarray(5 * MiB, 5 * MiB + 100)), 'unaligned zeroing keeps the bytes before');
  t.ok(small.subarray(100, 1100).equals(Buffer.alloc(1000)), 'zeroes the range');
  t.ok(small.subarray(1100).equals(content.subarray(5 * MiB + 1100, 5 * MiB + 1200)), 'keeps the bytes after');
  t.equal(fs.statSync(img).size, 8 * MiB, 'the size is unchanged');
  await f.close();

  const g = await open(t, img, { discard: 'ignore' });
  const now = allocated(img);
  await g.writeZeroes(6 * MiB, MiB, ReqFlags.MAY_UNMAP);
  t.ok(allocated(img) >= now, 'with discard=ignore MAY_UNMAP does not punch');
  b.fill(1);
  await g.read(6 * MiB, b);
  t.ok(b.equals(Buffer.alloc(MiB)), 'but the range reads zero');
});

t.test('FUA writes and flush', async (t) => {
  const img = sparseFile(path.join(tempDir(t), 'a.img'), MiB);
  const f = await open(t, img);
  await f.write(0, Buffer.alloc(4096, 7), ReqFlags.FUA);
  t.equal(fs.readFileSync(img)[4095], 7, 'a FUA write is in the file');
  await f.write(8192, patternBuffer(300 * KiB, 6), ReqFlags.FUA);
  t.ok(fs.readFileSync(img).subarray(8192, 8192 + 300 * KiB).equals(patternBuffer(300 * KiB, 6)), 'a large FUA write');
  await f.write(512 * KiB, Buffer.alloc(100, 8));
  await f.flush();
  t.equal(fs.readFileSync(img)[512 * KiB + 99], 8);
  await Promise.all([f.flush(), f.flush(), f.write(600 * KiB, Buffer.alloc(10, 9), ReqFlags.FUA)]);
  t.equal(fs.readFileSync(img)[600 * KiB], 9, 'flushes and FUA writes at once');

  const ro = await FileNode.open({ nodeName: 'ro', filename: img, readOnly: true, locking: 'off' });
  t.teardown(() => ro.close());
  await ro.flush();
  t.pass('flush on a read-only node succeeds');
  const nf = await FileNode.open({ nodeName: 'nf', filename: img, noFlush: true, locking: 'off' });
  t.teardown(() => nf.close());
  await nf.write(0, Buffer.alloc(10, 3), ReqFlags.FUA);
  await nf.flush();
  t.equal(fs.readFileSync(img)[0], 3, 'cache.no-flush still writes');
});

t.test('read-only: writes refused with EROFS, reads work', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'a.img');
  fs.writeFileSync(img, patternBuffer(MiB, 7));
  const ro = await open(t, img, { readOnly: true });
  t.equal(ro.readOnly, true);
  for (const [what, p] of [
    ['write', ro.write(0, Buffer.alloc(512))],
    ['write-zeroes', ro.writeZeroes(0, 512)],
    ['discard', ro.discard(0, 512)],
    ['truncate', ro.truncate(2 * MiB)],
  ] as const) {
    const err = await errorOf(p);
    t.equal(err?.errno, 'EROFS', `${what} is refused with EROFS`);
    t.match(err?.message, /read-only/);
  }
  const b = Buffer.alloc(4096);
  await ro.read(4096, b);
  t.ok(b.equals(patternBuffer(MiB, 7).subarray(4096, 8192)), 'reads work');
  t.ok(fs.readFileSync(img).equals(patternBuffer(MiB, 7)), 'the file is unchanged');
  t.equal(fs.statSync(img).size, MiB);
});

t.test('a file without write permission: read-only works, auto-read-only falls back', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'a.img');
  fs.writeFileSync(img, patternBuffer(MiB, 8));
  fs.chmodSync(img, 0o444);
  // Root ignores file modes: make the file immutable instead (chattr +i), undone before the dir is removed.
  if (process.getuid?.() === 0) {
    const r = await run('chattr', ['+i', img]);
    t.equal(r.code, 0, `chattr +i: ${r.stderr}`);
    t.teardown(() => run('chattr', ['-i', img]));
  }
  const plain = await errorOf(FileNode.open({ nodeName: 'p', filename: img }));
  t.type(plain, VdiskError, 'a writable open fails');
  t.match(plain?.errno, /^(EACCES|EPERM)$/);
  t.match(plain?.message, new RegExp(`^Could not open '${img}': `));

  const ro = await open(t, img, { readOnly: true });
  const b = Buffer.alloc(1000);
  await ro.read(5000, b);
  t.ok(b.equals(patternBuffer(MiB, 8).subarray(5000, 6000)), 'a read-only node reads it');
  t.equal(ro.size, MiB);
  await ro.close();

  const auto = await open(t, img, { autoReadOnly: true });
  t.equal(auto.readOnly, true, 'auto-read-only fell back to read-only');
  await auto.read(0, b);
  t.ok(b.equals(patternBuffer(MiB, 8).subarray(0, 1000)));
  await t.rejects(auto.write(0, Buffer.alloc(512)), { name: 'VdiskError', errno: 'EROFS' }, 'and refuses writes');
  await t.rejects(auto.read(MiB, Buffer.alloc(1)), { name: 'VdiskError', errno: 'EINVAL' }, 'a read-only node is not growable');
  await auto.close();

  const ok = sparseFile(path.join(dir, 'b.img'), MiB);
  const rw = await open(t, ok, { autoReadOnly: true });
  t.equal(rw.readOnly, false, 'auto-read-only stays writable when it can');
});

t.test('truncate: grow reads zeroes, shrink, sizes follow', async (t) => {
  const img = path.join(tempDir(t), 'a.img');
  fs.writeFileSync(img, patternBuffer(MiB, 10));
  const f = await open(t, img);
  await f.truncate(3 * MiB);
  t.equal(f.size, 3 * MiB);
  t.equal(fs.statSync(img).size, 3 * MiB);
  const b = Buffer.alloc(2 * MiB, 1);
  await f.read(MiB, b);
  t.ok(b.equals(Buffer.alloc(2 * MiB)), 'the grown part reads zero');
  t.match(await f.blockStatus(MiB, 2 * MiB), { length: 2 * MiB, flags: ZERO, depth: 1 }, 'and is a hole');
  const old = Buffer.alloc(MiB);
  await f.read(0, old);
  t.ok(old.equals(patternBuffer(MiB, 10)), 'the old part is intact');
  await f.write(3 * MiB - 512, Buffer.alloc(512, 4));
  await f.truncate(MiB / 2);
  t.equal(f.size, MiB / 2);
  t.equal(fs.statSync(img).size, MiB / 2);
  await f.truncate(MiB);
  const c = Buffer.alloc(MiB / 2, 1);
  await f.read(MiB / 2, c);
  t.ok(c.equals(Buffer.alloc(MiB / 2)), 'shrink then grow: the cut part is gone');
  await t.rejects(f.truncate(-1), { name: 'VdiskError', errno: 'EINVAL' });
  await t.rejects(f.truncate(1.5), { name: 'VdiskError', errno: 'EINVAL' });
  await t.rejects(f.truncate(2 ** 53), { name: 'VdiskError', errno: 'EINVAL' });
  t.equal(f.size, MiB);
});

t.test('range checks: past the end of a read-only node, offsets of 2^53 and more, bad numbers', async (t) => {
  const img = sparseFile(path.join(tempDir(t), 'a.img'), MiB);
  const ro = await open(t, img, { readOnly: true });
  const cases: Array<[string, () => Promise<unknown>]> = [
    ['read across the end', () => ro.read(MiB - 10, Buffer.alloc(20))],
    ['read at the end', () => ro.read(MiB, Buffer.alloc(1))],
    ['block status past the end', () => ro.blockStatus(MiB, 1)],
    ['cache past the end', () => ro.cache(MiB - 1, 2)],
  ];
  for (const [what, fn] of cases) {
    const err = await errorOf(fn());
    t.equal(err?.errno, 'EINVAL', what);
    t.match(err?.message, /past the end/, `${what}: says why`);
  }
  const b = Buffer.alloc(10);
  await ro.read(MiB - 10, b);
  t.pass('the last bytes can be read');
  await ro.read(MiB, Buffer.alloc(0));
  t.pass('an empty read at the end is fine');

  const rw = await open(t, img, { locking: 'off' });
  for (const node of [ro, rw]) {
    for (const [what, fn] of [
      ['read at 2^53', () => node.read(2 ** 53, Buffer.alloc(1))],
      ['read at 2^60', () => node.read(2 ** 60, Buffer.alloc(512))],
      ['read reaching past 2^53', () => node.read(2 ** 53 - 1, Buffer.alloc(2))],
      ['write at 2^53', () => node.write(2 ** 53, Buffer.alloc(1))],
      ['write at 2^53 + 2', () => node.write(2 ** 53 + 2, Buffer.alloc(1))],
      ['write-zeroes of 2^53 bytes', () => node.writeZeroes(0, 2 ** 53)],
      ['discard at 2^63', () => node.discard(2 ** 63, 4096)],
      ['block status at 2^53', () => node.blockStatus(2 ** 53, 1)],
      ['negative offset', () => node.read(-1, Buffer.alloc(1))],
      ['fractional offset', () => node.read(1.5, Buffer.alloc(1))],
      ['NaN offset', () => node.read(NaN, Buffer.alloc(1))],
      ['infinite length', () => node.writeZeroes(0, Infinity)],
      ['negative length', () => node.discard(0, -4096)],
    ] as Array<[string, () => Promise<unknown>]>) {
      const err = await errorOf(fn());
      t.equal(err?.errno, 'EINVAL', `${node.readOnly ? 'read-only' : 'writable'}: ${what} is EINVAL`);
    }
  }
  t.equal(fs.statSync(img).size, MiB, 'nothing grew the file');
  t.equal(rw.size, MiB);
  const c = Buffer.alloc(4096);
  await rw.read(0, c);
  t.pass('the node still works after all that');
});

t.test('a writable file node is growable (as under a format driver)', async (t) => {
  const img = path.join(tempDir(t), 'a.img');
  fs.writeFileSync(img, patternBuffer(MiB, 12));
  const f = await open(t, img);
  const b = Buffer.alloc(4096, 0xff);
  await f.read(MiB + 4096, b);
  t.ok(b.equals(Buffer.alloc(4096)), 'a read past the end returns zeroes');
  const across = Buffer.alloc(200, 0xff);
  await f.read(MiB - 100, across);
  t.ok(across.subarray(0, 100).equals(patternBuffer(MiB, 12).subarray(MiB - 100)), 'a read across the end: the data');
  t.ok(across.subarray(100).equals(Buffer.alloc(100)), 'then zeroes');
  t.equal(f.size, MiB, 'reading does not grow');
  await f.write(2 * MiB, Buffer.alloc(512, 3));
  t.equal(f.size, 2 * MiB + 512, 'a write past the end grows the node');
  t.equal(fs.statSync(img).size, 2 * MiB + 512, 'and the file');
  const gap = Buffer.alloc(4096, 1);
  await f.read(MiB, gap);
  t.ok(gap.equals(Buffer.alloc(4096)), 'the gap reads zero');
});

t.test('a growable file node: block status at the end is one extent, not one byte', async (t) => {
  const img = path.join(tempDir(t), 'a.img');
  fs.writeFileSync(img, patternBuffer(MiB, 13));
  const f = await open(t, img);
  // Past the end of a growable node nothing is stored: the whole range asked reads as zeroes.
  t.same(await f.blockStatus(f.size, 65536), { length: 65536, flags: Status.ZERO, depth: 0 }, 'one zero extent for the whole range asked, not one byte and not an error');
});

t.test('a growable file node: write-zeroes past the end grows it as a write does', async (t) => {
  // QEMU's file-posix zeroes with FALLOC_FL_ZERO_RANGE without KEEP_SIZE, which extends the file.
  const img = path.join(tempDir(t), 'a.img');
  fs.writeFileSync(img, patternBuffer(MiB, 14));
  const f = await open(t, img);
  await f.writeZeroes(3 * MiB, 65536);
  t.equal(f.size, 3 * MiB + 65536, 'write-zeroes past the end grows the node');
  t.equal(fs.statSync(img).size, 3 * MiB + 65536, 'and the file');
});

t.test('a closed node refuses every request with ESHUTDOWN', async (t) => {
  const img = sparseFile(path.join(tempDir(t), 'a.img'), MiB);
  const f = await FileNode.open({ nodeName: 'c', filename: img });
  await f.close();
  await f.close();
  t.equal(f.isClosed, true);
  t.ok(await FileNode.open({ nodeName: 'again', filename: img }).then((n) => n.close().then(() => true)), 'the lock is released');
  for (const [what, fn] of [
    ['read', () => f.read(0, Buffer.alloc(1))],
    ['write', () => f.write(0, Buffer.alloc(1))],
    ['write-zeroes', () => f.writeZeroes(0, 4096)],
    ['discard', () => f.discard(0, 4096)],
    ['flush', () => f.flush()],
    ['block status', () => f.blockStatus(0, 4096)],
  ] as Array<[string, () => Promise<unknown>]>) {
    const err = await errorOf(fn());
    t.type(err, VdiskError, `${what}: a VdiskError`);
    t.equal(err?.errno, 'ESHUTDOWN', `${what} after close is ESHUTDOWN`);
  }
});

t.test('truncate of a closed file node: ESHUTDOWN, a VdiskError', async (t) => {
  const img = sparseFile(path.join(tempDir(t), 'a.img'), MiB);
  const f = await FileNode.open({ nodeName: 'c', filename: img });
  await f.close();
  const err = await errorOf(f.truncate(2 * MiB));
  t.type(err, VdiskError, 'a VdiskError (not a RangeError from fs.ftruncate(-1))');
  t.equal(err?.errno, 'ESHUTDOWN');
  t.equal(fs.statSync(img).size, MiB, 'the file was not resized');
});

t.test('locking: vdisk against vdisk', async (t) => {
  const img = sparseFile(path.join(tempDir(t), 'a.img'), MiB);
  const w = await open(t, img);
  let err = await errorOf(FileNode.open({ nodeName: 'w2', filename: img }));
  t.type(err, VdiskError);
  t.equal(err?.message, `Failed to get "write" lock on '${img}': is another process using the image?`, 'a second writer is refused');
  t.equal(err?.errno, 'EBUSY');
  t.equal(err?.code, 'VDISK_LOCKED');
  err = await errorOf(FileNode.open({ nodeName: 'w3', filename: img, locking: 'on' }));
  t.match(err?.message, /Failed to get "write" lock/, 'locking=on too');
  err = await errorOf(FileNode.open({ nodeName: 'r2', filename: img, readOnly: true }));
  t.match(err?.message, /^Failed to get shared "write" lock/, 'a consistent reader does not share with a writer');
  const shared = await FileNode.open({ nodeName: 's', filename: img, readOnly: true, forceShare: true });
  const b = Buffer.alloc(512);
  await w.write(0, Buffer.alloc(512, 0x42));
  await shared.read(0, b);
  t.ok(b.equals(Buffer.alloc(512, 0x42)), 'a force-share reader opens and sees the data');
  await shared.close();
  const off = await FileNode.open({ nodeName: 'o', filename: img, locking: 'off' });
  t.equal(off.readOnly, false, 'locking=off opens writable next to a writer');
  await off.close();
  t.equal(w.isClosed, false, 'the first writer is unaffected by the failed opens');
  await w.write(512, Buffer.alloc(512, 1));
  await w.close();
  const next = await FileNode.open({ nodeName: 'n', filename: img });
  t.pass('after the writer closes, a new writer opens');
  // Two readers share.
  await next.close();
  const r1 = await FileNode.open({ nodeName: 'r1', filename: img, readOnly: true });
  const r2 = await FileNode.open({ nodeName: 'r2', filename: img, readOnly: true });
  err = await errorOf(FileNode.open({ nodeName: 'w', filename: img }));
  t.match(err?.message, /lock/, 'readers keep a writer out');
  await r1.close();
  await r2.close();
});

t.test('locking: QEMU (qemu-io) sees vdisk and vdisk sees QEMU', async (t) => {
  if (!requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), MiB);
  const w = await open(t, img);
  await w.write(0, Buffer.alloc(512, 0x5a));
  await w.flush();
  let q = await run('qemu-io', ['-c', 'read 0 512', '-f', 'raw', img]);
  t.not(q.code, 0, 'qemu-io (read-write) cannot open while vdisk writes the image');
  t.match(q.stderr, /Failed to get "write" lock/);
  // A raw reader in qemu-io shares every permission (QEMU 7.2), so it opens next to a writer.
  q = await run('qemu-io', ['-r', '-c', 'read -P 0x5a 0 512', '-f', 'raw', img]);
  t.equal(q.code, 0, `qemu-io -r reads next to a vdisk writer: ${q.stderr}`);
  q = await run('qemu-io', ['-U', '-r', '-c', 'read -P 0x5a 0 512', '-f', 'raw', img]);
  t.equal(q.code, 0, q.stderr);
  t.notMatch(q.stdout + q.stderr, /Pattern verification failed/, 'qemu-io -U -r reads what vdisk wrote');
  t.match(q.stdout, /read 512\/512 bytes/);
  await w.close();

  // A read-only vdisk node lets qemu-io read but not write.
  const ro = await open(t, img, { readOnly: true });
  q = await run('qemu-io', ['-r', '-c', 'read 0 512', '-f', 'raw', img]);
  t.equal(q.code, 0, `two readers share: ${q.stderr}`);
  q = await run('qemu-io', ['-c', 'write 0 512', '-f', 'raw', img]);
  t.match(q.stderr, /Failed to get "write" lock/, 'but qemu-io cannot write under a vdisk reader');
  await ro.close();

  // qemu-io holds the image open read-write.
  const holder: ChildProcess = spawn('qemu-io', ['-f', 'raw', '-c', 'sleep 30000', img], { stdio: ['ignore', 'pipe', 'pipe'] });
  let holderErr = '';
  holder.stderr!.on('data', (d) => (holderErr += d));
  const exited = new Promise((r) => holder.once('exit', r));
  t.teardown(async () => {
    holder.kill('SIGKILL');
    await exited;
  });
  for (let i = 0; i < 200 && !writeLockHeld(img); i++) await new Promise((r) => setTimeout(r, 25));
  t.ok(writeLockHeld(img), `qemu-io took its locks ${holderErr}`);
  let err = await errorOf(FileNode.open({ nodeName: 'x', filename: img }));
  // qemu-io holds the "write" permission (byte 101) and shares it; vdisk does not share "write".
  t.equal(err?.message, `Failed to get shared "write" lock on '${img}': is another process using the image?`, "a vdisk writer sees qemu-io's lock");
  t.equal(err?.errno, 'EBUSY');
  err = await errorOf(FileNode.open({ nodeName: 'y', filename: img, readOnly: true }));
  t.match(err?.message, /^Failed to get shared "write" lock/, 'so does a consistent reader');
  const fs1 = await FileNode.open({ nodeName: 'z', filename: img, readOnly: true, forceShare: true });
  await fs1.close();
  t.pass('a force-share reader opens');
  const off = await FileNode.open({ nodeName: 'o', filename: img, locking: 'off' });
  await off.write(4096, Buffer.alloc(512, 1));
  await off.close();
  t.pass('locking=off skips the locks and writes');
  holder.kill('SIGTERM');
  await exited;
  const again = await FileNode.open({ nodeName: 'again', filename: img });
  await again.close();
  t.pass('once qemu-io is gone, vdisk opens writable');

  // locking=off takes no locks: qemu-io can write while such a node is open.
  const nolock = await open(t, img, { locking: 'off' });
  q = await run('qemu-io', ['-c', 'write -P 0x33 8192 512', '-f', 'raw', img]);
  t.equal(q.code, 0, `qemu-io writes next to a locking=off node: ${q.stderr}`);
  t.notMatch(q.stderr, /lock/);
  const b = Buffer.alloc(512);
  await nolock.read(8192, b);
  t.ok(b.equals(Buffer.alloc(512, 0x33)), "vdisk sees qemu-io's write");
});

t.test('cache.direct=on: O_DIRECT, 4 KiB alignment, unaligned requests through read-modify-write', async (t) => {
  const img = path.join(tempDir(t), 'd.img');
  const content = patternBuffer(MiB, 3);
  fs.writeFileSync(img, content);
  const f = await open(t, img, { direct: true });
  t.equal(f.limits.requestAlignment, 4096);
  const fdinfo = fs.readdirSync('/proc/self/fd').map((fd) => {
    try {
      return [fs.readlinkSync(`/proc/self/fd/${fd}`), fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8')] as const;
    } catch {
      return ['', ''] as const;
    }
  });
  const flags = fdinfo.find(([p]) => p === img)?.[1].match(/flags:\s+(\d+)/)?.[1];
  t.ok(flags !== undefined && (parseInt(flags, 8) & fs.constants.O_DIRECT) !== 0, 'the descriptor has O_DIRECT');

  const b = Buffer.alloc(100);
  await f.read(5000, b);
  t.ok(b.equals(content.subarray(5000, 5100)), 'unaligned read (100 bytes at 5000)');
  await f.write(5000, Buffer.alloc(100, 0xaa));
  let file = fs.readFileSync(img);
  t.ok(file.subarray(5000, 5100).equals(Buffer.alloc(100, 0xaa)), 'unaligned write landed');
  t.ok(file.subarray(4096, 5000).equals(content.subarray(4096, 5000)), 'the bytes before it in the block are kept');
  t.ok(file.subarray(5100, 8192).equals(content.subarray(5100, 8192)), 'the bytes after it are kept');
  // Straddling a block boundary.
  await f.write(8192 - 50, Buffer.alloc(100, 0xbb));
  file = fs.readFileSync(img);
  t.ok(file.subarray(8142, 8242).equals(Buffer.alloc(100, 0xbb)), 'a write across a block boundary');
  t.ok(file.subarray(4096, 5000).equals(content.subarray(4096, 5000)) && file.subarray(8242, 12288).equals(content.subarray(8242, 12288)), 'its neighbours are kept');
  // Aligned I/O goes straight through.
  const big = patternBuffer(256 * KiB, 30);
  await f.write(512 * KiB, big);
  const back = Buffer.alloc(256 * KiB);
  await f.read(512 * KiB, back);
  t.ok(back.equals(big), 'aligned round trip');

  // Many small writes into one 4 KiB block at once must not undo each other.
  await Promise.all(Array.from({ length: 64 }, (_, i) => f.write(16384 + i * 64, Buffer.alloc(64, i + 1))));
  const block = Buffer.alloc(4096);
  await f.read(16384, block);
  const lost = Array.from({ length: 64 }, (_, i) => i).filter((i) => !block.subarray(i * 64, i * 64 + 64).equals(Buffer.alloc(64, i + 1)));
  t.same(lost, [], 'no piece of 64 concurrent unaligned writes into one block is lost');
  // Concurrent unaligned writes spanning blocks, mixed with aligned writes and zeroing of neighbours.
  const ops: Promise<void>[] = [];
  for (let i = 0; i < 16; i++) ops.push(f.write(32768 + i * 1000 + 1, Buffer.alloc(999, 0x10 + i)));
  ops.push(f.write(65536, Buffer.alloc(4096, 0xcc)));
  ops.push(f.writeZeroes(69632 + 10, 100));
  await Promise.all(ops);
  const region = Buffer.alloc(16 * 1000);
  await f.read(32768, region);
  const bad = Array.from({ length: 16 }, (_, i) => i).filter(
    (i) => region[i * 1000] !== content[32768 + i * 1000] || !region.subarray(i * 1000 + 1, i * 1000 + 1000).equals(Buffer.alloc(999, 0x10 + i)),
  );
  t.same(bad, [], 'concurrent unaligned writes across block boundaries all landed');
  const z = Buffer.alloc(120);
  await f.read(69632, z);
  t.ok(z.subarray(10, 110).equals(Buffer.alloc(100)) && z.subarray(0, 10).equals(content.subarray(69632, 69642)), 'unaligned write-zeroes');
  t.equal(fs.statSync(img).size, MiB, 'the size is unchanged');
});

t.test('cache.direct=on with a file size that is not a multiple of 4 KiB', async (t) => {
  const img = path.join(tempDir(t), 'odd.img');
  const content = patternBuffer(5000, 31);
  fs.writeFileSync(img, content);
  const f = await open(t, img, { direct: true, readOnly: true });
  t.equal(f.size, 5000);
  const head = Buffer.alloc(4096);
  await f.read(0, head);
  t.ok(head.equals(content.subarray(0, 4096)), 'the first, whole block');
  const all = Buffer.alloc(5000);
  const err = await errorOf(f.read(0, all));
  t.equal(err?.message, undefined, 'the whole file can be read');
  t.ok(all.equals(content), 'and matches');
  const tail = Buffer.alloc(100);
  const err2 = await errorOf(f.read(4900, tail));
  t.equal(err2?.message, undefined, 'the last 100 bytes can be read');
  t.ok(tail.equals(content.subarray(4900)), 'and match');
});

t.test('cache.direct=on on a growable node: reads past the end are zeroes', async (t) => {
  const img = path.join(tempDir(t), 'g.img');
  fs.writeFileSync(img, patternBuffer(MiB, 32));
  const f = await open(t, img, { direct: true });
  const across = Buffer.alloc(200, 0xff);
  const e1 = await errorOf(f.read(MiB - 100, across));
  t.equal(e1?.message, undefined, 'a read across the end succeeds');
  t.ok(across.subarray(0, 100).equals(patternBuffer(MiB, 32).subarray(MiB - 100)), 'with the data');
  t.ok(across.subarray(100).equals(Buffer.alloc(100)), 'then zeroes, not what the buffer held before');
  const past = Buffer.alloc(100, 0xff);
  const e2 = await errorOf(f.read(MiB + 5000, past));
  t.equal(e2?.message, undefined, 'an unaligned read past the end succeeds');
  t.ok(past.equals(Buffer.alloc(100)), 'and returns zeroes');
});

t.test('a loop block device', async (t) => {
  if (!requireTool(t, 'losetup')) return;
  const img = path.join(tempDir(t), 'loop.img');
  const content = patternBuffer(8 * MiB, 40);
  fs.writeFileSync(img, content);
  const r = await run('losetup', ['-f', '--show', img]);
  t.equal(r.code, 0, r.stderr);
  if (r.code !== 0) return;
  const dev = r.stdout.trim();
  t.teardown(() => run('losetup', ['-d', dev]));
  t.match(dev, /^\/dev\/loop\d+$/);
  const f = await open(t, dev, { discard: 'unmap' });
  t.equal(f.size, 8 * MiB, 'size from BLKGETSIZE64');
  t.equal(f.filename, dev);
  const first = Buffer.alloc(MiB);
  await f.read(0, first);
  t.ok(first.equals(content.subarray(0, MiB)), 'reads the backing file content');
  const data = patternBuffer(MiB, 4);
  await f.write(MiB, data, ReqFlags.FUA);
  const back = Buffer.alloc(MiB);
  await f.read(MiB, back);
  t.ok(back.equals(data), 'round trip');
  await f.write(3 * MiB + 7, Buffer.alloc(1000, 0x77));
  await f.flush();
  const odd = Buffer.alloc(1000);
  await f.read(3 * MiB + 7, odd);
  t.ok(odd.equals(Buffer.alloc(1000, 0x77)), 'unaligned round trip (buffered device)');
  await f.writeZeroes(MiB, 65536, ReqFlags.MAY_UNMAP);
  const z = Buffer.alloc(65536, 1);
  await f.read(MiB, z);
  t.ok(z.equals(Buffer.alloc(65536)), 'write-zeroes on the device');
  await f.writeZeroes(2 * MiB, 65536, 0);
  await f.read(2 * MiB, z.fill(1));
  t.ok(z.equals(Buffer.alloc(65536)), 'write-zeroes without unmap');
  await f.discard(4 * MiB, MiB);
  t.same(await f.blockStatus(0, MiB), { length: MiB, flags: DATA, depth: 1, hostOffset: 0 }, 'a device reports data');
  await t.rejects(f.truncate(16 * MiB), { name: 'VdiskError', errno: 'ENOTSUP' }, 'a device cannot be resized');
  await f.truncate(8 * MiB);
  t.pass('truncate to its own size is fine');
  await t.rejects(f.read(8 * MiB, Buffer.alloc(1)), { name: 'VdiskError', errno: 'EINVAL' }, 'past the end of a device');
  await t.rejects(f.write(8 * MiB - 1, Buffer.alloc(2)), { name: 'VdiskError', errno: 'EINVAL' }, 'a device is not growable');
  await f.close();
  const onDisk = fs.readFileSync(img);
  t.ok(onDisk.subarray(MiB + 65536, 2 * MiB).equals(data.subarray(65536)), 'the data reached the backing file');

  const d = await open(t, dev, { direct: true });
  t.equal(d.limits.requestAlignment, 512, "O_DIRECT on a device uses its logical block size");
  const dd = patternBuffer(8192, 41);
  await d.write(5 * MiB, dd);
  const dback = Buffer.alloc(100);
  await d.read(5 * MiB + 1000, dback);
  t.ok(dback.equals(dd.subarray(1000, 1100)), 'unaligned read through O_DIRECT on the device');
  await d.write(5 * MiB + 10, Buffer.alloc(10, 0xee));
  const e = Buffer.alloc(30);
  await d.read(5 * MiB, e);
  t.ok(e.subarray(10, 20).equals(Buffer.alloc(10, 0xee)) && e.subarray(0, 10).equals(dd.subarray(0, 10)) && e.subarray(20).equals(dd.subarray(20, 30)), 'unaligned write (read-modify-write)');
  await d.close();
});
