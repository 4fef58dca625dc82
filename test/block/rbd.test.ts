/**
 * driver=rbd against a real single-node Ceph cluster (scripts/ceph-cluster.sh): vdisk serves RBD
 * images over NBD, and what it reads and writes is checked with Ceph's own `rbd` tool (export,
 * import, diff, snap, lock) and with QEMU's rbd driver (qemu-img / qemu-io on rbd:pool/image).
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { type CephCluster, startCeph, startRbdDaemon } from '../helpers/ceph.js';
import { QmpWire } from '../helpers/qmp.js';
import { VDISK, patternBuffer, requireTools, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

requireTools(t, 'qemu-img', 'qemu-io', 'nbdcopy');
const ceph: CephCluster = await startCeph(t);


/** blockdev-add of an rbd node (and its NBD export, writable unless the node is read-only). */
async function addRbd(w: QmpWire, node: string, image: string, extra: Record<string, unknown> = {}, writable = true): Promise<void> {
  await w.ok('blockdev-add', { driver: 'rbd', 'node-name': node, pool: 'rbd', image, conf: ceph.conf, ...extra });
  await w.ok('block-export-add', { type: 'nbd', id: node, 'node-name': node, name: node, writable });
}

/** QEMU's spelling of an image with this cluster's conf. */
function qemuRbd(image: string): string {
  return `rbd:rbd/${image}:conf=${ceph.conf}`;
}

async function rbdExport(t: Tap.Test, image: string): Promise<Buffer> {
  const file = path.join(tempDir(t), `${image.replace(/[@/]/g, '_')}.raw`);
  await ceph.rbdOk(['export', '--no-progress', `rbd/${image}`, file]);
  return fs.readFileSync(file);
}

t.test('writes through vdisk are what rbd export and QEMU read', async (t) => {
  await ceph.rbdOk(['create', '--size', '32M', 'rbd/w1']);
  const { d, w } = await startRbdDaemon(t);
  // discard=unmap: discards reach librbd (the whole object at 20M goes).
  await addRbd(w, 'w1', 'w1', { discard: 'unmap' });
  const uri = d.uri('w1');
  const r = await run('qemu-io', ['-f', 'raw',
    '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 5M 3M', '-c', 'write -P 0x33 12345 777',
    '-c', 'write -z 5M 64k', '-c', 'write -P 0x44 20M 4M', '-c', 'discard 20M 4M', '-c', 'write -P 0x55 31M 1M', '-c', 'flush', uri]);
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /failed/, 'no request failed');

  const expected = Buffer.alloc(32 * MiB);
  expected.fill(0x11, 0, MiB);
  expected.fill(0x22, 5 * MiB, 8 * MiB);
  expected.fill(0x33, 12345, 12345 + 777);
  expected.fill(0, 5 * MiB, 5 * MiB + 65536);
  expected.fill(0x55, 31 * MiB, 32 * MiB);
  const exported = await rbdExport(t, 'w1');
  t.equal(exported.length, expected.length, 'rbd export has the image size');
  t.ok(exported.equals(expected), 'rbd export reads what vdisk wrote (after its flush)');

  // QEMU's own rbd driver reads the image while vdisk still holds it (reads need no lock).
  const local = path.join(tempDir(t), 'expected.raw');
  fs.writeFileSync(local, expected);
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', qemuRbd('w1'), local], { env: ceph.env });
  t.equal(cmp.code, 0, `qemu-img compare over rbd: ${cmp.stdout}${cmp.stderr}`);
});

t.test('an image made by rbd import reads the same through vdisk', async (t) => {
  const dir = tempDir(t);
  const src = path.join(dir, 'src.raw');
  const data = patternBuffer(24 * MiB, 7);
  // Holes that rbd import leaves unwritten (sparse), so the export has unallocated parts too.
  data.fill(0, 4 * MiB, 12 * MiB);
  data.fill(0, 20 * MiB, 21 * MiB);
  fs.writeFileSync(src, data);
  await ceph.rbdOk(['import', '--no-progress', src, 'rbd/imp1']);
  const { d, w } = await startRbdDaemon(t);
  await addRbd(w, 'imp1', 'imp1', {}, false);
  const back = path.join(dir, 'back.raw');
  const r = await run('nbdcopy', [d.uri('imp1'), back]);
  t.equal(r.code, 0, r.stderr);
  t.ok(fs.readFileSync(back).equals(data), 'nbdcopy out of vdisk equals the imported file');
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', d.uri('imp1'), src]);
  t.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
});

