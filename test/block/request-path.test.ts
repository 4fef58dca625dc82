/**
 * The request path every node shares (src/block/node.ts), seen through a
 * recording node, and the raw and null-co drivers on top of it.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { BlockNode, ReqFlags, Status, type Extent } from '../../src/block/node.js';
import { BlockGraph } from '../../src/block/graph.js';
import { NullNode } from '../../src/block/drivers/null-co.js';
import { RawNode } from '../../src/block/drivers/raw.js';
import { VdiskError } from '../../src/errors.js';
import { patternBuffer, sparseFile, tempDir } from '../helpers/tools.js';

/** A memory node that records every call reaching its driver hooks. */
class Recorder extends BlockNode {
  readonly driverName = 'recorder';
  calls: string[] = [];
  data: Buffer;
  zeroesSupported = true;
  hold: Promise<void> | undefined;

  constructor(size: number, limits: Partial<BlockNode['limits']> = {}, nativeFua = false) {
    super({ nodeName: 'rec' });
    this.length = size;
    this.data = Buffer.alloc(size);
    this.limits = { ...this.limits, ...limits };
    this.nativeFua = nativeFua;
  }
  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    this.calls.push(`read ${offset} ${buf.length}`);
    await this.hold;
    this.data.copy(buf, 0, offset, offset + buf.length);
  }
  protected override async doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    this.calls.push(`write ${offset} ${buf.length}${flags & ReqFlags.FUA ? ' fua' : ''}`);
    await this.hold;
    buf.copy(this.data, offset);
  }
  protected override async doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    if (!this.zeroesSupported) throw new VdiskError('ENOTSUP', 'no');
    this.calls.push(`zero ${offset} ${length}${flags & ReqFlags.MAY_UNMAP ? ' unmap' : ''}`);
    this.data.fill(0, offset, offset + length);
  }
  protected override async doFlush(): Promise<void> {
    this.calls.push('flush');
  }
  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    return { length: Math.min(length, 4096 - (offset % 4096)), flags: Status.DATA | Status.ALLOCATED, depth: 1 };
  }
}

t.test('maxTransfer splitting and alignment padding', async (t) => {
  const r = new Recorder(1 << 20, { maxTransfer: 65536, requestAlignment: 512 });
  await r.write(0, Buffer.alloc(200000, 1));
  // 200000 is not a multiple of 512: the last block is read first, then the whole aligned range is written in 64 KiB pieces.
  t.same(r.calls, ['read 199680 512', 'write 0 65536', 'write 65536 65536', 'write 131072 65536', 'write 196608 3584'], 'split at 64 KiB');
  r.calls = [];
  await r.read(1000, Buffer.alloc(100));
  t.same(r.calls, ['read 512 1024'], 'an unaligned read arrives aligned');
  r.calls = [];
  await r.write(1000, Buffer.alloc(100, 9));
  t.same(r.calls, ['read 512 512', 'read 1024 512', 'write 512 1024'], 'an unaligned write is read-modify-write of the two blocks it touches');
  t.ok(r.data.subarray(1000, 1100).equals(Buffer.alloc(100, 9)));
  t.equal(r.data[999], 1, 'the byte before is kept from the earlier write');
  r.calls = [];
  await r.write(1024, Buffer.alloc(1000, 5));
  t.same(r.calls, ['read 1536 512', 'write 1024 1024'], 'aligned head, unaligned tail: one block read');
});

t.test('FUA: emulated by a flush, or passed to a driver that does it itself', async (t) => {
  const emulated = new Recorder(65536);
  await emulated.write(0, Buffer.alloc(512), ReqFlags.FUA);
  t.same(emulated.calls, ['write 0 512', 'flush']);
  const native = new Recorder(65536, {}, true);
  await native.write(0, Buffer.alloc(512), ReqFlags.FUA);
  t.same(native.calls, ['write 0 512 fua']);
});

t.test('write-zeroes: efficient, fallback to zero buffers, NO_FALLBACK refuses', async (t) => {
  const r = new Recorder(1 << 21);
  r.data.fill(7);
  await r.writeZeroes(4096, 8192, ReqFlags.MAY_UNMAP);
  t.same(r.calls, ['zero 4096 8192 unmap']);
  r.zeroesSupported = false;
  r.calls = [];
  await r.writeZeroes(0, 3 << 20 >> 1);
  t.same(r.calls, ['write 0 1048576', 'write 1048576 524288'], 'fell back to writes of zero buffers');
  t.ok(r.data.subarray(0, 3 << 19).equals(Buffer.alloc(3 << 19)));
  await t.rejects(r.writeZeroes(0, 4096, ReqFlags.NO_FALLBACK), { errno: 'ENOTSUP' });
});

