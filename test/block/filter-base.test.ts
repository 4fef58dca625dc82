/**
 * The filter base (src/block/filter.ts): a filter that overrides nothing
 * hands every operation to its filtered child. Checked twice: on a spy
 * child that records exactly what reaches it (arguments and flags), and on
 * a chain filter -> file -> host file, where the effects must be on disk.
 * Then NBD_CMD_CACHE through a blkdebug node, sent by libnbd (nbdsh), must
 * reach the node under it (it used to stop at blkdebug), and what a format
 * under blkdebug tells about its image shows as QEMU shows it.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { BlockNode, type Extent, ReqFlags, Status } from '../../src/block/node.js';
import { Op } from '../../src/metrics/stats.js';
import { FilterNode } from '../../src/block/filter.js';
import { BlockGraph } from '../../src/block/graph.js';
import { Daemon } from '../../src/daemon.js';
import { setLogLevel } from '../../src/log.js';
import { VDISK, nbdsh, patternBuffer, requireTool, requireTools, run, tempDir } from '../helpers/tools.js';

setLogLevel('error');

const KiB = 1024;
const MiB = 1024 * 1024;

/** A filter that changes nothing: what the base does on its own. */
class PassFilter extends FilterNode {
  readonly driverName = 'pass';
  constructor(nodeName: string, child: BlockNode) {
    super({ nodeName }, 'file', child);
  }
}

/** Records every hook call with its arguments; stores nothing. */
class SpyNode extends BlockNode {
  readonly driverName = 'spy';
  readonly calls: string[] = [];
  constructor(nodeName: string, size: number, readonly name = 'spy.img') {
    super({ nodeName });
    this.length = size;
    this.limits = { requestAlignment: 512, maxTransfer: 256 * KiB, preferredSize: 8192 };
    // FUA reaches the hook as a flag only when the node says it honours it.
    this.nativeFua = true;
  }
  override get filename(): string {
    return this.name;
  }
  override get compressionClusterSize(): number {
    return 65536;
  }
  override formatInfo() {
    return { clusterSize: 65536, vmStateOffset: 123, dirty: true, specific: { type: 'spy', data: { x: 1 } } };
  }
  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    this.calls.push(`read ${offset} ${buf.length}`);
    buf.fill(0x77);
  }
  protected override async doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    this.calls.push(`write ${offset} ${buf.length} ${flags}`);
  }
  protected override async doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    this.calls.push(`zero ${offset} ${length} ${flags}`);
  }
  protected override async doDiscard(offset: number, length: number): Promise<void> {
    this.calls.push(`discard ${offset} ${length}`);
  }
  protected override async doFlush(): Promise<void> {
    this.calls.push('flush');
  }
  protected override async doTruncate(size: number): Promise<void> {
    this.calls.push(`truncate ${size}`);
    this.length = size;
  }
  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    this.calls.push(`status ${offset} ${length}`);
    return { length: Math.min(length, 4096), flags: Status.ZERO | Status.ALLOCATED, depth: 3, hostOffset: 1 << 20 };
  }
  protected override async doCache(offset: number, length: number): Promise<void> {
    this.calls.push(`cache ${offset} ${length}`);
  }
  protected override async doWriteCompressed(offset: number, buf: Buffer): Promise<void> {
    this.calls.push(`compressed ${offset} ${buf.length}`);
  }
}

