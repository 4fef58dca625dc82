/**
 * `vdisk serve` as a user runs it: the embedded default, clean shutdown on
 * SIGTERM and SIGINT, start-up errors that name the option at fault, and
 * image locks that keep a second writer away.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { VDISK, patternBuffer, requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

t.test('the embedded default: a sparse disk in the data dir, on TCP and a unix socket', async (t) => {
  requireTool(t, 'qemu-io');
  requireTool(t, 'nbdinfo');
  const dir = tempDir(t);
  // --port 0: the kernel picks a free port, so tests never collide with a real daemon on 10809.
  const d = await startDaemon(t, { dir, nbdServer: false, args: ['--data-dir', path.join(dir, 'data'), '--size', '64M', '--port', '0'] });
  const disk = path.join(dir, 'data', 'disk0.raw');
  t.equal(fs.statSync(disk).size, 64 * MiB, 'disk0.raw has the requested size');
  t.equal(fs.statSync(disk).blocks, 0, 'and is sparse');
  const banner = d.stdout();
  const tcp = /(nbd:\/\/127\.0\.0\.1:\d+\/disk0)/.exec(banner)?.[1];
  const unix = /(nbd\+unix:\/\/\/disk0\?socket=\S+)/.exec(banner)?.[1];
  t.ok(tcp, `the banner shows the TCP URI:\n${banner}`);
  t.ok(unix, 'and the unix socket URI');
  t.match(banner, /try: nbdinfo/, 'with a command to try');
  t.equal(unix, `nbd+unix:///disk0?socket=${path.join(dir, 'data', 'nbd.sock')}`);

  const data = patternBuffer(MiB, 77);
  fs.writeFileSync(path.join(dir, 'pattern.bin'), data);
  let r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x61 1M 1M', tcp!]);
  t.equal(r.code, 0, r.stderr);
  r = await run('nbdinfo', ['--json', unix!]);
  t.equal(r.code, 0, r.stderr);
  t.equal(JSON.parse(r.stdout).exports[0].is_read_only, false, 'writable');

  t.equal(await d.stop('SIGTERM'), 0, 'SIGTERM: exit status 0');
  t.notOk(fs.existsSync(path.join(dir, 'data', 'nbd.sock')), 'the socket file is removed');
  const onDisk = fs.readFileSync(disk);
  t.ok(onDisk.subarray(MiB, 2 * MiB).equals(Buffer.alloc(MiB, 0x61)), 'the write is in the disk file');
  t.match(d.stderr(), /shutdown-complete/, 'the shutdown is logged');

  // A second start reuses the disk (and does not recreate it).
  const d2 = await startDaemon(t, { dir, nbdServer: false, args: ['--data-dir', path.join(dir, 'data'), '--port', '0'] });
  const tcp2 = /(nbd:\/\/127\.0\.0\.1:\d+\/disk0)/.exec(d2.stdout())?.[1];
  r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x61 1M 1M', tcp2!]);
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /verification failed/, 'the data is still there after a restart');
  t.equal(await d2.stop('SIGINT'), 0, 'SIGINT: exit status 0');
});

t.test('shutdown waits for requests in flight and answers them', async (t) => {
  requireTool(t, 'qemu-io');
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), 64 * MiB);
  const qmpSock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, args: ['--qmp', `unix:${qmpSock}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(qmpSock);
  t.teardown(() => w.close());
  await w.ok('blockdev-add', { driver: 'raw', 'node-name': 'd0', file: { driver: 'blkdebug', 'node-name': 'dbg', image: { driver: 'file', filename: img } } });
  await w.ok('block-export-add', { type: 'nbd', id: 'e0', 'node-name': 'd0', name: 'disk', writable: true });
  // Every write waits 2 s in blkdebug, so SIGTERM is sure to find both writes in flight.
  await w.ok('x-blkdebug-add-rule', { node: 'dbg', 'inject-error': { event: 'write_aio', action: 'delay', 'delay-ms': 2000, iotype: 'write' } });
  const writer = run('qemu-io', ['-f', 'raw', '-c', 'aio_write -P 0x33 0 16M', '-c', 'aio_write -P 0x34 16M 16M', d.uri('disk')]);
  let inFlight = 0;
  for (let i = 0; i < 200 && inFlight < 2; i++) {
    const q = (await w.ok('x-query-nbd-server')) as { connections: Array<{ 'in-flight': number }> };
    inFlight = q.connections.reduce((n, c) => n + c['in-flight'], 0);
    if (inFlight < 2) await new Promise((r) => setTimeout(r, 50));
  }
  t.equal(inFlight, 2, 'both writes are in flight (held by the delay) when SIGTERM comes');
  const code = await d.stop('SIGTERM');
  t.equal(code, 0, 'exit 0');
  const out = (await writer).stdout;
  t.match(out, /wrote 16777216\/16777216 bytes at offset 0\b/, 'the first write was answered, with success');
  t.match(out, /wrote 16777216\/16777216 bytes at offset 16777216\b/, 'the second too');
  const file = fs.readFileSync(img);
  t.ok(file.subarray(0, 16 * MiB).equals(Buffer.alloc(16 * MiB, 0x33)), 'the first write is on disk');
  t.ok(file.subarray(16 * MiB, 32 * MiB).equals(Buffer.alloc(16 * MiB, 0x34)), 'the second write is on disk');
});

t.test('start-up errors name the option and the key, and nothing is served', async (t) => {
  const dir = tempDir(t);
  const cases: Array<[string[], RegExp]> = [
    [['--blockdev', 'driver=file,node-name=f0'], /--blockdev #1 .*Parameter 'filename' is missing/],
    [['--blockdev', 'driver=file,node-name=f0,filename=/nonexistent/x.img'], /--blockdev #1 .*Could not open '\/nonexistent\/x.img': No such file or directory/],
    [['--blockdev', 'driver=nope,node-name=f0'], /Parameter 'driver' does not accept value 'nope'/],
    [['--blockdev', 'driver=null-co,node-name=f0,size=big'], /Parameter 'size' expects/],
    [['--blockdev', 'driver=null-co,node-name=f0,colour=red'], /Parameter 'colour' is unexpected/],
    [['--blockdev', 'driver=null-co,node-name=0bad'], /Invalid node-name: '0bad'/],
    [['--blockdev', '{"driver":"null-co",'], /--blockdev #1: invalid JSON/],
    [['--blockdev', 'driver=null-co,node-name=n0', '--blockdev', 'driver=null-co,node-name=n0'], /--blockdev #2 .*Duplicate nodes with node-name='n0'/],
    [['--blockdev', 'driver=raw,node-name=r0,file=missing'], /Cannot find device='missing' nor node-name='missing'/],
    [['--blockdev', 'driver=null-co,node-name=n0', '--export', 'type=nbd,id=e0,node-name=n0'], /--export #1 .*NBD server not running/],
    [['--blockdev', 'driver=null-co,node-name=n0', '--nbd-server', 'addr.type=unix', '--export', 'type=nbd,id=e0,node-name=n0'], /--nbd-server #1 .*Parameter 'addr.path' is missing/],
    [['--blockdev', 'driver=null-co,node-name=n0,read-only=on', '--nbd-server', `addr.type=unix,addr.path=${dir}/s`, '--export', 'type=nbd,id=e0,node-name=n0,writable=on'], /Cannot export read-only node as writable/],
    [['--log-level', 'loud'], /--log-level/],
    [['--frobnicate'], /Unknown option '--frobnicate'/],
  ];
  for (const [args, expected] of cases) {
    const r = await run(process.execPath, [VDISK, 'serve', ...args], { cwd: dir, timeoutMs: 20_000 });
    t.equal(r.code, 1, `exit 1 for ${args.join(' ')}`);
    t.match(r.stderr, expected, args.join(' '));
    t.notMatch(r.stdout, /nbd:\/\//, 'no endpoint was announced');
  }
  t.notOk(fs.existsSync(path.join(dir, 'vdisk-data')), 'no default data dir was created');
});

t.test('image locks: one writer at a time, QEMU included', async (t) => {
  requireTool(t, 'qemu-io');
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), 8 * MiB);
  const d = await startDaemon(t, { dir, args: ['--blockdev', `driver=file,node-name=f0,filename=${img}`, '--export', 'type=nbd,id=e0,node-name=f0,writable=on'] });
  // A second vdisk on the same image.
  const second = await run(process.execPath, [VDISK, 'serve', '--blockdev', `driver=file,node-name=f0,filename=${img}`], { cwd: dir, timeoutMs: 20_000 });
  t.equal(second.code, 1);
  t.match(second.stderr, /Failed to get "write" lock|Failed to get shared "write" lock/, 'a second vdisk cannot open it writable');
  // QEMU sees vdisk's locks.
  const q = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 512', img]);
  t.not(q.code, 0, 'qemu-io cannot open it while vdisk writes it');
  t.match(q.stderr, /Failed to get .*lock/);
  const shared = await run('qemu-io', ['-U', '-r', '-f', 'raw', '-c', 'read 0 512', img]);
  t.equal(shared.code, 0, `qemu-io -U -r (force share) still reads: ${shared.stderr}`);
  await d.stop();
  const after = await run('qemu-io', ['-f', 'raw', '-c', 'read 0 512', img]);
  t.equal(after.code, 0, `after vdisk stops, qemu-io opens it: ${after.stderr}`);
});

t.test('--config: the same objects as the options, in one JSON document', async (t) => {
  requireTool(t, 'nbdinfo');
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'c.img'), 4 * MiB);
  const config = path.join(dir, 'vdisk.json');
  fs.writeFileSync(
    config,
    JSON.stringify({
      blockdev: [{ driver: 'raw', 'node-name': 'c0', file: { driver: 'file', filename: img } }],
      'nbd-server': { addr: { type: 'unix', path: path.join(dir, 'c.sock') } },
      export: [{ type: 'nbd', id: 'c0', 'node-name': 'c0', writable: true }],
      qmp: [`unix:${path.join(dir, 'q.sock')}`],
      pidfile: path.join(dir, 'pid'),
    }),
  );
  const d = await startDaemon(t, { dir, nbdServer: false, args: ['--config', config] });
  const r = await run('nbdinfo', ['--json', `nbd+unix:///c0?socket=${path.join(dir, 'c.sock')}`]);
  t.equal(r.code, 0, r.stderr);
  t.equal(JSON.parse(r.stdout).exports[0]['export-size'], 4 * MiB, 'the export of the config is served');
  t.equal(fs.readFileSync(path.join(dir, 'pid'), 'utf8').trim(), String(d.proc.pid), 'the pidfile of the config');
  t.ok(fs.existsSync(path.join(dir, 'q.sock')), 'and its QMP socket');
  t.equal(await d.stop(), 0);
  t.notOk(fs.existsSync(path.join(dir, 'pid')), 'the pidfile is removed at exit');

  const bad = path.join(dir, 'bad.json');
  fs.writeFileSync(bad, JSON.stringify({ blockdev: [{ driver: 'raw', 'node-name': 'b0', file: { driver: 'file', filename: img, bogus: 1 } }] }));
  let e = await run(process.execPath, [VDISK, 'serve', '--config', bad]);
  t.equal(e.code, 1);
  t.match(e.stderr, /--config .*bad\.json: blockdev\[0\] .*Parameter 'file\.bogus' is unexpected/, 'the error names the file, the entry and the key');
  fs.writeFileSync(bad, JSON.stringify({ blockdevs: [] }));
  e = await run(process.execPath, [VDISK, 'serve', '--config', bad]);
  t.match(e.stderr, /unknown key 'blockdevs'/);
  fs.writeFileSync(bad, '{"blockdev": [');
  e = await run(process.execPath, [VDISK, 'serve', '--config', bad]);
  t.equal(e.code, 1, 'malformed JSON');
  t.match(e.stderr, /--config .*bad\.json: /);
});
