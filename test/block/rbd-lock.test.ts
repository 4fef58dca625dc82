/**
 * Two vdisk daemons on one RBD image (two processes, one cluster): the exclusive lock keeps one
 * writer, the second writable open is refused naming the image and the holder, and after the
 * first daemon is killed (kill -9: no close, its lock stays) the second takes over, either at
 * once with x-break-lock=on or by itself once the dead holder's watch expires. What the first
 * wrote and flushed is what the second reads. Also: a monitor that does not answer fails an
 * open within x-connect-timeout instead of librados's 300 s.
 */
import t from 'tap';
import net from 'node:net';
import path from 'node:path';
import { type CephCluster, startCeph, startRbdDaemon } from '../helpers/ceph.js';
import { requireTools, run } from '../helpers/tools.js';

requireTools(t, 'qemu-io', 'ceph');
const ceph: CephCluster = await startCeph(t);

// A dead client's watch lasts osd_client_watch_timeout (30 s by default) before librbd may break
// its lock; 5 s keeps the automatic takeover's test short. It applies to watches made after it.
const WATCH_TIMEOUT_S = 5;
const tell = await run('ceph', ['-c', ceph.conf, 'tell', 'osd.0', 'config', 'set', 'osd_client_watch_timeout', String(WATCH_TIMEOUT_S)], { env: ceph.env, timeoutMs: 30_000 });
if (tell.code !== 0) throw new Error(`ceph tell osd.0 config set: ${tell.stderr}`);


function rbdNode(node: string, image: string, extra: Record<string, unknown> = {}) {
  return { driver: 'rbd', 'node-name': node, pool: 'rbd', image, conf: ceph.conf, ...extra };
}

/** Daemon A writes 0x5a over the first MiB and 0xa5 at 3 MiB through NBD and flushes; then it is killed with SIGKILL. */
async function writeThenDie(t: Tap.Test, image: string) {
  const a = await startRbdDaemon(t);
  await a.w.ok('blockdev-add', rbdNode('a', image));
  await a.w.ok('block-export-add', { type: 'nbd', id: 'a', 'node-name': 'a', name: 'a', writable: true });
  const wr = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0xa5 3M 64k', '-c', 'flush', a.d.uri('a')]);
  t.equal(wr.code, 0, wr.stderr);
  t.notMatch(wr.stdout, /failed/, 'daemon A wrote and flushed');
  return a;
}

async function readBack(t: Tap.Test, d: { uri(name: string): string }, name: string) {
  const r = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x5a 0 1M', '-c', 'read -P 0xa5 3M 64k', '-c', 'read -P 0 1M 2M', d.uri(name)]);
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /failed|verification/, 'what the dead daemon wrote and flushed is there');
}

t.test('a second daemon is refused; after kill -9 of the first, x-break-lock=on takes over at once', async (t) => {
  await ceph.rbdOk(['create', '--size', '8M', 'rbd/tk1']);
  const a = await writeThenDie(t, 'tk1');
  const b = await startRbdDaemon(t);

  const held = JSON.parse(await ceph.rbdOk(['lock', 'ls', '--format', 'json', 'rbd/tk1'])) as Array<{ address: string }>;
  const refused = await b.w.cmd('blockdev-add', rbdNode('b', 'tk1'));
  t.match(refused.error?.desc, /^Failed to get the exclusive lock on RBD image 'rbd\/tk1' \(held by (\S+)\): EROFS; is another process writing the image\?/, 'refused, naming the image and the holder');
  t.ok(held.length === 1 && refused.error?.desc.includes(`held by ${held[0].address}`), `the holder is daemon A's client, as rbd lock ls shows it (${held[0]?.address})`);
  t.match(refused.error?.desc, /x-break-lock=on/, 'and saying how to take over');

  const killed = await a.d.stop('SIGKILL');
  t.equal(killed, null, 'daemon A is gone (SIGKILL: no close, its lock and watch stay)');
  const started = Date.now();
  await b.w.ok('blockdev-add', rbdNode('b', 'tk1', { 'x-break-lock': true }));
  const took = Date.now() - started;
  t.ok(took < WATCH_TIMEOUT_S * 1000, `taken over without waiting for the watch to expire (${took} ms)`);
  t.match(b.d.stderr(), /rbd-lock-broken/, 'the break is logged');
  const locks = JSON.parse(await ceph.rbdOk(['lock', 'ls', '--format', 'json', 'rbd/tk1'])) as unknown[];
  t.equal(locks.length, 1, 'one lock again: daemon B’s');
  const blocklist = await run('ceph', ['-c', ceph.conf, 'osd', 'blocklist', 'ls'], { env: ceph.env });
  t.match(blocklist.stdout + blocklist.stderr, /127\.0\.0\.1:0\/\d+/, 'the dead holder is blocklisted (fenced)');

  await b.w.ok('block-export-add', { type: 'nbd', id: 'b', 'node-name': 'b', name: 'b', writable: true });
  await readBack(t, b.d, 'b');
  const wr = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x77 4M 4k', '-c', 'flush', b.d.uri('b')]);
  t.notMatch(wr.stdout, /failed/, 'daemon B writes');
});