t.test('detect-zeroes turns zero writes into write-zeroes', async (t) => {
  const r = new Recorder(65536);
  r.detectZeroes = 'unmap';
  await r.write(0, Buffer.alloc(4096));
  await r.write(4096, Buffer.alloc(4096, 1));
  t.same(r.calls, ['zero 0 4096 unmap', 'write 4096 4096']);
});

t.test('drain waits for requests in flight; close is idempotent; a closed node refuses requests', async (t) => {
  const r = new Recorder(65536);
  let release!: () => void;
  r.hold = new Promise((res) => (release = res));
  const pending = r.write(0, Buffer.alloc(512, 3));
  let drained = false;
  const d = r.drain().then(() => (drained = true));
  await new Promise((res) => setTimeout(res, 20));
  t.equal(drained, false, 'drain waits');
  release();
  await pending;
  await d;
  t.equal(drained, true);
  await r.close();
  await r.close();
  await t.rejects(r.read(0, Buffer.alloc(1)), { errno: 'ESHUTDOWN' });
});

t.test('errors that are not VdiskErrors become EIO with the cause', async (t) => {
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
  const err = await new Broken().read(0, Buffer.alloc(1)).catch((e) => e);
  t.type(err, VdiskError);
  t.equal(err.errno, 'EIO');
  t.match(err.message, /read at 0 on node 'b': boom/);
});

t.test('raw: offset and size windows over a file', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'a.img');
  fs.writeFileSync(img, patternBuffer(1 << 20, 5));
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  await g.add({ driver: 'file', 'node-name': 'f', filename: img });
  const w = await g.add({ driver: 'raw', 'node-name': 'w', file: 'f', offset: 65536, size: 131072 });
  t.equal(w.size, 131072);
  const b = Buffer.alloc(4096);
  await w.read(0, b);
  t.ok(b.equals(patternBuffer(1 << 20, 5).subarray(65536, 65536 + 4096)), 'reads come from the window');
  await w.write(4096, Buffer.alloc(4096, 0xcc));
  t.ok(fs.readFileSync(img).subarray(65536 + 4096, 65536 + 8192).equals(Buffer.alloc(4096, 0xcc)), 'writes land in the window');
  await t.rejects(w.read(131072 - 10, Buffer.alloc(20)), { errno: 'EINVAL' });
  await t.rejects(w.truncate(262144), { errno: 'ENOTSUP' });
  await t.rejects(g.add({ driver: 'raw', 'node-name': 'x', file: 'f', offset: 2 << 20 }), /Offset \(2097152\) cannot be greater than size of the containing file \(1048576\)/);
  await t.rejects(g.add({ driver: 'raw', 'node-name': 'x', file: 'f', offset: 1 << 19, size: 1 << 20 }), /The sum of offset \(524288\) and size \(1048576\) has to be smaller or equal to the  actual size of the containing file \(1048576\)/);
  await t.rejects(g.add({ driver: 'raw', 'node-name': 'x', file: 'f', size: 1000 }), /Specified size is not multiple of 512/);
  const whole = await g.add({ driver: 'raw', 'node-name': 'whole', file: { driver: 'file', filename: sparseFile(path.join(dir, 'b.img'), 1 << 20) } });
  await whole.truncate(2 << 20);
  t.equal(whole.size, 2 << 20, 'raw without a window grows with its file');
  t.equal(fs.statSync(path.join(dir, 'b.img')).size, 2 << 20);
});

t.test('null-co: zeroes, dropped writes, default size, raw on top', async (t) => {
  const n = new NullNode({ nodeName: 'n' });
  t.equal(n.size, 1 << 30);
  await n.write(0, Buffer.alloc(512, 1));
  const b = Buffer.alloc(512, 9);
  await n.read(0, b);
  t.ok(b.equals(Buffer.alloc(512)), 'reads zeroes even after a write');
  t.same(await n.blockStatus(0, 4096), { length: 4096, flags: Status.ZERO | Status.ALLOCATED, depth: 1 });
  const raw = new RawNode({ nodeName: 'r', file: n, offset: 4096, size: 8192 });
  t.equal(raw.size, 8192);
  await raw.write(0, Buffer.alloc(8192, 1), ReqFlags.FUA);
  const slow = new NullNode({ nodeName: 's', size: 4096, latencyNs: 30e6 });
  const t0 = Date.now();
  await slow.read(0, Buffer.alloc(512));
  t.ok(Date.now() - t0 >= 25, 'latency-ns delays requests');
});
