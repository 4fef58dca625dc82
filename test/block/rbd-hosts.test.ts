/**
 * Two vdisk daemons on one RBD image from two "hosts": each daemon runs in a network namespace
 * this test makes, reaching the cluster over a veth pair to the root namespace, where the
 * monitor and the OSD listen on an address of their own. The exclusive lock works across hosts
 * as it does across processes: the second host's writable open is refused naming the first
 * host's client, and after the first daemon is killed (kill -9) the second takes over with
 * x-break-lock=on and reads what the first flushed. The NBD exports are unix sockets, visible
 * from every namespace (they are paths); only the Ceph traffic crosses hosts, which is the point.
 */
import t from 'tap';
import path from 'node:path';
import { type CephCluster, startCeph } from '../helpers/ceph.js';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { requireTools, run, tempDir } from '../helpers/tools.js';

requireTools(t, 'ip', 'qemu-io', 'ceph', 'rbd');

/** Runs `ip ARGS` and throws with its stderr if it fails (set-up steps must not half-succeed silently). */
async function ip(args: string[]): Promise<string> {
  const r = await run('ip', args, { timeoutMs: 20_000 });
  if (r.code !== 0) throw new Error(`ip ${args.join(' ')} exited with ${r.code ?? r.signal}: ${r.stderr}`);
  return r.stdout;
}

/**
 * A /24 of 10.201.0.0/16 that no address or route of this host touches yet, starting from one
 * derived from the pid so two runs at once start apart.
 */
async function freeSubnet(): Promise<number> {
  const used = (await ip(['-4', 'addr'])) + (await ip(['-4', 'route', 'show', 'table', 'all']));
  for (let i = 0; i < 250; i++) {
    const third = ((process.pid + i) % 250) + 1;
    if (!used.includes(`10.201.${third}.`)) return third;
  }
  throw new Error('no free /24 in 10.201.0.0/16');
}

interface Host {
  ns: string;
  /** The veth's end in the root namespace; its address is the host's gateway. */
  link: string;
  gateway: string;
  addr: string;
  subnet: string;
}

/**
 * The two hosts and the cluster's address, made for test t and deleted at its teardown. Every
 * step runs inside the subtest, never at the file's top level: a top-level throw ends the process
 * without running any teardown, which left the namespaces and veths behind.
 */
async function makeHosts(t: Tap.Test): Promise<{ cephAddr: string; a: Host; b: Host }> {
  const pid = process.pid;
  const net = await freeSubnet();
  // The cluster's address sits on an interface of its own in the root namespace (one end of a
  // veth pair whose other end stays there too: this kernel has no dummy driver). Being local,
  // packets from either namespace to it are delivered, not forwarded: ip_forward stays as it is.
  const cephAddr = `10.201.${net}.1`;
  const clusterLink = `vdc-${pid}`;
  // Each host has a /30 of its own, so its address tells which host a client is on.
  const a: Host = { ns: `vdisk-a-${pid}`, link: `vda-${pid}`, gateway: `10.201.${net}.5`, addr: `10.201.${net}.6`, subnet: `10.201.${net}.4/30` };
  const b: Host = { ns: `vdisk-b-${pid}`, link: `vdb-${pid}`, gateway: `10.201.${net}.9`, addr: `10.201.${net}.10`, subnet: `10.201.${net}.8/30` };

  // Registered before anything is made, so a set-up that fails half-way is undone too; and
  // before the cluster and the daemons, so it runs after they have stopped (teardowns run
  // last-registered first). Every deletion is attempted whatever the others do; deleting a
  // namespace deletes the veth end inside it, and so the pair.
  t.teardown(async () => {
    for (const h of [a, b]) {
      await run('ip', ['netns', 'delete', h.ns], { timeoutMs: 20_000 });
      await run('ip', ['link', 'delete', h.link], { timeoutMs: 20_000 });
    }
    await run('ip', ['link', 'delete', clusterLink], { timeoutMs: 20_000 });
    const namespaces = await run('ip', ['netns', 'list'], { timeoutMs: 20_000 });
    const links = await run('ip', ['-br', 'link'], { timeoutMs: 20_000 });
    for (const name of [a.ns, b.ns]) {
      if (new RegExp(`^${name}( |$)`, 'm').test(namespaces.stdout)) t.fail(`namespace ${name} is left after teardown`);
    }
    for (const name of [a.link, b.link, clusterLink]) {
      if (new RegExp(`^${name}[@ ]`, 'm').test(links.stdout)) t.fail(`link ${name} is left after teardown`);
    }
  });

  await ip(['link', 'add', clusterLink, 'type', 'veth', 'peer', 'name', `vdcp-${pid}`]);
  await ip(['addr', 'add', `${cephAddr}/32`, 'dev', clusterLink]);
  await ip(['link', 'set', clusterLink, 'up']);
  await ip(['link', 'set', `vdcp-${pid}`, 'up']);
  for (const h of [a, b]) {
    await ip(['netns', 'add', h.ns]);
    // The namespace's end is made inside it, as eth0, like a host's only NIC.
    await ip(['link', 'add', h.link, 'type', 'veth', 'peer', 'name', 'eth0', 'netns', h.ns]);
    await ip(['addr', 'add', `${h.gateway}/30`, 'dev', h.link]);
    await ip(['link', 'set', h.link, 'up']);
    await ip(['-n', h.ns, 'link', 'set', 'lo', 'up']);
    await ip(['-n', h.ns, 'addr', 'add', `${h.addr}/30`, 'dev', 'eth0']);
    await ip(['-n', h.ns, 'link', 'set', 'eth0', 'up']);
    // Only the cluster is routed: the host has no other way out, so its Ceph traffic can only
    // cross its veth.
    await ip(['-n', h.ns, 'route', 'add', `${cephAddr}/32`, 'via', h.gateway]);
  }
  return { cephAddr, a, b };
}

