import t from 'tap';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { serveMemoryDisk } from '../examples/memory-disk.js';
import { startCeph } from './helpers/ceph.js';
import { makePki } from './helpers/tls.js';
import { ROOT, requireTool, requireTools, run, spawnLogged, tempDir, until } from './helpers/tools.js';

t.test('examples/memory-disk.ts: a node class of its own, served over NBD to qemu-io and nbdinfo', async (t) => {
  requireTool(t, 'qemu-io');
  requireTool(t, 'nbdinfo');
  const sock = path.join(tempDir(t), 'mem.sock');
  const daemon = await serveMemoryDisk(sock, 16 * 1024 * 1024);
  t.teardown(() => daemon.shutdown());
  const uri = `nbd+unix:///mem?socket=${sock}`;
  // Real clients run as child processes: never block this process's event loop, it serves them.
  const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 65536 131072', '-c', 'read -P 0x5a 65536 131072', '-c', 'read -P 0 0 65536', uri]);
  t.equal(w.code, 0, w.stderr);
  t.match(w.stdout, /wrote 131072\/131072 bytes at offset 65536/);
  t.notMatch(w.stdout, /Pattern verification failed/);
  const map = await run('nbdinfo', ['--map', '--json', uri]);
  t.equal(map.code, 0, map.stderr);
  const extents = JSON.parse(map.stdout) as Array<{ offset: number; length: number; type: number }>;
  t.same(
    extents.map((e) => [e.offset, e.length, e.type]),
    [
      [0, 65536, 3],
      [65536, 131072, 0],
      [196608, 16 * 1024 * 1024 - 196608, 3],
    ],
  );
});

/** examples/vdisk/*.json and the test that serves each one: a new example needs a test here or there. */
const CONFIG_TESTS: Record<string, string> = {
  'disk0.json': 'test/systemd/units.test.ts',
  'socket-activated.json': 'test/systemd/units.test.ts',
  'rbd.json': 'test/examples.test.ts',
};

t.test('every examples/vdisk/*.json is a JSON object served by a test', async (t) => {
  const dir = path.join(ROOT, 'examples', 'vdisk');
  const files = fs.readdirSync(dir).filter((f) => f.endsWith('.json')).sort();
  t.same(files, Object.keys(CONFIG_TESTS).sort(), 'examples and their tests');
  for (const f of files) {
    const doc = JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')) as Record<string, unknown>;
    t.ok(Array.isArray(doc.export) && doc.export.length > 0, `${f} exports something`);
    t.match(fs.readFileSync(path.join(ROOT, CONFIG_TESTS[f]), 'utf8'), `examples/vdisk/${f}`, `${CONFIG_TESTS[f]} uses ${f}`);
  }
});

