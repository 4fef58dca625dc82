/**
 * TLS on vdisk's NBD server and in its nbd client driver, against the real
 * clients and servers: nbdinfo/nbdsh (libnbd, GnuTLS), qemu-img, qemu-io and
 * qemu-nbd (QEMU, GnuTLS). Certificates and keys are made here with certtool
 * and psktool (test/helpers/tls.ts).
 */
import t from 'tap';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { type DaemonHandle, startDaemon, waitForSocket } from '../helpers/daemon.js';
import { RawClient } from '../helpers/nbd-raw.js';
import { QmpWire } from '../helpers/qmp.js';
import { type Pki, makePki } from '../helpers/tls.js';
import { VDISK, patternBuffer, requireTools, run, sparseFile, tempDir } from '../helpers/tools.js';

interface TestLike {
  teardown(fn: () => unknown): void;
  fail(message: string): void;
}

const MiB = 1024 * 1024;
const NBD_OPT_EXPORT_NAME = 1;
const NBD_OPT_ABORT = 2;
const NBD_OPT_LIST = 3;
const NBD_OPT_STARTTLS = 5;
const NBD_OPT_INFO = 6;
const NBD_OPT_GO = 7;
const NBD_OPT_STRUCTURED_REPLY = 8;
const NBD_REP_ACK = 1;
const NBD_REP_ERR_POLICY = 2 ** 31 + 2;
const NBD_REP_ERR_INVALID = 2 ** 31 + 3;
const NBD_REP_ERR_TLS_REQD = 2 ** 31 + 5;

if (!requireTools(t, 'certtool', 'psktool', 'nbdinfo', 'nbdsh', 'qemu-img', 'qemu-io', 'qemu-nbd')) process.exit(1);

const pkiDir = tempDir(t, 'vdisk-pki-');
let pki: Pki;
t.before(async () => {
  pki = await makePki(pkiDir);
});

/** vdisk serving a 64 MiB writable file as 'disk' on a unix socket with the given TLS options. */
async function serveTls(t: TestLike, objects: string[], serverExtra: string, extra: string[] = []): Promise<DaemonHandle & { img: string }> {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 64 * MiB);
  const socket = path.join(dir, 'nbd.sock');
  const d = await startDaemon(t, {
    dir,
    nbdServer: false,
    args: [
      ...objects.flatMap((o) => ['--object', o]),
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--nbd-server', `addr.type=unix,addr.path=${socket}${serverExtra}`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on',
      ...extra,
    ],
  });
  return Object.assign(d, { img });
}

const x509Server = () => `tls-creds-x509,id=tls0,dir=${pki.server},endpoint=server`;
const tlsUri = (d: DaemonHandle, certDir: string) => `nbds+unix:///disk?socket=${d.socket}&tls-certificates=${certDir}`;
/** qemu-img/qemu-io: --object for client credentials and the image options of the export. */
const qemuTls = (d: DaemonHandle, certDir: string, export_ = 'disk') => ({
  object: `tls-creds-x509,id=tlsc,dir=${certDir},endpoint=client`,
  image: `driver=nbd,server.type=unix,server.path=${d.socket},export=${export_},tls-creds=tlsc,tls-hostname=localhost`,
});

/** Waits (bounded) for a log line matching re; returns the whole log. */
async function waitForLog(d: DaemonHandle, re: RegExp, timeoutMs = 10_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  while (!re.test(d.stderr()) && Date.now() < deadline) await new Promise((r) => setTimeout(r, 50));
  return d.stderr();
}

