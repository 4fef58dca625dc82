/**
 * The QMP wire, driven over a real unix socket of a running `vdisk serve
 * --qmp`: greeting, negotiation, framing (several commands in one write, one
 * split across writes, single quotes, ids of any type), QEMU's error classes
 * and texts, events to every negotiated client, clients that send garbage or
 * vanish mid-command, and 1000 commands without growing memory.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { tempDir } from '../helpers/tools.js';

async function daemon(t: Parameters<typeof startDaemon>[0]) {
  const dir = tempDir(t);
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
  return { d, sock, dir };
}

t.test('greeting, negotiation and the socket itself', async (t) => {
  const { sock, d } = await daemon(t);
  t.equal(fs.statSync(sock).mode & 0o777, 0o600, 'the socket is mode 0600');
  t.match(d.stdout(), new RegExp(`QMP on unix:${sock}`), 'the banner names the control port');
  const w = await QmpWire.connect(sock, false);
  const greeting = w.messages[0];
  t.match(greeting, { QMP: { version: { qemu: { major: Number, minor: Number, micro: Number }, package: String }, capabilities: Array } });
  t.same(greeting.QMP!.capabilities, ['oob'], "offers 'oob' as QEMU does");

  let r = await w.cmd('query-version');
  t.same(r.error, { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" });
  r = await w.cmd('qmp_capabilities', { enable: ['bogus'] });
  t.same(r.error, { class: 'GenericError', desc: "Parameter 'enable[0]' does not accept value 'bogus'" }, 'a bad capability');
  r = await w.cmd('qmp_capabilities');
  t.same(r.return, {}, 'negotiation');
  r = await w.cmd('qmp_capabilities');
  t.same(r.error, { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete, command ignored' });
  r = await w.cmd('query-version');
  t.match(r.return, { qemu: { major: 7, minor: 2 }, package: /vdisk/ });
  w.close();

  const o = await QmpWire.connect(sock, false);
  t.same((await o.cmd('qmp_capabilities', { enable: ['oob'] })).return, {}, "enabling 'oob' works (Python's QMPClient does)");
  o.send({ 'exec-oob': 'query-version', id: 'x' });
  t.same((await o.waitFor((m) => m.id === 'x')).error, { class: 'GenericError', desc: 'The command query-version does not support OOB' });
  o.close();
});

t.test('framing and request errors, with QEMU texts', async (t) => {
  const { sock } = await daemon(t);
  const w = await QmpWire.connect(sock);
  const next = async (raw: string) => {
    const n = w.messages.length;
    w.sendRaw(raw);
    return w.waitFor(() => true, 10_000, n);
  };
  t.same((await next('[1]')).error, { class: 'GenericError', desc: 'QMP input must be a JSON object' });
  t.same((await next('{"foo": 1}')).error, { class: 'GenericError', desc: "QMP input member 'foo' is unexpected" });
  t.same((await next('{"execute": 1}')).error, { class: 'GenericError', desc: "QMP input member 'execute' must be a string" });
  t.same((await next('{"arguments": {}}')).error, { class: 'GenericError', desc: "QMP input lacks member 'execute'" });
  t.same((await next('{"execute": "query-version", "arguments": []}')).error, { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" });
  t.same((await next('{"execute": "nope", "id": 5}')), { error: { class: 'CommandNotFound', desc: 'The command nope has not been found' }, id: 5 }, 'the id is echoed on errors');
  const bad = await next('{"execute": tru}');
  t.equal(bad.error?.class, 'GenericError');
  t.match(bad.error?.desc, /^JSON parse error/);
  t.equal(bad.id, undefined, 'no id when the request could not be parsed');

  // A control character throws the partial value away; the next value parses.
  const n = w.messages.length;
  w.sendRaw('{"execute": "query-ver\x01{"execute": "query-version", "id": "after"}');
  const after = await w.waitFor((m) => m.id === 'after', 10_000, n);
  t.ok(after.return, 'the parser resynchronises after a control character');

  // Single quotes (QEMU's extension), several values in one write, one value in pieces, ids of any type.
  w.sendRaw(`{'execute': 'query-version', 'id': 'single'}{"execute":"query-version","id":{"a":[1,2]}}  {"execute":"query-`);
  w.sendRaw('version","id":7.5}');
  t.ok((await w.waitFor((m) => m.id === 'single')).return, 'single-quoted strings');
  t.ok((await w.waitFor((m) => JSON.stringify(m.id) === '{"a":[1,2]}')).return, 'an object id is echoed verbatim');
  t.ok((await w.waitFor((m) => m.id === 7.5)).return, 'a request split across writes');

  // Argument checking happens before anything is done.
  const errs: Array<[string, unknown, string]> = [
    ['blockdev-del', {}, "Parameter 'node-name' is missing"],
    ['blockdev-del', { 'node-name': 'x', extra: 1 }, "Parameter 'extra' is unexpected"],
    ['blockdev-del', { 'node-name': 5 }, "Invalid parameter type for 'node-name', expected: string"],
    ['block-export-del', { id: 'e', mode: 'soft' }, "Parameter 'mode' does not accept value 'soft'"],
    ['block_resize', { 'node-name': 'x', size: 'big' }, "Invalid parameter type for 'size', expected: integer"],
    ['blockdev-add', { driver: 'file', 'node-name': 'f' }, "Parameter 'filename' is missing"],
    ['blockdev-add', { driver: 'nope', 'node-name': 'f' }, "Parameter 'driver' does not accept value 'nope'"],
    ['nbd-server-start', { addr: { type: 'unix', path: '/x' } }, "Parameter 'addr.data' is missing"],
    ['query-named-block-nodes', { flat: 'yes' }, "Invalid parameter type for 'flat', expected: boolean"],
  ];
  for (const [cmd, args, desc] of errs) {
    const r = await w.cmd(cmd, args);
    t.same(r.error, { class: 'GenericError', desc }, `${cmd} ${JSON.stringify(args)}`);
  }
  t.same(await w.ok('query-named-block-nodes'), [], 'and nothing was created by the failed commands');
  w.close();
});

t.test('events go to every negotiated client, in order with replies', async (t) => {
  const { sock, dir } = await daemon(t);
  const a = await QmpWire.connect(sock);
  const b = await QmpWire.connect(sock);
  const silent = await QmpWire.connect(sock, false);
  await a.ok('blockdev-create', { 'job-id': 'j1', options: { driver: 'file', filename: path.join(dir, 'new.img'), size: 1048576 } });
  for (const w of [a, b]) {
    await w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'concluded');
    t.same(
      w.events('JOB_STATUS_CHANGE').map((e) => e.data),
      ['created', 'running', 'waiting', 'pending', 'concluded'].map((status) => ({ status, id: 'j1' })),
      'the job status sequence of blockdev-create, on each client',
    );
    const ts = w.events()[0].timestamp!;
    t.ok(Number.isInteger(ts.seconds) && Number.isInteger(ts.microseconds) && ts.microseconds < 1e6, 'timestamps are seconds and microseconds');
    t.ok(Math.abs(ts.seconds - Date.now() / 1000) < 60, 'of the wall clock');
  }
  t.equal(fs.statSync(path.join(dir, 'new.img')).size, 1048576, 'the file was created');
  await b.ok('job-dismiss', { id: 'j1' });
  await a.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'null');
  t.same(await a.ok('query-jobs'), [], 'a dismissed job is gone');
  await new Promise((r) => setTimeout(r, 200));
  t.same(silent.events(), [], 'a client that has not negotiated gets no events');
  for (const w of [a, b, silent]) w.close();
});

t.test('garbage, half commands and clients that vanish do not hurt the daemon', async (t) => {
  const { sock, dir, d } = await daemon(t);
  const junk = await QmpWire.connect(sock);
  junk.sendRaw(Buffer.from([0xff, 0xfe, 0x00, 0x41, 0x7b, 0x7b, 0x5b]));
  junk.sendRaw('{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "half"');
  junk.close();
  // A client that sends a command and disconnects before the reply.
  const gone = await QmpWire.connect(sock);
  gone.send({ execute: 'blockdev-create', arguments: { 'job-id': 'g', options: { driver: 'file', filename: path.join(dir, 'g.img'), size: 65536 } } });
  gone.close();
  // Very deep nesting is refused, not a stack overflow.
  const deep = await QmpWire.connect(sock);
  deep.sendRaw('['.repeat(5000));
  const e = await deep.waitFor((m) => m.error !== undefined);
  t.match(e.error?.desc, /JSON parse error/);
  deep.close();

  const w = await QmpWire.connect(sock);
  t.same(await w.ok('query-version') !== undefined, true, 'the daemon still answers');
  const nodes = (await w.ok('query-named-block-nodes')) as Array<{ 'node-name': string }>;
  t.notOk(nodes.some((n) => n['node-name'] === 'half'), 'a half-sent command was not executed');
  const jobs = (await w.ok('query-jobs')) as Array<{ id: string; status: string }>;
  t.same(jobs.map((j) => [j.id, j.status]), [['g', 'concluded']], 'the vanished client’s command ran to the end');
  w.close();
  t.equal(d.proc.exitCode, null, 'still running');
});

t.test('1000 commands in a row: every reply, and memory stays flat', async (t) => {
  const { sock, d } = await daemon(t);
  const w = await QmpWire.connect(sock);
  const rss = () => Number(/VmRSS:\s+(\d+)/.exec(fs.readFileSync(`/proc/${d.proc.pid}/status`, 'utf8'))![1]) * 1024;
  const round = async (n: number) => {
    for (let i = 0; i < n; i++) {
      await w.ok('blockdev-add', { driver: 'null-co', 'node-name': `n${i}`, size: 1048576 });
      await w.ok('query-named-block-nodes');
      await w.ok('blockdev-del', { 'node-name': `n${i}` });
    }
  };
  await round(100); // warm up: JIT, heap growth
  const before = rss();
  await round(334);
  const after = rss();
  t.ok(after - before < 32 * 1024 * 1024, `RSS grew by ${((after - before) / 1048576).toFixed(1)} MiB over 1002 commands (limit 32 MiB)`);
  t.same(await w.ok('query-named-block-nodes'), [], 'nothing left behind');
  w.close();
});

t.test('quit: replies, then the daemon shuts down cleanly', async (t) => {
  const { sock, d } = await daemon(t);
  const w = await QmpWire.connect(sock);
  t.same((await w.cmd('quit')).return, {});
  const code = await new Promise<number | null>((resolve) => d.proc.on('exit', (c) => resolve(c)));
  t.equal(code, 0, 'exit status 0');
  t.notOk(fs.existsSync(sock), 'the socket file is removed');
});

t.test('the TCP control port listens on loopback only unless told otherwise', async (t) => {
  const dir = tempDir(t);
  const d = await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', 'tcp:127.0.0.1:0', '--log-level', 'warn'] });
  const port = Number(/QMP on tcp:127\.0\.0\.1:(\d+)/.exec(d.stdout())?.[1]);
  t.ok(port > 0, 'the banner shows the port the kernel picked');
  const r = await startDaemon(t, { dir: tempDir(t), nbdServer: false, args: ['--qmp', 'tcp:0.0.0.0:0'] }).then(
    () => 'started',
    (err: Error) => err.message,
  );
  t.match(r, /refusing to listen on 0\.0\.0\.0/, 'a non-loopback address is refused at start');
});
