/**
 * Exporting dirty bitmaps, the QMP side, against qemu-storage-daemon 7.2:
 * the same block-export-add / bitmap / backup commands go to both daemons
 * and must get the same replies (error class and text included). Covers
 * lookup (by name down the backing chain, or {node, name}), the read-only
 * rule, busy and inconsistent bitmaps, the bitmap staying busy for exactly
 * the export's life however it ends, and backups and exports excluding
 * each other. The command line's keyval form is checked with nbdinfo.
 */
import t from 'tap';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { RawClient } from '../helpers/nbd-raw.js';
import { type Peer, startPeers, startQsd } from '../helpers/peers.js';
import type { QmpMessage } from '../helpers/qmp.js';
import { requireTools, run, runOk, tempDir } from '../helpers/tools.js';


/**
 * Both daemons with top.qcow2 over base.qcow2 (read-only backing), a
 * target image for backups, and bitmaps: b0 (enabled) and dis (disabled)
 * on top, bb on the backing node. With `inconsistent`, top.qcow2 also
 * carries a persistent bitmap left in use by a process that died.
 */
async function setUp(t: Tap.Test, options: { startServer?: boolean } = {}): Promise<[Peer, Peer]> {
  const peers = await startPeers(t, async (dir) => {
    await runOk(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'base.qcow2'), '8M']);
    await runOk(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.join(dir, 'base.qcow2'), '-F', 'qcow2', path.join(dir, 'top.qcow2')]);
    await runOk(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'target.qcow2'), '8M']);
    await runOk(t, 'qemu-img', ['bitmap', '--add', path.join(dir, 'top.qcow2'), 'stale']);
    // qemu-io kills itself with the image open read-write: 'stale' stays marked in use (inconsistent).
    await run('qemu-io', ['-c', 'write 0 64k', '-c', 'sigraise 9', path.join(dir, 'top.qcow2')]);
  });
  for (const p of peers) {
    await p.w.ok('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'top',
      file: { driver: 'file', filename: path.join(p.dir, 'top.qcow2') },
      backing: { driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: { driver: 'file', filename: path.join(p.dir, 'base.qcow2') } },
    });
    await p.w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'target', file: { driver: 'file', filename: path.join(p.dir, 'target.qcow2') } });
    await p.w.ok('block-dirty-bitmap-add', { node: 'top', name: 'b0' });
    await p.w.ok('block-dirty-bitmap-add', { node: 'top', name: 'dis', disabled: true });
    await p.w.ok('block-dirty-bitmap-add', { node: 'base', name: 'bb' });
    if (options.startServer !== false) await p.w.ok('nbd-server-start', { addr: { type: 'unix', data: { path: p.nbdSocket } } });
  }
  return peers;
}

/** Sends one command to both (qemu-storage-daemon first) and checks the replies are the same. */
function comparer(t: Tap.Test, qsd: Peer, vd: Peer) {
  return async (label: string, execute: string, args?: Record<string, unknown>): Promise<QmpMessage> => {
    const q = await qsd.w.cmd(execute, args);
    const v = await vd.w.cmd(execute, args);
    // vdisk may append its own advice to QEMU's text ("...: what to do"): QEMU's text must come first.
    if (q.error) t.same(v.error && { ...v.error, desc: v.error.desc.slice(0, q.error.desc.length) }, q.error, `${label}: ${q.error.desc}`);
    else t.same({ error: v.error, return: v.return }, { error: undefined, return: q.return }, `${label}: succeeds`);
    return v;
  };
}

/** node/name -> busy, from query-named-block-nodes. */
async function busyMap(p: Peer): Promise<Record<string, boolean>> {
  const nodes = (await p.w.ok('query-named-block-nodes')) as Array<{ 'node-name': string; 'dirty-bitmaps'?: Array<{ name?: string; busy: boolean }> }>;
  const out: Record<string, boolean> = {};
  for (const n of nodes) for (const b of n['dirty-bitmaps'] ?? []) if (b.name !== undefined) out[`${n['node-name']}/${b.name}`] = b.busy;
  return out;
}