/** Data extents, merged: [start, end) pairs. */
function merge(extents: Array<[number, number]>): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const [s, e] of extents.sort((a, b) => a[0] - b[0])) {
    const last = out[out.length - 1];
    if (last && last[1] >= s) last[1] = Math.max(last[1], e);
    else out.push([s, e]);
  }
  return out;
}

t.test('block status over NBD (qemu-img map) is rbd diff', async (t) => {
  await ceph.rbdOk(['create', '--size', '64M', 'rbd/map1']);
  // Written by QEMU's rbd driver, so the layout is not vdisk's own doing.
  const wr = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 64k', '-c', 'write -P 2 6M 1M', '-c', 'write -P 3 13M 5M', '-c', 'write -P 4 63M 1M', qemuRbd('map1')], { env: ceph.env });
  t.equal(wr.code, 0, wr.stderr);
  const { d, w } = await startRbdDaemon(t);
  await addRbd(w, 'map1', 'map1');
  const diff = JSON.parse(await ceph.rbdOk(['diff', '--format', 'json', 'rbd/map1'])) as Array<{ offset: number; length: number; exists: string }>;
  const fromRbd = merge(diff.filter((x) => x.exists === 'true').map((x) => [x.offset, x.offset + x.length]));
  const map = await run('qemu-img', ['map', '--output=json', '-f', 'raw', d.uri('map1')]);
  t.equal(map.code, 0, map.stderr);
  const entries = JSON.parse(map.stdout) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
  const fromVdisk = merge(entries.filter((e) => e.data).map((e) => [e.start, e.start + e.length]));
  t.same(fromVdisk, fromRbd, 'the data extents vdisk reports are the ones rbd diff lists');
  t.ok(fromRbd.length >= 3, `rbd diff lists separate extents: ${JSON.stringify(fromRbd)}`);
  t.ok(entries.filter((e) => !e.data).every((e) => e.zero), 'what is not data reads as zeroes');
  t.equal(entries.reduce((n, e) => n + e.length, 0), 64 * MiB, 'the map covers the image');

  // A write through vdisk shows in the next block status (the cached diff is dropped).
  const wz = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 9 40M 1M', d.uri('map1')]);
  t.equal(wz.code, 0, wz.stderr);
  const map2 = JSON.parse((await run('qemu-img', ['map', '--output=json', '-f', 'raw', d.uri('map1')])).stdout) as typeof entries;
  t.ok(map2.some((e) => e.data && e.start <= 40 * MiB && e.start + e.length >= 41 * MiB), 'the new write is data');
});

t.test('block_resize resizes the RBD image', async (t) => {
  await ceph.rbdOk(['create', '--size', '8M', 'rbd/rs1']);
  const { w } = await startRbdDaemon(t);
  // Not exported: an export holds the size its clients were told.
  await w.ok('blockdev-add', { driver: 'rbd', 'node-name': 'rs1', pool: 'rbd', image: 'rs1', conf: ceph.conf });
  await w.ok('block_resize', { 'node-name': 'rs1', size: 24 * MiB });
  const info = JSON.parse(await ceph.rbdOk(['info', '--format', 'json', 'rbd/rs1'])) as { size: number };
  t.equal(info.size, 24 * MiB, 'rbd info shows the new size');
  const nodes = (await w.ok('query-named-block-nodes')) as Array<{ 'node-name': string; image: { 'virtual-size': number } }>;
  t.equal(nodes.find((n) => n['node-name'] === 'rs1')!.image['virtual-size'], 24 * MiB, 'the node has the new size');
  await w.ok('block_resize', { 'node-name': 'rs1', size: 4 * MiB });
  const after = JSON.parse(await ceph.rbdOk(['info', '--format', 'json', 'rbd/rs1'])) as { size: number };
  t.equal(after.size, 4 * MiB, 'and shrinks it');
});

