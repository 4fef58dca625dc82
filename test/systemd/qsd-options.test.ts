/**
 * qemu-storage-daemon's process options: one qsd 7.2 command line
 * (--chardev/--monitor, --daemonize, --pidfile) run unchanged against the real
 * qemu-storage-daemon and against vdisk, with the same checks on both, and
 * the same mistakes giving the same error text and exit status.
 */
import t from 'tap';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { QmpWire } from '../helpers/qmp.js';
import { VDISK, requireTools, run, sparseFile, tempDir, until } from '../helpers/tools.js';

if (!requireTools(t, 'qemu-storage-daemon', 'nbdinfo', 'socat')) process.exit(1);

const MiB = 1024 * 1024;
const BINARIES: Array<[string, string, string[]]> = [
  ['qemu-storage-daemon', 'qemu-storage-daemon', []],
  ['vdisk', process.execPath, [VDISK, 'serve']],
];

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

for (const [name, cmd, prefix] of BINARIES) {
  t.test(`${name}: a qsd command line with --chardev/--monitor --daemonize --pidfile`, async (t) => {
    const dir = tempDir(t);
    const img = sparseFile(path.join(dir, 'disk.raw'), 8 * MiB);
    const qmpSock = path.join(dir, 'qmp.sock');
    const nbdSock = path.join(dir, 'nbd.sock');
    const pidfile = path.join(dir, 'daemon.pid');
    const r = await run(cmd, [
      ...prefix,
      '--chardev', `socket,id=mon0,path=${qmpSock},server=on,wait=off`,
      '--monitor', 'chardev=mon0,mode=control',
      '--blockdev', `driver=file,node-name=file0,filename=${img}`,
      '--nbd-server', `addr.type=unix,addr.path=${nbdSock}`,
      '--export', 'type=nbd,id=exp0,node-name=file0,name=disk,writable=on',
      '--daemonize',
      '--pidfile', pidfile,
    ], { timeoutMs: 30_000 });
    t.equal(r.code, 0, `the parent exits 0 once the daemon serves ${r.stderr}`);
    // Everything below holds the moment the parent has exited.
    const pid = Number(fs.readFileSync(pidfile, 'utf8').trim());
    t.teardown(() => {
      if (alive(pid)) process.kill(pid, 'SIGKILL');
    });
    t.ok(pid > 0 && alive(pid), 'the pidfile names a live process');
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    // QEMU forks twice (the daemon is not the session leader), vdisk once: either way a session not ours.
    const ours = fs.readFileSync('/proc/self/stat', 'utf8');
    t.not(Number(fields[3]), Number(ours.slice(ours.lastIndexOf(')') + 2).split(' ')[3]), 'the daemon is in a session of its own (setsid)');
    t.equal(Number(fields[4]), 0, 'and has no controlling terminal');
    const size = await run('nbdinfo', ['--size', `nbd+unix:///disk?socket=${nbdSock}`]);
    t.equal(size.stdout.trim(), String(8 * MiB), `NBD served ${size.stderr}`);
    const qmp = await QmpWire.connect(qmpSock);
    const exports = await qmp.cmd('query-block-exports');
    t.same((exports.return as Array<{ id: string }>).map((e) => e.id), ['exp0'], 'the --monitor is a QMP monitor');
    await qmp.cmd('quit');
    await until('the daemon to exit', () => !alive(pid));
    t.notOk(fs.existsSync(pidfile), 'the pidfile is removed at stop');
  });
}

/** The same mistake given to both: the same exit status and the same words. */
const MISTAKES: Array<[string, (dir: string) => string[], (dir: string) => string]> = [
  ['a monitor on a chardev that does not exist', () => ['--monitor', 'chardev=nope'], () => '--monitor chardev=nope: chardev "nope" not found'],
  ['an unknown chardev parameter', (dir) => ['--chardev', `socket,id=c0,path=${dir}/q.sock,server=on,wait=off,bogus=1`], (dir) => `--chardev socket,id=c0,path=${dir}/q.sock,server=on,wait=off,bogus=1: Invalid parameter 'bogus'`],
  ['a socket chardev with no address', () => ['--chardev', 'socket,id=c0', '--monitor', 'c0'], () => '--chardev socket,id=c0: Unable to parse FD number'],
  ['--daemonize with an image that does not exist', () => ['--daemonize', '--blockdev', 'driver=file,node-name=x,filename=/nonexistent-vdisk-test'], () => "Could not open '/nonexistent-vdisk-test': No such file or directory"],
  ['--daemonize with a pidfile that cannot be created', (dir) => ['--daemonize', '--pidfile', `${dir}/missing/x.pid`], (dir) => `cannot create PID file: Could not create '${dir}/missing/x.pid': No such file or directory`],
];