async function daemon(t: Tap.Test, netns: string) {
  const dir = tempDir(t);
  const qmpSock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, netns, args: ['--qmp', `unix:${qmpSock}`, '--log-level', 'warn'], env: { CEPH_CONF: '' } });
  const w = await QmpWire.connect(qmpSock);
  t.teardown(() => w.close());
  return { d, w };
}

/** The lock holders' client addresses, as `rbd lock ls` reports them (ADDR:0/NONCE). */
async function lockHolders(ceph: CephCluster): Promise<string[]> {
  const locks = JSON.parse(await ceph.rbdOk(['lock', 'ls', '--format', 'json', 'rbd/hosts1'])) as Array<{ address: string }>;
  return locks.map((l) => l.address);
}

// Network set-up, a cluster start (~5 s), two daemons and a takeover take ~12 s; a hung step
// must fail the test rather than hold the machine.
t.test('a writer on host B is refused while host A holds the lock; after kill -9 of A, B breaks it and reads what A flushed', { timeout: 180_000 }, async (t) => {
  const hosts = await makeHosts(t);
  const ceph = await startCeph(t, { addr: hosts.cephAddr });
  const rbdNode = (node: string, extra: Record<string, unknown> = {}) => ({ driver: 'rbd', 'node-name': node, pool: 'rbd', image: 'hosts1', conf: ceph.conf, ...extra });

  await ceph.rbdOk(['create', '--size', '8M', 'rbd/hosts1']);

  const a = await daemon(t, hosts.a.ns);
  await a.w.ok('blockdev-add', rbdNode('a'));
  await a.w.ok('block-export-add', { type: 'nbd', id: 'a', 'node-name': 'a', name: 'a', writable: true });
  const wr = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', '-c', 'write -P 0xa5 3M 64k', '-c', 'flush', a.d.uri('a')]);
  t.equal(wr.code, 0, wr.stderr);
  t.notMatch(wr.stdout, /failed/, 'daemon A wrote and flushed');
  const heldByA = await lockHolders(ceph);
  t.ok(heldByA.length === 1 && heldByA[0].startsWith(`${hosts.a.addr}:`), `the lock is held from host A's address (${heldByA.join(', ')})`);

  const b = await daemon(t, hosts.b.ns);
  const refused = await b.w.cmd('blockdev-add', rbdNode('b'));
  t.match(refused.error?.desc, /^Failed to get the exclusive lock on RBD image 'rbd\/hosts1' \(held by (\S+)\): EROFS; is another process writing the image\?/, 'host B is refused, naming the image');
  t.ok(heldByA.length === 1 && refused.error?.desc.includes(`held by ${heldByA[0]}`), `the refusal names host A's client as the holder: ${refused.error?.desc}`);

  const killed = await a.d.stop('SIGKILL');
  t.equal(killed, null, 'daemon A is gone (SIGKILL: no close, its lock and watch stay)');
  await b.w.ok('blockdev-add', rbdNode('b', { 'x-break-lock': true }));
  t.match(b.d.stderr(), /rbd-lock-broken/, 'the break is logged');
  const heldByB = await lockHolders(ceph);
  t.ok(heldByB.length === 1 && heldByB[0].startsWith(`${hosts.b.addr}:`), `the lock is now held from host B's address, in ${hosts.b.subnet} (${heldByB.join(', ')})`);
  const blocklist = await run('ceph', ['-c', ceph.conf, 'osd', 'blocklist', 'ls'], { env: ceph.env });
  t.ok((blocklist.stdout + blocklist.stderr).includes(heldByA[0] ?? 'no holder'), 'host A’s client is blocklisted (fenced)');

  await b.w.ok('block-export-add', { type: 'nbd', id: 'b', 'node-name': 'b', name: 'b', writable: true });
  const rd = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0x5a 0 1M', '-c', 'read -P 0xa5 3M 64k', '-c', 'read -P 0 1M 2M', b.d.uri('b')]);
  t.equal(rd.code, 0, rd.stderr);
  t.notMatch(rd.stdout, /failed|verification/, 'host B reads what host A wrote and flushed');
});