t.test('a second writer is refused while vdisk holds the exclusive lock', async (t) => {
  await ceph.rbdOk(['create', '--size', '8M', 'rbd/lk1']);
  const { w } = await startRbdDaemon(t);
  await addRbd(w, 'lk1', 'lk1');
  const locks = JSON.parse(await ceph.rbdOk(['lock', 'ls', '--format', 'json', 'rbd/lk1'])) as unknown[];
  t.equal(locks.length, 1, 'rbd lock ls shows the lock vdisk took');

  // Another node in the same daemon (its own cluster connection) ...
  const again = await w.cmd('blockdev-add', { driver: 'rbd', 'node-name': 'lk1b', pool: 'rbd', image: 'lk1', conf: ceph.conf });
  t.match(again.error?.desc, /Failed to get the exclusive lock on RBD image 'rbd\/lk1'.*held by/, 'a second writable node is refused, naming the image');
  // ... another vdisk process ...
  const other = await run(process.execPath, [VDISK, 'serve', '--blockdev', `driver=rbd,node-name=x,pool=rbd,image=lk1,conf=${ceph.conf}`], { timeoutMs: 60_000 });
  t.not(other.code, 0, 'a second vdisk exits');
  t.match(other.stderr, /exclusive lock on RBD image 'rbd\/lk1'/);
  // ... and QEMU cannot write either.
  const q = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 4k', qemuRbd('lk1')], { env: ceph.env });
  t.match(q.stdout + q.stderr, /Read-only file system/, 'qemu-io writes fail with EROFS');
  // A read-only node needs no lock.
  await w.ok('blockdev-add', { driver: 'rbd', 'node-name': 'lk1r', pool: 'rbd', image: 'lk1', conf: ceph.conf, 'read-only': true });

  // Closing the writer releases the lock: a new writer gets it.
  await w.ok('block-export-del', { id: 'lk1' });
  await new Promise((r) => setTimeout(r, 200));
  await w.ok('blockdev-del', { 'node-name': 'lk1' });
  await w.ok('blockdev-add', { driver: 'rbd', 'node-name': 'lk1c', pool: 'rbd', image: 'lk1', conf: ceph.conf });
});

t.test('a snapshot opens read-only and keeps its content', async (t) => {
  await ceph.rbdOk(['create', '--size', '8M', 'rbd/sn1']);
  const first = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 0 2M', qemuRbd('sn1')], { env: ceph.env });
  t.equal(first.code, 0, first.stderr);
  await ceph.rbdOk(['snap', 'create', 'rbd/sn1@s1']);
  const second = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x62 0 1M', qemuRbd('sn1')], { env: ceph.env });
  t.equal(second.code, 0, second.stderr);

  const { d, w } = await startRbdDaemon(t);
  await w.ok('blockdev-add', { driver: 'rbd', 'node-name': 'snap', pool: 'rbd', image: 'sn1', snapshot: 's1', conf: ceph.conf });
  const nodes = (await w.ok('query-named-block-nodes')) as Array<{ 'node-name': string; ro: boolean }>;
  t.equal(nodes.find((n) => n['node-name'] === 'snap')!.ro, true, 'the snapshot node is read-only');
  const refused = await w.cmd('block-export-add', { type: 'nbd', id: 'snapw', 'node-name': 'snap', writable: true });
  t.ok(refused.error, 'a writable export of the snapshot is refused');
  await w.ok('block-export-add', { type: 'nbd', id: 'snap', 'node-name': 'snap', name: 'snap' });
  const r = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x61 0 2M', '-c', 'read -P 0 2M 6M', d.uri('snap')]);
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /Pattern verification failed/, 'the snapshot has the content it was taken with');
  const missing = await w.cmd('blockdev-add', { driver: 'rbd', 'node-name': 'nosnap', pool: 'rbd', image: 'sn1', snapshot: 'nope', conf: ceph.conf });
  t.match(missing.error?.desc, /Could not open RBD image 'rbd\/sn1@nope'/, 'a missing snapshot is a clear error');
});

t.test('connection options: user, key-secret, auth-client-required, server; a missing image', async (t) => {
  await ceph.rbdOk(['create', '--size', '4M', 'rbd/opt1']);
  const keyring = fs.readFileSync(ceph.keyring, 'utf8');
  const key = /key = (\S+)/.exec(keyring)![1];
  // The monitor's msgr1 port: a bare host:port in mon_host means that protocol.
  const port = /v1:127\.0\.0\.1:(\d+)/.exec(fs.readFileSync(ceph.conf, 'utf8'))![1];
  const { w } = await startRbdDaemon(t);
  await w.ok('object-add', { 'qom-type': 'secret', id: 'cephkey', data: key, format: 'base64' });
  // No conf file: the monitor from `server`, the key from the secret (the daemon has no CEPH_CONF).
  await w.ok('blockdev-add', {
    driver: 'rbd', 'node-name': 'o1', pool: 'rbd', image: 'opt1', user: 'admin', 'key-secret': 'cephkey',
    'auth-client-required': ['cephx'], server: [{ host: '127.0.0.1', port }], 'read-only': true,
  });
  t.pass('opened with server, user, key-secret and auth-client-required and no conf file');
  const missing = await w.cmd('blockdev-add', { driver: 'rbd', 'node-name': 'm1', pool: 'rbd', image: 'nope', conf: ceph.conf });
  t.match(missing.error?.desc, /Could not open RBD image 'rbd\/nope' \(rbd_open\): ENOENT/, 'a missing image names the image and the errno');
  const badPool = await w.cmd('blockdev-add', { driver: 'rbd', 'node-name': 'm2', pool: 'nopool', image: 'x', conf: ceph.conf });
  t.match(badPool.error?.desc, /Could not open RBD image 'nopool\/x' \(rados_ioctx_create\): ENOENT/, 'a missing pool too');
});

