/**
 * vdisk under a service manager, with systemd's own tools standing in for
 * PID 1: sd_notify datagrams received by socat (UNIX-RECV / ABSTRACT-RECV),
 * socket activation by systemd-socket-activate (LISTEN_FDS, LISTEN_PID,
 * LISTEN_FDNAMES), and journald's JOURNAL_STREAM pointed at the test's pipe.
 */
import t from 'tap';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { QmpWire } from '../helpers/qmp.js';
import { VDISK, requireTools, run, sparseFile, tempDir, spawnLogged, until, type LoggedProcess } from '../helpers/tools.js';

if (!requireTools(t, 'socat', 'systemd-socket-activate', 'nbdinfo', 'qemu-img', 'stat')) process.exit(1);

const MiB = 1024 * 1024;

interface TestLike {
  teardown(fn: () => unknown): void;
}

/** socat receiving sd_notify datagrams on a path or an abstract name ('@name'); prints them back to back. */
async function notifyReceiver(t: TestLike, address: string): Promise<LoggedProcess> {
  const spec = address.startsWith('@') ? `ABSTRACT-RECV:${address.slice(1)}` : `UNIX-RECV:${address},unlink-early`;
  const socat = spawnLogged(t, 'socat', ['-u', spec, 'STDOUT']);
  if (address.startsWith('@')) {
    await until('the abstract notify socket', () => fs.readFileSync('/proc/net/unix', 'utf8').includes(address));
  } else {
    await until('the notify socket', () => fs.existsSync(address));
  }
  return socat;
}

function serveArgs(dir: string, extra: string[] = []): string[] {
  const img = sparseFile(path.join(dir, 'disk.raw'), 4 * MiB);
  return [
    VDISK, 'serve',
    '--blockdev', `driver=file,node-name=f0,filename=${img}`,
    '--nbd-server', `addr.type=unix,addr.path=${path.join(dir, 'nbd.sock')}`,
    '--export', 'type=nbd,id=e0,node-name=f0,name=disk0',
    '--qmp', `unix:${path.join(dir, 'qmp.sock')}`,
    ...extra,
  ];
}

t.test('READY=1 comes once clients can connect and the pidfile is written; watchdog pings; STOPPING=1 on SIGTERM', async (t) => {
  const dir = tempDir(t);
  const notifySock = path.join(dir, 'notify.sock');
  const socat = await notifyReceiver(t, notifySock);
  const pidfile = path.join(dir, 'vdisk.pid');
  const mountpoint = path.join(dir, 'fuse.raw');
  fs.writeFileSync(mountpoint, '');
  const vdisk = spawnLogged(t, process.execPath, serveArgs(dir, ['--pidfile', pidfile, '--export', `type=fuse,id=f1,node-name=f0,mountpoint=${mountpoint}`]), { NOTIFY_SOCKET: notifySock, WATCHDOG_USEC: '200000' });

  await until('READY=1', () => socat.out().includes('READY=1'));
  // Nothing may fail from here on: READY=1 promises a working service.
  t.equal(fs.readFileSync(pidfile, 'utf8'), `${vdisk.proc.pid}\n`, 'the pidfile is written before READY=1');
  const info = await run('nbdinfo', ['--size', `nbd+unix:///disk0?socket=${path.join(dir, 'nbd.sock')}`]);
  t.equal(info.stdout.trim(), String(4 * MiB), `nbdinfo reaches the export at READY=1 ${info.stderr}`);
  const qmp = await QmpWire.connect(path.join(dir, 'qmp.sock'));
  t.same(((await qmp.cmd('query-block-exports')).return as Array<{ id: string }>).map((e) => e.id).sort(), ['e0', 'f1'], 'QMP answers at READY=1');
  qmp.socket.destroy();
  const fuse = await run('qemu-img', ['info', '--output=json', '-f', 'raw', mountpoint]);
  t.equal(JSON.parse(fuse.stdout || '{}')['virtual-size'], 4 * MiB, `the FUSE export is mounted at READY=1 ${fuse.stderr}`);
  t.match(socat.out(), /STATUS=serving 2 exports \(e0, f1\); NBD on unix:\S+nbd\.sock; QMP on unix:\S+qmp\.sock/, 'STATUS says what is served');
  t.match(socat.out(), new RegExp(`MAINPID=${vdisk.proc.pid}`));
  t.ok(socat.out().indexOf('STATUS=starting') >= 0 && socat.out().indexOf('STATUS=starting') < socat.out().indexOf('READY=1'), 'a starting STATUS before READY=1');

  // WATCHDOG_USEC=200ms: a ping every 100 ms; wait for three beyond those seen so far.
  const before = (socat.out().match(/WATCHDOG=1/g) ?? []).length;
  await until('watchdog pings', () => (socat.out().match(/WATCHDOG=1/g) ?? []).length >= before + 3);

  vdisk.proc.kill('SIGTERM');
  t.equal(await vdisk.exited, 0, 'clean exit');
  await until('STOPPING=1', () => socat.out().includes('STOPPING=1'));
  const text = socat.out();
  t.ok(text.indexOf('STOPPING=1') > text.indexOf('READY=1'), 'STOPPING=1 after READY=1');
  t.match(text, /STOPPING=1\nSTATUS=stopping \(SIGTERM\)/);
  t.notOk(text.slice(text.indexOf('STOPPING=1')).includes('WATCHDOG=1'), 'no watchdog ping once stopping');
  t.notOk(fs.existsSync(pidfile), 'pidfile removed at stop');
});

