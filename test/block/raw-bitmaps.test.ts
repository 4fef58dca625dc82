/**
 * Persistent bitmaps for raw images, in a sidecar file beside the image
 * (IMAGE.vdisk-bitmaps), driven as a user drives them: QMP to vdisk serve,
 * writes from qemu-io over NBD. They survive a clean stop and (crash-safe,
 * the default) kill -9; a sidecar whose image was changed by someone else,
 * copied, or resized outside vdisk loads inconsistent with the reason; a
 * bitmap in QEMU's mode is inconsistent after a crash; an incremental backup
 * from a raw source clears it and the cleared state is what is stored.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { VDISK, requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io']) requireTool(t, tool);
});

async function serve(t: Test, dir: string, img: string, rawOptions = '') {
  const qmp = path.join(dir, `qmp-${Date.now()}.sock`);
  const d = await startDaemon(t, {
    dir,
    args: [
      '--blockdev', `driver=raw,node-name=d${rawOptions},file.driver=file,file.filename=${img}`,
      '--export', 'type=nbd,id=e,node-name=d,name=d,writable=on',
      '--qmp', `unix:${qmp}`,
    ],
  });
  const w = await QmpWire.connect(qmp);
  t.teardown(() => w.close());
  const list = async () => {
    const nodes = (await w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
    return Object.fromEntries(((nodes.find((n) => n['node-name'] === 'd')?.['dirty-bitmaps'] ?? []) as Array<Record<string, unknown>>).map((b) => [b.name, b]));
  };
  const sha = async (name: string) => ((await w.ok('x-debug-block-dirty-bitmap-sha256', { node: 'd', name })) as { sha256: string }).sha256;
  const io = async (...cmds: string[]) => {
    const r = await run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), d.uri('d')]);
    if (r.code !== 0) throw new Error(r.stderr);
  };
  const kill = async () => {
    d.proc.kill('SIGKILL');
    await new Promise((r) => d.proc.on('exit', r));
  };
  return { d, w, list, sha, io, kill };
}

t.test('a raw image keeps its bitmaps across a clean stop and across kill -9', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 64 * MiB);
  let s = await serve(t, dir, img);
  await s.w.ok('block-dirty-bitmap-add', { node: 'd', name: 'b', persistent: true });
  await s.w.ok('block-dirty-bitmap-add', { node: 'd', name: 'q', persistent: true, 'x-crash-safe': false });
  t.ok(fs.existsSync(`${img}.vdisk-bitmaps`), 'the sidecar exists as soon as a persistent bitmap does');
  await s.io('write -P 1 0 512', 'write -P 2 16M 256k');
  const after1 = await s.sha('b');
  t.equal(await s.d.stop(), 0);
  const info = JSON.parse((await run(process.execPath, [VDISK, 'img', 'info', '--output=json', img])).stdout);
  t.match(info['x-bitmaps'], [
    { name: 'q', granularity: 65536, flags: ['auto'], 'x-state': 'active' },
    { name: 'b', granularity: 65536, flags: ['auto'], 'x-state': 'active' },
  ], 'vdisk img info lists the sidecar bitmaps');
  const human = (await run(process.execPath, [VDISK, 'img', 'info', img])).stdout;
  t.match(human, /Persistent bitmaps \(vdisk sidecar .*disk\.raw\.vdisk-bitmaps\):\n    \[0\]:\n        flags:\n            \[0\]: auto\n        name: q/, 'and in its human output');
  s = await serve(t, dir, img);
  let l = await s.list();
  t.match(l.b, { persistent: true, count: 65536 + 262144, 'x-state': 'active', 'x-crash-safe': true }, 'after a clean stop: loaded');
  t.notMatch(l.b['x-reason'], /recovered/);
  t.match(l.q, { persistent: true, 'x-crash-safe': false, inconsistent: undefined }, 'the QEMU-mode bitmap too (it was stored at the clean close)');
  t.equal(await s.sha('b'), after1, 'with the same bits');

  await s.io('write -P 3 40M 64k', 'flush');
  const after2 = await s.sha('b');
  await s.kill();
  s = await serve(t, dir, img);
  l = await s.list();
  t.match(l.b, { 'x-state': 'active', 'x-reason': /recovered after an unclean stop/ }, 'after kill -9: crash-safe, usable, says it was recovered');
  t.equal(l.b.inconsistent, undefined);
  t.equal(await s.sha('b'), after2, 'every write of the last session is in it');
  t.match(l.q, { inconsistent: true, 'x-state': 'inconsistent', 'x-reason': /not crash-safe.*full backup/ }, 'the QEMU-mode bitmap is inconsistent after the crash');
  t.match((await s.w.cmd('block-dirty-bitmap-clear', { node: 'd', name: 'q' })).error?.desc, /is inconsistent and cannot be used/);
  const crashed = JSON.parse((await run(process.execPath, [VDISK, 'img', 'info', '-U', '--output=json', img])).stdout);
  t.match(crashed['x-bitmaps'].find((b: { name: string }) => b.name === 'q'), { flags: ['in-use', 'auto'], 'x-state': 'inconsistent', 'x-reason': /full backup/ }, 'img info says so too');
  await s.w.ok('block-dirty-bitmap-remove', { node: 'd', name: 'q' });
  t.equal(await s.d.stop(), 0);
});

t.test("a sidecar is not trusted for an image changed, copied or resized without vdisk", async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 32 * MiB);
  let s = await serve(t, dir, img);
  await s.w.ok('block-dirty-bitmap-add', { node: 'd', name: 'b', persistent: true });
  await s.io('write -P 1 1M 4k');
  t.equal(await s.d.stop(), 0);

  // Copied: another inode.
  const copy = path.join(dir, 'copy.raw');
  fs.copyFileSync(img, copy);
  fs.copyFileSync(`${img}.vdisk-bitmaps`, `${copy}.vdisk-bitmaps`);
  s = await serve(t, dir, copy);
  t.match((await s.list()).b, { inconsistent: true, 'x-reason': /belongs to another file/ }, 'a copied image and sidecar: inconsistent');
  t.match(s.d.stderr(), /bitmap-inconsistent/, 'logged at open');
  t.equal(await s.d.stop(), 0);

  // Written by another tool while vdisk was stopped.
  t.equal((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 9 8M 4k', img])).code, 0);
  s = await serve(t, dir, img);
  t.match((await s.list()).b, { inconsistent: true, 'x-reason': /modified while vdisk was not serving it/ }, 'changed by qemu-io: inconsistent');
  await s.w.ok('block-dirty-bitmap-remove', { node: 'd', name: 'b' });
  await s.w.ok('block-dirty-bitmap-add', { node: 'd', name: 'b', persistent: true });
  t.equal(await s.d.stop(), 0);
  t.equal((await run('qemu-img', ['resize', '-f', 'raw', img, '48M'])).code, 0);
  s = await serve(t, dir, img);
  t.match((await s.list()).b, { inconsistent: true, 'x-reason': /resized outside vdisk/ }, 'resized by qemu-img: inconsistent');
  t.equal(await s.d.stop(), 0);
});

t.test('an incremental backup of a raw source clears the bitmap, and the sidecar keeps that', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 32 * MiB);
  let s = await serve(t, dir, img);
  await s.w.ok('block-dirty-bitmap-add', { node: 'd', name: 'b', persistent: true });
  await s.io('write -P 5 2M 128k');
  const target = path.join(dir, 'inc.qcow2');
  const from = s.w.messages.length;
  await s.w.ok('drive-backup', { 'job-id': 'j', device: 'd', sync: 'incremental', bitmap: 'b', format: 'qcow2', target });
  const ev = await s.w.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED', 20_000, from);
  t.match(ev.data, { len: 131072, offset: 131072 }, 'the incremental copied the dirty part');
  t.match((await s.list()).b, { count: 0 }, 'cleared');
  await s.io('write -P 6 20M 4k');
  await s.kill();
  s = await serve(t, dir, img);
  t.match((await s.list()).b, { count: 65536 }, 'after kill -9: only the write since the backup (the clear reached the sidecar)');
  const r = await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 5 2M 128k', target]);
  t.notMatch(r.stdout, /verification failed/, 'the backup holds the data');
  t.equal(await s.d.stop(), 0);
});