t.test('x509: nbdinfo, qemu-img and qemu-io through TLS, and the data survives the round trip', async (t) => {
  const d = await serveTls(t, [x509Server()], ',tls-creds=tls0');
  t.match(d.stdout(), /nbds\+unix:\/\/\/disk\?socket=.*tls-certificates=/, 'the banner shows a TLS URI');

  const info = await run('nbdinfo', ['--json', tlsUri(d, pki.client)]);
  t.equal(info.code, 0, info.stderr);
  const j = JSON.parse(info.stdout);
  t.equal(j.TLS, true, 'nbdinfo negotiated TLS');
  t.equal(j.exports[0]['export-size'], 64 * MiB);

  const q = qemuTls(d, pki.client);
  const img = await run('qemu-img', ['info', '--output=json', '--object', q.object, '--image-opts', q.image]);
  t.equal(img.code, 0, img.stderr);
  t.equal(JSON.parse(img.stdout)['virtual-size'], 64 * MiB);

  const io = await run('qemu-io', ['--object', q.object, '--image-opts', q.image, '-c', 'write -P 0x5a 1M 3M', '-c', 'read -P 0x5a 1M 3M', '-c', 'read -P 0 0 1M']);
  t.equal(io.code, 0, io.stderr);
  t.notMatch(io.stdout + io.stderr, /fail|error|mismatch/i, io.stdout);

  // A source with data and holes goes in over TLS and compares equal coming back over TLS.
  const src = sparseFile(path.join(d.dir, 'src.raw'), 64 * MiB);
  const fd = fs.openSync(src, 'r+');
  fs.writeSync(fd, patternBuffer(5 * MiB, 7), 0, 5 * MiB, 0);
  fs.writeSync(fd, patternBuffer(3 * MiB + 512, 8), 0, 3 * MiB + 512, 40 * MiB + 4096);
  fs.closeSync(fd);
  const conv = await run('qemu-img', ['convert', '-n', '--object', q.object, '-f', 'raw', '--target-image-opts', src, q.image], { timeoutMs: 120_000 });
  t.equal(conv.code, 0, conv.stderr);
  const cmp = await run('qemu-img', ['compare', '--object', q.object, '--image-opts', `driver=raw,file.driver=file,file.filename=${src}`, q.image], { timeoutMs: 120_000 });
  t.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);

  // libnbd reads the same bytes through its own TLS stack.
  const sh = await run('nbdsh', ['-c', `
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(${JSON.stringify(pki.client)})
h.connect_uri(${JSON.stringify(`nbd+unix:///disk?socket=${d.socket}`)})
assert h.get_tls_negotiated()
buf = h.pread(512, 40 * 1024 * 1024 + 4096)
print(buf.hex())
`], { env: { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` } });
  t.equal(sh.code, 0, sh.stderr);
  t.equal(sh.stdout.trim(), patternBuffer(512, 8).toString('hex'), 'nbdsh over TLS reads what qemu-img wrote');
  t.match(d.stderr(), /"tls":"CN=client1,O=vdisk test"/, 'the connection log names the client by its DN');
});

