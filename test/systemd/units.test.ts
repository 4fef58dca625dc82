/**
 * The shipped units (systemd/) and example configs (examples/vdisk/):
 * `systemd-analyze verify` accepts every unit and drop-in without a warning,
 * `systemd-analyze security --offline=true` rates the services OK or better,
 * and the units' own ExecStart, sockets and configs run the daemon the way
 * systemd would (no PID 1 here: socat stands in for the notify socket and
 * systemd-socket-activate for the .socket units).
 */
import t from 'tap';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { QmpWire } from '../helpers/qmp.js';
import { ROOT, requireTools, run, tempDir, spawnLogged, until } from '../helpers/tools.js';

if (!requireTools(t, 'systemd-analyze', 'systemd-sysusers', 'systemd-socket-activate', 'setpriv', 'unshare', 'socat', 'qemu-img', 'qemu-io', 'nbdinfo')) process.exit(1);

interface TestLike {
  teardown(fn: () => unknown): void;
}

const UNITS = path.join(ROOT, 'systemd');
/** nobody: an unprivileged uid that exists everywhere. */
const NOBODY = 65534;
const SERVICES = ['vdisk.service', 'vdisk@.service'];
const SOCKETS = ['vdisk@.socket', 'vdisk-qmp@.socket'];
const DROPINS = fs.readdirSync(path.join(UNITS, 'dropins'));

/**
 * A copy of the shipped units in a temp dir, the only change being the node
 * binary's path when this machine's node is elsewhere (verify checks that
 * ExecStart's binary exists).
 */
function unitDir(t: TestLike, dropins: string[] = []): string {
  const dir = tempDir(t, 'vdisk-units-');
  for (const u of [...SERVICES, ...SOCKETS]) {
    fs.writeFileSync(path.join(dir, u), fs.readFileSync(path.join(UNITS, u), 'utf8').replaceAll('/usr/bin/node ', `${process.execPath} `));
  }
  if (dropins.length) {
    fs.mkdirSync(path.join(dir, 'vdisk@.service.d'));
    for (const d of dropins) fs.copyFileSync(path.join(UNITS, 'dropins', d), path.join(dir, 'vdisk@.service.d', d));
  }
  return dir;
}

/** One [Section] Key= value of a unit file (the last one given). */
function unitValue(file: string, key: string): string {
  const m = [...fs.readFileSync(file, 'utf8').matchAll(new RegExp(`^${key}=(.*)$`, 'gm'))];
  if (m.length === 0) throw new Error(`${file} has no ${key}=`);
  return m[m.length - 1][1];
}

t.test('systemd-analyze verify: every unit, every instance, every drop-in, no warnings', async (t) => {
  for (const dropins of [[], ...DROPINS.map((d) => [d])]) {
    const dir = unitDir(t, dropins);
    const targets = ['vdisk.service', 'vdisk@.service', 'vdisk@disk0.service', 'vdisk@disk0.socket', 'vdisk-qmp@disk0.socket'].map((u) => path.join(dir, u));
    const r = await run('systemd-analyze', ['verify', ...targets]);
    t.equal(r.code, 0, `verify ${dropins.join(' ') || 'the units'}: ${r.stderr}`);
    t.equal(r.stderr.trim(), '', `no warnings with ${dropins.join(' ') || 'no drop-in'}`);
  }
});

t.test('systemd-analyze verify fails on a broken unit (the check above can fail)', async (t) => {
  const dir = unitDir(t);
  const file = path.join(dir, 'vdisk@.service');
  fs.writeFileSync(file, fs.readFileSync(file, 'utf8').replace('Type=notify', 'Type=notifyy'));
  const r = await run('systemd-analyze', ['verify', path.join(dir, 'vdisk@disk0.service')]);
  t.not(r.stderr.trim(), '', 'a warning the first test would catch');
  t.match(r.stderr, /Failed to parse service type/);
});

t.test('systemd-sysusers makes the user and group the units run as', async (t) => {
  const root = tempDir(t, 'vdisk-sysroot-');
  fs.mkdirSync(path.join(root, 'etc'));
  const r = await run('systemd-sysusers', [`--root=${root}`, path.join(UNITS, 'vdisk.sysusers.conf')]);
  t.equal(r.code, 0, r.stderr);
  const user = unitValue(path.join(UNITS, 'vdisk@.service'), 'User');
  const group = unitValue(path.join(UNITS, 'vdisk@.service'), 'Group');
  t.match(fs.readFileSync(path.join(root, 'etc', 'passwd'), 'utf8'), new RegExp(`^${user}:x:\\d+:\\d+:[^:]*:/var/lib/vdisk:/usr/sbin/nologin$`, 'm'));
  t.match(fs.readFileSync(path.join(root, 'etc', 'group'), 'utf8'), new RegExp(`^${group}:x:\\d+:`, 'm'));
  for (const u of SOCKETS) t.equal(unitValue(path.join(UNITS, u), 'SocketUser'), user, `${u}: sockets owned by the service user`);
});

