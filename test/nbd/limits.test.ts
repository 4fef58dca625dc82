/**
 * Client limits and liveness of the NBD server (docs/design/limits.md):
 * max-connections is the total over every listener (a client over it is
 * accepted and closed at once, and logged); x-max-connections limits one
 * export (NBD_REP_ERR_POLICY with a message at GO/INFO, a hang-up at
 * EXPORT_NAME, CAN_MULTI_CONN withdrawn at 1); x-idle-timeout disconnects a
 * client that does nothing; the daemon-wide buffer budget stops reading
 * from clients that never read their replies, without starving the others,
 * and fio's nbd engine writes and verifies its data while the budget holds
 * it back. Real clients (qemu-img, qemu-io, nbdinfo, nbdsh) where one can do it; the
 * raw client where a test needs a client that misbehaves or holds still.
 */
import t from 'tap';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { RawClient } from '../helpers/nbd-raw.js';
import { QmpWire } from '../helpers/qmp.js';
import { nbdsh, requireTools, run, sparseFile, tempDir } from '../helpers/tools.js';

t.before(() => {
  requireTools(t, 'qemu-img', 'qemu-io', 'nbdinfo', 'nbdsh', 'fio');
});

const MiB = 1024 * 1024;
const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
const NBD_OPT_EXPORT_NAME = 1;
const NBD_OPT_INFO = 6;
const NBD_REP_ERR_POLICY = 2 ** 31 + 2;
const NBD_CMD_READ = 0;

type LogLine = Record<string, unknown> & { message: string };

function logLines(stderr: string, message: string): LogLine[] {
  return stderr
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as LogLine)
    .filter((l) => l.message === message);
}

/** Waits until the condition holds (the test's own timeout bounds it). */
async function until(what: string, cond: () => Promise<boolean> | boolean): Promise<void> {
  for (let i = 0; ; i++) {
    if (await cond()) return;
    if (i > 1500) throw new Error(`gave up waiting for: ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

interface ServerStats {
  'max-connections': number;
  'buffer-limit': number;
  buffered: number;
  'buffered-peak': number;
  'budget-waits': number;
  'refused-at-accept': number;
  exports: Array<{ name: string; clients: number; 'max-connections': number }>;
  connections: Array<{ id: number; export?: string; paused: boolean; requests: number; buffered: number; 'in-flight': number }>;
}

async function stats(qmp: QmpWire): Promise<ServerStats> {
  const r = await qmp.cmd('x-query-nbd-server');
  if (r.error) throw new Error(r.error.desc);
  return r.return as ServerStats;
}

t.test('max-connections is the total over every listener: the next client gets EOF and a log line', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 16 * MiB);
  const sockA = path.join(dir, 'a.sock');
  const sockB = path.join(dir, 'b.sock');
  const qmpSock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, {
    dir,
    nbdServer: false,
    args: [
      '--nbd-server', `addr.type=unix,addr.path=${sockA},max-connections=2`,
      '--nbd-server', `addr.type=unix,addr.path=${sockB}`,
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=disk',
      '--qmp', `unix:${qmpSock}`,
    ],
  });
  const qmp = await QmpWire.connect(qmpSock);
  t.teardown(() => qmp.socket.destroy());
  // One client on each listener: together they are the server's two.
  const a = await RawClient.connect(sockA);
  const b = await RawClient.connect(sockB);
  t.teardown(() => (a.close(), b.close()));
  const { flags } = await a.go('disk');
  t.ok(flags & NBD_FLAG_CAN_MULTI_CONN, 'max-connections=2: CAN_MULTI_CONN is still advertised');
  await b.greet();
  for (const sock of [sockA, sockB]) {
    const r = await run('qemu-img', ['info', `nbd+unix:///disk?socket=${sock}`]);
    t.not(r.code, 0, `qemu-img on ${path.basename(sock)} is turned away while two clients are connected`);
    t.match(r.stderr, /end-of-file|EOF|closed/i, `it sees the connection end at once: ${r.stderr.trim()}`);
  }
  const info = await run('nbdinfo', [`nbd+unix:///disk?socket=${sockB}`]);
  t.not(info.code, 0, `nbdinfo too: ${info.stderr.trim()}`);
  const refused = logLines(d.stderr(), 'nbd-client-refused');
  t.equal(refused.length, 3, 'each refused client is logged once');
  for (const l of refused) {
    t.equal(l.level, 'warn');
    t.equal(l.limit, 2, 'the line gives the limit');
    t.equal(l.peer, 'unix', 'and the peer');
    t.match(l.reason, /max-connections/, 'and the reason');
  }
  const s = await stats(qmp);
  t.equal(s['max-connections'], 2);
  t.equal(s['refused-at-accept'], 3, 'x-query-nbd-server counts them');
  t.equal(s.connections.length, 2, 'the two held clients are the only connections');
  // A slot frees: the next client gets in.
  b.close();
  await until('the server sees the client go', async () => (await stats(qmp)).connections.length === 1);
  const ok = await run('qemu-img', ['info', '--output=json', `nbd+unix:///disk?socket=${sockB}`]);
  t.equal(ok.code, 0, `with a slot free qemu-img connects: ${ok.stderr}`);
  t.equal(JSON.parse(ok.stdout)['virtual-size'], 16 * MiB);
  t.equal(await d.stop(), 0);
});