t.test('before STARTTLS every option but ABORT is refused; STARTTLS rules', async (t) => {
  const d = await serveTls(t, [x509Server()], ',tls-creds=tls0');

  const plain = await run('nbdinfo', [`nbd+unix:///disk?socket=${d.socket}`]);
  t.not(plain.code, 0, 'nbdinfo without TLS fails');
  t.match(plain.stderr, /disk/, plain.stderr);
  // libnbd 1.14 words NBD_REP_ERR_TLS_REQD as ENOTSUP (the same against qemu-nbd); QEMU says it plainly.
  const plainQemu = await run('qemu-img', ['info', `nbd+unix:///disk?socket=${d.socket}`]);
  t.not(plainQemu.code, 0, 'qemu-img without TLS fails');
  t.match(plainQemu.stderr, /TLS negotiation required before option 7 \(go\)[\s\S]*not permitted before TLS/);

  const c = await RawClient.connect(d.socket);
  t.teardown(() => c.close());
  await c.greet();
  for (const [option, data] of [
    [NBD_OPT_LIST, Buffer.alloc(0)],
    [NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)],
    [NBD_OPT_INFO, Buffer.from([0, 0, 0, 4, ...Buffer.from('disk'), 0, 0])],
    [NBD_OPT_GO, Buffer.from([0, 0, 0, 4, ...Buffer.from('disk'), 0, 0])],
  ] as const) {
    c.sendOption(option, data);
    const r = await c.optionReply();
    t.equal(r.type, NBD_REP_ERR_TLS_REQD, `option ${option} before TLS gets NBD_REP_ERR_TLS_REQD`);
    t.match(r.data.toString(), /not permitted before TLS/);
  }
  c.sendOption(NBD_OPT_STARTTLS, Buffer.from('x'));
  t.equal((await c.optionReply()).type, NBD_REP_ERR_INVALID, 'STARTTLS with data is invalid');

  // STARTTLS, the handshake over the same socket, and then a second STARTTLS is invalid.
  c.sendOption(NBD_OPT_STARTTLS);
  const ack = await c.optionReply();
  t.equal(ack.type, NBD_REP_ACK);
  const ca = fs.readFileSync(path.join(pki.client, 'ca-cert.pem'));
  const secure = tls.connect({
    socket: c.socket,
    ca,
    cert: fs.readFileSync(path.join(pki.client, 'client-cert.pem')),
    key: fs.readFileSync(path.join(pki.client, 'client-key.pem')),
    servername: 'localhost',
  });
  await new Promise<void>((resolve, reject) => {
    secure.once('secureConnect', () => resolve());
    secure.once('error', reject);
  });
  t.ok(secure.authorized, `the server's certificate verifies (${secure.authorizationError ?? 'ok'})`);
  const s = RawClient.over(secure);
  s.sendOption(NBD_OPT_STARTTLS);
  const again = await s.optionReply();
  t.equal(again.type, NBD_REP_ERR_INVALID, 'a second STARTTLS is invalid');
  t.match(again.data.toString(), /already/);
  s.sendOption(NBD_OPT_LIST);
  const listed = await s.optionReply();
  t.equal(listed.type, 2, 'after TLS, NBD_OPT_LIST answers');
  t.equal((await s.optionReply()).type, NBD_REP_ACK);
  s.sendOption(NBD_OPT_ABORT);
  t.equal((await s.optionReply()).type, NBD_REP_ACK);
  secure.destroy();

  // NBD_OPT_EXPORT_NAME has no error reply: before TLS it ends the connection.
  const e = await RawClient.connect(d.socket);
  t.teardown(() => e.close());
  await e.greet();
  e.sendOption(NBD_OPT_EXPORT_NAME, Buffer.from('disk'));
  t.ok(await e.waitClosed(), 'NBD_OPT_EXPORT_NAME before TLS closes the connection');

  // ABORT is allowed before TLS.
  const a = await RawClient.connect(d.socket);
  t.teardown(() => a.close());
  await a.greet();
  a.sendOption(NBD_OPT_ABORT);
  t.equal((await a.optionReply()).type, NBD_REP_ACK, 'NBD_OPT_ABORT is answered before TLS');

  // Without tls-creds, STARTTLS is refused by policy, as before.
  const noTls = await serveTls(t, [], '');
  const p = await RawClient.connect(noTls.socket);
  t.teardown(() => p.close());
  await p.greet();
  p.sendOption(NBD_OPT_STARTTLS);
  t.equal((await p.optionReply()).type, NBD_REP_ERR_POLICY, 'no tls-creds: NBD_REP_ERR_POLICY');
});

