/**
 * Every existing capability on an RBD node, on a real single-node Ceph cluster: the FUSE export,
 * blkverify with the RBD image as the reference and as the image under test, blkdebug above it,
 * a dirty bitmap read over NBD (qemu-img map x-dirty-bitmap), full and incremental backups out of
 * an RBD image into qcow2 files and backups of a file into an RBD image. What vdisk did is
 * checked with Ceph's `rbd export` and QEMU's tools (qemu-img compare/map, qemu-io).
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { type CephCluster, startCeph, startRbdDaemon } from '../helpers/ceph.js';
import { QmpWire } from '../helpers/qmp.js';
import { patternBuffer, requireTools, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

requireTools(t, 'qemu-img', 'qemu-io', 'dd', 'umount');
const ceph: CephCluster = await startCeph(t);


function rbdNode(node: string, image: string, extra: Record<string, unknown> = {}) {
  return { driver: 'rbd', 'node-name': node, pool: 'rbd', image, conf: ceph.conf, ...extra };
}

function qemuRbd(image: string): string {
  return `rbd:rbd/${image}:conf=${ceph.conf}`;
}

async function rbdExport(t: Tap.Test, image: string): Promise<string> {
  const file = path.join(tempDir(t), `${image}.raw`);
  await ceph.rbdOk(['export', '--no-progress', `rbd/${image}`, file]);
  return file;
}

/** An RBD image holding `data` (rbd import of a file). */
async function importImage(t: Tap.Test, image: string, data: Buffer): Promise<void> {
  const file = path.join(tempDir(t), `${image}.src`);
  fs.writeFileSync(file, data);
  await ceph.rbdOk(['import', '--no-progress', file, `rbd/${image}`]);
}

function isMounted(mountpoint: string): boolean {
  return fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n').some((l) => l.split(' ')[4] === mountpoint);
}

/** Waits for a job's BLOCK_JOB_COMPLETED; fails on an error in it. */
async function jobCompleted(w: QmpWire, id: string, from: number): Promise<void> {
  const ev = await w.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED' && m.data?.device === id, 60_000, from);
  if (ev.data?.error) throw new Error(`job ${id}: ${String(ev.data.error)}`);
}

t.test('FUSE export of an rbd node: dd writes (fsync, O_DIRECT) are what rbd export reads', async (t) => {
  const initial = patternBuffer(8 * MiB, 11);
  await importImage(t, 'fu1', initial);
  const { w, dir } = await startRbdDaemon(t);
  const mnt = path.join(dir, 'disk.fuse');
  fs.writeFileSync(mnt, '');
  t.teardown(async () => {
    for (let i = 0; i < 4 && isMounted(mnt); i++) await run('umount', ['-l', mnt]);
  });
  await w.ok('blockdev-add', rbdNode('fu1', 'fu1'));
  await w.ok('block-export-add', { type: 'fuse', id: 'fu1', 'node-name': 'fu1', mountpoint: mnt, writable: true });
  // This test process only spawns dd and cmp: the daemon (another process) serves the mount.
  t.equal((await run('cmp', [mnt, await rbdExport(t, 'fu1')])).code, 0, 'the FUSE file reads the image');
  const a = patternBuffer(2 * MiB, 12);
  const b = patternBuffer(MiB, 13);
  const srcA = path.join(dir, 'a.bin');
  const srcB = path.join(dir, 'b.bin');
  fs.writeFileSync(srcA, a);
  fs.writeFileSync(srcB, b);
  const dd1 = await run('dd', [`if=${srcA}`, `of=${mnt}`, 'bs=1M', 'seek=1', 'conv=notrunc,fsync', 'status=none']);
  t.equal(dd1.code, 0, `dd conv=fsync: ${dd1.stderr}`);
  const dd2 = await run('dd', [`if=${srcB}`, `of=${mnt}`, 'bs=64k', 'seek=96', 'oflag=direct', 'conv=notrunc,fsync', 'status=none']);
  t.equal(dd2.code, 0, `dd oflag=direct: ${dd2.stderr}`);
  const expected = Buffer.from(initial);
  a.copy(expected, MiB);
  b.copy(expected, 6 * MiB);
  // rbd export reads while vdisk still holds the lock: what fsync made durable is in the cluster.
  t.ok(fs.readFileSync(await rbdExport(t, 'fu1')).equals(expected), 'rbd export has both writes');
  await w.ok('block-export-del', { id: 'fu1' });
  await w.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED' && m.data?.id === 'fu1');
});