t.test('systemd-analyze security --offline=true rates the services OK or better', async (t) => {
  const ratings: Record<string, number> = {};
  for (const [label, dropins, unit] of [
    ['vdisk@.service', [], 'vdisk@disk0.service'],
    ['vdisk.service', [], 'vdisk.service'],
    ...DROPINS.map((d) => [`vdisk@.service + ${d}`, [d], 'vdisk@disk0.service']),
  ] as Array<[string, string[], string]>) {
    const dir = unitDir(t, dropins);
    const r = await run('systemd-analyze', ['security', '--offline=true', '--no-pager', path.join(dir, unit)]);
    const m = /Overall exposure level for \S+: (\d+\.\d) (\S+)/.exec(r.stdout);
    t.ok(m, `${label}: a rating ${r.stderr}`);
    if (!m) continue;
    ratings[label] = Number(m[1]);
    t.ok(['OK', 'SAFE', 'PERFECT'].includes(m[2]), `${label}: ${m[1]} ${m[2]}`);
    // The unprivileged units are the ones to keep tight; the variants may only add what they need.
    if (dropins.length === 0) t.ok(Number(m[1]) <= 2.0, `${label}: exposure ${m[1]} <= 2.0`);
  }
  t.comment(JSON.stringify(ratings));
});

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

/**
 * The machine the unit would set up, under a temp dir: /run/vdisk (RuntimeDirectory),
 * /var/lib/vdisk (StateDirectory) and /etc/vdisk, with the example config installed
 * and its image created. Paths and the TCP port are rewritten; nothing else is.
 */
