/**
 * A throwaway single-node Ceph cluster for one test (scripts/ceph-cluster.sh): started in a
 * temp dir, stopped at teardown, both bounded in time. The cluster has a pool `rbd`; clients
 * reach it with `-c conf` (or CEPH_CONF), as client.admin, whose key is in `keyring`.
 */
import fs from 'node:fs';
import path from 'node:path';
import { type DaemonHandle, startDaemon } from './daemon.js';
import { QmpWire } from './qmp.js';
import { ROOT, requireTools, run, tempDir } from './tools.js';

export interface CephCluster {
  dir: string;
  /** The cluster's ceph.conf: it names the monitor and the client.admin keyring. */
  conf: string;
  keyring: string;
  /** Environment for the ceph, rbd and rados tools and qemu-img's rbd driver: CEPH_CONF set. */
  env: NodeJS.ProcessEnv;
  /** Runs `rbd -c conf ...`; its result. */
  rbd(args: string[], input?: string | Buffer): ReturnType<typeof run>;
  /** Runs `rbd`; its stdout, or an error with its stderr (which fails the test that awaits it). */
  rbdOk(args: string[]): Promise<string>;
}

interface TestLike {
  fail(message: string): void;
  teardown(fn: () => unknown): void;
}

const SCRIPT = path.join(ROOT, 'scripts', 'ceph-cluster.sh');
/** The script waits at most ~30 s for each step itself; this is the outer bound. */
const START_TIMEOUT_MS = 90_000;
const STOP_TIMEOUT_MS = 30_000;

export interface CephOptions {
  /**
   * The IPv4 address the monitor and the OSD listen on (`ceph-cluster.sh start DIR --addr IP`),
   * for clients in other network namespaces; 127.0.0.1 when left out.
   */
  addr?: string;
}

/** Starts a cluster for test t (which fails, never skips, if Ceph is not installed). */
export async function startCeph(t: TestLike, options: CephOptions = {}): Promise<CephCluster> {
  if (!requireTools(t, 'ceph-mon', 'ceph-osd', 'ceph', 'rbd', 'monmaptool', 'ceph-authtool')) {
    throw new Error("Ceph is not installed: run 'bash scripts/setup.sh --test'");
  }
  const dir = path.join(tempDir(t, 'vdisk-ceph-'), 'cluster');
  // Registered before the start, so a start that fails half-way is stopped too (teardowns run
  // last-registered first: the stop runs before tempDir's removal).
  t.teardown(async () => {
    const r = await run('bash', [SCRIPT, 'stop', dir], { timeoutMs: STOP_TIMEOUT_MS });
    if (r.code !== 0) t.fail(`ceph-cluster.sh stop: ${r.stderr}`);
  });
  const addrArgs = options.addr ? ['--addr', options.addr] : [];
  const started = await run('bash', [SCRIPT, 'start', dir, ...addrArgs], { timeoutMs: START_TIMEOUT_MS });
  if (started.code !== 0) throw new Error(`ceph-cluster.sh start failed (${started.code ?? started.signal}): ${started.stderr}`);
  const conf = started.stdout.trim().split('\n').pop()!;
  const env = { ...process.env, CEPH_CONF: conf };
  const rbd = (args: string[], input?: string | Buffer) => run('rbd', ['-c', conf, ...args], { env, input, timeoutMs: 60_000 });
  return {
    dir,
    conf,
    keyring: path.join(dir, 'keyring'),
    env,
    rbd,
    async rbdOk(args) {
      // Thrown rather than asserted on `t`: the cluster is the file's, the failure the subtest's.
      const r = await rbd(args);
      if (r.code !== 0) throw new Error(`rbd ${args.join(' ')} exited with ${r.code ?? r.signal}: ${r.stderr}`);
      return r.stdout;
    },
  };
}

export interface Radosgw {
  /** http://127.0.0.1:PORT (path-style S3). */
  endpoint: string;
  /** https://127.0.0.1:PORT, when started with a certificate. */
  httpsEndpoint: string | undefined;
  accessKey: string;
  secretKey: string;
  /** Seconds `ceph-cluster.sh rgw-start` took (gateway up, pools made, user created). */
  startSeconds: number;
}

/**
 * Adds a radosgw and an S3 user to a cluster from startCeph (`ceph-cluster.sh rgw-start`), with an
 * https endpoint too when given a certificate and key. The cluster's stop (registered by startCeph)
 * stops the gateway too.
 */
export async function startRgw(cluster: CephCluster, https?: { cert: string; key: string }): Promise<Radosgw> {
  const began = Date.now();
  const extra = https ? ['--https', https.cert, https.key] : [];
  const started = await run('bash', [SCRIPT, 'rgw-start', cluster.dir, ...extra], { timeoutMs: START_TIMEOUT_MS });
  if (started.code !== 0) throw new Error(`ceph-cluster.sh rgw-start failed (${started.code ?? started.signal}): ${started.stderr}`);
  const read = (name: string) => fs.readFileSync(path.join(cluster.dir, 'rgw', name), 'utf8').trim();
  const urls = started.stdout.trim().split('\n').filter((l) => /^https?:\/\//.test(l));
  return {
    endpoint: urls.find((u) => u.startsWith('http:'))!,
    httpsEndpoint: urls.find((u) => u.startsWith('https:')),
    accessKey: read('access-key'),
    secretKey: read('secret-key'),
    startSeconds: (Date.now() - began) / 1000,
  };
}

/**
 * A `vdisk serve` with a QMP socket and an NBD server for the RBD tests. CEPH_CONF is
 * emptied so the nodes reach the cluster only through the options a test gives them.
 */
export async function startRbdDaemon(t: TestLike): Promise<{ d: DaemonHandle; w: QmpWire; dir: string }> {
  const dir = tempDir(t);
  const qmpSock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, args: ['--qmp', `unix:${qmpSock}`, '--log-level', 'warn'], env: { CEPH_CONF: '' } });
  const w = await QmpWire.connect(qmpSock);
  t.teardown(() => w.close());
  return { d, w, dir };
}
