/**
 * The qcow2 driver against QEMU's own tools as referee: images made and
 * written by qemu-img / qemu-io read byte for byte the same in vdisk (every
 * cluster size, compat=0.10, every refcount width, lazy refcounts, backing
 * chains, compressed clusters, internal snapshots, persistent bitmaps),
 * and images vdisk writes pass `qemu-img check` and `qemu-img compare`
 * against a plain byte model, also after growing (over a bigger backing
 * file too). Block status agrees with `qemu-img map`. Broken headers and
 * tables, and features vdisk does not support, are refused with a clear
 * error and nothing is written to the file.
 */
import t, { type Test } from 'tap';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { type BlockNode, ReqFlags } from '../../src/block/node.js';
import { createQcow2 } from '../../src/block/drivers/qcow2/create.js';
import { VdiskError } from '../../src/errors.js';
import { setLogLevel } from '../../src/log.js';
import { patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';
import {
  assertCleanCheck,
  compareImage,
  compareMap,
  describeDifference,
  dirtyBitOnDisk,
  openQcow2,
  qemuImg,
  qemuIo,
  readAll,
} from '../helpers/qcow2.js';

setLogLevel('error');

const KiB = 1024;
const MiB = 1024 * KiB;
const CLUSTER_SIZES = [512, 1 * KiB, 2 * KiB, 4 * KiB, 8 * KiB, 16 * KiB, 32 * KiB, 64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB];

/** A qemu-io write: a byte pattern, or zeroes (-z). */
interface Op {
  offset: number;
  length: number;
  /** undefined: write -z */
  pattern?: number;
}

/** Writes of different shapes for a cluster size: aligned, unaligned, across clusters and L2 tables, the last byte. */
function opsFor(cs: number, size: number): Op[] {
  const l2Span = (cs / 8) * cs; // guest bytes one L2 table maps
  const ops: Op[] = [
    { offset: 0, length: cs, pattern: 0x11 },
    { offset: cs + 3, length: 2 * cs + 100, pattern: 0x22 }, // unaligned, across three clusters
    { offset: Math.floor(cs / 2) + 1, length: 517, pattern: 0x33 }, // inside one cluster
    { offset: 5 * MiB + 1234, length: 3 * cs + 77, pattern: 0x44 },
    { offset: size - 1000, length: 1000, pattern: 0x55 }, // the end of the disk
    { offset: 5 * MiB + 1234 + cs, length: cs, pattern: undefined }, // zero inside written data
    { offset: 7 * MiB + 7, length: 3 * cs, pattern: undefined }, // zero over nothing
    { offset: 5 * MiB + 100, length: 300, pattern: 0x66 },
  ];
  if (l2Span < size / 2) {
    // A write that crosses from one L2 table into the next.
    const b = Math.min(3, Math.floor(size / l2Span) - 1) * l2Span;
    ops.push({ offset: b - cs - 5, length: 2 * cs + 10, pattern: 0x77 });
    ops.push({ offset: b + 2 * cs, length: cs, pattern: undefined });
  }
  return ops;
}

function qemuIoCommand(op: Op): string {
  return op.pattern === undefined ? `write -z ${op.offset} ${op.length}` : `write -P 0x${op.pattern.toString(16)} ${op.offset} ${op.length}`;
}

function applyToModel(model: Buffer, op: Op): void {
  model.fill(op.pattern ?? 0, op.offset, op.offset + op.length);
}

async function expectSame(t: Test, node: BlockNode, model: Buffer, what: string, chunk?: number): Promise<void> {
  const got = await readAll(node, chunk);
  t.ok(got.equals(model), `${what}: ${describeDifference(got, model)}`);
}

async function expectQemuSame(t: Test, img: string, model: Buffer, dir: string, what: string): Promise<void> {
  const r = await compareImage(img, model, dir);
  t.equal(r.code, 0, `${what}: qemu-img compare says identical${r.code === 0 ? '' : `\n${r.stdout}${r.stderr}`}`);
}

t.test('images made by qemu-img and written by qemu-io read the same in vdisk, every cluster size', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 16 * MiB;
  for (const cs of CLUSTER_SIZES) {
    const img = path.join(dir, `c${cs}.qcow2`);
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(size));
    const ops = opsFor(cs, size);
    await qemuIo(img, ops.map(qemuIoCommand));
    const model = Buffer.alloc(size);
    for (const op of ops) applyToModel(model, op);
    // The model is right: QEMU agrees.
    await expectQemuSame(t, img, model, dir, `cluster ${cs}: the model`);
    const { g, q } = await openQcow2(t, img, { readOnly: true });
    t.equal(q.size, size, `cluster ${cs}: size`);
    await expectSame(t, q, model, `cluster ${cs}: aligned reads`);
    await expectSame(t, q, model, `cluster ${cs}: odd-sized reads`, 3 * cs + 4093);
    await g.closeAll();
  }
});