async function fakeRoot(t: TestLike, example: string, instance: string): Promise<{ root: string; config: string; run: string; state: string; port: number; map: (s: string) => string }> {
  const root = tempDir(t, 'vdisk-root-');
  const port = await freePort();
  const map = (s: string): string => s.replaceAll('/run/vdisk', `${root}/run/vdisk`).replaceAll('/var/lib/vdisk', `${root}/var/lib/vdisk`).replaceAll('/etc/vdisk', `${root}/etc/vdisk`);
  const runDir = path.join(root, 'run', 'vdisk', instance);
  const state = path.join(root, 'var', 'lib', 'vdisk', instance);
  for (const d of [runDir, state, path.join(root, 'etc', 'vdisk')]) fs.mkdirSync(d, { recursive: true });
  const config = path.join(root, 'etc', 'vdisk', `${instance}.json`);
  fs.writeFileSync(config, map(fs.readFileSync(path.join(ROOT, 'examples', 'vdisk', example), 'utf8')).replace('"10809"', `"${port}"`));
  const img = await run('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(state, 'disk0.qcow2'), '64M']);
  if (img.code !== 0) throw new Error(img.stderr);
  return { root, config, run: runDir, state, port, map };
}

/** ExecStart= of a unit, instance substituted, as argv (the units use no quoting). */
function execStart(unit: string, instance: string, map: (s: string) => string): string[] {
  const argv = map(unitValue(path.join(UNITS, unit), 'ExecStart').replaceAll('%i', instance)).split(/\s+/);
  t.equal(argv[0], '/usr/bin/node');
  t.equal(argv[1], '/opt/vdisk/bin/vdisk');
  return [process.execPath, path.join(ROOT, 'bin', 'vdisk'), ...argv.slice(2)];
}

t.test('vdisk@disk0.service as systemd would run it with examples/vdisk/disk0.json', async (t) => {
  const f = await fakeRoot(t, 'disk0.json', 'disk0');
  const notifySock = path.join(f.root, 'notify.sock');
  // systemd's notify socket takes datagrams from any uid (it checks the sender's pid instead).
  const socat = spawnLogged(t, 'socat', ['-u', `UNIX-RECV:${notifySock},perm=0777`, 'STDOUT']);
  await until('the notify socket', () => fs.existsSync(notifySock));
  const watchdogSec = Number(unitValue(path.join(UNITS, 'vdisk@.service'), 'WatchdogSec'));
  const argv = execStart('vdisk@.service', 'disk0', f.map);
  t.same(argv.slice(2), ['serve', '--config', f.config]);
  // Not root: an unprivileged uid owning only the Runtime/StateDirectory, with the unit's UMask= and
  // NoNewPrivileges=, as User=vdisk gets them (nobody's uid stands in for the vdisk user).
  const unit = path.join(UNITS, 'vdisk@.service');
  t.equal(unitValue(unit, 'User'), 'vdisk');
  t.equal(unitValue(unit, 'NoNewPrivileges'), 'yes');
  // The way there is the system's (/, /run, /var/lib, /etc: root's, readable by all).
  for (const d of [f.root, path.dirname(f.run), path.dirname(f.state), path.dirname(f.config)]) fs.chmodSync(d, 0o755);
  for (const d of [f.run, f.state, path.join(f.state, 'disk0.qcow2')]) fs.chownSync(d, NOBODY, NOBODY);
  fs.chmodSync(f.run, 0o750);
  fs.chmodSync(f.state, 0o750);
  // ProtectSystem=strict: the whole file system read-only but for the Runtime/StateDirectory, in a
  // mount namespace of its own (binds of the two directories first, then / remounted read-only).
  t.equal(unitValue(unit, 'ProtectSystem'), 'strict');
  const strict = `mount --bind "$RUN" "$RUN" && mount --bind "$STATE" "$STATE" && mount -o remount,bind,ro / && exec "$@"`;
  const vdisk = spawnLogged(
    t,
    'unshare',
    ['--mount', '--propagation', 'private', 'sh', '-c', strict, 'sh',
      'setpriv', `--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', '--no-new-privs', 'sh', '-c', `umask ${unitValue(unit, 'UMask')} && exec "$@"`, 'sh', ...argv],
    { NOTIFY_SOCKET: notifySock, WATCHDOG_USEC: String(watchdogSec * 1e6), RUN: f.run, STATE: f.state },
  );
  await until('READY=1', () => socat.out().includes('READY=1') || vdisk.proc.exitCode !== null).catch((err) => {
    throw new Error(`${(err as Error).message}: ${vdisk.err()}`);
  });
  const pid = Number(fs.readFileSync(path.join(f.run, 'vdisk.pid'), 'utf8'));
  t.equal(pid, vdisk.proc.pid, 'pidfile in the RuntimeDirectory (unshare, setpriv and sh exec: the same process)');
  t.match(fs.readFileSync(`/proc/${pid}/status`, 'utf8'), new RegExp(`^Uid:\\s+${NOBODY}\\s+${NOBODY}\\s+${NOBODY}\\s+${NOBODY}$`, 'm'), 'serving as the unprivileged user');
  t.equal(fs.statSync(path.join(f.run, 'vdisk.pid')).mode & 0o777, 0o600, 'UMask=0077 applies');
  const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x3c 0 1M', `nbd+unix:///disk0?socket=${path.join(f.run, 'nbd.sock')}`]);
  t.equal(w.code, 0, `write over the unix socket ${w.stderr}`);
  const size = await run('nbdinfo', ['--size', `nbd://127.0.0.1:${f.port}/disk0`]);
  t.equal(size.stdout.trim(), String(64 * 1024 * 1024), `nbdinfo over TCP ${size.stderr}`);
  const qmp = await QmpWire.connect(path.join(f.run, 'qmp.sock'));
  t.equal(fs.statSync(path.join(f.run, 'qmp.sock')).mode & 0o777, 0o600, 'QMP socket only for the service user');
  t.equal(((await qmp.cmd('query-block-exports')).return as unknown[]).length, 1);
  qmp.socket.destroy();
  vdisk.proc.kill(unitValue(path.join(UNITS, 'vdisk@.service'), 'KillSignal') as NodeJS.Signals);
  t.equal(await vdisk.exited, 0);
  await until('STOPPING=1', () => socat.out().includes('STOPPING=1'));
  t.notOk(fs.existsSync(path.join(f.run, 'vdisk.pid')), 'pidfile removed');
  const check = await run('qemu-io', ['-f', 'qcow2', '-c', 'read -P 0x3c 0 1M', path.join(f.state, 'disk0.qcow2')]);
  t.equal(check.code, 0, 'data flushed to the image in the StateDirectory');
  t.notMatch(check.stdout, /fail/i);
});

t.test('vdisk@disk0.socket + vdisk-qmp@disk0.socket with examples/vdisk/socket-activated.json', async (t) => {
  const f = await fakeRoot(t, 'socket-activated.json', 'disk0');
  const listen: string[] = [];
  const paths: Record<string, string> = {};
  for (const unit of SOCKETS) {
    const file = path.join(UNITS, unit);
    const p = f.map(unitValue(file, 'ListenStream').replaceAll('%i', 'disk0'));
    const name = unitValue(file, 'FileDescriptorName');
    t.equal(unitValue(file, 'Service'), 'vdisk@%i.service', `${unit} starts the instance`);
    paths[name] = p;
    listen.push('-l', p, `--fdname=${name}`);
  }
  t.same(Object.keys(paths).sort(), ['nbd', 'qmp'], 'the names the example config uses');
  const sockets = unitValue(path.join(UNITS, 'dropins', 'socket-activation.conf'), 'Sockets');
  t.equal(sockets, 'vdisk@%i.socket vdisk-qmp@%i.socket', 'the drop-in passes both sockets to the service');
  const argv = execStart('vdisk@.service', 'disk0', f.map);
  const act = spawnLogged(t, 'systemd-socket-activate', [...listen, ...argv]);
  await until('the sockets', () => (act.err().match(/Listening on/g) ?? []).length === 2);
  const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 0 64k', '-c', 'read -P 0x77 0 64k', `nbd+unix:///disk0?socket=${paths.nbd}`]);
  t.equal(w.code, 0, `the first client starts the service and is served ${w.stderr}`);
  const qmp = await QmpWire.connect(paths.qmp);
  t.equal(((await qmp.cmd('query-block-exports')).return as unknown[]).length, 1, 'QMP on the passed socket');
  await qmp.cmd('quit');
  t.equal(await act.exited, 0);
});
