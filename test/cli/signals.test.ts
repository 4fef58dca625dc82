/**
 * Signals and clean stops: SIGHUP is logged and survived; SIGTERM, SIGINT
 * and QMP quit each stop the daemon cleanly, removing the pidfile and the
 * sockets, and storing every persistent bitmap (not left "in use") with the
 * bits the writes made, including one a running backup was using. The
 * bitmaps are read back by QEMU's tools: qemu-img info / check and
 * qemu-nbd -B with nbdinfo --map.
 *
 * A client that stays attached (as the kernel's nbd-client does, idle between
 * requests) does not hold up SIGTERM: its connection is closed once its
 * replies are out, the data it was told is written is on the disk, and the
 * daemon exits 0 (it used to wait for the listener to close, which waits for
 * the very connections it had not closed yet).
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { bitmapExtents } from '../helpers/bitmaps.js';
import { RawClient } from '../helpers/nbd-raw.js';
import { requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo']) requireTool(t, tool);
});

type Stop = 'SIGTERM' | 'SIGINT' | 'quit';

for (const how of ['SIGTERM', 'SIGINT', 'quit'] as Stop[]) {
  t.test(`SIGHUP is survived; ${how} stops cleanly and stores the bitmaps`, async (t) => {
    const dir = tempDir(t);
    const img = path.join(dir, 'd.qcow2');
    t.equal((await run('qemu-img', ['create', '-f', 'qcow2', img, '64M'])).code, 0);
    const qmpSock = path.join(dir, 'qmp.sock');
    const pidfile = path.join(dir, 'vdisk.pid');
    const d = await startDaemon(t, {
      dir,
      args: [
        '--blockdev', `driver=qcow2,node-name=d,file.driver=file,file.filename=${img}`,
        '--export', 'type=nbd,id=e,node-name=d,name=d,writable=on',
        '--qmp', `unix:${qmpSock}`,
        '--pidfile', pidfile,
      ],
    });
    const w = await QmpWire.connect(qmpSock);
    t.teardown(() => w.close());
    await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'b', persistent: true });
    await w.ok('block-dirty-bitmap-add', { node: 'd', name: 'frozen', persistent: true });
    let r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 512', '-c', 'write -P 2 16M 256k', d.uri('d')]);
    t.equal(r.code, 0, r.stderr);

    d.proc.kill('SIGHUP');
    await new Promise((resolve) => setTimeout(resolve, 300));
    t.equal(d.proc.exitCode, null, 'SIGHUP: still running');
    t.match(d.stderr(), /signal-ignored.*SIGHUP/, 'SIGHUP is logged');
    r = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 3 40M 64k', '-c', 'read -P 2 16M 256k', d.uri('d')]);
    t.equal(r.code, 0, 'still serving after SIGHUP');
    t.notMatch(r.stdout, /verification failed/);

    // A backup using 'frozen' is still running (1 byte/s) when the stop comes: the job is
    // cancelled and the bitmap gets back every bit before it is stored.
    await w.ok('drive-backup', { 'job-id': 'slow', device: 'd', sync: 'incremental', bitmap: 'frozen', format: 'qcow2', target: path.join(dir, 'inc.qcow2'), speed: 1 });

    let code: number | null;
    if (how === 'quit') {
      await w.ok('quit');
      code = await new Promise((resolve) => (d.proc.exitCode !== null ? resolve(d.proc.exitCode) : d.proc.on('exit', resolve)));
    } else {
      code = await d.stop(how);
    }
    t.equal(code, 0, `${how}: exit status 0`);
    t.notOk(fs.existsSync(pidfile), 'the pidfile is removed');
    t.notOk(fs.existsSync(qmpSock), 'the QMP socket is removed');
    t.notOk(fs.existsSync(d.socket), 'the NBD socket is removed');

    const c = await run('qemu-img', ['check', img]);
    t.equal(c.code, 0, `qemu-img check is clean: ${c.stdout}${c.stderr}`);
    const info = JSON.parse((await run('qemu-img', ['info', '--output=json', img])).stdout);
    t.same(
      info['format-specific'].data.bitmaps.map((b: Record<string, unknown>) => [b.name, b.flags]).sort(),
      [['b', ['auto']], ['frozen', ['auto']]],
      'both bitmaps stored, enabled and not in use',
    );
    const expected = [
      { offset: 0, length: 65536 },
      { offset: 16 * MiB, length: 256 * 1024 },
      { offset: 40 * MiB, length: 65536 },
    ];
    t.same(await bitmapExtents(t, img, 'b'), expected, 'b holds every write, as qemu-nbd reads it');
    t.same(await bitmapExtents(t, img, 'frozen'), expected, 'so does the bitmap of the cancelled backup');
  });
}

t.test('SIGTERM with clients attached and idle: each is closed, the daemon exits 0, acknowledged writes are on disk', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'd.raw');
  fs.writeFileSync(img, Buffer.alloc(MiB));
  const d = await startDaemon(t, {
    dir,
    args: [
      '--blockdev', `driver=raw,node-name=d,file.driver=file,file.filename=${img}`,
      '--export', 'type=nbd,id=e,node-name=d,name=d,writable=on',
    ],
  });
  const clients = await Promise.all([0, 1].map(() => RawClient.connect(d.socket)));
  t.teardown(() => clients.forEach((c) => c.close()));
  for (const c of clients) await c.go('d');
  // NBD_CMD_WRITE, then NBD_CMD_FLUSH: acknowledged, and the client stays.
  clients[0].request(1, 4096, 4096, 7, 0, Buffer.alloc(4096, 0x5a));
  t.same(await clients[0].simpleReply(), { error: 0, cookie: 7 }, 'the write is acknowledged');
  clients[0].request(3, 0, 0, 8);
  t.same(await clients[0].simpleReply(), { error: 0, cookie: 8 }, 'the flush is acknowledged');

  t.equal(await d.stop('SIGTERM'), 0, 'SIGTERM: exit status 0 (not the SIGKILL of the grace period)');
  for (const [i, c] of clients.entries()) t.ok(await c.waitClosed(), `client ${i}: the server closed the connection`);
  const records = d
    .stderr()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>);
  const gone = records.filter((r) => r.message === 'nbd-client-disconnected');
  t.equal(gone.length, 2, 'both disconnections are logged');
  t.same(
    gone.map((r) => [r.requests, r.requestBytes]).sort((a, b) => JSON.stringify(a).length - JSON.stringify(b).length),
    [[{}, {}], [{ write: 1, flush: 1 }, { write: 4096 }]],
    'with the requests each connection received, by command',
  );
  t.ok(records.some((r) => r.message === 'shutdown-complete'), 'the shutdown completed');
  t.ok(fs.readFileSync(img).subarray(4096, 8192).equals(Buffer.alloc(4096, 0x5a)), 'the acknowledged write is in the image');
});