t.test('compat=0.10 (version 2): read, write, zero and discard, then qemu-img check and compare', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  for (const cs of [4 * KiB, 64 * KiB]) {
    const img = path.join(dir, `v2-${cs}.qcow2`);
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `compat=0.10,cluster_size=${cs}`, img, String(size));
    const ops = opsFor(cs, size);
    await qemuIo(img, ops.map(qemuIoCommand));
    const model = Buffer.alloc(size);
    for (const op of ops) applyToModel(model, op);
    await expectQemuSame(t, img, model, dir, `v2 ${cs}: the model`);
    const { g, q } = await openQcow2(t, img, { discard: true });
    await expectSame(t, q, model, `v2 ${cs}: read`);
    // Writes through vdisk: new clusters, over qemu's clusters, zeroes with and without unmap.
    const w = patternBuffer(3 * cs + 11, cs);
    await q.write(2 * MiB + 5, w);
    w.copy(model, 2 * MiB + 5);
    await q.write(cs + 1, w);
    w.copy(model, cs + 1);
    await q.writeZeroes(0, 2 * cs, ReqFlags.MAY_UNMAP);
    model.fill(0, 0, 2 * cs);
    await q.writeZeroes(5 * MiB, 4 * cs + 3, 0);
    model.fill(0, 5 * MiB, 5 * MiB + 4 * cs + 3);
    await q.discard(2 * MiB, 2 * cs);
    // No backing file: a discarded qcow2 cluster is unallocated, so zeroes.
    model.fill(0, Math.ceil(2 * MiB / cs) * cs, Math.floor((2 * MiB + 2 * cs) / cs) * cs);
    await expectSame(t, q, model, `v2 ${cs}: after vdisk writes`);
    await g.closeAll();
    const info = JSON.parse((await qemuImg('info', '--output=json', img)).stdout);
    t.equal(info['format-specific'].data.compat, '0.10', `v2 ${cs}: still version 2`);
    await assertCleanCheck(t, img, `v2 ${cs}`);
    await expectQemuSame(t, img, model, dir, `v2 ${cs}: after vdisk writes`);
  }
});

t.test('every refcount width: qemu writes, vdisk reads and writes, qemu-img check is clean', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  for (const bits of [1, 2, 4, 8, 16, 32, 64]) {
    // 512-byte clusters make refcount blocks small: with 64-bit refcounts one block covers 64 clusters,
    // so writing a few MiB needs many new blocks and a bigger refcount table.
    for (const cs of [512, 64 * KiB]) {
      const what = `refcount_bits=${bits} cluster ${cs}`;
      const img = path.join(dir, `r${bits}-${cs}.qcow2`);
      await qemuImg('create', '-q', '-f', 'qcow2', '-o', `refcount_bits=${bits},cluster_size=${cs}`, img, String(size));
      const ops = opsFor(cs, size);
      await qemuIo(img, ops.map(qemuIoCommand));
      const model = Buffer.alloc(size);
      for (const op of ops) applyToModel(model, op);
      const { g, q } = await openQcow2(t, img, { discard: true });
      await expectSame(t, q, model, `${what}: read`);
      const big = patternBuffer(3 * MiB + 333, bits * 1000 + cs);
      await q.write(MiB - 77, big);
      big.copy(model, MiB - 77);
      const small = patternBuffer(700, bits);
      await q.write(3, small);
      small.copy(model, 3);
      await q.writeZeroes(2 * MiB, 64 * KiB, ReqFlags.MAY_UNMAP);
      model.fill(0, 2 * MiB, 2 * MiB + 64 * KiB);
      await q.discard(3 * MiB, 128 * KiB);
      model.fill(0, 3 * MiB, 3 * MiB + 128 * KiB);
      await q.flush();
      // Freed clusters are reused: write again after the flush.
      await q.write(6 * MiB, big.subarray(0, MiB));
      big.copy(model, 6 * MiB, 0, MiB);
      await expectSame(t, q, model, `${what}: after vdisk writes`);
      await g.closeAll();
      await assertCleanCheck(t, img, what);
      await expectQemuSame(t, img, model, dir, what);
    }
  }
});

t.test('lazy_refcounts=on images: read and write, clean after a close', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  const img = path.join(dir, 'lazy.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'lazy_refcounts=on,cluster_size=4096', img, String(size));
  const ops = opsFor(4096, size);
  await qemuIo(img, ops.map(qemuIoCommand));
  const model = Buffer.alloc(size);
  for (const op of ops) applyToModel(model, op);
  const { g, q } = await openQcow2(t, img);
  await expectSame(t, q, model, 'lazy: read');
  const w = patternBuffer(100_000, 9);
  await q.write(3 * MiB + 1, w);
  w.copy(model, 3 * MiB + 1);
  await g.closeAll();
  const info = JSON.parse((await qemuImg('info', '--output=json', img)).stdout);
  t.equal(info['format-specific'].data['lazy-refcounts'], true, 'lazy refcounts stay on');
  t.equal(info['dirty-flag'], false, 'not dirty after a close');
  await assertCleanCheck(t, img, 'lazy');
  await expectQemuSame(t, img, model, dir, 'lazy');
});