/** `rbd info --format json`: size, object size and order. */
async function rbdInfo(image: string): Promise<{ size: number; object_size: number; order: number }> {
  return JSON.parse(await ceph.rbdOk(['info', '--format', 'json', `rbd/${image}`])) as { size: number; object_size: number; order: number };
}

t.test('blockdev-create driver=rbd: size and object size as rbd info and qemu-img info see them', async (t) => {
  const { w } = await startRbdDaemon(t);
  const done = async (id: string) => {
    await w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.id === id && m.data?.status === 'concluded');
    const job = ((await w.ok('query-jobs')) as Array<Record<string, unknown>>).find((j) => j.id === id)!;
    await w.ok('job-dismiss', { id });
    return job;
  };
  const location = (image: string) => ({ pool: 'rbd', image, conf: ceph.conf });
  await w.ok('blockdev-create', { 'job-id': 'c1', options: { driver: 'rbd', location: location('bc1'), size: 24 * MiB, 'cluster-size': MiB } });
  t.equal((await done('c1')).error, undefined, 'the job succeeded');
  t.match(await rbdInfo('bc1'), { size: 24 * MiB, object_size: MiB, order: 20 }, 'rbd info: the size and 1 MiB objects');
  const qi = JSON.parse((await run('qemu-img', ['info', '--output=json', qemuRbd('bc1')], { env: ceph.env })).stdout) as Record<string, unknown>;
  t.match(qi, { 'virtual-size': 24 * MiB, 'cluster-size': MiB, format: 'raw' }, 'qemu-img info over rbd: agrees');

  // Without cluster-size: librbd's default object size (4 MiB); then qcow2 laid out on the new image.
  await w.ok('blockdev-create', { 'job-id': 'c2', options: { driver: 'rbd', location: location('bc2'), size: 0 } });
  t.equal((await done('c2')).error, undefined);
  t.match(await rbdInfo('bc2'), { size: 0, object_size: 4 * MiB, order: 22 });
  await w.ok('blockdev-add', { driver: 'rbd', 'node-name': 'bc2', ...location('bc2') });
  await w.ok('blockdev-create', { 'job-id': 'c3', options: { driver: 'qcow2', file: 'bc2', size: 32 * MiB } });
  t.equal((await done('c3')).error, undefined, 'qcow2 formats the empty RBD image (writes past its end grow it, as in QEMU)');
  await w.ok('blockdev-del', { 'node-name': 'bc2' });
  const check = await run('qemu-img', ['check', '-f', 'qcow2', qemuRbd('bc2')], { env: ceph.env });
  t.equal(check.code, 0, `qemu-img check over rbd: ${check.stdout}${check.stderr}`);

  // Refused: encryption at submit; a bad object size and an existing image in the job.
  const enc = await w.cmd('blockdev-create', { 'job-id': 'c4', options: { driver: 'rbd', location: location('bc4'), size: MiB, encrypt: { format: 'luks', 'key-secret': 'k' } } });
  t.match(enc.error?.desc, /Encrypted RBD images are not supported by vdisk/);
  const typo = await w.cmd('blockdev-create', { 'job-id': 'c7', options: { driver: 'rbd', location: { ...location('bc7'), imgae: 'x' }, size: MiB } });
  t.same(typo.error?.desc, "Parameter 'options.location.imgae' is unexpected", 'location is checked as BlockdevOptionsRbd');
  const snap = await w.cmd('blockdev-create', { 'job-id': 'c8', options: { driver: 'rbd', location: { ...location('bc8'), snapshot: 's' }, size: MiB } });
  t.match(snap.error?.desc, /Can't use snapshot name for image creation/);
  await w.ok('blockdev-create', { 'job-id': 'c5', options: { driver: 'rbd', location: location('bc5'), size: MiB, 'cluster-size': 3 * MiB } });
  t.match((await done('c5')).error, /obj size needs to be power of 2/);
  await w.ok('blockdev-create', { 'job-id': 'c6', options: { driver: 'rbd', location: location('bc1'), size: MiB } });
  t.match((await done('c6')).error, /RBD image 'rbd\/bc1' already exists/);
  t.match(await rbdInfo('bc1'), { size: 24 * MiB }, 'the existing image is untouched');
});