t.test('block-export-add bitmaps: the same answers as qemu-storage-daemon', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img', 'qemu-io')) return;
  const [qsd, vd] = await setUp(t, { startServer: false });
  const same = comparer(t, qsd, vd);
  const exp = (extra: Record<string, unknown>) => ({ type: 'nbd', id: 'e0', 'node-name': 'top', ...extra });
  await same('no server', 'block-export-add', exp({ bitmaps: ['b0'] }));
  for (const p of [qsd, vd]) await p.w.ok('nbd-server-start', { addr: { type: 'unix', data: { path: p.nbdSocket } } });
  await same('unknown bitmap name', 'block-export-add', exp({ bitmaps: ['nope'] }));
  await same('unknown node', 'block-export-add', exp({ bitmaps: [{ node: 'nope', name: 'b0' }] }));
  await same('unknown bitmap on a node', 'block-export-add', exp({ bitmaps: [{ node: 'top', name: 'nope' }] }));
  await same('a name is not looked for above the node', 'block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'base', bitmaps: ['b0'] });
  await same('enabled bitmap, read-only export of a writable node', 'block-export-add', exp({ bitmaps: ['b0'] }));
  await same('the second of two fails', 'block-export-add', exp({ bitmaps: ['dis', 'b0'] }));
  const stale = await same('an inconsistent bitmap', 'block-export-add', exp({ writable: true, bitmaps: ['stale'] }));
  t.match(stale.error?.desc, /: .*take a full backup/, "vdisk's error also says what to do");
  await same('bad allocation-depth', 'block-export-add', exp({ 'allocation-depth': 'yes' }));
  t.same(await busyMap(vd), { 'top/b0': false, 'top/dis': false, 'top/stale': false, 'base/bb': false }, 'failed exports hold nothing');

  // These succeed; each export is removed again before the next.
  const cases: Array<[string, Record<string, unknown>]> = [
    ['{node, name} skips the read-only rule (as QEMU)', exp({ bitmaps: [{ node: 'top', name: 'b0' }] })],
    ['found down the backing chain, on a read-only node', exp({ bitmaps: ['bb'] })],
    ['a disabled bitmap on a read-only export', exp({ bitmaps: ['dis'] })],
    ['one bitmap listed twice', exp({ writable: true, bitmaps: ['b0', { node: 'top', name: 'b0' }], 'allocation-depth': true })],
  ];
  for (const [label, args] of cases) {
    await same(label, 'block-export-add', args);
    await same(`${label}: deleted`, 'block-export-del', { id: 'e0' });
    t.same(await busyMap(vd), await busyMap(qsd), `${label}: afterwards nothing is busy (as QEMU)`);
  }
  // A clash on the export name is found before any bitmap is touched.
  await same('export for the clash', 'block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'top', name: 'disk' });
  await same('export name taken', 'block-export-add', exp({ name: 'disk', writable: true, bitmaps: ['b0'] }));
  t.equal((await busyMap(vd))['top/b0'], false, 'b0 is not left busy by the refused export');
});

t.test('an exported bitmap is busy for exactly the life of its export', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img', 'qemu-io')) return;
  const [qsd, vd] = await setUp(t);
  const same = comparer(t, qsd, vd);
  await same('export b0 and dis', 'block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'top', name: 'disk', writable: true, bitmaps: ['b0', 'dis'] });
  t.same(await busyMap(vd), { 'top/b0': true, 'top/dis': true, 'top/stale': false, 'base/bb': false }, 'both exported bitmaps are busy');
  t.same(await busyMap(vd), await busyMap(qsd), 'as in QEMU');
  const busyError = { class: 'GenericError', desc: "Bitmap 'b0' is currently in use by another operation and cannot be used" };
  const v = await same('clear', 'block-dirty-bitmap-clear', { node: 'top', name: 'b0' });
  t.same(v.error, busyError, "QEMU's busy text");
  await same('remove', 'block-dirty-bitmap-remove', { node: 'top', name: 'dis' });
  await same('enable', 'block-dirty-bitmap-enable', { node: 'top', name: 'dis' });
  await same('disable', 'block-dirty-bitmap-disable', { node: 'top', name: 'b0' });
  await same('merge into it', 'block-dirty-bitmap-merge', { node: 'top', target: 'b0', bitmaps: ['dis'] });
  await same('clear in a transaction', 'transaction', { actions: [{ type: 'block-dirty-bitmap-clear', data: { node: 'top', name: 'b0' } }] });
  await same('remove in a transaction', 'transaction', { actions: [{ type: 'block-dirty-bitmap-remove', data: { node: 'top', name: 'dis' } }] });
  await same('incremental backup with it', 'blockdev-backup', { 'job-id': 'j0', device: 'top', target: 'target', sync: 'incremental', bitmap: 'b0' });
  await same('a second export of it', 'block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'top', name: 'other', writable: true, bitmaps: ['b0'] });
  await same('a bitmap to merge into', 'block-dirty-bitmap-add', { node: 'top', name: 'sum' });
  await same('merge from it', 'block-dirty-bitmap-merge', { node: 'top', target: 'sum', bitmaps: [{ node: 'top', name: 'dis' }] });
  await same('drop that bitmap', 'block-dirty-bitmap-remove', { node: 'top', name: 'sum' });

  // Safe delete with a client connected is refused, and the bitmaps stay busy.
  const clients = await Promise.all([qsd, vd].map(async (p) => {
    const c = await RawClient.connect(p.nbdSocket);
    await c.go('disk', true);
    return c;
  }));
  t.teardown(() => clients.forEach((c) => c.close()));
  await same('safe delete with a client', 'block-export-del', { id: 'e1' });
  t.same(await busyMap(vd), await busyMap(qsd), 'still busy, as in QEMU');
  t.equal((await busyMap(vd))['top/b0'], true);
  // Hard delete: the client is cut off, and once the export is gone the bitmaps are free.
  const marks = [qsd, vd].map((p) => p.w.messages.length);
  await same('hard delete', 'block-export-del', { id: 'e1', mode: 'hard' });
  for (const [i, p] of [qsd, vd].entries()) await p.w.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED', 20_000, marks[i]);
  t.same(await busyMap(vd), { 'top/b0': false, 'top/dis': false, 'top/stale': false, 'base/bb': false }, 'free after the export is gone');
  t.same(await busyMap(vd), await busyMap(qsd), 'as in QEMU');
  await same('clear works again', 'block-dirty-bitmap-clear', { node: 'top', name: 'b0' });

  // nbd-server-stop takes every export with it, and frees their bitmaps too.
  await same('export again', 'block-export-add', { type: 'nbd', id: 'e3', 'node-name': 'top', name: 'disk', writable: true, bitmaps: ['b0'] });
  t.equal((await busyMap(vd))['top/b0'], true);
  await same('nbd-server-stop', 'nbd-server-stop');
  t.same(await busyMap(vd), await busyMap(qsd), 'free after the server stopped, as in QEMU');
  t.equal((await busyMap(vd))['top/b0'], false);
  await same('remove works again', 'block-dirty-bitmap-remove', { node: 'top', name: 'b0' });
});

t.test('a backup and an export never share a bitmap', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img', 'qemu-io')) return;
  const [qsd, vd] = await setUp(t);
  const same = comparer(t, qsd, vd);
  const waitEvent = async (event: string, marks: number[]) => {
    for (const [i, p] of [qsd, vd].entries()) await p.w.waitFor((m) => m.event === event, 30_000, marks[i]);
  };
  // A slow backup holds b0 (speed 1 byte/s: it stays running until cancelled).
  await same('backup using b0', 'blockdev-backup', { 'job-id': 'j0', device: 'top', target: 'target', sync: 'full', bitmap: 'b0', 'bitmap-mode': 'on-success', speed: 1 });
  t.equal((await busyMap(vd))['top/b0'], true, 'b0 is busy while the backup runs');
  const v = await same('read-only export of b0 during the backup', 'block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'top', name: 'disk', bitmaps: ['b0'] });
  t.match(v.error?.desc, /currently in use by another operation/);
  let marks = [qsd, vd].map((p) => p.w.messages.length);
  await same('cancel the backup', 'block-job-cancel', { device: 'j0', force: true });
  await waitEvent('BLOCK_JOB_CANCELLED', marks);
  for (const p of [qsd, vd]) await p.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'null', 30_000);
  t.equal((await busyMap(vd))['top/b0'], false, 'free once the backup is over');

  // And the other way round: an exported bitmap cannot drive a backup.
  await same('export b0', 'block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'top', name: 'disk', writable: true, bitmaps: ['b0'] });
  const b = await same('backup with the exported b0', 'blockdev-backup', { 'job-id': 'j1', device: 'top', target: 'target', sync: 'incremental', bitmap: 'b0' });
  t.match(b.error?.desc, /currently in use by another operation/);
  await same('a backup without it runs', 'blockdev-backup', { 'job-id': 'j2', device: 'top', target: 'target', sync: 'full', speed: 1 });
  t.equal((await busyMap(vd))['top/b0'], true, 'and b0 stays held by the export');
  marks = [qsd, vd].map((p) => p.w.messages.length);
  await same('cancel it', 'block-job-cancel', { device: 'j2', force: true });
  await waitEvent('BLOCK_JOB_CANCELLED', marks);
  t.equal((await busyMap(vd))['top/b0'], true, "the backup's end does not free the export's bitmap");
  await same('delete the export', 'block-export-del', { id: 'e1' });
  t.equal((await busyMap(vd))['top/b0'], false);
  marks = [qsd, vd].map((p) => p.w.messages.length);
  await same('now the backup may use b0', 'blockdev-backup', { 'job-id': 'j3', device: 'top', target: 'target', sync: 'incremental', bitmap: 'b0' });
  await waitEvent('BLOCK_JOB_COMPLETED', marks);
});

t.test('the command line takes bitmaps and allocation-depth in keyval form, as qemu-storage-daemon', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img', 'qemu-io', 'nbdinfo')) return;
  const outputs: string[] = [];
  for (const name of ['qsd', 'vdisk']) {
    const dir = tempDir(t);
    const img = path.join(dir, 'disk.qcow2');
    await runOk(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']);
    await runOk(t, 'qemu-img', ['bitmap', '--add', '--granularity', '128k', img, 'pb']);
    await runOk(t, 'qemu-img', ['bitmap', '--add', img, 'pb2']);
    await runOk(t, 'qemu-img', ['bitmap', '--disable', img, 'pb2']);
    // Written with the bitmaps enabled: qemu-img bitmap leaves pb recording.
    await runOk(t, 'qemu-io', ['-c', 'write 1M 64k', img]);
    const sock = path.join(dir, 'nbd.sock');
    const args = [
      '--blockdev', `driver=qcow2,node-name=q0,file.driver=file,file.filename=${img}`,
      '--nbd-server', `addr.type=unix,addr.path=${sock}`,
      '--export', 'type=nbd,id=e0,node-name=q0,name=disk,writable=on,bitmaps.0=pb,bitmaps.1.node=q0,bitmaps.1.name=pb2,allocation-depth=on',
    ];
    if (name === 'qsd') await startQsd(t, dir, args);
    else await startDaemon(t, { dir, nbdServer: false, args: [...args, '--log-level', 'warn'] });
    const uri = `nbd+unix:///disk?socket=${sock}`;
    const info = await run('nbdinfo', ['--json', uri]);
    t.equal(info.code, 0, info.stderr);
    const map = await run('nbdinfo', ['--map=qemu:dirty-bitmap:pb', uri]);
    t.equal(map.code, 0, map.stderr);
    outputs.push(info.stdout.replaceAll(dir, 'DIR') + map.stdout);
  }
  t.equal(outputs[1], outputs[0], 'nbdinfo sees the same export from both');
  t.match(outputs[1], /"qemu:dirty-bitmap:pb2"/);
  t.match(outputs[1], /1048576\s+131072\s+1\s+dirty/, 'pb has the 128 KiB granule written before the daemon started');
});