t.test('x509: a client certificate from another CA, or none, is refused and logged', async (t) => {
  const d = await serveTls(t, [x509Server()], ',tls-creds=tls0');
  // GnuTLS clients only offer a certificate from a CA the server names, so nbdinfo sends none.
  const rogue = await run('nbdinfo', [tlsUri(d, pki.rogue)]);
  t.not(rogue.code, 0, 'nbdinfo with a certificate from another CA is refused');
  let log = await waitForLog(d, /the client sent no certificate/);
  t.match(log, /nbd-tls-client-refused.*the client sent no certificate/, 'logged with the reason');
  const none = await run('nbdinfo', [tlsUri(d, pki.nocert)]);
  t.not(none.code, 0, 'no client certificate is refused');

  // OpenSSL's client sends it anyway: the server checks it against its CA and refuses.
  const c = await RawClient.connect(d.socket);
  t.teardown(() => c.close());
  await c.greet();
  c.sendOption(NBD_OPT_STARTTLS);
  t.equal((await c.optionReply()).type, NBD_REP_ACK);
  const secure = tls.connect({
    socket: c.socket,
    ca: fs.readFileSync(path.join(pki.rogue, 'ca-cert.pem')),
    cert: fs.readFileSync(path.join(pki.rogue, 'client-cert.pem')),
    key: fs.readFileSync(path.join(pki.rogue, 'client-key.pem')),
    servername: 'localhost',
  });
  secure.on('error', () => undefined);
  const s = RawClient.over(secure);
  s.sendOption(NBD_OPT_LIST);
  t.ok(await s.waitClosed(), 'the server hangs up on a certificate from another CA');
  log = await waitForLog(d, /nbd-tls-client-refused.*CN=client1/);
  t.match(log, /"message":"nbd-tls-client-refused","peer":"unix","reason":"certificate of CN=client1,O=vdisk test not accepted: [A-Z_]+/, 'logged with the DN and the reason');

  // QEMU checks its own certificate against its CA before connecting.
  const q = qemuTls(d, pki.rogue);
  const img = await run('qemu-img', ['info', '--object', q.object, '--image-opts', q.image]);
  t.not(img.code, 0, 'qemu-img with the wrong certificate fails');

  // The server's certificate does not carry the name the client expects: the client refuses.
  const good = qemuTls(d, pki.client);
  const wrongName = await run('qemu-img', ['info', '--object', good.object, '--image-opts', good.image.replace('tls-hostname=localhost', 'tls-hostname=elsewhere')]);
  t.not(wrongName.code, 0);
  t.match(wrongName.stderr, /hostname/);
});

t.test('authz-simple lets one DN in; authz-list matches with globs (QMP object-add, object-del)', async (t) => {
  // The DN has a comma, written twice in the key=value syntax.
  const d = await serveTls(t, [x509Server(), `authz-simple,id=auth0,identity=${pki.client1Dn.replace(/,/g, ',,')}`], ',tls-creds=tls0,tls-authz=auth0');
  const ok = await run('nbdinfo', [tlsUri(d, pki.client)]);
  t.equal(ok.code, 0, ok.stderr);
  const denied = await run('nbdinfo', [tlsUri(d, pki.client2)]);
  t.not(denied.code, 0, 'another DN from the same CA is refused');
  const log = await waitForLog(d, /is denied/);
  t.match(log, /nbd-tls-client-refused.*TLS authz check for CN=client2,O=vdisk test is denied/);

  // The same over QMP, with authz-list.
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 16 * MiB);
  const qmpSock = path.join(dir, 'qmp.sock');
  const q = await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', `unix:${qmpSock}`, '--blockdev', `driver=file,node-name=f0,filename=${img}`] });
  const w = await QmpWire.connect(qmpSock);
  t.teardown(() => w.close());
  const nbdSock = path.join(dir, 'nbd.sock');
  const addr = { type: 'unix', data: { path: nbdSock } };

  let r = await w.cmd('nbd-server-start', { addr, 'tls-creds': 'tls0' });
  t.match(r.error?.desc, "No TLS credentials with id 'tls0'");
  r = await w.cmd('object-add', { 'qom-type': 'tls-creds-x509', id: 'tlsc', dir: pki.client, endpoint: 'client' });
  t.same(r.return, {});
  r = await w.cmd('nbd-server-start', { addr, 'tls-creds': 'tlsc' });
  t.match(r.error?.desc, 'Expected TLS credentials for a server endpoint');
  r = await w.cmd('nbd-server-start', { addr, 'tls-authz': 'authz0' });
  t.match(r.error?.desc, 'tls-authz is not supported without tls-creds');
  r = await w.cmd('object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: path.join(dir, 'nowhere'), endpoint: 'server' });
  t.match(r.error?.desc, /Unable to access credentials .*nowhere\/ca-cert.pem/);
  await w.ok('object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: pki.server, endpoint: 'server', 'verify-peer': true });
  r = await w.cmd('object-add', { 'qom-type': 'tls-creds-x509', id: 'tls0', dir: pki.server, endpoint: 'server' });
  t.match(r.error?.desc, /duplicate/);
  await w.ok('object-add', {
    'qom-type': 'authz-list',
    id: 'authz0',
    policy: 'deny',
    rules: [
      { match: 'CN=client2,*', policy: 'deny', format: 'glob' },
      { match: 'CN=client?,O=vdisk test', policy: 'allow', format: 'glob' },
    ],
  });
  await w.ok('nbd-server-start', { addr, 'tls-creds': 'tls0', 'tls-authz': 'authz0' });
  await w.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'f0', name: 'disk', writable: true });
  const uri = (certs: string) => `nbds+unix:///disk?socket=${nbdSock}&tls-certificates=${certs}`;
  const one = await run('nbdinfo', [uri(pki.client)]);
  t.equal(one.code, 0, one.stderr);
  const two = await run('nbdinfo', [uri(pki.client2)]);
  t.not(two.code, 0, 'client2 matches the deny rule first');
  t.match(await waitForLog(q, /is denied/), /TLS authz check for CN=client2,O=vdisk test is denied/);

  r = await w.cmd('object-del', { id: 'tls0' });
  t.match(r.error?.desc, "object 'tls0' is in use, can not be deleted");
  r = await w.cmd('object-del', { id: 'nope' });
  t.match(r.error?.desc, "object 'nope' not found");
  await w.ok('nbd-server-stop');
  await w.ok('object-del', { id: 'tls0' });
  await w.ok('object-del', { id: 'authz0' });
  await w.ok('object-del', { id: 'tlsc' });
});