t.test('abstract NOTIFY_SOCKET; WATCHDOG_PID of another process means no pings; QMP quit sends STOPPING=1', async (t) => {
  const dir = tempDir(t);
  const name = `@vdisk-test-notify-${process.pid}-${Date.now()}`;
  const socat = await notifyReceiver(t, name);
  // A 10 ms interval: had it been enabled, pings would arrive long before READY=1.
  const vdisk = spawnLogged(t, process.execPath, serveArgs(dir), { NOTIFY_SOCKET: name, WATCHDOG_USEC: '20000', WATCHDOG_PID: '1' });
  await until('READY=1', () => socat.out().includes('READY=1'));
  const qmp = await QmpWire.connect(path.join(dir, 'qmp.sock'));
  t.same((await qmp.cmd('block-export-del', { id: 'e0' })).return, {});
  await until('a new STATUS', () => socat.out().includes('STATUS=serving 0 exports; NBD on'));
  await qmp.cmd('quit');
  t.equal(await vdisk.exited, 0);
  await until('STOPPING=1', () => socat.out().includes('STOPPING=1'));
  t.match(socat.out(), /STOPPING=1\nSTATUS=stopping \(QMP quit\)/);
  t.notOk(socat.out().includes('WATCHDOG=1'), 'the watchdog belongs to WATCHDOG_PID, not to vdisk');
  t.notMatch(vdisk.err(), /sd-notify-failed/);
});

/** A TCP port nobody listens on right now. */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

t.test('socket activation: NBD on a passed unix and TCP socket, QMP on its own, by LISTEN_FDNAMES', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.raw'), 4 * MiB);
  const nbdSock = path.join(dir, 'nbd.sock');
  const qmpSock = path.join(dir, 'qmp.sock');
  const port = await freePort();
  const act = spawnLogged(t, 'systemd-socket-activate', [
    '-l', nbdSock, '--fdname=nbd',
    '-l', `127.0.0.1:${port}`, '--fdname=nbd',
    '-l', qmpSock, '--fdname=qmp',
    process.execPath, VDISK, 'serve',
    '--blockdev', `driver=file,node-name=f0,filename=${img}`,
    '--nbd-server', 'addr.type=fd,addr.str=nbd',
    '--export', 'type=nbd,id=e0,node-name=f0,name=disk0,writable=on',
    '--qmp', 'fd:qmp',
  ]);
  await until('the sockets', () => (act.err().match(/Listening on/g) ?? []).length === 3);
  // The first client starts the daemon, as a .socket unit does; its connection waits in the backlog.
  const info = await run('nbdinfo', ['--size', `nbd+unix:///disk0?socket=${nbdSock}`]);
  t.equal(info.stdout.trim(), String(4 * MiB), `nbdinfo through the passed unix socket ${info.stderr}`);
  const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 64k', `nbd://127.0.0.1:${port}/disk0`]);
  t.equal(w.code, 0, `qemu-io writes through the passed TCP socket ${w.stderr}`);
  const qmp = await QmpWire.connect(qmpSock);
  t.same((await qmp.cmd('query-block-exports')).return, [{ id: 'e0', type: 'nbd', 'node-name': 'f0', 'shutting-down': false }], 'QMP on its passed socket');
  await until('the banner', () => act.out().includes('nbd://127.0.0.1'));
  t.match(act.out(), `nbd+unix:///disk0?socket=${nbdSock}`, 'the banner names the passed unix socket by its path');
  t.match(act.out(), `nbd://127.0.0.1:${port}/disk0`);
  t.match(act.out(), `QMP on unix:${qmpSock}`);
  t.match(act.err(), 'systemd-listen-fds', 'the passed sockets are logged');
  await qmp.cmd('quit');
  t.equal(await act.exited, 0);
  t.ok(fs.existsSync(nbdSock) && fs.existsSync(qmpSock), 'the socket files are the service manager\'s: left in place');
  const cmp = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 64k', img]);
  t.equal(cmp.code, 0, `the write reached the image ${cmp.stdout}`);
});

