/**
 * Every QMP command of the control port, its happy path and its errors, with
 * real tools checking the effect: nbdinfo and qemu-io reach what
 * nbd-server-start and block-export-add set up, qemu-img checks what
 * blockdev-create formats and what block_resize grows.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { VDISK, patternBuffer, requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

async function daemon(t: Parameters<typeof startDaemon>[0]) {
  const dir = tempDir(t);
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(sock);
  t.teardown(() => w.close());
  return { d, sock, dir, w };
}

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io', 'nbdinfo']) requireTool(t, tool);
});

t.test('query-commands lists what the table has', async (t) => {
  const { w } = await daemon(t);
  const names = ((await w.ok('query-commands')) as Array<{ name: string }>).map((c) => c.name);
  for (const n of [
    'qmp_capabilities', 'query-version', 'query-commands', 'quit', 'blockdev-add', 'blockdev-del', 'query-named-block-nodes',
    'blockdev-create', 'block_resize', 'nbd-server-start', 'nbd-server-stop', 'block-export-add', 'block-export-del',
    'query-block-exports', 'query-jobs', 'job-dismiss', 'job-cancel', 'human-monitor-command',
  ]) {
    t.ok(names.includes(n), n);
  }
});

t.test('blockdev-add / blockdev-del / query-named-block-nodes', async (t) => {
  const { w, dir } = await daemon(t);
  const base = path.join(dir, 'base.raw');
  fs.writeFileSync(base, patternBuffer(4 * MiB, 5));
  const top = path.join(dir, 'top.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', '-b', base, '-F', 'raw', top])).code, 0);

  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'q0', file: { driver: 'file', filename: top } });
  await w.ok('blockdev-add', { driver: 'null-co', 'node-name': 'n0', size: MiB, 'read-only': true });
  const nodes = (await w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
  const q0 = nodes.find((n) => n['node-name'] === 'q0')!;
  t.match(q0, {
    file: top, ro: false, drv: 'qcow2', backing_file: base, backing_file_depth: 1, encrypted: false, detect_zeroes: 'off',
    bps: 0, bps_rd: 0, bps_wr: 0, iops: 0, iops_rd: 0, iops_wr: 0, write_threshold: 0,
    cache: { writeback: true, direct: false, 'no-flush': false },
    image: {
      filename: top, format: 'qcow2', 'virtual-size': 4 * MiB, 'cluster-size': 65536, 'backing-filename': base, 'backing-filename-format': 'raw',
      'format-specific': { type: 'qcow2', data: { compat: '1.1', 'refcount-bits': 16, corrupt: false } },
      'backing-image': { filename: base, format: 'raw', 'virtual-size': 4 * MiB },
    },
  });
  t.equal(nodes.filter((n) => String(n['node-name']).startsWith('#block')).length, 3, 'implicit children are listed with #block names (file, backing raw, its file)');
  t.match(nodes.find((n) => n['node-name'] === 'n0'), { drv: 'null-co', ro: true });
  const flat = (await w.ok('query-named-block-nodes', { flat: true })) as Array<{ 'node-name': string; image: Record<string, unknown> }>;
  t.equal(flat.find((n) => n['node-name'] === 'q0')!.image['backing-image'], undefined, 'flat leaves out backing-image');

  for (const [args, desc] of [
    [{ driver: 'null-co', 'node-name': 'q0' }, "Duplicate nodes with node-name='q0'"],
    [{ driver: 'null-co', 'node-name': '1bad' }, "Invalid node-name: '1bad'"],
    [{ driver: 'qcow2', 'node-name': 'q1', file: 'nope' }, "Cannot find device='nope' nor node-name='nope'"],
    [{ driver: 'file', 'node-name': 'f1', filename: path.join(dir, 'missing') }, `Could not open '${path.join(dir, 'missing')}': No such file or directory`],
    [{ driver: 'file', 'node-name': 'f2', filename: top }, /Failed to get "write" lock/],
  ] as Array<[unknown, string | RegExp]>) {
    const r = await w.cmd('blockdev-add', args);
    t.equal(r.error?.class, 'GenericError');
    if (typeof desc === 'string') t.equal(r.error?.desc, desc);
    else t.match(r.error?.desc, desc);
  }
  t.same((await w.cmd('blockdev-del', { 'node-name': 'nope' })).error, { class: 'GenericError', desc: "Failed to find node with node-name='nope'" });
  const implicit = nodes.find((n) => String(n['node-name']).startsWith('#block'))!['node-name'];
  t.match((await w.cmd('blockdev-del', { 'node-name': implicit })).error?.desc, /is not owned by the monitor/);
  await w.ok('blockdev-del', { 'node-name': 'q0' });
  await w.ok('blockdev-del', { 'node-name': 'n0' });
  t.same(await w.ok('query-named-block-nodes'), [], 'deleting q0 took its implicit children');
  t.equal((await run('qemu-img', ['check', top])).code, 0, 'the image was closed cleanly (qemu-img check)');
});

t.test('nbd-server-start / block-export-add / block-export-del / nbd-server-stop, seen by nbdinfo and qemu-io', async (t) => {
  const { w, dir } = await daemon(t);
  const img = path.join(dir, 'disk.raw');
  fs.writeFileSync(img, patternBuffer(MiB, 9));
  const nbd = path.join(dir, 'nbd.sock');
  await w.ok('blockdev-add', { driver: 'raw', 'node-name': 'd0', file: { driver: 'file', filename: img } });
  t.same((await w.cmd('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0' })).error, { class: 'GenericError', desc: 'NBD server not running' });
  await w.ok('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
  t.same((await w.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } })).error, { class: 'GenericError', desc: 'NBD server already running' });
  t.same((await w.cmd('block-export-add', { type: 'nbd', 'node-name': 'd0' })).error, { class: 'GenericError', desc: "Parameter 'id' is missing" });
  t.same((await w.cmd('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'nope' })).error, { class: 'GenericError', desc: "Cannot find device='' nor node-name='nope'" });
  await w.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', name: 'disk', writable: true, description: 'a test disk' });
  t.same((await w.cmd('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0' })).error, { class: 'GenericError', desc: "Block export id 'e0' is already in use" });
  t.same(await w.ok('query-block-exports'), [{ id: 'e0', type: 'nbd', 'node-name': 'd0', 'shutting-down': false }]);

  const uri = `nbd+unix:///disk?socket=${nbd}`;
  const info = await run('nbdinfo', ['--json', uri]);
  t.equal(info.code, 0, info.stderr);
  t.match(JSON.parse(info.stdout).exports[0], { 'export-name': 'disk', description: 'a test disk', 'export-size': MiB, is_read_only: false });
  t.equal((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 4096 4096', uri])).code, 0);
  t.ok(fs.readFileSync(img).subarray(4096, 8192).equals(Buffer.alloc(4096, 0x5a)), 'a write through the export reached the file');
  t.match((await w.cmd('block_resize', { 'node-name': 'd0', size: 2 * MiB })).error?.desc, /exported as 'e0'/, 'an exported node keeps its size');

  const n = w.messages.length;
  await w.ok('block-export-del', { id: 'e0' });
  const del = w.messages.slice(n).find((m) => m.event === 'BLOCK_EXPORT_DELETED');
  t.same(del?.data, { id: 'e0' }, 'BLOCK_EXPORT_DELETED, before the reply since no client was connected');
  t.same((await w.cmd('block-export-del', { id: 'e0' })).error, { class: 'GenericError', desc: "Export 'e0' is not found" });
  t.not((await run('nbdinfo', [uri])).code, 0, 'the export is gone');

  await w.ok('block-export-add', { type: 'nbd', id: 'e1', 'node-name': 'd0' });
  const m = w.messages.length;
  await w.ok('nbd-server-stop');
  t.same(w.messages.slice(m).filter((x) => x.event === 'BLOCK_EXPORT_DELETED').map((x) => x.data), [{ id: 'e1' }], 'nbd-server-stop deletes every NBD export');
  t.same(await w.ok('query-block-exports'), []);
  t.same((await w.cmd('nbd-server-stop')).error, { class: 'GenericError', desc: 'NBD server not running' });
  t.notOk(fs.existsSync(nbd), 'the NBD socket file is gone');
});

t.test('blockdev-create jobs: file, qcow2 on it, checked by qemu-img; failures in query-jobs', async (t) => {
  const { w, dir } = await daemon(t);
  const file = path.join(dir, 'new.qcow2');
  const done = async (id: string) => {
    await w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.id === id && m.data?.status === 'concluded');
    const job = ((await w.ok('query-jobs')) as Array<Record<string, unknown>>).find((j) => j.id === id)!;
    await w.ok('job-dismiss', { id });
    return job;
  };
  await w.ok('blockdev-create', { 'job-id': 'c1', options: { driver: 'file', filename: file, size: 0 } });
  t.match(await done('c1'), { id: 'c1', type: 'create', status: 'concluded', 'current-progress': 1, 'total-progress': 1 });
  await w.ok('blockdev-add', { driver: 'file', 'node-name': 'f', filename: file });
  await w.ok('blockdev-create', { 'job-id': 'c2', options: { driver: 'qcow2', file: 'f', size: 64 * MiB, 'cluster-size': 4096, 'lazy-refcounts': true } });
  const c2 = await done('c2');
  t.equal(c2.error, undefined, 'formatting succeeded');
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'q', file: 'f' });
  const nodes = (await w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
  t.match(nodes.find((n) => n['node-name'] === 'q'), { image: { 'virtual-size': 64 * MiB, 'cluster-size': 4096, 'format-specific': { data: { 'lazy-refcounts': true } } } });
  await w.ok('blockdev-del', { 'node-name': 'q' });
  await w.ok('blockdev-del', { 'node-name': 'f' });
  const check = await run('qemu-img', ['check', file]);
  t.equal(check.code, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
  const info = JSON.parse((await run('qemu-img', ['info', '--output=json', file])).stdout);
  t.match(info, { 'virtual-size': 64 * MiB, 'cluster-size': 4096, format: 'qcow2' });

  // Refused at submit, with nothing started.
  t.same((await w.cmd('blockdev-create', { 'job-id': 'c3', options: { driver: 'raw', file: 'f', size: 1, extra: 1 } })).error, { class: 'GenericError', desc: "Parameter 'options.extra' is unexpected" });
  t.same((await w.cmd('blockdev-create', { 'job-id': '9bad', options: { driver: 'file', filename: file, size: 0 } })).error, { class: 'GenericError', desc: "Invalid job ID '9bad'" });
  // A failure shows in query-jobs, as QEMU's.
  sparseFile(path.join(dir, 'x.img'), MiB);
  await w.ok('blockdev-add', { driver: 'file', 'node-name': 'x', filename: path.join(dir, 'x.img') });
  await w.ok('blockdev-create', { 'job-id': 'c4', options: { driver: 'qcow2', file: 'x', size: MiB, 'cluster-size': 3000 } });
  const c4 = await done('c4');
  t.match(c4.error, /Cluster size must be a power of two between 512 and 2048k/, 'the error is in query-jobs');
  t.same((await w.cmd('job-dismiss', { id: 'c4' })).error, { class: 'GenericError', desc: 'Job not found' });
  await w.ok('blockdev-create', { 'job-id': 'c5', options: { driver: 'file', filename: path.join(dir, 'c5'), size: 0 } });
  await w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.id === 'c5' && m.data?.status === 'concluded');
  t.same((await w.cmd('job-cancel', { id: 'c5' })).error, { class: 'GenericError', desc: "Job 'c5' in state 'concluded' cannot accept command verb 'cancel'" });
  await w.ok('job-dismiss', { id: 'c5' });
});

t.test('block_resize grows a qcow2 node; qemu-img sees the new size', async (t) => {
  const { w, dir } = await daemon(t);
  const img = path.join(dir, 'r.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '16M'])).code, 0);
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'r', file: { driver: 'file', filename: img } });
  await w.ok('block_resize', { 'node-name': 'r', size: 1024 * MiB });
  t.same((await w.cmd('block_resize', { 'node-name': 'r', size: -1 })).error, { class: 'GenericError', desc: "Parameter 'size' expects a >0 size" });
  t.same((await w.cmd('block_resize', { 'node-name': 'nope', size: 1 })).error, { class: 'GenericError', desc: "Cannot find device='' nor node-name='nope'" });
  t.same((await w.cmd('block_resize', { device: 'nope', size: 1 })).error, { class: 'GenericError', desc: "Cannot find device='nope' nor node-name=''" });
  await w.ok('blockdev-del', { 'node-name': 'r' });
  t.equal(JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout)['virtual-size'], 1024 * MiB);
  t.equal((await run('qemu-img', ['check', img])).code, 0);
});

t.test('vdisk qmp: one command, key=value arguments, errors and exit codes', async (t) => {
  const { sock, dir } = await daemon(t);
  const q = (...args: string[]) => run(process.execPath, [VDISK, 'qmp', '--socket', sock, ...args]);
  let r = await q('blockdev-add', 'driver=null-co', 'node-name=n1', 'size=1048576');
  t.equal(r.code, 0, r.stderr);
  t.same(JSON.parse(r.stdout), {});
  r = await q('blockdev-add', '{"driver": "null-co", "node-name": "n2", "read-only": true}');
  t.equal(r.code, 0, r.stderr);
  r = await q('query-named-block-nodes', 'flat=true');
  t.same(JSON.parse(r.stdout).map((n: { 'node-name': string }) => n['node-name']).sort(), ['n1', 'n2']);
  r = await q('nbd-server-start', 'addr.type=unix', `addr.data.path=${path.join(dir, 'n.sock')}`);
  t.equal(r.code, 0, `dotted keys nest: ${r.stderr}`);
  r = await q('blockdev-del', 'node-name=nope');
  t.equal(r.code, 1, 'an error reply is exit 1');
  t.equal(r.stderr, "vdisk qmp: GenericError: Failed to find node with node-name='nope'\n");
  r = await run(process.execPath, [VDISK, 'qmp', '--socket', path.join(dir, 'absent.sock'), 'query-version']);
  t.equal(r.code, 2, 'no daemon is exit 2');
  r = await q('--events', '--timeout', '2', '--compact', 'blockdev-create', 'job-id=j', `options={"driver": "file", "filename": "${path.join(dir, 'e.img')}", "size": 0}`);
  t.equal(r.code, 0, r.stderr);
  const lines = r.stdout.trim().split('\n').map((l) => JSON.parse(l));
  t.equal(lines.filter((l) => l.event === undefined).length, 1, 'one reply');
  t.same(lines.filter((l) => l.event === 'JOB_STATUS_CHANGE').map((l) => l.data.status), ['created', 'running', 'waiting', 'pending', 'concluded'], 'and every event, in order');
  r = await run(process.execPath, [VDISK, 'qmp', '--socket', sock], { input: 'query-version\nquery-block-exports\n' });
  t.equal(r.code, 0);
  t.match(r.stdout, /"major": 7/, 'the shell reads commands from stdin');
});

t.test('human-monitor-command: qemu-io on a node, output on the daemon stdout, "" as the reply', async (t) => {
  const { w, dir, d } = await daemon(t);
  const img = path.join(dir, 'h.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '4M'])).code, 0);
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'h0', file: { driver: 'file', filename: img } });
  t.equal(await w.ok('human-monitor-command', { 'command-line': 'qemu-io h0 "write -P 0x5a 64k 4k"' }), '');
  t.equal(await w.ok('human-monitor-command', { 'command-line': 'qemu-io h0 "flush"' }), '');
  t.equal(await w.ok('human-monitor-command', { 'command-line': 'qemu-io h0 "read -P 0x5a 64k 4k"' }), '', 'a read returns "" too');
  t.equal(await w.ok('human-monitor-command', { 'command-line': 'qemu-io h0 "read -P 0x11 64k 4k"' }), '', 'even a failed verification');
  t.match(await d.waitStdout(/wrote 4096/), /wrote 4096\/4096 bytes at offset 65536/, "qemu-io's output went to the daemon's stdout");
  t.match(await d.waitStdout(/Pattern verification failed/), /Pattern verification failed at offset 65536, 4096 bytes/);
  t.equal(await w.ok('human-monitor-command', { 'command-line': 'qemu-io nope "read 0 512"' }), "Error: Cannot find device='' nor node-name='nope'\r\n");
  t.equal(await w.ok('human-monitor-command', { 'command-line': 'info block' }), "unknown command: 'info'\r\n");
  await w.ok('blockdev-del', { 'node-name': 'h0' });
  const r = await run('qemu-io', ['-f', 'qcow2', '-r', '-c', 'read -P 0x5a 64k 4k', img]);
  t.notMatch(r.stdout, /failed/, 'the write is in the image (qemu-io reads it back)');
  t.equal((await run('qemu-img', ['check', img])).code, 0);
});