t.test('every operation reaches the filtered child with its arguments and flags', async (t) => {
  const spy = new SpyNode('s', 4 * MiB);
  const f = new PassFilter('f', spy);

  t.equal(f.size, 4 * MiB, "the child's size");
  t.same(f.limits, spy.limits, "the child's limits");
  t.not(f.limits, spy.limits, 'a copy: a filter may narrow its own without touching the child');
  t.equal(f.filename, 'spy.img', "the child's filename");
  t.equal(f.filteredRole, 'file');
  t.equal(f.filterOrBacking, spy);
  t.equal(f.compressionClusterSize, 65536, "the child's compression cluster size");
  t.same(f.formatInfo(), { clusterSize: 65536, vmStateOffset: 123, dirty: true }, "the child's get_info, without its format-specific data");

  const buf = Buffer.alloc(8192);
  await f.read(4096, buf);
  t.ok(buf.equals(Buffer.alloc(8192, 0x77)), 'read: the data is the child’s');
  await f.write(8192, Buffer.alloc(4096, 1), ReqFlags.FUA);
  await f.writeZeroes(16384, 4096, ReqFlags.MAY_UNMAP | ReqFlags.FUA);
  await f.discard(20480, 8192);
  await f.writeCompressed(65536, Buffer.alloc(65536, 2));
  await f.cache(32768, 4096);
  const ext = await f.blockStatus(0, MiB);
  await f.flush();
  await f.truncate(8 * MiB);
  t.same(spy.calls, [
    'read 4096 8192',
    `write 8192 4096 ${ReqFlags.FUA}`,
    `zero 16384 4096 ${ReqFlags.MAY_UNMAP | ReqFlags.FUA}`,
    'discard 20480 8192',
    'compressed 65536 65536',
    'cache 32768 4096',
    'status 0 1048576',
    'flush',
    'truncate 8388608',
  ], 'each operation once, in order, with FUA and MAY_UNMAP kept');
  t.same(ext, { length: 4096, flags: Status.ZERO | Status.ALLOCATED, depth: 3, hostOffset: 1 << 20 }, "block status is the child's extent as it is (depth included)");
  t.equal(f.size, 8 * MiB, 'after truncate the filter has the child’s new size');

  // A write that is not aligned for the child.
  spy.calls.length = 0;
  await f.write(100, Buffer.alloc(10, 3));
  t.same(spy.calls, ['read 0 512', 'write 0 512 0'], "the filter has the child's alignment: one read-modify-write, and the child sees only aligned requests");
});

t.test('replacing the filtered child: later requests go to the new one; other roles are refused', async (t) => {
  const a = new SpyNode('a', MiB, 'a.img');
  const b = new SpyNode('b', MiB, 'b.img');
  const f = new PassFilter('f', a);
  t.equal(f.replaceChild(a, b), true, 'the filtered child can be swapped while open');
  t.equal(f.child('file'), b);
  t.equal(f.filename, 'b.img');
  await f.read(0, Buffer.alloc(512));
  await f.cache(0, 512);
  t.same(a.calls, [], 'the old child is not asked any more');
  t.same(b.calls, ['read 0 512', 'cache 0 512'], 'the new one is');
  t.equal(f.replaceChild(a, b), false, 'a node that is not a child is not replaced');
});

t.test('a chain filter -> file: the effects are on the host file', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'disk.img');
  const content = patternBuffer(2 * MiB, 9);
  fs.writeFileSync(img, content);
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const file = await g.add({ driver: 'file', 'node-name': 'file0', filename: img, discard: 'unmap' });
  const f = new PassFilter('f', file);

  const got = Buffer.alloc(64 * KiB);
  await f.read(MiB, got);
  t.ok(got.equals(content.subarray(MiB, MiB + 64 * KiB)), 'read: the file’s bytes');

  await f.write(4096, Buffer.alloc(4096, 0xee), ReqFlags.FUA);
  t.ok(fs.readFileSync(img).subarray(4096, 8192).equals(Buffer.alloc(4096, 0xee)), 'write (FUA): on disk');

  await f.writeZeroes(64 * KiB, 64 * KiB, ReqFlags.MAY_UNMAP);
  t.ok(fs.readFileSync(img).subarray(64 * KiB, 128 * KiB).equals(Buffer.alloc(64 * KiB)), 'write-zeroes: zeroes on disk');
  const zeroExt = await f.blockStatus(64 * KiB, 64 * KiB);
  t.same(zeroExt, await file.blockStatus(64 * KiB, 64 * KiB), "block status: the file's extent");
  t.ok(zeroExt.flags & Status.ZERO, 'the zeroed range reads as zeroes');

  await f.discard(MiB, 64 * KiB);
  t.ok(fs.readFileSync(img).subarray(MiB, MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB)), 'discard: the hole punched in the file reads as zeroes');

  const flushesBefore = file.stats.ops[Op.Flush];
  await f.flush();
  t.equal(file.stats.ops[Op.Flush], flushesBefore + 1, 'flush: the file is flushed once');

  await f.cache(0, 64 * KiB);
  t.pass('cache: the file accepts the hint');

  await f.truncate(3 * MiB);
  t.equal(fs.statSync(img).size, 3 * MiB, 'truncate: the host file grew');
  t.equal(f.size, 3 * MiB);
  t.equal(f.filename, img);
  t.same(f.formatInfo(), { clusterSize: 0, vmStateOffset: 0, dirty: false }, "the file's get_info");
  await t.rejects(f.writeCompressed(0, Buffer.alloc(65536)), { errno: 'ENOTSUP' }, 'compressed writes: refused as the file refuses them');
  t.equal(f.compressionClusterSize, 0);
});