t.test('blkverify: RBD as the raw reference and a qcow2 file under test, and the other way round', async (t) => {
  const data = patternBuffer(4 * MiB, 21);
  const { d, w, dir } = await startRbdDaemon(t);

  // 1. raw = RBD image, test = qcow2 file; the mismatch is planted in the qcow2 at 1 MiB.
  await importImage(t, 'bv1', data);
  const rawFile = path.join(dir, 'same.raw');
  fs.writeFileSync(rawFile, data);
  const qcow = path.join(dir, 'test.qcow2');
  t.equal((await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', rawFile, qcow])).code, 0);
  t.equal((await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0xee 1M 512', qcow])).code, 0);
  await w.ok('blockdev-add', {
    driver: 'blkverify', 'node-name': 'v1',
    raw: { driver: 'raw', file: rbdNode('bv1r', 'bv1') },
    test: { driver: 'qcow2', file: { driver: 'file', filename: qcow } },
  });
  await w.ok('block-export-add', { type: 'nbd', id: 'v1', 'node-name': 'v1', name: 'v1', writable: true });
  const good = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 1M', '-c', 'read 2M 2M', d.uri('v1')]);
  t.notMatch(good.stdout, /failed/, 'where both sides agree, reads succeed');
  const bad = await run('qemu-io', ['-f', 'raw', '-c', 'read 1M 4k', d.uri('v1')]);
  t.match(bad.stdout, /read failed: Input\/output error/, 'the planted mismatch is EIO');
  const ev = await w.waitFor((m) => m.event === 'BLKVERIFY_MISMATCH' && m.data?.['node-name'] === 'v1');
  t.match(ev.data, { operation: 'read', offset: MiB, 'mismatch-offset': MiB }, 'and an event with where');
  // Writes reach both sides: the RBD image gets them (rbd export) and so does the qcow2.
  const wr = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x42 1M 64k', '-c', 'write -P 0x43 3M 4k', '-c', 'flush', d.uri('v1')]);
  t.notMatch(wr.stdout, /failed/, 'writes through blkverify succeed');
  t.notMatch((await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4M', d.uri('v1')])).stdout, /failed/, 'after the overwrite both sides agree everywhere');
  const expected = Buffer.from(data);
  expected.fill(0x42, MiB, MiB + 65536);
  expected.fill(0x43, 3 * MiB, 3 * MiB + 4096);
  t.ok(fs.readFileSync(await rbdExport(t, 'bv1')).equals(expected), 'rbd export has the writes');
  await w.ok('block-export-del', { id: 'v1' });
  await w.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED' && m.data?.id === 'v1');
  await w.ok('blockdev-del', { 'node-name': 'v1' });
  t.equal((await run('qemu-img', ['compare', '-F', 'raw', qcow, qemuRbd('bv1')], { env: ceph.env })).code, 0, 'qemu-img: the qcow2 and the RBD image agree');

  // 2. raw = a file, test = RBD image; the mismatch is planted in the RBD image (by QEMU's rbd driver).
  await importImage(t, 'bv2', data);
  t.equal((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xdd 2M 512', qemuRbd('bv2')], { env: ceph.env })).code, 0);
  await w.ok('blockdev-add', {
    driver: 'blkverify', 'node-name': 'v2',
    raw: { driver: 'raw', file: { driver: 'file', filename: rawFile } },
    test: { driver: 'raw', file: rbdNode('bv2t', 'bv2') },
  });
  await w.ok('block-export-add', { type: 'nbd', id: 'v2', 'node-name': 'v2', name: 'v2' });
  t.notMatch((await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 0 2M', d.uri('v2')])).stdout, /failed/, 'agreeing range reads');
  t.match((await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read 2M 4k', d.uri('v2')])).stdout, /read failed: Input\/output error/, 'the mismatch on the RBD side is EIO');
  const ev2 = await w.waitFor((m) => m.event === 'BLKVERIFY_MISMATCH' && m.data?.['node-name'] === 'v2');
  t.match(ev2.data, { operation: 'read', offset: 2 * MiB, 'mismatch-offset': 2 * MiB });
});

t.test('blkdebug above rbd: an injected EIO on a read reaches a qemu-io client', async (t) => {
  await importImage(t, 'dbg1', Buffer.alloc(2 * MiB, 0x31));
  const { d, w } = await startRbdDaemon(t);
  await w.ok('blockdev-add', {
    driver: 'raw', 'node-name': 'dbg',
    file: { driver: 'blkdebug', image: rbdNode('dbgr', 'dbg1'), 'inject-error': [{ event: 'read_aio', errno: 5, sector: 2048, once: true }] },
  });
  await w.ok('block-export-add', { type: 'nbd', id: 'dbg', 'node-name': 'dbg', name: 'dbg' });
  const io = (cmd: string) => run('qemu-io', ['-r', '-f', 'raw', '-c', cmd, d.uri('dbg')]);
  t.notMatch((await io('read -P 0x31 0 4k')).stdout, /failed/, 'other sectors read from RBD');
  t.match((await io('read 1M 4k')).stdout, /read failed: Input\/output error/, 'sector 2048 fails with EIO');
  t.notMatch((await io('read -P 0x31 1M 4k')).stdout, /failed/, 'once: the next read gets the data');
});

/** [start, end) ranges of a qemu-img map whose entries match `pick`, merged. */
function ranges(entries: Array<{ start: number; length: number; data: boolean }>, pick: (e: { data: boolean }) => boolean): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const e of entries.filter(pick)) {
    const last = out[out.length - 1];
    if (last && last[1] === e.start) last[1] = e.start + e.length;
    else out.push([e.start, e.start + e.length]);
  }
  return out;
}

t.test('a dirty bitmap on an rbd node, read over NBD with qemu-img map x-dirty-bitmap', async (t) => {
  await ceph.rbdOk(['create', '--size', '16M', 'rbd/bm1']);
  const { d, w } = await startRbdDaemon(t);
  await w.ok('blockdev-add', rbdNode('bm1', 'bm1'));
  await w.ok('block-dirty-bitmap-add', { node: 'bm1', name: 'b0', granularity: 65536 });
  await w.ok('block-export-add', { type: 'nbd', id: 'bm1', 'node-name': 'bm1', name: 'bm1', writable: true, bitmaps: ['b0'] });
  const wr = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', '-c', 'write -P 2 1M 128k', '-c', 'write -P 3 5000000 10', '-c', 'write -z 12M 64k', d.uri('bm1')]);
  t.notMatch(wr.stdout, /failed/, 'the writes over NBD succeed');
  const map = await run('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,server.type=unix,server.path=${d.socket},export=bm1,x-dirty-bitmap=qemu:dirty-bitmap:b0`]);
  t.equal(map.code, 0, map.stderr);
  const entries = JSON.parse(map.stdout) as Array<{ start: number; length: number; data: boolean }>;
  // QEMU's x-dirty-bitmap shows a dirty granule as a hole (data false), a clean one as data.
  const g = 65536;
  const down = (n: number) => Math.floor(n / g) * g;
  const up = (n: number) => Math.ceil(n / g) * g;
  t.same(ranges(entries, (e) => !e.data), [[0, g], [MiB, MiB + 2 * g], [down(5000000), up(5000010)], [12 * MiB, 12 * MiB + g]], 'the dirty granules are the written ones');
  const info = (await w.ok('query-named-block-nodes')) as Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name: string; count: number }> }>;
  t.match(info.find((n) => n['node-name'] === 'bm1')?.['dirty-bitmaps'], [{ name: 'b0', count: 5 * g }], 'query-named-block-nodes counts the same bytes');
});

t.test('full and incremental backups out of an RBD image into qcow2 files', async (t) => {
  const data = patternBuffer(16 * MiB, 31);
  data.fill(0, 4 * MiB, 10 * MiB);
  await importImage(t, 'bk1', data);
  const { d, w, dir } = await startRbdDaemon(t);
  await w.ok('blockdev-add', rbdNode('bk1', 'bk1'));
  await w.ok('block-export-add', { type: 'nbd', id: 'bk1', 'node-name': 'bk1', name: 'bk1', writable: true });
  const full = path.join(dir, 'full.qcow2');
  let from = w.messages.length;
  await w.ok('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-add', data: { node: 'bk1', name: 'b0' } },
      { type: 'drive-backup', data: { 'job-id': 'full', device: 'bk1', target: full, sync: 'full', format: 'qcow2' } },
    ],
  });
  await jobCompleted(w, 'full', from);
  t.equal((await run('qemu-img', ['compare', '-F', 'raw', full, await rbdExport(t, 'bk1')])).code, 0, 'the full backup is rbd export');

  const wr = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x71 0 64k', '-c', 'write -P 0x72 5M 1M', '-c', 'write -z 12M 128k', '-c', 'flush', d.uri('bk1')]);
  t.notMatch(wr.stdout, /failed/, 'writes over NBD after the full backup');
  const inc = path.join(dir, 'inc0.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', '-b', full, '-F', 'qcow2', inc])).code, 0);
  from = w.messages.length;
  await w.ok('drive-backup', { 'job-id': 'inc0', device: 'bk1', target: inc, sync: 'incremental', bitmap: 'b0', format: 'qcow2', mode: 'existing' });
  await jobCompleted(w, 'inc0', from);
  const exported = await rbdExport(t, 'bk1');
  const cmp = await run('qemu-img', ['compare', '-F', 'raw', inc, exported]);
  t.equal(cmp.code, 0, `the incremental over the full is rbd export now: ${cmp.stdout}`);
  const incMap = JSON.parse((await run('qemu-img', ['map', '--output=json', inc])).stdout) as Array<{ start: number; length: number; depth: number; data: boolean }>;
  const own = incMap.filter((e) => e.depth === 0 && e.data).reduce((n, e) => n + e.length, 0);
  t.ok(own > 0 && own <= 2 * MiB, `the incremental holds only the changed clusters (${own} bytes)`);
});

t.test('backups of a file into RBD: blockdev-backup to an rbd node, drive-backup to an rbd: target', async (t) => {
  const { w, dir } = await startRbdDaemon(t);
  const src = path.join(dir, 'src.raw');
  const data = patternBuffer(8 * MiB, 41);
  data.fill(0, 2 * MiB, 5 * MiB);
  fs.writeFileSync(src, data);
  await w.ok('blockdev-add', { driver: 'raw', 'node-name': 'src', file: { driver: 'file', filename: src } });

  await ceph.rbdOk(['create', '--size', '8M', 'rbd/tg1']);
  await w.ok('blockdev-add', rbdNode('tg1', 'tg1'));
  let from = w.messages.length;
  await w.ok('blockdev-backup', { 'job-id': 'b1', device: 'src', target: 'tg1', sync: 'full' });
  await jobCompleted(w, 'b1', from);
  t.ok(fs.readFileSync(await rbdExport(t, 'tg1')).equals(data), 'blockdev-backup: rbd export is the file');

  // drive-backup creates the RBD image itself (src/block/create.ts), raw by default for a raw source.
  from = w.messages.length;
  await w.ok('drive-backup', { 'job-id': 'b2', device: 'src', target: qemuRbd('tg2'), sync: 'full' });
  await jobCompleted(w, 'b2', from);
  t.ok(fs.readFileSync(await rbdExport(t, 'tg2')).equals(data), 'drive-backup to rbd:: rbd export is the file');
  const info = JSON.parse(await ceph.rbdOk(['info', '--format', 'json', 'rbd/tg2'])) as { size: number };
  t.equal(info.size, 8 * MiB, 'the new image has the source’s size');
});
