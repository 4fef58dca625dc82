/**
 * Dirty bitmaps against qemu-storage-daemon: the same bitmap commands and
 * the same guest writes (qemu-io over NBD) must give the same BlockDirtyInfo
 * and the same x-debug-block-dirty-bitmap-sha256 on both daemons, and the
 * same errors. Includes iotest 124's example count (458752).
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { waitForQsdSocket } from '../helpers/peers.js';
import { type QmpMessage, QmpWire } from '../helpers/qmp.js';
import { requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

interface Peer {
  name: string;
  w: QmpWire;
  dir: string;
  nbd: string;
}

async function peers(t: Parameters<typeof startDaemon>[0]): Promise<Peer[]> {
  const out: Peer[] = [];
  for (const name of ['qsd', 'vdisk']) {
    const dir = tempDir(t);
    const sock = path.join(dir, 'qmp.sock');
    const img = path.join(dir, 'disk.qcow2');
    t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '64M'])).code, 0);
    if (name === 'qsd') {
      const p = spawn('qemu-storage-daemon', ['--chardev', `socket,path=${sock},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'], { stdio: 'ignore' });
      t.teardown(() => p.kill('SIGKILL'));
      await waitForQsdSocket(p, sock);
    } else {
      await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
    }
    const w = await QmpWire.connect(sock);
    t.teardown(() => w.close());
    const nbd = path.join(dir, 'nbd.sock');
    await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'drive0', file: { driver: 'file', filename: img } });
    await w.ok('blockdev-add', { driver: 'null-co', 'node-name': 'small', size: MiB });
    await w.ok('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
    await w.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'drive0', writable: true });
    out.push({ name, w, dir, nbd });
  }
  return out;
}

t.before(() => {
  for (const tool of ['qemu-storage-daemon', 'qemu-img', 'qemu-io']) requireTool(t, tool);
});

t.test('bitmap commands and guest writes: the same state as QEMU', async (t) => {
  const ps = await peers(t);
  const both = async (execute: string, args?: unknown): Promise<QmpMessage[]> => Promise.all(ps.map((p) => p.w.cmd(execute, args)));
  const same = async (what: string, execute: string, args?: unknown) => {
    const [q, v] = await both(execute, args);
    if (q.error) t.same(v.error, q.error, `${what}: the same error`);
    else t.same(v.return, q.return, `${what}: the same result`);
  };
  const io = async (cmd: string) => {
    for (const p of ps) {
      const r = await run('qemu-io', ['-f', 'raw', '-c', cmd, `nbd+unix:///drive0?socket=${p.nbd}`]);
      t.equal(r.code, 0, `${p.name}: qemu-io ${cmd}: ${r.stderr}`);
    }
  };
  const bitmaps = async () => {
    const r = await both('query-named-block-nodes');
    return r.map((m) => (m.return as Array<Record<string, unknown>>).find((n) => n['node-name'] === 'drive0')!['dirty-bitmaps']);
  };
  const sameBitmaps = async (what: string) => {
    const [q, v] = await bitmaps();
    // vdisk's own members (x-state, x-reason, x-crash-safe) are additions: QEMU's members must match.
    const qemuMembers = (list: unknown) => (list as Array<Record<string, unknown>>).map((b) => Object.fromEntries(Object.entries(b).filter(([k]) => !k.startsWith('x-'))));
    t.same(qemuMembers(v), q, `${what}: the same dirty-bitmaps`);
    return v as Array<Record<string, unknown>>;
  };

  await same('add bitmap0', 'block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0' });
  await same('add a disabled 512 B one', 'block-dirty-bitmap-add', { node: 'drive0', name: 'fine', granularity: 512, disabled: true });
  await same('add 1 MiB', 'block-dirty-bitmap-add', { node: 'drive0', name: 'coarse', granularity: MiB });
  await sameBitmaps('three clean bitmaps');
  // iotest 124's writes: (0, 512), (16M, 256k), (32736k, 64k).
  await io('write -P 0x6a 0 512');
  await io('write -P 0x6b 16M 256k');
  await io('write -P 0x6c 32736k 64k');
  const after = await sameBitmaps('after the writes');
  t.equal(after.find((b) => b.name === 'bitmap0')?.count, 458752, "iotest 124's count");
  await same('sha256 of bitmap0', 'x-debug-block-dirty-bitmap-sha256', { node: 'drive0', name: 'bitmap0' });
  await same('sha256 of the 1 MiB one', 'x-debug-block-dirty-bitmap-sha256', { node: 'drive0', name: 'coarse' });
  await same('sha256 of the disabled one', 'x-debug-block-dirty-bitmap-sha256', { node: 'drive0', name: 'fine' });

  await same('enable fine', 'block-dirty-bitmap-enable', { node: 'drive0', name: 'fine' });
  await io('write -z 40M 1k');
  await io('discard 48M 64k');
  await sameBitmaps('write-zeroes and discard mark too');
  await same('sha256 of fine', 'x-debug-block-dirty-bitmap-sha256', { node: 'drive0', name: 'fine' });
  await same('disable bitmap0', 'block-dirty-bitmap-disable', { node: 'drive0', name: 'bitmap0' });
  await io('write 60M 4k');
  await sameBitmaps('a disabled bitmap does not record');

  await same('merge into a new one', 'block-dirty-bitmap-add', { node: 'drive0', name: 'sum', disabled: true });
  await same('merge', 'block-dirty-bitmap-merge', { node: 'drive0', target: 'sum', bitmaps: ['bitmap0', { node: 'drive0', name: 'fine' }] });
  await same('sha256 of the merge (granularities differ)', 'x-debug-block-dirty-bitmap-sha256', { node: 'drive0', name: 'sum' });
  await same('merge of different sizes', 'block-dirty-bitmap-merge', { node: 'drive0', target: 'sum', bitmaps: [{ node: 'small', name: 'nope' }] });
  await same('bitmap on the small node', 'block-dirty-bitmap-add', { node: 'small', name: 's' });
  await same('merge of different sizes', 'block-dirty-bitmap-merge', { node: 'drive0', target: 'sum', bitmaps: [{ node: 'small', name: 's' }] });
  await same('sha256 unchanged after a failed merge', 'x-debug-block-dirty-bitmap-sha256', { node: 'drive0', name: 'sum' });

  await same('clear', 'block-dirty-bitmap-clear', { node: 'drive0', name: 'bitmap0' });
  await same('remove', 'block-dirty-bitmap-remove', { node: 'drive0', name: 'coarse' });
  await sameBitmaps('after clear and remove');

  for (const [what, cmd, args] of [
    ['unknown node', 'block-dirty-bitmap-add', { node: 'nope', name: 'x' }],
    ['empty name', 'block-dirty-bitmap-add', { node: 'drive0', name: '' }],
    ['long name', 'block-dirty-bitmap-add', { node: 'drive0', name: 'x'.repeat(1024) }],
    ['bad granularity', 'block-dirty-bitmap-add', { node: 'drive0', name: 'g', granularity: 1000 }],
    ['small granularity', 'block-dirty-bitmap-add', { node: 'drive0', name: 'g', granularity: 256 }],
    ['duplicate', 'block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0' }],
    ['persistent on null-co', 'block-dirty-bitmap-add', { node: 'small', name: 'p', persistent: true }],
    ['unknown bitmap', 'block-dirty-bitmap-remove', { node: 'drive0', name: 'nope' }],
    ['unknown bitmap', 'block-dirty-bitmap-clear', { node: 'drive0', name: 'nope' }],
    ['unknown bitmap', 'x-debug-block-dirty-bitmap-sha256', { node: 'drive0', name: 'nope' }],
    ['unknown merge source', 'block-dirty-bitmap-merge', { node: 'drive0', target: 'sum', bitmaps: ['nope'] }],
    ['negative granularity', 'block-dirty-bitmap-add', { node: 'drive0', name: 'g', granularity: -1 }],
  ] as Array<[string, string, unknown]>) {
    await same(what, cmd, args);
  }
});

t.test('a bitmap follows the node size (block_resize)', async (t) => {
  const dir = tempDir(t);
  const sock = path.join(dir, 'qmp.sock');
  await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(sock);
  t.teardown(() => w.close());
  const img = path.join(dir, 'r.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '1M'])).code, 0);
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'r', file: { driver: 'file', filename: img } });
  await w.ok('block-dirty-bitmap-add', { node: 'r', name: 'b', granularity: 65536 });
  await w.ok('human-monitor-command', { 'command-line': 'qemu-io r "write 960k 64k"' });
  await w.ok('block_resize', { 'node-name': 'r', size: 2 * MiB });
  const sha = (await w.ok('x-debug-block-dirty-bitmap-sha256', { node: 'r', name: 'b' })) as { sha256: string };
  t.match(sha.sha256, /^[0-9a-f]{64}$/);
  const nodes = (await w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
  const b = (nodes.find((n) => n['node-name'] === 'r')!['dirty-bitmaps'] as Array<Record<string, unknown>>)[0];
  t.equal(b.name, 'b');
  t.equal(b.count, 65536, 'the written cluster stays dirty and the grown part is clean');
});
