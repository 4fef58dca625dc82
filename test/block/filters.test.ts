/**
 * The blkverify and blkdebug filters, driven as users drive them: the seed
 * document's example with `vdisk io` (and the same line from qemu-io), a
 * daemon serving a blkverify pair over NBD to qemu-io (a mismatch fails the
 * read with EIO and raises BLKVERIFY_MISMATCH, and nothing else stops), the
 * 'log' action, both children kept in step by writes, zero writes and
 * discards, and blkdebug rules (state machine, sector, iotype, once) seen
 * through NBD as real I/O errors.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { VDISK, requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

t.before(() => {
  for (const tool of ['qemu-io', 'qemu-img']) requireTool(t, tool);
});

function seedImages(dir: string): { raw: string; test: string } {
  const raw = path.join(dir, 'raw.img');
  const test = path.join(dir, 'test.img');
  fs.writeFileSync(raw, Buffer.concat([Buffer.alloc(512, 0xcd), Buffer.alloc(MiB - 512)]));
  fs.writeFileSync(test, Buffer.alloc(MiB));
  return { raw, test };
}

t.test("the seed document's example, with vdisk io and with qemu-io", async (t) => {
  const dir = tempDir(t);
  const { raw, test } = seedImages(dir);
  const dump = await run(process.execPath, [VDISK, 'io', '-c', 'read -v 0 512', raw]);
  t.equal(dump.code, 0);
  t.match(dump.stdout, /^00000000: {2}cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd cd {2}\.{16}\n/, 'read -v shows the 0xcd sector');
  const ours = await run(process.execPath, [VDISK, 'io', '-c', 'read 0 512', `blkverify:${raw}:${test}`]);
  const theirs = await run('qemu-io', ['-c', 'read 0 512', `blkverify:${raw}:${test}`]);
  t.equal(ours.code, 1, 'the mismatch ends the process with status 1, as QEMU');
  t.equal(theirs.code, 1);
  const line = 'blkverify: read offset=0 bytes=512 contents mismatch at offset 0';
  t.match(theirs.stderr, line, "qemu-io's line");
  t.equal(ours.stderr.split('\n')[0], line, 'vdisk prints the same line first');
  t.match(ours.stderr, /test-sha256=[0-9a-f]{64} raw-sha256=[0-9a-f]{64} recent: read@0\+512/, 'then the hashes and the trail');
  const good = await run(process.execPath, [VDISK, 'io', '-c', 'read 4096 4096', `blkverify:${raw}:${test}`]);
  t.equal(good.code, 0, 'a range that agrees reads fine');
});

t.test('a blkverify pair served over NBD: EIO and an event on a mismatch, the daemon goes on', async (t) => {
  const dir = tempDir(t);
  const { raw, test } = seedImages(dir);
  const qcow = path.join(dir, 'test.qcow2');
  t.equal((await run('qemu-img', ['convert', '-O', 'qcow2', test, qcow])).code, 0);
  fs.writeFileSync(path.join(dir, 'other.raw'), Buffer.alloc(MiB, 7));
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, {
    dir,
    args: [
      '--qmp', `unix:${sock}`, '--log-level', 'warn',
      '--blockdev', `driver=blkverify,node-name=v0,raw.driver=raw,raw.file.driver=file,raw.file.filename=${raw},test.driver=qcow2,test.file.driver=file,test.file.filename=${qcow}`,
      '--blockdev', `driver=raw,node-name=o0,file.driver=file,file.filename=${path.join(dir, 'other.raw')}`,
      '--export', 'type=nbd,id=v0,node-name=v0,writable=on',
      '--export', 'type=nbd,id=o0,node-name=o0',
    ],
  });
  const w = await QmpWire.connect(sock);
  t.teardown(() => w.close());
  const r = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 512', d.uri('v0')]);
  t.match(r.stdout, /read failed: Input\/output error/, 'the client gets EIO for the corrupt sector');
  const ev = await w.waitFor((m) => m.event === 'BLKVERIFY_MISMATCH');
  t.match(ev.data, { 'node-name': 'v0', operation: 'read', offset: 0, bytes: 512, 'mismatch-offset': 0, sector: 0, action: 'eio', 'test-sha256': /^[0-9a-f]{64}$/, recent: [{ op: 'read', offset: 0, length: 512 }] });
  t.match(d.stderr(), /blkverify: read offset=0 bytes=512 contents mismatch at offset 0/, 'and a log line');
  t.equal(d.proc.exitCode, null, 'the daemon is still running');
  const other = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 7 0 4096', d.uri('o0')]);
  t.notMatch(other.stdout, /failed/, 'another export is still served');

  // Writes, zero writes and discards reach both children; afterwards they agree everywhere.
  const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 0 64k', '-c', 'write -z 128k 64k', '-c', 'discard 256k 64k', '-c', 'write -P 0x44 1000 3000', '-c', 'read -P 0x33 4096 4096', d.uri('v0')]);
  t.notMatch(io.stdout, /failed/, io.stdout);
  const all = await run('qemu-io', ['-f', 'raw', '-c', `read 0 ${MiB}`, d.uri('v0')]);
  t.notMatch(all.stdout, /failed/, 'the whole disk reads without a mismatch');
  await d.stop();
  const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, qcow]);
  t.equal(cmp.code, 0, `raw and test hold the same content: ${cmp.stdout}`);
});

t.test("mismatch-action=log: the reference's data, a report, no error", async (t) => {
  const dir = tempDir(t);
  const { raw, test } = seedImages(dir);
  const r = await run(process.execPath, [VDISK, 'io', '-c', 'read -P 0xcd 0 512', `json:{"driver":"blkverify","mismatch-action":"log","raw":{"driver":"raw","file":{"driver":"file","filename":"${raw}"}},"test":{"driver":"raw","file":{"driver":"file","filename":"${test}"}}}`], { env: { ...process.env, VDISK_LOG_LEVEL: 'error' } });
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /verification failed/, "the read returned the reference's 0xcd");
  t.match(r.stderr, /blkverify-mismatch/, 'and the mismatch was logged');
});

t.test('blkdebug rules: state machine, sector, iotype and once, as real I/O errors over NBD', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'd.raw');
  fs.writeFileSync(img, Buffer.alloc(MiB, 1));
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(sock);
  t.teardown(() => w.close());
  await w.ok('blockdev-add', {
    driver: 'raw',
    'node-name': 'dbg',
    file: {
      driver: 'blkdebug',
      image: { driver: 'file', filename: img },
      'set-state': [{ event: 'flush_to_disk', state: 1, new_state: 2 }],
      'inject-error': [
        { event: 'read_aio', state: 2, errno: 5, sector: 8, once: true },
        { event: 'write_aio', errno: 28, iotype: 'write', sector: 16 },
      ],
    },
  });
  await w.ok('block-export-add', { type: 'nbd', id: 'dbg', 'node-name': 'dbg', writable: true });
  const io = (cmd: string) => run('qemu-io', ['-f', 'raw', '-c', cmd, d.uri('dbg')]);
  t.notMatch((await io('read 4096 512')).stdout, /failed/, 'state 1: reads of sector 8 work');
  t.match((await io('write 8192 512')).stdout, /write failed: No space left on device/, 'the write rule: sector 16, ENOSPC');
  t.notMatch((await io('write 0 512')).stdout, /failed/, 'a write elsewhere works');
  const flushed = await io('flush');
  t.notMatch(flushed.stdout, /failed/);
  t.notMatch((await io('read 0 512')).stdout, /failed/, 'state 2: sector 0 is not the rule’s sector');
  t.match((await io('read 4096 512')).stdout, /read failed: Input\/output error/, 'state 2: sector 8 fails');
  t.notMatch((await io('read 4096 512')).stdout, /failed/, 'once: only the first time');
});

t.test('blkdebug config files and the blkdebug:CONFIG:IMAGE shorthand, as qemu-io reads them', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'd.raw');
  fs.writeFileSync(img, Buffer.alloc(MiB, 2));
  const conf = path.join(dir, 'rules.conf');
  fs.writeFileSync(conf, '# the first read of sector 0 fails\n[inject-error]\nevent = "read_aio"\nerrno = "5"\nsector = "0"\nonce = "on"\n\n[set-state]\nevent = "read_aio"\nstate = "1"\nnew_state = "2"\n');
  const cmds = ['-c', 'read 0 512', '-c', 'read 0 512', '-c', 'read 4096 512'];
  const ours = await run(process.execPath, [VDISK, 'io', '-f', 'raw', ...cmds, `blkdebug:${conf}:${img}`]);
  const theirs = await run('qemu-io', ['-f', 'raw', ...cmds, `blkdebug:${conf}:${img}`]);
  const lines = (s: string) => s.split('\n').filter((l) => /^(read|write)/.test(l));
  t.same(lines(ours.stdout), lines(theirs.stdout), `the same results as qemu-io: ${lines(theirs.stdout).join(' | ')}`);
  t.match(ours.stdout, /read failed: Input\/output error/);
  fs.writeFileSync(conf, '[inject-error]\nevent = "nope"\n');
  const bad = await run(process.execPath, [VDISK, 'io', '-f', 'raw', '-c', 'read 0 512', `blkdebug:${conf}:${img}`]);
  t.not(bad.code, 0);
  t.match(bad.stderr, /Parameter 'inject-error.event' does not accept value 'nope'/, 'a bad rule is refused with the key at fault');
  fs.writeFileSync(conf, '[oops]\n');
  const sec = await run(process.execPath, [VDISK, 'io', '-f', 'raw', '-c', 'read 0 512', `blkdebug:${conf}:${img}`]);
  t.match(sec.stderr, /rules\.conf:1: unknown section \[oops\]/);
});

t.test('blkdebug at run time: rules added and removed over QMP, delay, dropped connection, power cut', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'p.raw');
  fs.writeFileSync(img, Buffer.alloc(MiB, 0x0a));
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(sock);
  t.teardown(() => w.close());
  await w.ok('blockdev-add', { driver: 'raw', 'node-name': 'p', file: { driver: 'blkdebug', 'node-name': 'dbg', image: { driver: 'file', filename: img } } });
  await w.ok('block-export-add', { type: 'nbd', id: 'p', 'node-name': 'p', writable: true });
  const io = (...cmds: string[]) => run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), d.uri('p')]);

  const { id: delayId } = (await w.ok('x-blkdebug-add-rule', { node: 'dbg', 'inject-error': { event: 'read_aio', action: 'delay', 'delay-ms': 50, iotype: 'read' } })) as { id: number };
  t.notMatch((await io('read -P 0x0a 0 4096')).stdout, /failed/, 'a delayed read still succeeds');
  let q = (await w.ok('x-blkdebug-query', { node: 'dbg' })) as { state: number; rules: Array<Record<string, unknown>> };
  t.match(q.rules.find((r) => r.id === delayId), { action: 'delay', injected: 1 }, 'and the rule counted it');
  await w.ok('x-blkdebug-remove-rule', { node: 'dbg', id: delayId });
  t.same(((await w.ok('x-blkdebug-query', { node: 'dbg' })) as { rules: unknown[] }).rules, [], 'removed');
  t.match((await w.cmd('x-blkdebug-remove-rule', { node: 'dbg', id: delayId })).error?.desc, /has no rule/);
  t.match((await w.cmd('x-blkdebug-query', { node: 'p' })).error?.desc, /is not a blkdebug node/);

  await w.ok('x-blkdebug-add-rule', { node: 'dbg', 'inject-error': { event: 'read_aio', action: 'drop-connection', sector: 16, once: true } });
  const dropped = await io('read 8192 512');
  t.match(dropped.stdout + dropped.stderr, /failed|error|reset|closed/i, 'the client loses its connection');
  t.notMatch((await io('read -P 0x0a 0 512')).stdout, /failed/, 'a new connection works; the daemon is fine');

  // Power cut: a flushed write survives, an unflushed one is lost, and the node is dead until powered on.
  t.notMatch((await io('write -P 0x0b 0 4096', 'flush')).stdout, /failed/);
  await w.ok('x-blkdebug-add-rule', { node: 'dbg', 'inject-error': { event: 'read_aio', action: 'power-cut', iotype: 'read', sector: 100, once: true } });
  // Through the monitor: qemu-io over NBD would flush when it closes.
  t.equal(await w.ok('human-monitor-command', { 'command-line': 'qemu-io p "write -P 0x0c 4096 4096"' }), '', 'an unflushed write');
  t.match((await io('read 51200 512')).stdout, /read failed: Input\/output error/, 'the power cut');
  t.match((await io('read 0 512')).stdout, /read failed: Input\/output error/, 'after it, everything fails');
  q = (await w.ok('x-blkdebug-query', { node: 'dbg' })) as { state: number; rules: Array<Record<string, unknown>> };
  t.match(q, { 'powered-off': true });
  await w.ok('x-blkdebug-power-on', { node: 'dbg' });
  t.notMatch((await io('read -P 0x0b 0 4096', 'read -P 0x0a 4096 4096')).stdout, /failed/, 'the flushed write survived; the unflushed one is gone');
});

t.test("blkdebug under qcow2: metadata events (l2_load, l2_update) fail the I/O as in qemu-io", async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'm.qcow2');
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '16M'])).code, 0);
  t.equal((await run('qemu-io', ['-c', 'write -P 0x31 0 64k', img])).code, 0);
  const json = (event: string, iotype?: string) =>
    `json:${JSON.stringify({ driver: 'qcow2', file: { driver: 'blkdebug', image: { driver: 'file', filename: img }, 'inject-error': [{ event, errno: 5, once: true, ...(iotype ? { iotype } : {}) }] } })}`;
  for (const [what, event, cmds] of [
    ['an L2 table load', 'l2_load', ['read -P 0x31 0 4k', 'read -P 0x31 0 4k']],
    ['a data write into an allocated L2 table (no metadata event)', 'cluster_alloc', ['write -P 0x32 1M 4k', 'write -P 0x32 1M 4k']],
  ] as Array<[string, string, string[]]>) {
    const args = cmds.flatMap((c) => ['-c', c]);
    const ours = await run(process.execPath, [VDISK, 'io', ...args, json(event)]);
    const theirs = await run('qemu-io', [...args, json(event)]);
    const results = (s: string) => s.split('\n').filter((l) => /^(read|wrote|write) /.test(l) || /failed/.test(l));
    t.same(results(ours.stdout), results(theirs.stdout), `${what}: the same results as qemu-io (${results(theirs.stdout).join(' | ')})`);
  }
  // l2_update fires at flush time, when vdisk writes its L2 tables (QEMU writes them earlier):
  // the flush fails (qemu-io's flush says so only by its exit status), the next one succeeds.
  const ours = await run(process.execPath, [VDISK, 'io', '-c', 'write -P 0x33 2M 4k', '-c', 'flush', '-c', 'flush', '-c', 'read -P 0x33 2M 4k', json('l2_update', 'write')]);
  t.equal(ours.code, 1, 'a command failed: the flush that wrote the L2 table');
  t.notMatch(ours.stdout, /verification failed/, 'the data reads back');
  t.equal((await run('qemu-img', ['check', img])).code, 0, 'the image is consistent');
});

t.test('blkdebug breakpoints: break, wait_break and resume hold a guest read, as qemu-io drives them', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'b.raw');
  fs.writeFileSync(img, Buffer.alloc(MiB, 0x42));
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(sock);
  t.teardown(() => w.close());
  await w.ok('blockdev-add', { driver: 'raw', 'node-name': 'b0', file: { driver: 'blkdebug', image: { driver: 'file', filename: img } } });
  await w.ok('block-export-add', { type: 'nbd', id: 'b0', 'node-name': 'b0' });
  const hmp = (cmd: string) => w.ok('human-monitor-command', { 'command-line': `qemu-io b0 "${cmd}"` });
  t.equal(await hmp('break read_aio bp'), '');
  // A guest read over NBD now stops at the breakpoint.
  let finished = false;
  const reader = run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x42 0 4096', d.uri('b0')]).then((r) => {
    finished = true;
    return r;
  });
  t.equal(await hmp('wait_break bp'), '', 'wait_break returns once the request is held');
  t.match(await d.waitStdout(/Suspended request/), /blkdebug: Suspended request 'bp'/);
  t.notOk(finished, 'the read is held');
  t.equal(await hmp('resume bp'), '');
  const r = await reader;
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /failed/, 'and completes with the right data once resumed');
  t.match(await d.waitStdout(/Resuming request/), /blkdebug: Resuming request 'bp'/);
  t.equal(await hmp('remove_break bp'), '');
  t.notMatch((await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read 0 4096', d.uri('b0')])).stdout, /failed/, 'without the breakpoint reads flow');
});