t.test('socket activation mistakes are clear errors at start', async (t) => {
  const dir = tempDir(t);
  const nbdSock = path.join(dir, 'nbd.sock');
  const qmpSock = path.join(dir, 'qmp.sock');
  const activate = async (names: [string, string], args: string[]): Promise<LoggedProcess> => {
    fs.rmSync(nbdSock, { force: true });
    fs.rmSync(qmpSock, { force: true });
    const act = spawnLogged(t, 'systemd-socket-activate', ['-l', nbdSock, `--fdname=${names[0]}`, '-l', qmpSock, `--fdname=${names[1]}`, process.execPath, VDISK, 'serve', ...args]);
    await until('the sockets', () => (act.err().match(/Listening on/g) ?? []).length === 2);
    // Wake it as a client would; the connection is refused or dropped, which is the point.
    const s = net.connect(nbdSock);
    s.on('error', () => undefined);
    t.teardown(() => s.destroy());
    return act;
  };
  let act = await activate(['nbd', 'qmp'], ['--nbd-server', 'addr.type=fd,addr.str=nbd']);
  t.equal(await act.exited, 1, 'a passed socket no option uses');
  t.match(act.err(), "vdisk: systemd passed fd 4 ('qmp') but no option uses it");

  act = await activate(['nbd', 'qmp'], ['--nbd-server', 'addr.type=fd,addr.str=nbd', '--qmp', 'fd:monitor']);
  t.equal(await act.exited, 1, 'an option naming a socket that was not passed');
  t.match(act.err(), "--qmp fd:monitor: no socket named 'monitor' was passed (LISTEN_FDNAMES) (passed: 3=nbd, 4=qmp)");

  // QMP has no authentication: a passed TCP socket beyond loopback is refused as --qmp tcp: is.
  fs.rmSync(nbdSock, { force: true });
  act = spawnLogged(t, 'systemd-socket-activate', ['-l', nbdSock, '--fdname=nbd', '-l', `0.0.0.0:${await freePort()}`, '--fdname=qmp', process.execPath, VDISK, 'serve', '--nbd-server', 'addr.type=fd,addr.str=nbd', '--qmp', 'fd:qmp']);
  await until('the sockets', () => (act.err().match(/Listening on/g) ?? []).length === 2);
  const wake = net.connect(nbdSock);
  wake.on('error', () => undefined);
  t.teardown(() => wake.destroy());
  t.equal(await act.exited, 1, 'QMP on a passed socket bound to 0.0.0.0');
  t.match(act.err(), /--qmp: refusing to serve QMP on the passed socket fd 4 bound to 0\.0\.0\.0:\d+: QMP has no authentication/);

  const r = await run(process.execPath, [VDISK, 'serve', '--nbd-server', 'addr.type=fd,addr.str=nbd']);
  t.equal(r.code, 1, 'type=fd with no sockets passed');
  t.match(r.stderr, "no socket named 'nbd' was passed (LISTEN_FDNAMES) (no sockets were passed: LISTEN_FDS is unset)");
});

t.test('a missing socket directory is named, not reported as EACCES', async (t) => {
  const dir = tempDir(t);
  const missing = path.join(dir, 'run', 'vdisk');
  let r = await run(process.execPath, [VDISK, 'serve', '--qmp', `unix:${missing}/qmp.sock`]);
  t.equal(r.code, 1);
  t.match(r.stderr, `cannot create socket ${missing}/qmp.sock: directory ${missing} does not exist`);
  r = await run(process.execPath, [VDISK, 'serve', '--nbd-server', `addr.type=unix,addr.path=${missing}/nbd.sock`]);
  t.equal(r.code, 1);
  t.match(r.stderr, `cannot create socket ${missing}/nbd.sock: directory ${missing} does not exist`);
  t.notOk(fs.existsSync(missing), 'nothing was created');
});

t.test('journald: sd-daemon <N> priorities when JOURNAL_STREAM is stderr, or with --log-format journal', async (t) => {
  const dir = tempDir(t);
  const args = serveArgs(dir, ['--log-level', 'debug']);
  // The shell gives the daemon the test's pipe as stderr and names that pipe in JOURNAL_STREAM, as journald does.
  const quoted = args.map((a) => `'${a}'`).join(' ');
  const runWith = async (journalStream: string, extra = ''): Promise<string> => {
    const sh = spawnLogged(t, 'sh', ['-c', `JOURNAL_STREAM=${journalStream} exec '${process.execPath}' ${quoted} ${extra}`]);
    await until('the banner', () => sh.out().includes('vdisk: '));
    // A client that breaks the protocol: a warning.
    const s = net.connect(path.join(dir, 'nbd.sock'));
    s.on('error', () => undefined);
    s.write(Buffer.alloc(64, 0xee));
    await until('the protocol warning', () => sh.err().includes('nbd-protocol-error'));
    s.destroy();
    sh.proc.kill('SIGTERM');
    t.equal(await sh.exited, 0);
    return sh.err();
  };
  const journal = await runWith('$(stat -L -c %d:%i /proc/self/fd/2)');
  const lines = journal.trim().split('\n');
  t.ok(lines.length > 3);
  t.same(lines.filter((l) => !/^<[3467]>\{/.test(l)), [], 'every line starts with a priority');
  t.match(journal, /^<6>\{.*"message":"nbd-server-listening"/m, 'info is 6');
  t.match(journal, /^<4>\{.*"message":"nbd-protocol-error"/m, 'warn is 4');
  t.match(journal, /^<7>\{.*"message":"nbd-connection-accepted"/m, 'debug is 7');

  const other = await runWith('1:1');
  t.notMatch(other, /^<\d>/m, 'JOURNAL_STREAM naming another stream: no prefixes');

  const forced = await runWith('', '--log-format journal');
  t.match(forced, /^<4>\{.*"message":"nbd-protocol-error"/m, '--log-format journal forces them');
});