t.test('a second --nbd-server with another max-connections is refused (it is a total, not per listener)', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), MiB);
  const r = await run(process.execPath, [
    path.resolve('bin/vdisk'), 'serve',
    '--nbd-server', `addr.type=unix,addr.path=${path.join(dir, 'a.sock')},max-connections=2`,
    '--nbd-server', `addr.type=unix,addr.path=${path.join(dir, 'b.sock')},max-connections=5`,
    '--blockdev', `driver=file,node-name=f0,filename=${img}`,
  ], { cwd: dir, timeoutMs: 20_000 });
  t.not(r.code, 0, 'the daemon does not start');
  t.match(r.stderr, /--nbd-server #2.*max-connections is the NBD server's total over all its addresses/s, r.stderr);
});

t.test('x-max-connections on an export: POLICY with a message at GO and INFO, hang-up at EXPORT_NAME, logged once per client', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 16 * MiB);
  const qmpSock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, {
    dir,
    args: [
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=one,writable=on,x-max-connections=1',
      '--export', 'type=nbd,id=e1,node-name=f0,name=other',
      '--qmp', `unix:${qmpSock}`,
    ],
  });
  const qmp = await QmpWire.connect(qmpSock);
  t.teardown(() => qmp.socket.destroy());
  const holder = await RawClient.connect(d.socket);
  t.teardown(() => holder.close());
  const { flags } = await holder.go('one', true);
  t.notOk(flags & NBD_FLAG_CAN_MULTI_CONN, 'x-max-connections=1: no CAN_MULTI_CONN (a second connection would be refused)');

  const info = await run('nbdinfo', [d.uri('one')]);
  t.not(info.code, 0, 'nbdinfo cannot open the full export');
  const img2 = await run('qemu-img', ['info', d.uri('one')]);
  t.not(img2.code, 0, 'qemu-img cannot either');
  t.match(img2.stderr, "export 'one' has reached its limit of 1 client (x-max-connections)", `qemu-img shows the server's message: ${img2.stderr.trim()}`);
  // INFO must answer as GO would; then GO on the same connection: one log line for the client.
  const raw = await RawClient.connect(d.socket);
  t.teardown(() => raw.close());
  await raw.greet();
  const name = Buffer.from('one');
  const data = Buffer.alloc(4 + name.length + 2);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  raw.sendOption(NBD_OPT_INFO, data);
  const r1 = await raw.optionReply();
  t.equal(r1.type, NBD_REP_ERR_POLICY, 'INFO: NBD_REP_ERR_POLICY');
  t.match(r1.data.toString(), /limit of 1 client/);
  raw.sendOption(NBD_OPT_EXPORT_NAME, name);
  t.ok(await raw.waitClosed(), 'EXPORT_NAME (no error reply exists): the connection ends');

  const other = await run('nbdinfo', ['--json', d.uri('other')]);
  t.equal(other.code, 0, `another export on the same node is not limited: ${other.stderr}`);
  t.equal(JSON.parse(other.stdout).exports[0].can_multi_conn, true, 'and keeps CAN_MULTI_CONN');

  const refused = logLines(d.stderr(), 'nbd-client-refused');
  t.equal(refused.length, 3, 'three clients refused, one line each (nbdinfo, qemu-img, the raw client that asked twice)');
  for (const l of refused) {
    t.equal(l.export, 'one');
    t.equal(l.limit, 1);
    t.match(l.reason, /x-max-connections/);
  }
  const s = await stats(qmp);
  t.same(s.exports.find((e) => e.name === 'one'), { name: 'one', clients: 1, 'max-connections': 1 }, 'x-query-nbd-server shows the export full');

  // The holder goes: nbdsh gets in and writes.
  holder.close();
  await until('the export is free', async () => (await stats(qmp)).exports.find((e) => e.name === 'one')!.clients === 0);
  const w = await nbdsh("h.pwrite(b'\\x5a' * 4096, 8192)\nh.flush()\nprint(h.can_multi_conn())", d.uri('one'));
  t.equal(w.code, 0, `nbdsh writes once the slot is free: ${w.stderr}`);
  t.equal(w.stdout.trim(), 'False', 'libnbd sees can_multi_conn false');
  const check = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x5a 8192 4096', img]);
  t.notMatch(check.stdout, /fail/i, 'the write reached the image');
  t.equal(await d.stop(), 0);
});

