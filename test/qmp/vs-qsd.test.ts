/**
 * The wire checked against QEMU itself: one command sequence is sent to
 * qemu-storage-daemon 7.2 and to vdisk, and the replies must have the same
 * shapes (member names and JSON types, recursively), the same error classes
 * and texts, and the same event sequences. Values may differ where they
 * describe the implementation (version, timestamps, auto-generated names,
 * sizes on disk, the dirty flag vdisk sets while an image is open).
 */
import t from 'tap';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { waitForQsdSocket } from '../helpers/peers.js';
import { type QmpMessage, QmpWire } from '../helpers/qmp.js';
import { patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

/** A value's shape: its JSON type, with members (objects) and element shapes (arrays) recursively. */
function shape(v: unknown): unknown {
  if (v === null) return 'null';
  if (Array.isArray(v)) {
    const shapes = [...new Set(v.map((x) => JSON.stringify(shape(x))))].sort();
    return ['array', ...shapes.map((s) => JSON.parse(s) as unknown)];
  }
  if (typeof v === 'object') {
    const out: Record<string, unknown> = {};
    for (const k of Object.keys(v as object).sort()) out[k] = shape((v as Record<string, unknown>)[k]);
    return out;
  }
  return typeof v;
}

interface Peer {
  name: string;
  w: QmpWire;
  dir: string;
}

async function startQsd(t: Parameters<typeof startDaemon>[0], dir: string): Promise<QmpWire> {
  const sock = path.join(dir, 'qmp.sock');
  const proc: ChildProcess = spawn('qemu-storage-daemon', ['--chardev', `socket,path=${sock},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'], { stdio: 'ignore' });
  t.teardown(() => {
    proc.kill('SIGKILL');
  });
  await waitForQsdSocket(proc, sock);
  return QmpWire.connect(sock);
}

t.test('the same sequence to qemu-storage-daemon and to vdisk', async (t) => {
  if (!requireTool(t, 'qemu-storage-daemon') || !requireTool(t, 'qemu-img')) return;
  const peers: Peer[] = [];
  for (const name of ['qsd', 'vdisk']) {
    const dir = tempDir(t);
    fs.writeFileSync(path.join(dir, 'base.raw'), patternBuffer(4 * MiB, 1));
    t.equal((await run('qemu-img', ['create', '-f', 'qcow2', '-b', path.join(dir, 'base.raw'), '-F', 'raw', path.join(dir, 'top.qcow2')])).code, 0);
    fs.writeFileSync(path.join(dir, 'plain.raw'), Buffer.alloc(MiB));
    let w: QmpWire;
    if (name === 'qsd') w = await startQsd(t, dir);
    else {
      const sock = path.join(dir, 'qmp.sock');
      await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
      w = await QmpWire.connect(sock);
    }
    t.teardown(() => w.close());
    peers.push({ name, w, dir });
  }
  const [qsd, vd] = peers;
  t.same(shape(vd.w.messages[0]), shape(qsd.w.messages[0]), 'greeting');

  /** Runs one command on both (paths rewritten per peer) and returns both replies. */
  const both = async (execute: string, args?: (p: Peer) => unknown): Promise<[QmpMessage, QmpMessage]> => {
    const r = await Promise.all(peers.map((p) => p.w.cmd(execute, args?.(p))));
    return [r[0], r[1]];
  };
  const same = async (what: string, execute: string, args?: (p: Peer) => unknown) => {
    const [q, v] = await both(execute, args);
    if (q.error) t.same(v.error, q.error, `${what}: the same error`);
    else t.same(shape(v.return), shape(q.return), `${what}: the same shape`);
    return [q, v] as const;
  };

  await same('query-version', 'query-version');
  const [qc, vc] = await both('query-commands');
  const qsdNames = new Set((qc.return as Array<{ name: string }>).map((c) => c.name));
  const extra = (vc.return as Array<{ name: string }>).map((c) => c.name).filter((n) => !qsdNames.has(n) && !n.startsWith('x-blkdebug-') && n !== 'x-query-nbd-server' && n !== 'x-backup-s3');
  t.same(extra, ['human-monitor-command'], "every vdisk command is a QEMU command (human-monitor-command is system QEMU's; x-blkdebug-*, x-query-nbd-server and x-backup-s3 are vdisk's own)");

  await same('blockdev-add qcow2 with its backing file', 'blockdev-add', (p) => ({ driver: 'qcow2', 'node-name': 'q0', file: { driver: 'file', filename: path.join(p.dir, 'top.qcow2') } }));
  await same('blockdev-add raw over file', 'blockdev-add', (p) => ({ driver: 'raw', 'node-name': 'r0', file: { driver: 'file', 'node-name': 'f0', filename: path.join(p.dir, 'plain.raw') } }));
  await same('blockdev-add null-co', 'blockdev-add', () => ({ driver: 'null-co', 'node-name': 'n0', size: MiB, 'read-only': true }));
  const [qn, vn] = await both('query-named-block-nodes');
  const byName = (r: QmpMessage) => new Map((r.return as Array<Record<string, unknown>>).map((n) => [n['node-name'] as string, n]));
  const qNodes = byName(qn);
  const vNodes = byName(vn);
  t.equal(vNodes.size, qNodes.size, 'as many nodes, implicit ones included');
  for (const name of ['q0', 'r0', 'f0', 'n0']) t.same(shape(vNodes.get(name)), shape(qNodes.get(name)), `query-named-block-nodes: ${name}`);
  t.same([...vNodes.values()].map((n) => n.drv).sort(), [...qNodes.values()].map((n) => n.drv).sort(), 'the same drivers');

  await same('nbd-server-start', 'nbd-server-start', (p) => ({ addr: { type: 'unix', data: { path: path.join(p.dir, 'nbd.sock') } } }));
  await same('block-export-add', 'block-export-add', () => ({ type: 'nbd', id: 'e0', 'node-name': 'q0', writable: true }));
  const [qe, ve] = await same('query-block-exports', 'query-block-exports');
  t.same(ve.return, qe.return, 'query-block-exports: the same values');

  // Errors: the same class and text.
  await same('duplicate node-name', 'blockdev-add', () => ({ driver: 'null-co', 'node-name': 'q0' }));
  await same('missing argument', 'blockdev-del', () => ({}));
  await same('unexpected argument', 'blockdev-del', () => ({ 'node-name': 'x', bogus: 1 }));
  await same('wrong type', 'block_resize', () => ({ 'node-name': 'q0', size: 'x' }));
  await same('bad enum', 'block-export-del', () => ({ id: 'e0', mode: 'soft' }));
  await same('unknown node', 'blockdev-add', () => ({ driver: 'raw', 'node-name': 'r9', file: 'nope' }));
  await same('unknown command', 'no-such-command');
  await same('export of an unknown node', 'block-export-add', () => ({ type: 'nbd', id: 'e9', 'node-name': 'nope' }));
  await same('duplicate export id', 'block-export-add', () => ({ type: 'nbd', id: 'e0', 'node-name': 'r0' }));
  await same('server twice', 'nbd-server-start', (p) => ({ addr: { type: 'unix', data: { path: path.join(p.dir, 'nbd2.sock') } } }));
  await same('negative resize', 'block_resize', () => ({ 'node-name': 'r0', size: -1 }));
  await same('unknown job', 'job-dismiss', () => ({ id: 'nope' }));
  await same('unknown export', 'block-export-del', () => ({ id: 'nope' }));
  const [qu, vu] = await both('blockdev-del', () => ({ 'node-name': 'q0' }));
  t.equal(vu.error?.class, qu.error?.class, 'a node in use: the same class');
  t.ok(vu.error?.desc.startsWith(qu.error!.desc), `and QEMU's text ("${qu.error?.desc}"), which vdisk continues with who uses it`);

  // Events: the export deleted, a create job's life.
  const mark = peers.map((p) => p.w.messages.length);
  await same('block-export-del', 'block-export-del', () => ({ id: 'e0' }));
  await same('blockdev-create (file)', 'blockdev-create', (p) => ({ 'job-id': 'j0', options: { driver: 'file', filename: path.join(p.dir, 'new.qcow2'), size: 0 } }));
  for (const p of peers) await p.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'concluded');
  const [qj, vj] = await same('query-jobs', 'query-jobs');
  t.same(vj.return, qj.return, 'query-jobs: the same values');
  await same('job-dismiss', 'job-dismiss', () => ({ id: 'j0' }));
  for (const p of peers) await p.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'null');
  const evs = peers.map((p, i) => p.w.messages.slice(mark[i]).filter((m) => m.event).map((m) => ({ event: m.event, data: m.data })));
  t.same(evs[1], evs[0], 'the same events with the same data, in the same order');
  t.same(shape(peers[1].w.events()[0]), shape(peers[0].w.events()[0]), 'events have the same shape (timestamp, event, data)');

  await same('blockdev-add the new file', 'blockdev-add', (p) => ({ driver: 'file', 'node-name': 'nf', filename: path.join(p.dir, 'new.qcow2') }));
  await same('blockdev-create (qcow2)', 'blockdev-create', () => ({ 'job-id': 'j1', options: { driver: 'qcow2', file: 'nf', size: 8 * MiB, 'cluster-size': 65536 } }));
  for (const p of peers) await p.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.id === 'j1' && m.data?.status === 'concluded');
  const [qj1, vj1] = await both('query-jobs');
  t.same(vj1.return, qj1.return, 'the qcow2 create job: the same values');
  await same('job-dismiss', 'job-dismiss', () => ({ id: 'j1' }));
  await same('block_resize', 'block_resize', () => ({ 'node-name': 'r0', size: 2 * MiB }));
  await same('nbd-server-stop', 'nbd-server-stop');
  await same('blockdev-del', 'blockdev-del', () => ({ 'node-name': 'q0' }));
  await same('blockdev-del nf', 'blockdev-del', () => ({ 'node-name': 'nf' }));
  for (const p of peers) {
    const c = await run('qemu-img', ['check', path.join(p.dir, 'new.qcow2')]);
    t.equal(c.code, 0, `${p.name}: the created image passes qemu-img check`);
  }
  t.same(
    JSON.parse((await run('qemu-img', ['info', '--output=json', path.join(vd.dir, 'new.qcow2')])).stdout)['virtual-size'],
    JSON.parse((await run('qemu-img', ['info', '--output=json', path.join(qsd.dir, 'new.qcow2')])).stdout)['virtual-size'],
    'the same image size',
  );
});
