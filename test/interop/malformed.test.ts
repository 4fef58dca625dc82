/**
 * Bad input from a client gets the protocol's error or a clean disconnect,
 * and nothing else: the daemon and its other clients go on, and data the
 * daemon acknowledged stays written.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { RawClient } from '../helpers/nbd-raw.js';
import { patternBuffer, requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const NBD_CMD_READ = 0;
const NBD_CMD_WRITE = 1;
const NBD_CMD_FLUSH = 3;
const NBD_EINVAL = 22;
const NBD_ENOSPC = 28;
const NBD_REP_ERR_UNSUP = 2 ** 31 + 1;
const NBD_REP_ERR_INVALID = 2 ** 31 + 3;
const NBD_REP_ERR_UNKNOWN = 2 ** 31 + 6;
const NBD_REP_ERR_TOO_BIG = 2 ** 31 + 9;

async function setup(t: Tap.Test) {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.img'), 4 * MiB);
  const d = await startDaemon(t, {
    dir,
    args: ['--blockdev', `driver=file,node-name=f0,filename=${img}`, '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on'],
  });
  /** A real client still gets served. */
  const stillServes = async (what: string) => {
    const r = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 4k', d.uri('disk')], { timeoutMs: 20_000 });
    t.equal(r.code, 0, `the daemon still serves after ${what}: ${r.stderr}`);
    t.equal(d.proc.exitCode, null, 'the daemon is still running');
  };
  return { d, img, stillServes };
}