function sha(file: string): string {
  return createHash('sha256').update(fs.readFileSync(file)).digest('hex');
}

t.test('backing chains: base (raw and qcow2) <- mid <- top, merged reads, block status, writes into the top', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  for (const baseFormat of ['raw', 'qcow2']) {
    for (const [baseCs, midCs, topCs] of [
      [64 * KiB, 4 * KiB, 16 * KiB],
      [4 * KiB, 64 * KiB, 512],
    ]) {
      const what = `${baseFormat} base, clusters ${baseCs}/${midCs}/${topCs}`;
      const base = path.join(dir, `base-${baseCs}.${baseFormat}`);
      const mid = path.join(dir, `mid-${baseFormat}-${midCs}.qcow2`);
      const top = path.join(dir, `top-${baseFormat}-${topCs}.qcow2`);
      if (baseFormat === 'raw') await qemuImg('create', '-q', '-f', 'raw', base, String(size));
      else await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${baseCs}`, base, String(size));
      const model = Buffer.alloc(size);
      const layer = async (img: string, format: string, ops: Op[]) => {
        await qemuIo(img, ops.map(qemuIoCommand), format);
        for (const op of ops) applyToModel(model, op);
      };
      await layer(base, baseFormat, [
        { offset: 0, length: 3 * MiB, pattern: 0xa1 },
        { offset: 4 * MiB + 123, length: 1 * MiB, pattern: 0xa2 },
        { offset: 6 * MiB, length: 100 * KiB, pattern: undefined },
        { offset: size - 4096, length: 4096, pattern: 0xa3 },
      ]);
      await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${midCs}`, '-b', base, '-F', baseFormat, mid);
      await layer(mid, 'qcow2', [
        { offset: 512 * KiB + 7, length: 70 * KiB, pattern: 0xb1 },
        { offset: 1 * MiB, length: 200 * KiB, pattern: undefined }, // zeroes over base data
        { offset: 4 * MiB + 50 * KiB, length: 9 * KiB + 1, pattern: 0xb2 },
        { offset: 7 * MiB + 3, length: 64 * KiB, pattern: 0xb3 },
      ]);
      await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${topCs}`, '-b', mid, '-F', 'qcow2', top);
      await layer(top, 'qcow2', [
        { offset: 500 * KiB, length: 30 * KiB + 5, pattern: 0xc1 },
        { offset: 1 * MiB + 100 * KiB, length: 16 * KiB, pattern: 0xc2 }, // data over mid's zeroes
        { offset: 2 * MiB, length: 64 * KiB, pattern: undefined }, // zeroes over base data
        { offset: 5 * MiB + 1, length: 3, pattern: 0xc3 },
      ]);
      await expectQemuSame(t, top, model, dir, `${what}: the model`);
      const baseSum = sha(base);
      const midSum = sha(mid);

      {
        const { g, q } = await openQcow2(t, top, { readOnly: true });
        t.equal(q.child('backing')?.child('backing') !== undefined, true, `${what}: the backing chain is opened from the headers`);
        await expectSame(t, q, model, `${what}: merged reads`);
        await expectSame(t, q, model, `${what}: merged odd-sized reads`, 12345);
        await compareMap(t, q, top, what);
        await g.closeAll();
      }

      // Writes through vdisk into the top: partial clusters copy from the backing layers.
      const { g, q } = await openQcow2(t, top, { discard: true });
      const writes: Array<[number, number]> = [
        [3, 1000],
        [600 * KiB - 1, 5 * KiB],
        [1 * MiB + 99 * KiB, 3 * KiB],
        [4 * MiB + 49 * KiB, 70 * KiB],
        [size - 700, 700],
      ];
      for (const [off, len] of writes) {
        const b = patternBuffer(len, off + 1);
        await q.write(off, b);
        b.copy(model, off);
      }
      await q.writeZeroes(3 * MiB - 5000, 20_000, 0);
      model.fill(0, 3 * MiB - 5000, 3 * MiB + 15_000);
      await q.writeZeroes(4 * MiB, 128 * KiB, ReqFlags.MAY_UNMAP);
      model.fill(0, 4 * MiB, 4 * MiB + 128 * KiB);
      // Discard: content is unspecified by the block layer, so take what vdisk reads back (and check it is
      // zeroes or what was there, cluster by cluster: never something else).
      const dOff = 7 * MiB;
      const dLen = 256 * KiB;
      await q.discard(dOff, dLen);
      const after = Buffer.alloc(dLen);
      await q.read(dOff, after);
      const odd: number[] = [];
      for (let c = 0; c < dLen; c += topCs) {
        const got = after.subarray(c, c + topCs);
        if (!got.equals(model.subarray(dOff + c, dOff + c + topCs)) && !got.equals(Buffer.alloc(topCs))) odd.push(dOff + c);
      }
      t.same(odd, [], `${what}: discarded clusters read zeroes or their old data`);
      after.copy(model, dOff);
      await expectSame(t, q, model, `${what}: after vdisk writes`);
      await g.closeAll();
      await assertCleanCheck(t, top, what);
      await expectQemuSame(t, top, model, dir, `${what}: after vdisk writes`);
      t.equal(sha(base), baseSum, `${what}: base unchanged`);
      t.equal(sha(mid), midSum, `${what}: mid unchanged`);
      {
        const { g, q } = await openQcow2(t, top, { readOnly: true });
        await compareMap(t, q, top, `${what}: after vdisk writes`);
        await g.closeAll();
      }
    }
  }
});

t.test('compressed clusters: read, then overwrite (partial: copy on write), zero and discard them', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  for (const cs of [512, 4 * KiB, 64 * KiB, 2 * MiB]) {
    const what = `compressed, cluster ${cs}`;
    const size = Math.max(4 * MiB, 18 * cs);
    // Compressible text, some incompressible clusters, some zero ranges.
    const m = Buffer.alloc(size);
    const text = Buffer.from('vdisk compressed cluster test: the quick brown fox jumps over the lazy dog. ');
    for (let off = 0; off < size; off += text.length) text.copy(m, off, 0, Math.min(text.length, size - off));
    for (let off = 0; off < size; off += 8 * KiB) m.writeUInt32BE(off, off); // make clusters differ
    patternBuffer(100 * KiB, 5).copy(m, size / 2 + 3);
    m.fill(0, size / 4, size / 4 + 300 * KiB);
    const raw = path.join(dir, `src-${cs}.raw`);
    fs.writeFileSync(raw, m);
    const img = path.join(dir, `comp-${cs}.qcow2`);
    await qemuImg('convert', '-q', '-c', '-f', 'raw', '-O', 'qcow2', '-o', `cluster_size=${cs}`, raw, img);
    {
      const { g, q } = await openQcow2(t, img, { readOnly: true });
      await expectSame(t, q, m, `${what}: reads`);
      await expectSame(t, q, m, `${what}: odd-sized reads`, 7777);
      const s = await q.blockStatus(0, cs);
      t.equal(s.compressed, true, `${what}: block status says compressed`);
      await compareMap(t, q, img, what);
      await g.closeAll();
    }
    const { g, q } = await openQcow2(t, img, { discard: true });
    const edits: Array<[number, number]> = [
      [5, 100], // partial: the rest of the cluster comes from decompressed data
      [cs + Math.floor(cs / 2), cs], // across two compressed clusters
      [4 * cs, 2 * cs], // whole clusters
      [size - 10, 10],
    ];
    for (const [off, len] of edits) {
      const b = patternBuffer(len, off + 77);
      await q.write(off, b);
      b.copy(m, off);
    }
    await q.writeZeroes(7 * cs, 3 * cs, ReqFlags.MAY_UNMAP);
    m.fill(0, 7 * cs, 10 * cs);
    await q.writeZeroes(11 * cs + 1, cs, 0);
    m.fill(0, 11 * cs + 1, 12 * cs + 1);
    await q.discard(14 * cs, 2 * cs);
    m.fill(0, 14 * cs, 16 * cs); // no backing file: discarded clusters are unallocated
    await expectSame(t, q, m, `${what}: after vdisk writes`);
    await q.flush();
    await g.closeAll();
    await assertCleanCheck(t, img, what);
    await expectQemuSame(t, img, m, dir, `${what}: after vdisk writes`);
    fs.rmSync(raw);
  }
});

/** Formats a new file as qcow2 with vdisk and opens it writable in a graph (file node 'f', qcow2 node 'q'). */
async function vdiskCreate(t: Test, img: string, options: Parameters<typeof createQcow2>[1], discard = true): Promise<{ g: BlockGraph; q: BlockNode }> {
  fs.writeFileSync(img, '');
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const f = await g.add({ driver: 'file', 'node-name': 'f', filename: img });
  await createQcow2(f, options);
  const q = await g.add({ driver: 'qcow2', 'node-name': 'q', file: 'f', ...(discard ? { discard: 'unmap' } : {}) });
  return { g, q };
}

/** vdisk's version of opsFor: the same shapes of writes, through the node. */
async function applyOps(q: BlockNode, model: Buffer, ops: Op[], seed: number): Promise<void> {
  for (const [i, op] of ops.entries()) {
    if (op.pattern === undefined) {
      await q.writeZeroes(op.offset, op.length, i % 2 ? ReqFlags.MAY_UNMAP : 0);
      model.fill(0, op.offset, op.offset + op.length);
    } else {
      const b = patternBuffer(op.length, seed + i);
      await q.write(op.offset, b);
      b.copy(model, op.offset);
    }
  }
}

t.test('images created and written by vdisk pass qemu-img check and compare, every cluster size; dirty bit; growing', async (t) => {
  if (!requireTool(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const size = 16 * MiB;
  for (const cs of CLUSTER_SIZES) {
    const what = `vdisk-made, cluster ${cs}`;
    const img = path.join(dir, `v${cs}.qcow2`);
    const model = Buffer.alloc(size);
    {
      const { g, q } = await vdiskCreate(t, img, { size, clusterSize: cs });
      t.equal(dirtyBitOnDisk(img), true, `${what}: the dirty bit is set on disk while open writable`);
      await applyOps(q, model, opsFor(cs, size), cs);
      await q.flush();
      t.equal(dirtyBitOnDisk(img), true, `${what}: and stays set after a flush`);
      await expectSame(t, q, model, `${what}: reads`);
      await g.closeAll();
    }
    t.equal(dirtyBitOnDisk(img), false, `${what}: the dirty bit is clear after close`);
    const info = JSON.parse((await qemuImg('info', '--output=json', img)).stdout);
    t.equal(info['dirty-flag'], false, `${what}: qemu-img info: not dirty`);
    t.equal(info['cluster-size'], cs, `${what}: qemu-img info: cluster size`);
    t.equal(info['virtual-size'], size, `${what}: qemu-img info: size`);
    await assertCleanCheck(t, img, what);
    await expectQemuSame(t, img, model, dir, what);

    // Grow: by enough that small clusters need a bigger L1 table.
    const bigger = 2 * size + 8 * MiB + 512;
    {
      const { g, q } = await openQcow2(t, img);
      await q.truncate(bigger);
      t.equal(q.size, bigger, `${what}: grown`);
      const tail = Buffer.alloc(bigger - size, 1);
      await q.read(size, tail);
      t.ok(tail.equals(Buffer.alloc(bigger - size)), `${what}: the new part reads zeroes`);
      const b = patternBuffer(3000, 3);
      await q.write(bigger - 3000, b);
      await g.closeAll();
      const grown = Buffer.alloc(bigger);
      model.copy(grown);
      b.copy(grown, bigger - 3000);
      const info2 = JSON.parse((await qemuImg('info', '--output=json', img)).stdout);
      t.equal(info2['virtual-size'], bigger, `${what}: qemu-img info shows the new size`);
      await assertCleanCheck(t, img, `${what}, grown`);
      await expectQemuSame(t, img, grown, dir, `${what}, grown`);
    }
    fs.rmSync(img);
  }
});

t.test('vdisk-made images: version 2, refcount widths, lazy refcounts, a backing file', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  const variants: Array<[string, Parameters<typeof createQcow2>[1]]> = [
    ['v2', { size, clusterSize: 4096, version: 2 }],
    ['v2 64k', { size, version: 2 }],
    ['lazy', { size, clusterSize: 8192, lazyRefcounts: true }],
    ...[1, 2, 4, 8, 32, 64].map((bits): [string, Parameters<typeof createQcow2>[1]] => [`refcount_bits=${bits}`, { size, clusterSize: 1024, refcountBits: bits }]),
  ];
  for (const [what, options] of variants) {
    const img = path.join(dir, `${what.replace(/\W/g, '_')}.qcow2`);
    const model = Buffer.alloc(size);
    const { g, q } = await vdiskCreate(t, img, options);
    const cs = options.clusterSize ?? 65536;
    await applyOps(q, model, opsFor(cs, size), 7);
    const big = patternBuffer(2 * MiB + 1, 8);
    await q.write(MiB + 1, big);
    big.copy(model, MiB + 1);
    await q.discard(MiB, 512 * KiB);
    model.fill(0, MiB, MiB + 512 * KiB);
    await expectSame(t, q, model, `${what}: reads`);
    await g.closeAll();
    const info = JSON.parse((await qemuImg('info', '--output=json', img)).stdout);
    t.equal(info['format-specific'].data.compat, options.version === 2 ? '0.10' : '1.1', `${what}: compat`);
    if (options.refcountBits) t.equal(info['format-specific'].data['refcount-bits'], options.refcountBits, `${what}: refcount bits`);
    if (options.lazyRefcounts) t.equal(info['format-specific'].data['lazy-refcounts'], true, `${what}: lazy refcounts`);
    await assertCleanCheck(t, img, what);
    await expectQemuSame(t, img, model, dir, what);
  }

  // A vdisk-made overlay over a qemu-made base.
  const base = path.join(dir, 'base.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', base, String(size));
  await qemuIo(base, ['write -P 0x5a 0 8M']);
  const model = Buffer.alloc(size, 0x5a);
  const top = path.join(dir, 'top.qcow2');
  const { g, q } = await vdiskCreate(t, top, { size, clusterSize: 4096, backingFile: 'base.qcow2', backingFormat: 'qcow2' });
  await expectSame(t, q, model, 'vdisk overlay: reads the base');
  await applyOps(q, model, opsFor(4096, size), 9);
  await g.closeAll();
  const info = JSON.parse((await qemuImg('info', '--output=json', top)).stdout);
  t.equal(info['backing-filename'], 'base.qcow2', 'vdisk overlay: backing file name');
  t.equal(info['backing-filename-format'], 'qcow2', 'vdisk overlay: backing format');
  await assertCleanCheck(t, top, 'vdisk overlay');
  await expectQemuSame(t, top, model, dir, 'vdisk overlay');
});

/** Expects opening an image to be refused with a VdiskError whose message matches. */
async function refusesOpen(t: Test, img: string, message: RegExp, what: string, readOnly = false): Promise<void> {
  const g = new BlockGraph();
  const err = await g
    .add({ driver: 'qcow2', 'node-name': 'q', ...(readOnly ? { 'read-only': true } : {}), file: { driver: 'file', filename: img } })
    .then(
      () => undefined,
      (e: unknown) => e,
    );
  await g.closeAll();
  if (!(err instanceof VdiskError)) {
    t.fail(`${what}: expected the open to be refused with a VdiskError, got ${err === undefined ? 'success' : String(err)}`);
    return;
  }
  t.match(err.message, message, `${what}: refused: ${err.message}`);
}

/** Expects a read to fail with EIO and a message matching. */
async function readFailsEIO(t: Test, q: BlockNode, offset: number, length: number, message: RegExp, what: string): Promise<void> {
  const err = await q.read(offset, Buffer.alloc(length)).then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof VdiskError)) {
    t.fail(`${what}: expected the read to fail with EIO, got ${err === undefined ? 'success' : String(err)}`);
    return;
  }
  t.equal(err.errno, 'EIO', `${what}: EIO`);
  t.match(err.message, message, `${what}: ${err.message}`);
}

function patchFile(file: string, offset: number, bytes: Buffer): void {
  const fd = fs.openSync(file, 'r+');
  fs.writeSync(fd, bytes, 0, bytes.length, offset);
  fs.closeSync(fd);
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
}

function u64(v: bigint): Buffer {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(v);
  return b;
}

t.test('bad images are refused, or their bad clusters fail with EIO, and nothing is written to them', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const good = path.join(dir, 'good.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', good, String(4 * MiB));
  await qemuIo(good, ['write -P 0x42 0 256k']);
  const h = fs.readFileSync(good, { encoding: null }).subarray(0, 112);
  const l1Offset = Number(h.readBigUInt64BE(40));
  const rtOffset = Number(h.readBigUInt64BE(48));
  const fileSize = fs.statSync(good).size;

  const headerCases: Array<[string, number, Buffer, RegExp]> = [
    ['bad magic', 0, u32(0x12345678), /not a qcow2 image|magic/i],
    ['version 4', 4, u32(4), /version 4/],
    ['version 1', 4, u32(1), /version 1/],
    ['cluster_bits 8', 20, u32(8), /cluster size|cluster_bits|2\^8/i],
    ['cluster_bits 22', 20, u32(22), /cluster size|cluster_bits|2\^22/i],
    ['an unknown incompatible feature (bit 5)', 72, u64(1n << 5n), /unknown incompatible feature.*\b5\b|bit 5/i],
    ['an unknown incompatible feature (bit 63)', 72, u64(1n << 63n), /unknown incompatible feature.*\b63\b|bit 63/i],
    ['the L1 table past the end of the file', 40, u64(BigInt(fileSize + 1024 * 1024 - (fileSize % 65536))), /L1 table.*outside|L1 table.*end|L1 table.*past/i],
    ['an unaligned refcount table', 48, u64(BigInt(rtOffset + 512)), /refcount table.*(not cluster aligned|unaligned)/i],
    ['an L1 table too small for the disk', 36, u32(0), /L1 table/i],
    ['encryption', 32, u32(1), /encrypt/i],
  ];
  for (const [what, at, bytes, message] of headerCases) {
    const img = path.join(dir, `bad-${what.replace(/\W+/g, '_')}.qcow2`);
    fs.copyFileSync(good, img);
    patchFile(img, at, bytes);
    const before = fs.readFileSync(img);
    await refusesOpen(t, img, message, what);
    await refusesOpen(t, img, message, `${what} (read-only)`, true);
    t.ok(fs.readFileSync(img).equals(before), `${what}: the file is unchanged`);
  }

  // Bad L2 entries: the first L2 table maps guest clusters 0..; entry 1 is rewritten.
  const l2Offset = Number(fs.readFileSync(good).readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n);
  const copied = 1n << 63n;
  const entryCases: Array<[string, bigint, RegExp]> = [
    ['an L2 entry pointing into the header cluster (unaligned)', copied | 512n, /512/],
    ['an L2 entry pointing at the refcount table', copied | BigInt(rtOffset), new RegExp(`${rtOffset}`)],
    ['an L2 entry pointing at the L1 table', copied | BigInt(l1Offset), new RegExp(`${l1Offset}`)],
    ['an L2 entry pointing at its own L2 table', copied | BigInt(l2Offset), new RegExp(`${l2Offset}`)],
    ['an L2 entry pointing past the end of the file', copied | (1n << 32n), new RegExp(`${2 ** 32}`)],
  ];
  for (const [what, entry, message] of entryCases) {
    for (const readOnly of [true, false]) {
      const img = path.join(dir, `badl2-${what.replace(/\W+/g, '_')}-${readOnly}.qcow2`);
      fs.copyFileSync(good, img);
      patchFile(img, l2Offset + 8, u64(entry));
      const before = fs.readFileSync(img);
      const mode = readOnly ? 'read-only' : 'writable';
      const g = new BlockGraph();
      let q: BlockNode | undefined;
      try {
        q = await g.add({ driver: 'qcow2', 'node-name': 'q', 'read-only': readOnly, file: { driver: 'file', filename: img } });
      } catch (err) {
        t.match((err as Error).message, message, `${what} (${mode}): refused at open: ${(err as Error).message}`);
      }
      if (q) {
        await readFailsEIO(t, q, 65536, 4096, message, `${what} (${mode}): reading the cluster`);
        await readFailsEIO(t, q, 0, 3 * 65536, message, `${what} (${mode}): a read across it`);
        const ok = Buffer.alloc(65536);
        await q.read(0, ok);
        t.ok(ok.equals(Buffer.alloc(65536, 0x42)), `${what} (${mode}): the good cluster before it still reads`);
        if (!readOnly) {
          // A write there must not land on metadata either.
          const werr = await q.write(65536 + 100, Buffer.alloc(100, 1)).then(
            () => undefined,
            (e: unknown) => e,
          );
          t.ok(werr instanceof VdiskError && werr.errno === 'EIO', `${what} (${mode}): a write into the cluster fails with EIO (${String(werr)})`);
        }
      }
      await g.closeAll();
      if (!readOnly && q) {
        // A writable open sets and clears the dirty bit; QEMU would also mark the image corrupt. Everything else stays.
        const after = fs.readFileSync(img);
        const strip = (b: Buffer) => {
          const c = Buffer.from(b);
          c.writeBigUInt64BE(c.readBigUInt64BE(72) & ~3n, 72);
          return c;
        };
        t.ok(strip(after).equals(strip(before)), `${what} (${mode}): nothing but the dirty/corrupt bits changed in the file`);
      } else {
        t.ok(fs.readFileSync(img).equals(before), `${what} (${mode}): the file is unchanged`);
      }
    }
  }
});

t.test('extended L2 entries, external data files and zstd compression are refused with a clear error', async (t) => {
  if (!requireTool(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const ext = path.join(dir, 'ext.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'extended_l2=on', ext, '4M');
  const before = fs.readFileSync(ext);
  await refusesOpen(t, ext, /extended L2/i, 'extended_l2=on');
  await refusesOpen(t, ext, /extended L2/i, 'extended_l2=on (read-only)', true);
  t.ok(fs.readFileSync(ext).equals(before), 'extended_l2: the file is unchanged');
  const df = path.join(dir, 'df.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `data_file=${path.join(dir, 'df.raw')}`, df, '4M');
  const before2 = fs.readFileSync(df);
  await refusesOpen(t, df, /external data file/i, 'data_file');
  await refusesOpen(t, df, /external data file/i, 'data_file (read-only)', true);
  t.ok(fs.readFileSync(df).equals(before2), 'data_file: the file is unchanged');
  const zstd = path.join(dir, 'zstd.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', 'compression_type=zstd', zstd, '4M');
  const before3 = fs.readFileSync(zstd);
  await refusesOpen(t, zstd, /zstd/i, 'compression_type=zstd');
  await refusesOpen(t, zstd, /zstd/i, 'compression_type=zstd (read-only)', true);
  t.ok(fs.readFileSync(zstd).equals(before3), 'zstd: the file is unchanged');
});

t.test('internal snapshots: writes over clusters and L2 tables shared with a snapshot copy them; the snapshot keeps its data', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 8 * MiB;
  for (const cs of [4 * KiB, 64 * KiB]) {
    const what = `snapshot, cluster ${cs}`;
    const img = path.join(dir, `snap-${cs}.qcow2`);
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(size));
    await qemuIo(img, ['write -P 0x01 0 6M', 'write -z 7M 64k']);
    await qemuImg('snapshot', '-c', 'snap1', img);
    const snap = Buffer.alloc(size);
    snap.fill(0x01, 0, 6 * MiB);
    // QEMU copies (on write) what it writes after the snapshot: the first L2 table only (4k clusters).
    await qemuIo(img, ['write -P 0x02 512k 1M']);
    const model = Buffer.from(snap);
    model.fill(0x02, 512 * KiB, 1536 * KiB);
    const { g, q } = await openQcow2(t, img, { discard: true });
    await expectSame(t, q, model, `${what}: reads the current state`);
    const edits: Array<[number, number]> = [
      [100 * KiB + 3, 1000], // a shared data cluster, partially
      [3 * MiB + 5, 3 * cs], // an L2 table shared with the snapshot (4k clusters)
      [5 * MiB, 2 * cs], // whole clusters, shared
      [6 * MiB + 10, 100], // unallocated
    ];
    for (const [off, len] of edits) {
      const b = patternBuffer(len, off);
      await q.write(off, b);
      b.copy(model, off);
    }
    await q.writeZeroes(4 * MiB, 4 * cs, ReqFlags.MAY_UNMAP);
    model.fill(0, 4 * MiB, 4 * MiB + 4 * cs);
    await q.writeZeroes(4 * MiB + 8 * cs, 2 * cs, 0);
    model.fill(0, 4 * MiB + 8 * cs, 4 * MiB + 10 * cs);
    await q.discard(2 * MiB, 4 * cs);
    model.fill(0, 2 * MiB, 2 * MiB + 4 * cs);
    await expectSame(t, q, model, `${what}: after vdisk writes`);
    await g.closeAll();
    await assertCleanCheck(t, img, what);
    await expectQemuSame(t, img, model, dir, what);
    // The snapshot still holds what it held.
    const copy = path.join(dir, `snap-${cs}-applied.qcow2`);
    fs.copyFileSync(img, copy);
    await qemuImg('snapshot', '-a', 'snap1', copy);
    await expectQemuSame(t, copy, snap, dir, `${what}: the snapshot, applied`);
    await assertCleanCheck(t, copy, `${what}: the snapshot, applied`);
    // Deleting the snapshot drops its references: what vdisk wrote must still add up.
    await qemuImg('snapshot', '-d', 'snap1', img);
    await assertCleanCheck(t, img, `${what}: snapshot deleted`);
    await expectQemuSame(t, img, model, dir, `${what}: snapshot deleted`);
  }
});

t.test('persistent bitmaps and unknown header extensions survive a vdisk write session', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const img = path.join(dir, 'bm.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', img, String(8 * MiB));
  await qemuImg('bitmap', '--add', img, 'bm0');
  await qemuIo(img, ['write -P 0x01 0 1M']);
  const model = Buffer.alloc(8 * MiB);
  model.fill(0x01, 0, MiB);
  const { g, q } = await openQcow2(t, img);
  const b = patternBuffer(100_000, 1);
  await q.write(3 * MiB, b);
  b.copy(model, 3 * MiB);
  await g.closeAll();
  // vdisk loads the persistent bitmap, keeps it up to date and stores it again at close.
  const r = await run('qemu-img', ['check', img], { timeoutMs: 60_000 });
  t.equal(r.code, 0, `qemu-img check exits 0\n${r.stdout}${r.stderr}`);
  t.match(r.stdout, /No errors were found/, 'no errors, no leaks');
  await expectQemuSame(t, img, model, dir, 'bitmaps image');
  const info = JSON.parse((await qemuImg('info', '--output=json', img)).stdout);
  t.same(info['format-specific'].data.bitmaps?.map((b: { name: string; flags: string[] }) => [b.name, b.flags]), [['bm0', ['auto']]], 'the bitmap is kept, consistent and enabled');
  await qemuImg('bitmap', '--remove', img, 'bm0');
  await assertCleanCheck(t, img, 'bitmap removed by qemu-img');

  // An extension vdisk does not know is written back unchanged.
  const img2 = path.join(dir, 'ext.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', img2, String(8 * MiB));
  const head = fs.readFileSync(img2).subarray(0, 4096);
  let pos = head.readUInt32BE(100);
  while (head.readUInt32BE(pos) !== 0) pos += 8 + Math.ceil(head.readUInt32BE(pos + 4) / 8) * 8;
  const unknown = Buffer.alloc(24);
  unknown.writeUInt32BE(0x7664736b, 0);
  unknown.writeUInt32BE(11, 4);
  unknown.write('hello vdisk', 8);
  patchFile(img2, pos, Buffer.concat([unknown, Buffer.alloc(8)]));
  await assertCleanCheck(t, img2, 'with an unknown extension, before');
  {
    const { g, q } = await openQcow2(t, img2);
    await q.write(0, Buffer.alloc(4096, 1));
    await g.closeAll();
  }
  await assertCleanCheck(t, img2, 'with an unknown extension, after vdisk');
  t.ok(fs.readFileSync(img2).subarray(0, 65536).includes(unknown), 'the unknown extension is still in the header');
});

t.test('growing an overlay over a bigger backing file: the new part reads zeroes, not the backing data', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  for (const compat of ['1.1', '0.10']) {
    const base = path.join(dir, `base-${compat}.qcow2`);
    await qemuImg('create', '-q', '-f', 'qcow2', base, String(8 * MiB));
    await qemuIo(base, ['write -P 0x77 0 8M']);
    const top = path.join(dir, `top-${compat}.qcow2`);
    const small = 3 * MiB + 512; // ends inside a cluster
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `compat=${compat},cluster_size=4096`, '-b', base, '-F', 'qcow2', top, String(small));
    const { g, q } = await openQcow2(t, top);
    const bigger = 6 * MiB;
    await q.truncate(bigger);
    const model = Buffer.alloc(bigger);
    model.fill(0x77, 0, small);
    await expectSame(t, q, model, `compat=${compat}: after growing`);
    await g.closeAll();
    await assertCleanCheck(t, top, `compat=${compat}`);
    await expectQemuSame(t, top, model, dir, `compat=${compat}: after growing`);
  }
});
