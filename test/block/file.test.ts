/**
 * The file driver on a real file system and a real block device (loop):
 * data, holes, punching, zeroing, flush, read-only, truncate, O_DIRECT and
 * QEMU-compatible locking.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { spawn } from 'node:child_process';
import { FileNode } from '../../src/block/drivers/file.js';
import { ReqFlags, Status } from '../../src/block/node.js';
import { patternBuffer, requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const allocated = (file: string) => fs.statSync(file).blocks * 512;

async function open(t: Tap.Test, filename: string, extra: Partial<Parameters<typeof FileNode.open>[0]> = {}) {
  const node = await FileNode.open({ nodeName: 'f0', filename, ...extra });
  t.teardown(() => node.close());
  return node;
}

t.test('data round trip, holes read as zeroes, block status', async (t) => {
  const img = sparseFile(path.join(tempDir(t), 'a.img'), 16 * MiB);
  const f = await open(t, img);
  t.equal(f.size, 16 * MiB);
  const zero = Buffer.alloc(MiB, 0xff);
  await f.read(3 * MiB, zero);
  t.ok(zero.equals(Buffer.alloc(MiB)), 'a hole reads as zeroes');
  const data = patternBuffer(2 * MiB, 1);
  await f.write(4 * MiB, data);
  const back = Buffer.alloc(2 * MiB);
  await f.read(4 * MiB, back);
  t.ok(back.equals(data));
  t.ok(fs.readFileSync(img).subarray(4 * MiB, 6 * MiB).equals(data), 'the bytes are in the file');

  let ext = await f.blockStatus(0, 16 * MiB);
  t.same(ext, { length: 4 * MiB, flags: Status.ZERO | Status.ALLOCATED, depth: 1 }, 'hole before the data');
  ext = await f.blockStatus(4 * MiB, 12 * MiB);
  t.same(ext, { length: 2 * MiB, flags: Status.DATA | Status.ALLOCATED, depth: 1 }, 'the data');
  ext = await f.blockStatus(6 * MiB, 10 * MiB);
  t.same(ext, { length: 10 * MiB, flags: Status.ZERO | Status.ALLOCATED, depth: 1 }, 'hole to the end');
  ext = await f.blockStatus(5 * MiB, 4096);
  t.equal(ext.length, 4096, 'never longer than asked');
});

t.test('discard and write-zeroes: punch with discard=unmap, zero range otherwise', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'a.img');
  fs.writeFileSync(img, patternBuffer(8 * MiB, 2));
  const f = await open(t, img, { discard: 'unmap' });
  const before = allocated(img);
  await f.discard(MiB, MiB);
  t.equal(allocated(img), before - MiB, 'discard punched 1 MiB');
  const b = Buffer.alloc(MiB, 1);
  await f.read(MiB, b);
  t.ok(b.equals(Buffer.alloc(MiB)), 'a punched range reads zero');
  await f.writeZeroes(2 * MiB, MiB, ReqFlags.MAY_UNMAP);
  t.equal(allocated(img), before - 2 * MiB, 'write-zeroes with MAY_UNMAP punched');
  await f.writeZeroes(3 * MiB, MiB, 0);
  t.equal(allocated(img), before - 2 * MiB, 'write-zeroes without MAY_UNMAP keeps the space');
  await f.read(3 * MiB, b);
  t.ok(b.equals(Buffer.alloc(MiB)), 'and reads zero');
  await f.writeZeroes(4 * MiB, MiB, ReqFlags.NO_FALLBACK | ReqFlags.FUA);
  await f.read(4 * MiB, b);
  t.ok(b.equals(Buffer.alloc(MiB)), 'fast zero works on ext4');
  await f.writeZeroes(5 * MiB + 100, 1000);
  const small = Buffer.alloc(1200);
  await f.read(5 * MiB, small);
  const expected = fs.readFileSync(img).subarray(5 * MiB, 5 * MiB + 1200);
  t.ok(small.equals(expected) && small.subarray(100, 1100).equals(Buffer.alloc(1000)), 'an unaligned zero range');

  const g = await FileNode.open({ nodeName: 'g', filename: img, discard: 'ignore', locking: 'off' });
  t.teardown(() => g.close());
  const now = allocated(img);
  await g.discard(6 * MiB, MiB);
  t.equal(allocated(img), now, 'discard=ignore keeps the data');
  await g.writeZeroes(6 * MiB, MiB, ReqFlags.MAY_UNMAP);
  // Zeroing a range may split extents and cost an extent-tree block, but frees nothing.
  t.ok(allocated(img) >= now, 'and write-zeroes does not punch either');
});

t.test('FUA, flush, truncate, past-the-end and huge offsets', async (t) => {
  const img = sparseFile(path.join(tempDir(t), 'a.img'), MiB);
  const f = await open(t, img);
  await f.write(0, Buffer.alloc(4096, 7), ReqFlags.FUA);
  await f.flush();
  t.equal(fs.readFileSync(img)[4095], 7);
  await t.rejects(f.read(MiB - 10, Buffer.alloc(20)), { errno: 'EINVAL', message: /past the end/ });
  await t.rejects(f.write(MiB, Buffer.alloc(1)), { errno: 'EINVAL' });
  await t.rejects(f.read(2 ** 53, Buffer.alloc(1)), { errno: 'EINVAL' });
  await t.rejects(f.read(-1, Buffer.alloc(1)), { errno: 'EINVAL' });
  await t.rejects(f.writeZeroes(0, 2 * MiB), { errno: 'EINVAL' });
  await f.truncate(2 * MiB);
  t.equal(f.size, 2 * MiB);
  t.equal(fs.statSync(img).size, 2 * MiB);
  const b = Buffer.alloc(4096, 1);
  await f.read(2 * MiB - 4096, b);
  t.ok(b.equals(Buffer.alloc(4096)), 'the grown part reads zero');
});

t.test('read-only and auto-read-only', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), MiB);
  const ro = await open(t, img, { readOnly: true });
  await t.rejects(ro.write(0, Buffer.alloc(512)), { errno: 'EROFS' });
  await t.rejects(ro.discard(0, 512), { errno: 'EROFS' });
  await t.rejects(ro.truncate(2 * MiB), { errno: 'EROFS' });
  await ro.read(0, Buffer.alloc(512));
  await ro.close();
  fs.chmodSync(img, 0o444);
  // Root ignores file modes; make the file immutable-ish by opening through a read-only bind instead when root.
  if (process.getuid?.() === 0) {
    const r = await run('mount', ['--bind', '-o', 'ro', dir, dir]);
    if (r.code === 0) t.teardown(() => run('umount', [dir]));
  }
  const auto = await FileNode.open({ nodeName: 'a', filename: img, autoReadOnly: true });
  t.teardown(() => auto.close());
  t.equal(auto.readOnly, true, 'fell back to read-only');
  await t.rejects(FileNode.open({ nodeName: 'b', filename: img, locking: 'off' }), { errno: /EROFS|EACCES/ }, 'without auto-read-only it fails');
});

t.test('locks: one writer, QEMU included; force-share readers; locking=off', async (t) => {
  requireTool(t, 'qemu-io');
  const img = sparseFile(path.join(tempDir(t), 'a.img'), MiB);
  const w = await open(t, img);
  await t.rejects(FileNode.open({ nodeName: 'w2', filename: img }), { message: /Failed to get "write" lock|Failed to get shared "write" lock/ });
  await t.rejects(FileNode.open({ nodeName: 'r2', filename: img, readOnly: true }), { message: /Failed to get shared "write" lock/ }, 'a consistent reader refuses a writer');
  const shared = await FileNode.open({ nodeName: 's', filename: img, readOnly: true, forceShare: true });
  await shared.close();
  const off = await FileNode.open({ nodeName: 'o', filename: img, locking: 'off' });
  await off.close();
  let q = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', img]);
  t.not(q.code, 0, 'qemu-io cannot write while vdisk holds the image');
  t.match(q.stderr, /Failed to get "write" lock/);
  q = await run('qemu-io', ['-r', '-U', '-f', 'raw', '-c', 'read 0 512', img]);
  t.equal(q.code, 0, q.stderr);
  await w.close();

  // QEMU holds it: vdisk cannot open it writable.
  const holder = spawn('qemu-io', ['-f', 'raw', img], { stdio: ['pipe', 'pipe', 'pipe'] });
  t.teardown(() => holder.kill('SIGKILL'));
  await new Promise((r) => holder.stdout.once('data', r)); // the qemu-io prompt
  await t.rejects(FileNode.open({ nodeName: 'x', filename: img }), { message: /lock/ }, 'vdisk sees qemu-io\'s lock');
  holder.stdin.end('quit\n');
  await new Promise((r) => holder.once('exit', r));
  const again = await FileNode.open({ nodeName: 'y', filename: img });
  await again.close();
});

t.test('cache.direct: O_DIRECT with 4 KiB alignment, unaligned requests padded and serialised', async (t) => {
  const img = path.join(tempDir(t), 'd.img');
  fs.writeFileSync(img, patternBuffer(MiB, 3));
  const f = await open(t, img, { direct: true });
  t.equal(f.limits.requestAlignment, 4096);
  const b = Buffer.alloc(100);
  await f.read(5000, b);
  t.ok(b.equals(fs.readFileSync(img).subarray(5000, 5100)), 'unaligned read');
  await f.write(5000, Buffer.alloc(100, 0xaa));
  const file = fs.readFileSync(img);
  t.ok(file.subarray(5000, 5100).equals(Buffer.alloc(100, 0xaa)), 'unaligned write landed');
  t.ok(file.subarray(4096, 5000).equals(patternBuffer(MiB, 3).subarray(4096, 5000)), 'the bytes around it are kept');
  // Many small writes into one block at once must not undo each other.
  await Promise.all(Array.from({ length: 64 }, (_, i) => f.write(8192 + i * 64, Buffer.alloc(64, i + 1))));
  const block = Buffer.alloc(4096);
  await f.read(8192, block);
  for (let i = 0; i < 64; i++) t.ok(block.subarray(i * 64, i * 64 + 64).equals(Buffer.alloc(64, i + 1)), `piece ${i}`);
  await f.writeZeroes(10000, 3000);
  const z = Buffer.alloc(3000, 1);
  await f.read(10000, z);
  t.ok(z.equals(Buffer.alloc(3000)), 'unaligned write-zeroes');
});

t.test('a loop block device', async (t) => {
  requireTool(t, 'losetup');
  const img = path.join(tempDir(t), 'loop.img');
  fs.writeFileSync(img, Buffer.alloc(8 * MiB));
  const r = await run('losetup', ['-f', '--show', img]);
  t.equal(r.code, 0, r.stderr);
  const dev = r.stdout.trim();
  t.teardown(() => run('losetup', ['-d', dev]));
  const f = await FileNode.open({ nodeName: 'dev', filename: dev, discard: 'unmap' });
  t.teardown(() => f.close());
  t.equal(f.size, 8 * MiB, 'size from BLKGETSIZE64');
  const data = patternBuffer(MiB, 4);
  await f.write(MiB, data, ReqFlags.FUA);
  const back = Buffer.alloc(MiB);
  await f.read(MiB, back);
  t.ok(back.equals(data));
  await f.writeZeroes(MiB, 65536, ReqFlags.MAY_UNMAP);
  const z = Buffer.alloc(65536, 1);
  await f.read(MiB, z);
  t.ok(z.equals(Buffer.alloc(65536)), 'zeroed on the device');
  await f.discard(2 * MiB, MiB);
  await f.flush();
  t.same(await f.blockStatus(0, MiB), { length: MiB, flags: Status.DATA | Status.ALLOCATED, depth: 1 }, 'a device reports data');
  await t.rejects(f.truncate(16 * MiB), { errno: 'ENOTSUP' });
});