t.test('examples/vdisk/rbd.json: client.vdisk with docs/deployment.md caps, served over TLS', async (t) => {
  if (!requireTools(t, 'nbdinfo', 'qemu-io', 'certtool', 'ceph')) return;
  const ceph = await startCeph(t);
  const dir = tempDir(t, 'vdisk-rbd-example-');
  const example = JSON.parse(fs.readFileSync(path.join(ROOT, 'examples', 'vdisk', 'rbd.json'), 'utf8'));
  const [secret, creds] = example.object;
  const [node] = example.blockdev;
  const [exp] = example.export;

  // The pool, the user and its key as docs/deployment.md makes them.
  const cephCmd = (args: string[]) => run('ceph', ['-c', ceph.conf, ...args], { env: ceph.env, timeoutMs: 60_000 });
  for (const args of [
    ['osd', 'pool', 'create', node.pool, '1', '1'],
    ['auth', 'get-or-create', `client.${node.user}`, 'mon', 'profile rbd', 'osd', `profile rbd pool=${node.pool}`, 'mgr', `profile rbd pool=${node.pool}`],
  ]) {
    const r = await cephCmd(args);
    t.equal(r.code, 0, `ceph ${args.join(' ')}${r.code === 0 ? '' : `: ${r.stderr}`}`);
  }
  await ceph.rbdOk(['pool', 'init', node.pool]);
  const key = await cephCmd(['auth', 'print-key', `client.${node.user}`]);
  t.equal(key.code, 0, key.stderr);
  const keyFile = path.join(dir, 'rbd.ceph-key');
  fs.writeFileSync(keyFile, key.stdout, { mode: 0o640 });
  // Made as client.vdisk (its key only, not the admin keyring): the caps allow creating images.
  const keyring = path.join(dir, 'vdisk.keyring');
  fs.writeFileSync(keyring, `[client.${node.user}]\n\tkey = ${key.stdout.trim()}\n`);
  await ceph.rbdOk(['--id', node.user, '--keyring', keyring, 'create', '--size', '64M', `${node.pool}/${node.image}`]);

  // The example with this machine's paths and free ports; everything else as shipped.
  const pki = await makePki(path.join(dir, 'pki'));
  const port = await freePort();
  const config = structuredClone(example);
  config.object[0].file = keyFile;
  config.object[1].dir = pki.server;
  config.blockdev[0].conf = ceph.conf;
  config['nbd-server'][0].addr = { type: 'inet', host: '127.0.0.1', port: String(port) };
  config.qmp = [`unix:${path.join(dir, 'qmp.sock')}`];
  config.pidfile = path.join(dir, 'vdisk.pid');
  config.metrics = '127.0.0.1:0';
  const configFile = path.join(dir, 'rbd.json');
  fs.writeFileSync(configFile, JSON.stringify(config));
  t.equal(secret['qom-type'], 'secret');
  t.equal(creds['qom-type'], 'tls-creds-x509');
  t.equal(node.driver, 'rbd');
  t.equal(node['key-secret'], secret.id, 'the key comes from the secret object');
  t.equal(config['nbd-server'][0]['tls-creds'], creds.id, 'the NBD server requires TLS');

  const vdisk = spawnLogged(t, process.execPath, [path.join(ROOT, 'bin', 'vdisk'), 'serve', '--config', configFile]);
  await until('the pidfile', () => fs.existsSync(config.pidfile) || vdisk.proc.exitCode !== null, 60_000).catch((err) => {
    throw new Error(`${(err as Error).message}: ${vdisk.err()}`);
  });
  t.equal(vdisk.proc.exitCode, null, vdisk.proc.exitCode === null ? 'serving' : vdisk.err());

  const uri = `nbds://localhost:${port}/${exp.name}?tls-certificates=${pki.client}`;
  const size = await run('nbdinfo', ['--size', uri]);
  t.equal(size.stdout.trim(), String(64 * 1024 * 1024), `nbdinfo over TLS: ${size.stderr}`);
  const plain = await run('nbdinfo', ['--size', `nbd://localhost:${port}/${exp.name}`]);
  t.not(plain.code, 0, 'a client without TLS is refused');
  const tlsObj = `tls-creds-x509,id=tls0,dir=${pki.client},endpoint=client`;
  const opts = `driver=nbd,server.type=inet,server.host=localhost,server.port=${port},export=${exp.name},tls-creds=tls0`;
  const w = await run('qemu-io', ['--object', tlsObj, '--image-opts', opts, '-c', 'write -P 0x6b 1M 1M', '-c', 'flush']);
  t.equal(w.code, 0, `qemu-io over TLS: ${w.stderr}`);
  const locks = await ceph.rbdOk(['lock', 'ls', `${node.pool}/${node.image}`]);
  t.match(locks, /1 exclusive lock/, 'the daemon holds the exclusive lock');

  vdisk.proc.kill('SIGTERM');
  const code = await vdisk.exited;
  t.equal(code, 0, code === 0 ? 'SIGTERM: a clean stop' : vdisk.err());
  // The data is in the cluster: read back as client.vdisk through QEMU's own rbd driver.
  const r = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x6b 1M 1M', `rbd:${node.pool}/${node.image}:conf=${ceph.conf}:id=${node.user}:keyring=${keyring}`], { env: ceph.env });
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /fail/i);
});

/** A TCP port on 127.0.0.1 nobody listens on now. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}