t.test('x-idle-timeout: a client doing nothing is disconnected with a log line; nbd-server-start takes it over QMP', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 4 * MiB);
  const qmpSock = path.join(dir, 'qmp.sock');
  const sock = path.join(dir, 'nbd.sock');
  const d = await startDaemon(t, {
    dir,
    nbdServer: false,
    args: ['--blockdev', `driver=file,node-name=f0,filename=${img}`, '--qmp', `unix:${qmpSock}`],
  });
  const qmp = await QmpWire.connect(qmpSock);
  t.teardown(() => qmp.socket.destroy());
  const bad = await qmp.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: sock } }, 'x-idle-timeout': -1 });
  t.equal(bad.error?.class, 'GenericError', 'a negative timeout is refused');
  const start = await qmp.cmd('nbd-server-start', { addr: { type: 'unix', data: { path: sock } }, 'x-idle-timeout': 1 });
  t.same(start.return, {}, JSON.stringify(start));
  t.same((await qmp.cmd('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'f0', name: 'disk' })).return, {});
  const c = await RawClient.connect(sock);
  t.teardown(() => c.close());
  await c.go('disk');
  // A request answered: the client was served before it went quiet.
  c.request(NBD_CMD_READ, 0, 4096, 7);
  t.equal((await c.simpleReply()).error, 0);
  await c.read(4096);
  t.ok(await c.waitClosed(20_000), 'the idle client is disconnected');
  const lines = logLines(d.stderr(), 'nbd-client-idle-timeout');
  t.equal(lines.length, 1, 'one line says why');
  t.equal(lines[0].seconds, 1);
  t.equal(lines[0].export, 'disk');
  t.equal(await d.stop(), 0);
});

t.test('buffer budget: clients that never read their replies are stopped, the others still served, nothing leaks', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 64 * MiB);
  const qmpSock = path.join(dir, 'qmp.sock');
  const sock = path.join(dir, 'nbd.sock');
  const limit = 8 * MiB;
  const d = await startDaemon(t, {
    dir,
    nbdServer: false,
    args: [
      '--nbd-server', `addr.type=unix,addr.path=${sock},x-buffer-limit=8M`,
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on',
      '--qmp', `unix:${qmpSock}`,
    ],
  });
  const qmp = await QmpWire.connect(qmpSock);
  t.teardown(() => qmp.socket.destroy());
  t.equal((await stats(qmp))['buffer-limit'], limit);

  // Two slow readers: each sends far more 1 MiB READs than any socket buffer holds, and reads nothing.
  const count = 1_000_000;
  const requests = Buffer.alloc(28 * count);
  for (let i = 0; i < count; i++) {
    const at = 28 * i;
    requests.writeUInt32BE(0x25609513, at);
    requests.writeUInt32BE(i, at + 12);
    requests.writeUInt32BE(((i * MiB) % (64 * MiB)) >>> 0, at + 20);
    requests.writeUInt32BE(MiB, at + 24);
  }
  const slow: RawClient[] = [];
  for (let i = 0; i < 2; i++) {
    const c = await RawClient.connect(sock);
    t.teardown(() => c.close());
    await c.go('disk');
    c.socket.pause(); // never read a reply
    c.write(requests);
    slow.push(c);
  }
  const slowIds = new Set<number>();
  await until('both slow readers are paused with their requests left unread', async () => {
    const s = await stats(qmp);
    const paused = s.connections.filter((c) => c.paused && c.requests > 0);
    paused.forEach((c) => slowIds.add(c.id));
    return paused.length === 2 && slow.every((c) => c.socket.writableLength > 0);
  });
  const s = await stats(qmp);
  for (const c of s.connections) {
    t.ok(c.requests < count / 100, `connection ${c.id} took ${c.requests} of ${count} requests and stopped reading`);
  }
  t.ok(slow.every((c) => c.socket.writableLength > 0), 'the clients\' writes are not being taken (their send buffers stay full)');
  // The bound: the limit and its reserve of half, plus at most one request per connection.
  // A connection holding under 64 KiB (an unsent reply header, say) may always take one more request.
  const bound = (n: number) => 1.5 * limit + n * (MiB + 64 * 1024);
  t.ok(s.buffered <= bound(s.connections.length), `buffered ${s.buffered} bytes <= 1.5 x ${limit} + one request and 64 KiB per connection`);
  t.ok(s.buffered >= limit / 2, `the budget is what stopped them (buffered ${s.buffered})`);

  // Another client is not starved: qemu-io writes and reads back 4 MiB (one request each, over its share).
  const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x6b 8M 4M', '-c', 'read -P 0x6b 8M 4M', d.uri('disk')], { timeoutMs: 60_000 });
  t.equal(io.code, 0, io.stderr);
  t.notMatch(io.stdout, /fail/i, `qemu-io is served while the slow readers hold the budget: ${io.stdout.trim().split('\n').join(' | ')}`);
  const after = await stats(qmp);
  t.ok(after.buffered <= bound(after.connections.length), `still bounded after (${after.buffered})`);

  // The slow readers go: every byte they were charged is given back.
  for (const c of slow) c.close();
  await until('the slow readers are gone', async () => (await stats(qmp)).connections.length === 0);
  // Reads still in flight at the close settle after it and give their bytes back then.
  await until('every charge is given back', async () => (await stats(qmp)).buffered === 0);
  t.equal((await stats(qmp)).buffered, 0, 'nothing is left charged to the budget');
  t.equal(await d.stop(), 0);
});