t.test('PSK: qemu-img and nbdinfo; a wrong key or an unknown user is refused and logged', async (t) => {
  const d = await serveTls(t, [`tls-creds-psk,id=tls0,dir=${pki.psk},endpoint=server`], ',tls-creds=tls0');
  const object = (dir: string, user: string) => `tls-creds-psk,id=tlsc,dir=${dir},username=${user},endpoint=client`;
  const image = `driver=nbd,server.type=unix,server.path=${d.socket},export=disk,tls-creds=tlsc`;

  const io = await run('qemu-io', ['--object', object(pki.psk, 'alice'), '--image-opts', image, '-c', 'write -P 0x33 0 2M', '-c', 'read -P 0x33 0 2M']);
  t.equal(io.code, 0, io.stderr);
  t.notMatch(io.stdout, /fail|mismatch/i);
  // libnbd takes the PSK user from the URI's user part.
  const bob = await run('nbdinfo', ['--json', `nbds+unix://bob@/disk?socket=${d.socket}&tls-psk-file=${path.join(pki.psk, 'keys.psk')}`]);
  t.equal(bob.code, 0, bob.stderr);
  t.equal(JSON.parse(bob.stdout).TLS, true);
  t.match(await waitForLog(d, /"tls":"bob"/), /"tls":"bob"/, 'the connection log names the PSK user');

  const wrongKey = await run('qemu-img', ['info', '--object', object(pki.pskWrong, 'alice'), '--image-opts', image]);
  t.not(wrongKey.code, 0, 'a wrong key is refused');
  t.match(await waitForLog(d, /"identity":"alice".*nbd-tls-handshake-failed/), /"identity":"alice","level":"warn","message":"nbd-tls-handshake-failed","peer":"unix","reason":"[^"]+"/, 'and logged with the identity');
  const unknown = await run('nbdinfo', [`nbds+unix://carol@/disk?socket=${d.socket}&tls-psk-file=${path.join(pki.pskWrong, 'keys.psk')}`]);
  t.not(unknown.code, 0, 'an unknown user is refused');
  t.match(await waitForLog(d, /"identity":"carol".*nbd-tls-handshake-failed/), /"identity":"carol".*nbd-tls-handshake-failed/);
});