/** Counts the prefetch hints that reach it; reads zeroes. */
class CacheCounter extends BlockNode {
  readonly driverName = 'cache-counter';
  readonly cached: Array<[number, number]> = [];
  constructor(nodeName: string, size: number) {
    super({ nodeName });
    this.length = size;
  }
  protected override async doRead(_offset: number, buf: Buffer): Promise<void> {
    buf.fill(0);
  }
  protected override async doCache(offset: number, length: number): Promise<void> {
    this.cached.push([offset, length]);
  }
}

t.test('NBD_CMD_CACHE through blkdebug reaches the node under it (nbdsh)', async (t) => {
  requireTool(t, 'nbdsh');
  const sock = path.join(tempDir(t), 'nbd.sock');
  const daemon = new Daemon();
  t.teardown(() => daemon.shutdown());
  const counter = new CacheCounter('c0', 4 * MiB);
  daemon.graph.insert(counter);
  // A rule that would fail reads: cache is a hint, not a read, so it does not fire on it.
  await daemon.blockdevAdd({ driver: 'blkdebug', 'node-name': 'dbg', image: 'c0', 'inject-error': [{ event: 'none', iotype: 'read' }] });
  await daemon.nbdServerStart({ addr: { type: 'unix', path: sock } });
  await daemon.blockExportAdd({ type: 'nbd', id: 'dbg', 'node-name': 'dbg' });
  const r = await nbdsh(
    `
assert h.can_cache()
h.cache(65536, 1048576)
print('cached')
`,
    `nbd+unix:///dbg?socket=${sock}`,
  );
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /cached/);
  t.same(counter.cached, [[1048576, 65536]], 'the hint reached the node below blkdebug, with its range');
});

t.test("formatInfo looks through blkdebug: qemu-io's info and qemu-img info say what QEMU's say", async (t) => {
  requireTools(t, 'qemu-io', 'qemu-img');
  const dir = tempDir(t);
  const rawImg = path.join(dir, 'a.img');
  const qcowImg = path.join(dir, 'a.qcow2');
  fs.writeFileSync(rawImg, Buffer.alloc(MiB));
  t.equal((await run('qemu-img', ['create', '-q', '-f', 'qcow2', qcowImg, '1M'])).code, 0);
  for (const [fmt, img] of [['raw', rawImg], ['qcow2', qcowImg]]) {
    const name = `blkdebug::${img}`;
    const ours = await run(process.execPath, [VDISK, 'io', '-f', fmt, '-c', 'info', name]);
    const theirs = await run('qemu-io', ['-f', fmt, '-c', 'info', name]);
    t.equal(ours.stdout, theirs.stdout, `${fmt} over blkdebug: qemu-io's info lines`);
    t.equal(ours.code, theirs.code, `${fmt} over blkdebug: the same exit status`);
    const oursJson = JSON.parse((await run(process.execPath, [VDISK, 'img', 'info', '--output=json', '-f', fmt, name])).stdout) as Record<string, unknown>;
    const theirsJson = JSON.parse((await run('qemu-img', ['info', '--output=json', '-f', fmt, name])).stdout) as Record<string, unknown>;
    // actual-size is left out: QEMU does not ask a host file through blkdebug for it.
    delete oursJson['actual-size'];
    t.same(oursJson, theirsJson, `${fmt} over blkdebug: qemu-img info's JSON (cluster-size, dirty-flag, format-specific)`);
  }
});