t.test('vdisk img create/info/convert/compare/check on rbd: names, against rbd and qemu-img', async (t) => {
  const dir = tempDir(t);
  const img = (...args: string[]) => run(process.execPath, [VDISK, 'img', ...args], { env: ceph.env });
  const c1 = await img('create', '-f', 'raw', '-o', 'cluster_size=64k', `rbd:rbd/ic1:conf=${ceph.conf}`, '16M');
  t.equal(c1.code, 0, c1.stderr);
  t.match(c1.stdout, /^Formatting 'rbd:rbd\/ic1:conf=.*', fmt=raw size=16777216/);
  t.match(await rbdInfo('ic1'), { size: 16 * MiB, object_size: 65536, order: 16 }, 'rbd info: the size and object size');
  // id= and a librados setting as extra pairs, as QEMU reads them.
  const info = await img('info', '--output=json', `rbd:rbd/ic1:id=admin:conf=${ceph.conf}:rbd_cache=false`);
  t.equal(info.code, 0, info.stderr);
  t.match(JSON.parse(info.stdout), { 'virtual-size': 16 * MiB, 'cluster-size': 65536, format: 'raw' });
  const again = await img('create', '-f', 'raw', `rbd:rbd/ic1:conf=${ceph.conf}`, '1M');
  t.match(again.stderr, /RBD image 'rbd\/ic1' already exists/, 'an existing image is not overwritten');

  // convert a file into a new RBD image; rbd export and qemu-img read it back.
  const src = path.join(dir, 'src.raw');
  const data = patternBuffer(10 * MiB, 3);
  data.fill(0, 2 * MiB, 6 * MiB);
  fs.writeFileSync(src, data);
  const cv = await img('convert', '-f', 'raw', '-O', 'raw', src, 'rbd:rbd/ic2');
  t.equal(cv.code, 0, `convert into rbd: (conf from CEPH_CONF): ${cv.stderr}`);
  t.ok((await rbdExport(t, 'ic2')).equals(data), 'rbd export is the converted file');
  const cmp = await img('compare', '-f', 'raw', '-F', 'raw', src, `rbd:rbd/ic2:conf=${ceph.conf}`);
  t.equal(cmp.code, 0, cmp.stdout + cmp.stderr);
  t.match(cmp.stdout, /Images are identical/);
  // qcow2 on RBD and out of it again.
  const q = await img('convert', '-f', 'raw', '-O', 'qcow2', src, `rbd:rbd/ic3:conf=${ceph.conf}`);
  t.equal(q.code, 0, q.stderr);
  t.equal((await run('qemu-img', ['compare', '-F', 'raw', qemuRbd('ic3'), src], { env: ceph.env })).code, 0, 'qemu-img compares the qcow2 on RBD with the file');
  const chk = await img('check', `rbd:rbd/ic3:conf=${ceph.conf}`);
  t.equal(chk.code, 0, chk.stdout + chk.stderr);
  const out = path.join(dir, 'out.qcow2');
  t.equal((await img('convert', '-O', 'qcow2', `rbd:rbd/ic3:conf=${ceph.conf}`, out)).code, 0);
  t.equal((await run('qemu-img', ['compare', out, src])).code, 0, 'converted back out of RBD, the same data');
  const differ = path.join(dir, 'differ.raw');
  const changed = Buffer.from(data);
  changed[5 * MiB] = 1;
  fs.writeFileSync(differ, changed);
  const cmp2 = await img('compare', '-f', 'raw', '-F', 'raw', differ, `rbd:rbd/ic2:conf=${ceph.conf}`);
  t.equal(cmp2.code, 1, 'a difference is found');
  t.match(cmp2.stdout, /Content mismatch at offset 5242880!/);
  const bad = await img('info', 'rbd:rbd');
  t.match(bad.stderr, /Invalid rbd file name 'rbd:rbd': Pool name is required/);
});