t.test('after kill -9 of the holder, a plain blockdev-add takes over once its watch expires', async (t) => {
  await ceph.rbdOk(['create', '--size', '8M', 'rbd/tk2']);
  const a = await writeThenDie(t, 'tk2');
  const b = await startRbdDaemon(t);
  t.match((await b.w.cmd('blockdev-add', rbdNode('b', 'tk2'))).error?.desc, /exclusive lock on RBD image 'rbd\/tk2'/, 'refused while A lives');
  await a.d.stop('SIGKILL');
  // librbd asks the holder to release and, while its watch lasts, waits; then it breaks the
  // lock of a holder without a watch (blocklisting it). Bounded: watch timeout plus slack.
  const started = Date.now();
  const r = await b.w.cmd('blockdev-add', rbdNode('b', 'tk2'));
  const took = Date.now() - started;
  t.equal(r.error, undefined, `taken over by librbd itself: ${JSON.stringify(r.error)}`);
  t.ok(took < (WATCH_TIMEOUT_S + 20) * 1000, `within the watch timeout and some slack (${took} ms)`);
  await b.w.ok('block-export-add', { type: 'nbd', id: 'b', 'node-name': 'b', name: 'b', writable: true });
  await readBack(t, b.d, 'b');
});

/** A TCP port nobody listens on: bound, noted and closed. */
async function deadPort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((resolve) => s.close(resolve));
  return port;
}

t.test('a monitor that does not answer fails the open within x-connect-timeout', async (t) => {
  const { w } = await startRbdDaemon(t);
  const port = await deadPort();
  const started = Date.now();
  const r = await w.cmd('blockdev-add', {
    driver: 'rbd', 'node-name': 'x', pool: 'rbd', image: 'tk1', server: [{ host: '127.0.0.1', port: String(port) }], 'x-connect-timeout': 2,
  });
  const took = Date.now() - started;
  t.match(r.error?.desc, /Could not open RBD image 'rbd\/tk1' \(rados_connect\): ETIMEDOUT: no monitor answered within 2 s \(x-connect-timeout\)/, 'a clear error');
  t.ok(took < 10_000, `failed within the bound (${took} ms)`);
  const bad = await w.cmd('blockdev-add', { driver: 'rbd', 'node-name': 'y', pool: 'rbd', image: 'tk1', conf: ceph.conf, 'x-connect-timeout': 0 });
  t.match(bad.error?.desc, /x-connect-timeout' expects a whole number of seconds/);
  // The same through an rbd: name's librados pair (QEMU's syntax; ':' in the address escaped).
  const img = await run(process.execPath, [path.join(process.cwd(), 'bin', 'vdisk'), 'img', 'info', `rbd:rbd/tk1:mon_host=127.0.0.1\\:${port}:client_mount_timeout=2`], { env: { ...process.env, CEPH_CONF: '' }, timeoutMs: 20_000 });
  t.not(img.code, 0);
  t.match(img.stderr, /\(rados_connect\): ETIMEDOUT: no monitor answered within 2 s/, `vdisk img fails at rados_connect: ${img.stderr}`);
});

t.test('x-break-lock=on against a holder that is alive fences it: its writes fail, the new writer’s stand', async (t) => {
  await ceph.rbdOk(['create', '--size', '8M', 'rbd/tk3']);
  const a = await startRbdDaemon(t);
  await a.w.ok('blockdev-add', rbdNode('a', 'tk3'));
  await a.w.ok('block-export-add', { type: 'nbd', id: 'a', 'node-name': 'a', name: 'a', writable: true });
  const b = await startRbdDaemon(t);
  await b.w.ok('blockdev-add', rbdNode('b', 'tk3', { 'x-break-lock': true }));
  await b.w.ok('block-export-add', { type: 'nbd', id: 'b', 'node-name': 'b', name: 'b', writable: true });
  const wb = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x66 0 64k', '-c', 'flush', b.d.uri('b')]);
  t.notMatch(wb.stdout, /failed/, 'the new writer writes');
  // A is blocklisted: librbd refuses its requests (with or without its cache, the flush fails).
  const wa = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 64k', '-c', 'flush', a.d.uri('a')], { timeoutMs: 60_000 });
  t.match(wa.stdout + wa.stderr, /failed/, `the fenced writer's write or flush fails: ${wa.stdout.trim()}`);
  const r = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x66 0 64k', b.d.uri('b')]);
  t.notMatch(r.stdout, /failed|verification/, 'the new writer’s data stands');
});
