/**
 * Persistent dirty bitmaps in qcow2, with QEMU as the referee both ways:
 * bitmaps vdisk stores at close are loaded by qemu-storage-daemon with the
 * same content (x-debug-block-dirty-bitmap-sha256) and flags, and pass
 * qemu-img check; bitmaps QEMU stored are loaded by vdisk the same way; a
 * writer that dies leaves them in use, which the next open reports as
 * inconsistent.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { waitForQsdSocket } from '../helpers/peers.js';
import { QmpWire } from '../helpers/qmp.js';
import { VDISK, requireTool, run, tempDir } from '../helpers/tools.js';

t.before(() => {
  for (const tool of ['qemu-storage-daemon', 'qemu-img']) requireTool(t, tool);
});

async function qsd(t: Parameters<typeof startDaemon>[0], dir: string): Promise<{ w: QmpWire; stop: () => Promise<void> }> {
  const sock = path.join(dir, `qsd-${Date.now()}.sock`);
  const p = spawn('qemu-storage-daemon', ['--chardev', `socket,path=${sock},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'], { stdio: 'ignore' });
  const exited = new Promise((r) => p.on('exit', r));
  t.teardown(() => p.kill('SIGKILL'));
  await waitForQsdSocket(p, sock);
  const w = await QmpWire.connect(sock);
  return {
    w,
    stop: async () => {
      await w.cmd('quit');
      await exited;
    },
  };
}

async function vdisk(t: Parameters<typeof startDaemon>[0], dir: string) {
  const sock = path.join(dir, `vdisk-${Date.now()}.sock`);
  const d = await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(sock);
  return { d, w };
}

const sha = async (w: QmpWire, name: string) => ((await w.ok('x-debug-block-dirty-bitmap-sha256', { node: 'd', name })) as { sha256: string }).sha256;
const bitmaps = async (w: QmpWire) => {
  const nodes = (await w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
  return (nodes.find((n) => n['node-name'] === 'd')?.['dirty-bitmaps'] ?? []) as Array<Record<string, unknown>>;
};
const byName = (list: Array<Record<string, unknown>>) => Object.fromEntries(list.map((b) => [b.name, { count: b.count, granularity: b.granularity, recording: b.recording, persistent: b.persistent, inconsistent: b.inconsistent ?? false }]));

t.test('vdisk stores, QEMU loads the same bitmaps', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'p.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '64M'])).code, 0);
  const { w, d } = await vdisk(t, dir);
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: img } });
  await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'p', persistent: true });
  await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'q', persistent: true, granularity: 4096 });
  await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'gone', persistent: false });
  for (const cmd of ['write -P 1 0 512', 'write -P 2 16M 256k', 'write -P 3 32736k 64k', 'write -z 40M 1M']) {
    await w.ok('human-monitor-command', { 'command-line': `qemu-io d "${cmd}"` });
  }
  await w.ok('block-dirty-bitmap-disable', { node: 'd', name: 'q' });
  await w.ok('human-monitor-command', { 'command-line': 'qemu-io d "write -P 4 50M 64k"' });
  const ours = { p: await sha(w, 'p'), q: await sha(w, 'q') };
  const oursInfo = byName(await bitmaps(w));
  t.same(Object.keys(oursInfo).sort(), ['gone', 'p', 'q']);
  await w.ok('blockdev-del', { 'node-name': 'd' });
  t.equal((await run('qemu-img', ['check', img])).code, 0, 'qemu-img check is clean after the bitmaps were stored');
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout);
  t.same(
    (info['format-specific'].data.bitmaps as Array<Record<string, unknown>>).map((b) => [b.name, b.granularity, b.flags]).sort(),
    [['p', 65536, ['auto']], ['q', 4096, []]],
    'qemu-img info lists the stored bitmaps: enabled ones with the auto flag',
  );
  w.close();
  await d.stop();

  const q = await qsd(t, dir);
  await q.w.ok('qmp_capabilities').catch(() => undefined);
  await q.w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: img } });
  t.same({ p: await sha(q.w, 'p'), q: await sha(q.w, 'q') }, ours, 'QEMU loads the same bits');
  const theirs = byName(await bitmaps(q.w));
  t.same(theirs, { p: oursInfo.p, q: oursInfo.q }, 'and the same counts, granularities and recording state');
  await q.stop();
  t.equal((await run('qemu-img', ['check', img])).code, 0);
});

t.test("QEMU stores, vdisk loads; in QEMU's mode a writer that dies leaves them inconsistent", async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'q.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '64M'])).code, 0);
  const q = await qsd(t, dir);
  await q.w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: img } });
  await q.w.ok('block-dirty-bitmap-add', { node: 'd', name: 'b', persistent: true, granularity: 32768 });
  await q.w.ok('nbd-server-start', { addr: { type: 'unix', data: { path: path.join(dir, 'n.sock') } } });
  await q.w.ok('block-export-add', { type: 'nbd', id: 'd', 'node-name': 'd', writable: true });
  t.equal((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 5 1M 100k', '-c', 'write -P 6 33M 1k', `nbd+unix:///d?socket=${path.join(dir, 'n.sock')}`])).code, 0);
  const theirs = await sha(q.w, 'b');
  const theirInfo = byName(await bitmaps(q.w));
  await q.stop();

  const { w, d } = await vdisk(t, dir);
  // x-crash-safe-bitmaps=off: QEMU's mode, in use on disk while open (the default is crash-safe, below).
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'd', 'x-crash-safe-bitmaps': false, file: { driver: 'file', filename: img } });
  t.equal(await sha(w, 'b'), theirs, "vdisk loads QEMU's bits");
  t.same(byName(await bitmaps(w)), theirInfo, 'with the same count, granularity and state');
  await w.ok('human-monitor-command', { 'command-line': 'qemu-io d "write -P 7 60M 4k"' });
  const after = await sha(w, 'b');
  // A crash while the image is open writable: the bitmap is left "in use" on disk.
  d.proc.kill('SIGKILL');
  await new Promise((r) => d.proc.on('exit', r));
  const crashed = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', img])).stdout);
  t.same(crashed['format-specific'].data.bitmaps.map((b: Record<string, unknown>) => b.flags), [['in-use', 'auto']], 'on disk: in use');
  const again = await vdisk(t, dir);
  await again.w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: img } });
  t.match((await bitmaps(again.w))[0], { name: 'b', inconsistent: true, 'x-state': 'inconsistent', 'x-reason': /not closed cleanly.*take a full backup/ }, 'reopened: inconsistent, as QEMU reports it, and why');
  t.ok(again.d.stderr().split('\n').some((l) => l.includes('bitmap-inconsistent') && l.includes('full backup')), 'the inconsistent bitmap is logged at open, with what to do');
  t.match((await again.w.cmd('block-dirty-bitmap-clear', { node: 'd', name: 'b' })).error?.desc, /is inconsistent and cannot be used/);
  await again.w.ok('block-dirty-bitmap-remove', { node: 'd', name: 'b' });
  await again.w.ok('blockdev-del', { 'node-name': 'd' });
  const c = await run('qemu-img', ['check', img]);
  t.equal(c.code, 0, `after removing it, qemu-img check is clean: ${c.stdout}`);
  t.equal(JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout)['format-specific'].data.bitmaps, undefined, 'and no bitmap is left');
  void after;
});

t.test('the same image opened by both daemons: bitmap order, format-specific bitmaps, persistence errors', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'o.qcow2');
  const v2 = path.join(dir, 'v2.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '64M'])).code, 0);
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', '-o', 'compat=0.10', v2, '64M'])).code, 0);
  for (const args of [['--add', img, 'a'], ['--add', '--disable', '-g', '4k', img, 'b'], ['--add', img, 'c']]) {
    t.equal((await run('qemu-img', ['bitmap', ...args])).code, 0);
  }
  const peers = [
    { name: 'qsd', open: async () => (await qsd(t, dir)).w, copy: path.join(dir, 'q.qcow2'), old: path.join(dir, 'q2.qcow2') },
    { name: 'vdisk', open: async () => (await vdisk(t, dir)).w, copy: path.join(dir, 'v.qcow2'), old: path.join(dir, 'v2c.qcow2') },
  ];
  const seen: Record<string, unknown[]> = {};
  for (const p of peers) {
    const out: unknown[] = [];
    fs.copyFileSync(img, p.copy);
    fs.copyFileSync(v2, p.old);
    const w = await p.open();
    // vdisk in QEMU's mode, so "in use while open" compares like with like.
    const mode = p.name === 'vdisk' ? { 'x-crash-safe-bitmaps': false } : {};
    await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'd', ...mode, file: { driver: 'file', filename: p.copy } });
    await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'old', ...mode, file: { driver: 'file', filename: p.old } });
    const node = async () => ((await w.ok('query-named-block-nodes')) as Array<Record<string, any>>).find((n) => n['node-name'] === 'd')!;
    const n = await node();
    const qemuMembers = (list: Array<Record<string, unknown>>) => list.map((b) => Object.fromEntries(Object.entries(b).filter(([k]) => !k.startsWith('x-'))));
    // vdisk's x-state/x-reason are additions to each bitmap; QEMU's members must match.
    const specific = (fs: { type: string; data: Record<string, unknown> }) =>
      fs.data.bitmaps ? { ...fs, data: { ...fs.data, bitmaps: qemuMembers(fs.data.bitmaps as Array<Record<string, unknown>>) } } : fs;
    out.push(qemuMembers(n['dirty-bitmaps']), specific(n.image['format-specific']));
    out.push((await w.cmd('block-dirty-bitmap-add', { node: 'old', name: 'p', persistent: true })).error);
    out.push((await w.cmd('block-dirty-bitmap-add', { node: 'd', name: 'g', persistent: true, granularity: 1 << 30 })).error);
    out.push((await w.cmd('block-dirty-bitmap-add', { node: 'd', name: 'x'.repeat(1024), persistent: true })).error);
    out.push((await w.cmd('block-dirty-bitmap-add', { node: 'd', name: 'a', persistent: true, granularity: 1000 })).error);
    await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'n', persistent: true });
    await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'm', persistent: true });
    await w.ok('block-dirty-bitmap-remove', { node: 'd', name: 'b' });
    out.push(specific((await node()).image['format-specific']));
    await w.ok('blockdev-del', { 'node-name': 'd' });
    w.close();
    out.push(JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', p.copy])).stdout)['format-specific'].data.bitmaps);
    seen[p.name] = out;
  }
  const what = ['loaded bitmaps, newest first', 'format-specific while open (in use)', 'persistent on qcow2 v2', 'granularity 1 GiB on 64 MiB', 'a name too long for qcow2', 'a bad granularity before an existing name', 'a removed bitmap leaves the image at once', 'the directory order after close'];
  what.forEach((w, i) => t.same(seen.vdisk[i], seen.qsd[i], `${w}: as QEMU`));
  // What QEMU said, so the comparison above is known to cover something.
  t.match(seen.qsd[2], { desc: /Cannot store dirty bitmaps in qcow2 v2 files/ });
  t.match(seen.qsd[4], { desc: /Name length exceeds maximum/ });
  t.match(seen.qsd[5], { desc: /Granularity must be power of 2/ });
  t.same((seen.qsd[7] as Array<{ name: string }>).map((b) => b.name), ['a', 'c', 'm', 'n', 'g'], 'QEMU keeps stored bitmaps in place and adds new ones newest first');
});

t.test('crash-safe (the default): after kill -9 the bitmaps are usable supersets, not inconsistent', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'c.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '64M'])).code, 0);
  const { w, d } = await vdisk(t, dir);
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: img } });
  await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'cs', persistent: true });
  await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'fine', persistent: true, granularity: 4096 });
  await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'qemu-mode', persistent: true, 'x-crash-safe': false });
  t.match(Object.fromEntries((await bitmaps(w)).map((b) => [b.name, b['x-crash-safe']])), { cs: true, fine: true, 'qemu-mode': false }, 'x-crash-safe per bitmap');
  const open = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', img])).stdout);
  t.same(
    Object.fromEntries(open['format-specific'].data.bitmaps.map((b: Record<string, unknown>) => [b.name, b.flags])),
    { cs: ['auto'], fine: ['auto'] },
    'while open: crash-safe bitmaps are stored at once, consistent; a new QEMU-mode one waits for the close, as in QEMU',
  );
  for (const cmd of ['write -P 1 0 512', 'write -P 2 16M 256k', 'write -z 40M 1M', 'discard 50M 64k']) {
    await w.ok('human-monitor-command', { 'command-line': `qemu-io d "${cmd}"` });
  }
  const before = { cs: await sha(w, 'cs'), fine: await sha(w, 'fine') };
  d.proc.kill('SIGKILL');
  await new Promise((r) => d.proc.on('exit', r));
  const crashed = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', img])).stdout);
  t.same(
    Object.fromEntries(crashed['format-specific'].data.bitmaps.map((b: Record<string, unknown>) => [b.name, b.flags])),
    { cs: ['auto'], fine: ['auto'] },
    'after kill -9: the crash-safe bitmaps are there and not in use (the QEMU-mode one never reached the disk)',
  );
  const ours = JSON.parse((await run(process.execPath, [VDISK, 'img', 'info', '-U', '--output=json', img])).stdout);
  t.match(Object.fromEntries(ours['format-specific'].data.bitmaps.map((b: Record<string, unknown>) => [b.name, b])), {
    cs: { flags: ['auto'], 'x-state': 'active', 'x-reason': /recovered after an unclean stop/ },
    fine: { 'x-state': 'active' },
  }, 'vdisk img info: the same list, and says they were recovered');
  const plain = (list: Array<Record<string, unknown>>) => list.map((b) => Object.fromEntries(Object.entries(b).filter(([k]) => !k.startsWith('x-'))));
  t.same(plain(ours['format-specific'].data.bitmaps), crashed['format-specific'].data.bitmaps, "QEMU's members as qemu-img prints them");
  // QEMU itself trusts them: qemu-storage-daemon loads the same bits.
  const q = await qsd(t, dir);
  await q.w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'd', 'read-only': true, file: { driver: 'file', filename: img, 'read-only': true } });
  t.same({ cs: await sha(q.w, 'cs'), fine: await sha(q.w, 'fine') }, before, 'QEMU reads exactly the bits the writes made');
  await q.stop();
  const again = await vdisk(t, dir);
  await again.w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'd', file: { driver: 'file', filename: img } });
  const list = Object.fromEntries((await bitmaps(again.w)).map((b) => [b.name, b]));
  t.match(list.cs, { inconsistent: undefined, 'x-state': 'active', 'x-reason': /recovered after an unclean stop/ }, 'reopened by vdisk: usable, and says it was recovered');
  t.equal(list['qemu-mode'], undefined, 'the QEMU-mode bitmap is lost with the crash, as with QEMU');
  t.equal(await sha(again.w, 'cs'), before.cs);
  t.equal(await sha(again.w, 'fine'), before.fine);
  await again.w.ok('blockdev-del', { 'node-name': 'd' });
  const c = await run('qemu-img', ['check', img]);
  t.equal(c.code, 0, `qemu-img check is clean after the restart and a clean close: ${c.stdout}`);
});