t.test('fio over a tight budget: 8 connections x 16 requests of 1 MiB write and verify their data while the budget holds them back', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 64 * MiB);
  const qmpSock = path.join(dir, 'qmp.sock');
  const sock = path.join(dir, 'nbd.sock');
  const limit = 4 * MiB;
  const d = await startDaemon(t, {
    dir,
    nbdServer: false,
    args: [
      '--nbd-server', `addr.type=unix,addr.path=${sock},x-buffer-limit=4M`,
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on',
      '--qmp', `unix:${qmpSock}`,
    ],
  });
  const qmp = await QmpWire.connect(qmpSock);
  t.teardown(() => qmp.socket.destroy());
  // Each job writes its own 8 MiB (offset_increment), then reads it back and checks every block.
  const jobs = 8;
  const r = await run('fio', [
    '--name=budget', '--ioengine=nbd', `--uri=nbd+unix:///disk?socket=${sock}`, '--rw=randwrite', '--bs=1M', '--iodepth=16',
    `--numjobs=${jobs}`, '--thread', '--size=8M', '--offset_increment=8M', '--verify=crc32c', '--do_verify=1', '--verify_fatal=1',
    '--verify_state_save=0', '--group_reporting', '--output-format=json',
  ], { timeoutMs: 120_000, cwd: dir });
  t.equal(r.code, 0, `fio wrote and verified: ${r.stderr.slice(-2000)}`);
  const job = JSON.parse(r.stdout.slice(r.stdout.indexOf('{'))).jobs[0];
  t.equal(job.error, 0, 'no fio error');
  t.equal(job.write.io_bytes, jobs * 8 * MiB, 'every job wrote its 8 MiB');
  t.equal(job.read.io_bytes, jobs * 8 * MiB, 'and read it all back for the verify');
  const s = await stats(qmp);
  t.ok(s['budget-waits'] > 0, `connections had to wait for the budget (${s['budget-waits']} times)`);
  // Per connection: one 1 MiB request on top of what it held when it was let through, which is
  // under 64 KiB (reply headers still unsent) once the total is past 1.5 x the limit.
  t.ok(s['buffered-peak'] <= 1.5 * limit + jobs * (MiB + 64 * 1024), `the peak (${s['buffered-peak']}) stayed within 1.5 x ${limit} + one request and 64 KiB per connection`);
  await until('the clients are gone and every charge given back', async () => {
    const now = await stats(qmp);
    return now.connections.length === 0 && now.buffered === 0;
  });
  t.equal(await d.stop(), 0);
});