t.test('the same mistakes give qemu-storage-daemon\'s errors', async (t) => {
  // All at once: each is a process start that fails, and starts are what take the time.
  const cases = MISTAKES.flatMap(([what, args, message]) =>
    BINARIES.map(async ([name, cmd, prefix]) => {
      const dir = tempDir(t);
      const r = await run(cmd, [...prefix, ...args(dir)], { timeoutMs: 30_000 });
      return { what, name, dir, message: message(dir), r };
    }),
  );
  for (const { what, name, dir, message, r } of await Promise.all(cases)) {
    t.equal(r.code, 1, `${what}: ${name} exits 1`);
    t.match(r.stderr, message, `${what}: ${name}: ${r.stderr.trim().split('\n').pop()}`);
    t.same(fs.readdirSync(dir), [], `${what}: ${name} left nothing behind`);
  }
});

t.test('vdisk: --monitor pretty=on indents its JSON as QEMU does', async (t) => {
  const dir = tempDir(t);
  const sock = path.join(dir, 'q.sock');
  const pidfile = path.join(dir, 'v.pid');
  const r = await run(process.execPath, [VDISK, 'serve', '--chardev', `socket,id=m,path=${sock},server=on,wait=off`, '--monitor', 'm,pretty=on', '--daemonize', '--pidfile', pidfile]);
  t.equal(r.code, 0, r.stderr);
  const pid = Number(fs.readFileSync(pidfile, 'utf8'));
  t.teardown(() => {
    if (alive(pid)) process.kill(pid, 'SIGKILL');
  });
  const out = await run('socat', ['-t', '5', '-', `UNIX-CONNECT:${sock}`], { input: '{"execute":"qmp_capabilities"}\n{"execute":"query-version"}\n{"execute":"quit"}\n' });
  t.match(out.stdout, '{\r\n    "QMP": {\r\n        "version": {', 'greeting indented, lines ending \\r\\n');
  t.match(out.stdout, '"return": {\r\n        "qemu": {');
  await until('the daemon to exit', () => !alive(pid));
});

t.test('vdisk: a TCP --chardev on loopback is a monitor; any other address is refused (QMP has no authentication)', async (t) => {
  const dir = tempDir(t);
  const probe = net.createServer();
  await new Promise<void>((r) => probe.listen(0, '127.0.0.1', r));
  const port = (probe.address() as net.AddressInfo).port;
  await new Promise<void>((r) => probe.close(() => r()));
  const pidfile = path.join(dir, 'v.pid');
  const r = await run(process.execPath, [VDISK, 'serve', '--chardev', `socket,id=m,host=127.0.0.1,port=${port},server=on,wait=off`, '--monitor', 'chardev=m', '--daemonize', '--pidfile', pidfile]);
  t.equal(r.code, 0, r.stderr);
  const pid = Number(fs.readFileSync(pidfile, 'utf8'));
  t.teardown(() => {
    if (alive(pid)) process.kill(pid, 'SIGKILL');
  });
  const out = await run('socat', ['-t', '5', '-', `TCP:127.0.0.1:${port}`], { input: '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n' });
  t.match(out.stdout, /^\{"QMP": .*\r\n\{"return": \{\}\}\r\n\{"return": \{\}\}\r\n$/, 'greeting, capabilities, quit');
  await until('the daemon to exit', () => !alive(pid));

  const refused = await run(process.execPath, [VDISK, 'serve', '--chardev', 'socket,id=m,host=0.0.0.0,port=4444,server=on,wait=off', '--monitor', 'm']);
  t.equal(refused.code, 1);
  t.match(refused.stderr, 'refusing to listen on 0.0.0.0: QMP has no authentication');
});

t.test('vdisk --daemonize with relative paths: they keep their meaning, and are cleaned up at stop', async (t) => {
  const dir = tempDir(t);
  sparseFile(path.join(dir, 'disk.raw'), MiB);
  const r = await run(process.execPath, [
    VDISK, 'serve',
    '--chardev', 'socket,id=m,path=q.sock,server=on,wait=off', '--monitor', 'm',
    '--blockdev', 'driver=file,node-name=f,filename=disk.raw',
    '--nbd-server', 'addr.type=unix,addr.path=n.sock',
    '--export', 'type=nbd,id=e,node-name=f,name=d',
    '--daemonize', '--pidfile', 'p.pid',
  ], { cwd: dir });
  t.equal(r.code, 0, r.stderr);
  const pid = Number(fs.readFileSync(path.join(dir, 'p.pid'), 'utf8'));
  t.teardown(() => {
    if (alive(pid)) process.kill(pid, 'SIGKILL');
  });
  t.same(fs.readdirSync(dir).sort(), ['disk.raw', 'n.sock', 'p.pid', 'q.sock']);
  const size = await run('nbdinfo', ['--size', `nbd+unix:///d?socket=${path.join(dir, 'n.sock')}`]);
  t.equal(size.stdout.trim(), String(MiB), size.stderr);
  const qmp = await QmpWire.connect(path.join(dir, 'q.sock'));
  await qmp.cmd('quit');
  await until('the daemon to exit', () => !alive(pid));
  t.same(fs.readdirSync(dir), ['disk.raw'], 'sockets and pidfile removed');
});