t.test('handshake: garbage, unknown options, oversized options, half a handshake', async (t) => {
  requireTool(t, 'qemu-io');
  const { d, stillServes } = await setup(t);

  const garbage = await RawClient.connect(d.socket);
  await garbage.read(18);
  garbage.write(Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n'));
  t.ok(await garbage.waitClosed(), 'garbage client flags: the server hangs up');
  await stillServes('garbage');

  const c = await RawClient.connect(d.socket);
  await c.greet();
  c.sendOption(99, Buffer.from('whatever'));
  let r = await c.optionReply();
  t.equal(r.type, NBD_REP_ERR_UNSUP, 'unknown option: ERR_UNSUP');
  c.sendOption(3, Buffer.from('x')); // LIST with data
  r = await c.optionReply();
  t.equal(r.type, NBD_REP_ERR_INVALID, 'LIST with data: ERR_INVALID');
  // Declare 100 MiB of option data, send a little of it: the server refuses and skips it unread.
  c.sendOption(6, Buffer.alloc(0), 100 * MiB);
  r = await c.optionReply();
  t.equal(r.type, NBD_REP_ERR_TOO_BIG, 'oversized option: ERR_TOO_BIG');
  c.write(Buffer.alloc(100 * MiB));
  // INFO for an unknown export.
  const name = Buffer.from('nope');
  const data = Buffer.alloc(4 + name.length + 2);
  data.writeUInt32BE(name.length, 0);
  name.copy(data, 4);
  c.sendOption(6, data);
  r = await c.optionReply(10_000);
  t.equal(r.type, NBD_REP_ERR_UNKNOWN, 'after the skipped data, the session goes on: unknown export is ERR_UNKNOWN');
  t.match(r.data.toString(), /nope/);
  // Malformed INFO: name length past the data.
  const bad = Buffer.alloc(6);
  bad.writeUInt32BE(1000, 0);
  c.sendOption(6, bad);
  r = await c.optionReply();
  t.equal(r.type, NBD_REP_ERR_INVALID, 'inconsistent lengths: ERR_INVALID');
  c.close();

  // A client that stops halfway through the handshake does not hold up others.
  const half = await RawClient.connect(d.socket);
  await half.read(10);
  await stillServes('a half-open handshake');
  half.close();
});

t.test('a client that never finishes its handshake is dropped after the handshake timeout', async (t) => {
  requireTool(t, 'qemu-io');
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.img'), MiB);
  const sock = path.join(dir, 'short.sock');
  const d = await startDaemon(t, {
    dir,
    nbdServer: false,
    args: [
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--nbd-server', `addr.type=unix,addr.path=${sock},handshake-timeout=1`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=disk',
    ],
  });
  const slow = await RawClient.connect(sock);
  await slow.greet();
  const started = Date.now();
  t.ok(await slow.waitClosed(5000), 'the server hung up');
  const waited = Date.now() - started;
  t.ok(waited >= 800 && waited < 4000, `after about a second (${waited} ms)`);
  t.match(d.stderr(), /nbd-handshake-timeout/, 'and logged why');
  // A client that completed its handshake is not subject to the timeout.
  const ok = await RawClient.connect(sock);
  await ok.go('disk');
  await new Promise((r) => setTimeout(r, 1500));
  ok.request(NBD_CMD_READ, 0, 512, 1);
  t.same(await ok.simpleReply(), { error: 0, cookie: 1 }, 'a connected client is still served after the timeout');
  ok.close();
});

t.test('transmission: bad requests get errors and the connection goes on', async (t) => {
  requireTool(t, 'qemu-io');
  const { d, stillServes } = await setup(t);
  const c = await RawClient.connect(d.socket);
  const { size } = await c.go('disk');
  t.equal(size, BigInt(4 * MiB));

  c.request(42, 0, 512, 1);
  t.same(await c.simpleReply(), { error: NBD_EINVAL, cookie: 1 }, 'unknown command: EINVAL');
  c.request(NBD_CMD_READ, 4 * MiB - 100, 512, 2);
  t.same(await c.simpleReply(), { error: NBD_EINVAL, cookie: 2 }, 'read past the end: EINVAL');
  c.request(NBD_CMD_WRITE, 4 * MiB - 100, 512, 3, 0, Buffer.alloc(512, 1));
  t.same(await c.simpleReply(), { error: NBD_ENOSPC, cookie: 3 }, 'write past the end: ENOSPC, payload skipped');
  c.request(NBD_CMD_READ, 0, 512, 4, 0x40);
  t.same(await c.simpleReply(), { error: NBD_EINVAL, cookie: 4 }, 'unknown flag: EINVAL');
  c.request(NBD_CMD_READ, 0, 512, 5, 4 /* DF without structured replies */);
  t.same(await c.simpleReply(), { error: NBD_EINVAL, cookie: 5 }, 'DF without structured replies: EINVAL');
  c.request(NBD_CMD_READ, 2 ** 60, 512, 6);
  t.same(await c.simpleReply(), { error: NBD_EINVAL, cookie: 6 }, 'offset beyond 2^53: EINVAL');

  // The stream is still in step: a write and a read work.
  const data = patternBuffer(4096, 9);
  c.request(NBD_CMD_WRITE, 8192, 4096, 7, 0, data);
  t.same(await c.simpleReply(), { error: 0, cookie: 7 });
  c.request(NBD_CMD_READ, 8192, 4096, 8);
  t.same(await c.simpleReply(), { error: 0, cookie: 8 });
  t.ok((await c.read(4096)).equals(data), 'read back what was written');

  // Bad magic: the server cannot trust anything after it and hangs up.
  c.request(NBD_CMD_READ, 0, 512, 9, 0, undefined, 0xdeadbeef);
  t.ok(await c.waitClosed(), 'bad request magic: disconnect');
  await stillServes('a bad magic');
});

t.test('a client that vanishes mid-request loses nothing it was told is written', async (t) => {
  requireTool(t, 'qemu-io');
  const { d, img, stillServes } = await setup(t);
  const c = await RawClient.connect(d.socket);
  await c.go('disk');
  // Acknowledged write.
  const acked = patternBuffer(65536, 5);
  c.request(NBD_CMD_WRITE, 0, 65536, 1, 0, acked);
  t.same(await c.simpleReply(), { error: 0, cookie: 1 });
  // A burst of requests in flight, then a write cut short, then gone.
  for (let i = 0; i < 32; i++) c.request(NBD_CMD_READ, i * 65536, 65536, 100 + i);
  c.request(NBD_CMD_FLUSH, 0, 0, 200);
  const cut = Buffer.alloc(28 + 1000);
  cut.writeUInt32BE(0x25609513, 0);
  cut.writeUInt16BE(NBD_CMD_WRITE, 6);
  cut.writeBigUInt64BE(300n, 8);
  cut.writeBigUInt64BE(BigInt(MiB), 16);
  cut.writeUInt32BE(65536, 24);
  cut.fill(0xee, 28);
  c.write(cut);
  c.close();
  await stillServes('a client vanishing mid-request');
  const onDisk = fs.readFileSync(img);
  t.ok(onDisk.subarray(0, 65536).equals(acked), 'the acknowledged write is in the image');
  t.ok(onDisk.subarray(MiB, MiB + 65536).equals(Buffer.alloc(65536)), 'the write that never arrived whole was not applied');
});

t.test('a write larger than 32 MiB is refused and the connection closed', async (t) => {
  requireTool(t, 'qemu-io');
  const { d, stillServes } = await setup(t);
  const c = await RawClient.connect(d.socket);
  await c.go('disk');
  c.request(NBD_CMD_WRITE, 0, 64 * MiB, 1);
  const r = await c.simpleReply();
  t.equal(r.error, NBD_EINVAL);
  t.ok(await c.waitClosed(), 'then the server hangs up: the payload cannot be trusted');
  await stillServes('an oversized write');
});