/** qemu-nbd serving img as 'disk' on a unix socket with TLS credentials (server endpoint). */
async function qemuNbdTls(t: TestLike, dir: string, img: string, object: string): Promise<string> {
  const sock = path.join(dir, 'qemu-nbd.sock');
  const proc: ChildProcess = spawn('qemu-nbd', ['-f', 'raw', '--persistent', '--shared=4', '-x', 'disk', '-k', sock, '--object', object, '--tls-creds', 'tls0', img], { stdio: 'ignore' });
  t.teardown(() => {
    proc.kill('SIGKILL');
  });
  await waitForSocket(sock);
  return sock;
}

t.test("vdisk's nbd driver speaks TLS to qemu-nbd and to vdisk", async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'q.raw'), 32 * MiB);
  const qsock = await qemuNbdTls(t, dir, img, `tls-creds-x509,id=tls0,dir=${pki.server},endpoint=server`);

  // vdisk connects to qemu-nbd over TLS and serves what it reaches on its own plain socket.
  const b = await startDaemon(t, {
    args: [
      '--object', `tls-creds-x509,id=tlsc,dir=${pki.client},endpoint=client`,
      '--blockdev', `driver=nbd,node-name=n0,server.type=unix,server.path=${qsock},export=disk,tls-creds=tlsc,tls-hostname=localhost`,
      '--export', 'type=nbd,id=e0,node-name=n0,name=via,writable=on',
    ],
  });
  let io = await run('qemu-io', ['-f', 'raw', b.uri('via'), '-c', 'write -P 0x77 4M 2M', '-c', 'read -P 0x77 4M 2M']);
  t.equal(io.code, 0, io.stderr);
  t.notMatch(io.stdout, /fail|mismatch/i);
  // What went through vdisk's TLS client is on qemu-nbd's disk.
  io = await run('qemu-io', ['--object', `tls-creds-x509,id=tlsc,dir=${pki.client},endpoint=client`, '--image-opts', `driver=nbd,server.type=unix,server.path=${qsock},export=disk,tls-creds=tlsc,tls-hostname=localhost`, '-c', 'read -P 0x77 4M 2M']);
  t.equal(io.code, 0, io.stderr);
  t.notMatch(io.stdout, /fail|mismatch/i, 'qemu-nbd has the bytes');

  // vdisk to vdisk, both ends TLS, and the client's credentials are in use while the node lives.
  const a = await serveTls(t, [x509Server()], ',tls-creds=tls0');
  const qmpDir = tempDir(t);
  const qmpSock = path.join(qmpDir, 'qmp.sock');
  const c = await startDaemon(t, { dir: qmpDir, nbdServer: false, args: ['--qmp', `unix:${qmpSock}`] });
  const w = await QmpWire.connect(qmpSock);
  t.teardown(() => w.close());
  await w.ok('object-add', { 'qom-type': 'tls-creds-x509', id: 'tlsc', dir: pki.client, endpoint: 'client' });
  let r = await w.cmd('blockdev-add', { driver: 'nbd', 'node-name': 'n1', server: { type: 'unix', path: a.socket }, export: 'disk', 'tls-creds': 'tlsc' });
  t.match(r.error?.desc, 'No hostname for certificate validation', 'a unix socket needs tls-hostname, as in QEMU');
  r = await w.cmd('blockdev-add', { driver: 'nbd', 'node-name': 'n1', server: { type: 'unix', path: a.socket }, export: 'disk' });
  t.ok(r.error, 'without TLS the node cannot open');
  t.match(r.error?.desc, /TLS/);
  await w.ok('blockdev-add', { driver: 'nbd', 'node-name': 'n1', server: { type: 'unix', path: a.socket }, export: 'disk', 'tls-creds': 'tlsc', 'tls-hostname': 'localhost' });
  await w.ok('human-monitor-command', { 'command-line': 'qemu-io n1 "write -P 0x42 0 1M"' });
  const read = (await w.ok('human-monitor-command', { 'command-line': 'qemu-io n1 "read -P 0x42 0 1M"' })) as string;
  t.notMatch(read, /fail|mismatch/i, read);
  r = await w.cmd('object-del', { id: 'tlsc' });
  t.match(r.error?.desc, 'is in use');
  await w.ok('blockdev-del', { 'node-name': 'n1' });
  await w.ok('object-del', { id: 'tlsc' });
  t.equal(c.proc.exitCode, null);

  // PSK from vdisk's client to qemu-nbd.
  const pdir = tempDir(t);
  const pimg = sparseFile(path.join(pdir, 'p.raw'), 8 * MiB);
  const psock = await qemuNbdTls(t, pdir, pimg, `tls-creds-psk,id=tls0,dir=${pki.psk},endpoint=server`);
  const p = await startDaemon(t, {
    args: [
      '--object', `tls-creds-psk,id=tlsc,dir=${pki.psk},endpoint=client,username=bob`,
      '--blockdev', `driver=nbd,node-name=n0,server.type=unix,server.path=${psock},export=disk,tls-creds=tlsc`,
      '--export', 'type=nbd,id=e0,node-name=n0,name=via,writable=on',
    ],
  });
  io = await run('qemu-io', ['-f', 'raw', p.uri('via'), '-c', 'write -P 0x19 0 1M', '-c', 'read -P 0x19 0 1M']);
  t.equal(io.code, 0, io.stderr);
  t.notMatch(io.stdout, /fail|mismatch/i);

  // A wrong key: the node does not open, and vdisk says why.
  const bad = await run(process.execPath, [
    VDISK, 'serve',
    '--object', `tls-creds-psk,id=tlsc,dir=${pki.pskWrong},endpoint=client,username=alice`,
    '--blockdev', `driver=nbd,node-name=n0,server.type=unix,server.path=${psock},export=disk,tls-creds=tlsc`,
  ], { timeoutMs: 60_000 });
  t.not(bad.code, 0);
  t.match(bad.stderr, /TLS handshake failed/);
});

t.test('a writable export on a non-loopback address without TLS logs a warning', async (t) => {
  const warned = /nbd-writable-export-without-tls/;
  const args = (host: string, extra = '') => [
    '--blockdev', `driver=null-co,node-name=n0,size=1048576`,
    '--nbd-server', `addr.type=inet,addr.host=${host},addr.port=0${extra}`,
    '--export', 'type=nbd,id=e0,node-name=n0,writable=on',
  ];
  const open = await startDaemon(t, { nbdServer: false, args: args('0.0.0.0') });
  const log = await waitForLog(open, warned);
  t.equal(log.match(/nbd-writable-export-without-tls/g)?.length, 1, 'one line');
  t.match(log, /"export":"n0"/);

  const loop = await startDaemon(t, { nbdServer: false, args: args('127.0.0.1') });
  t.notMatch(loop.stderr(), warned, 'loopback: no warning');
  const withTls = await startDaemon(t, { nbdServer: false, args: ['--object', x509Server(), ...args('0.0.0.0', ',tls-creds=tls0')] });
  t.notMatch(withTls.stderr(), warned, 'TLS: no warning');
  const ro = await startDaemon(t, { nbdServer: false, args: args('0.0.0.0').map((a) => a.replace(',writable=on', '')) });
  t.notMatch(ro.stderr(), warned, 'read-only: no warning');

  // A second --nbd-server must agree on TLS: a plain listener beside a TLS one would be a way around it.
  const mixed = await run(process.execPath, [
    VDISK, 'serve', '--object', x509Server(),
    '--nbd-server', `addr.type=unix,addr.path=${path.join(tempDir(t), 'a.sock')},tls-creds=tls0`,
    '--nbd-server', `addr.type=unix,addr.path=${path.join(tempDir(t), 'b.sock')}`,
  ], { timeoutMs: 60_000 });
  t.not(mixed.code, 0);
  t.match(mixed.stderr, /same tls-creds/);
});
