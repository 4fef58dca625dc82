/**
 * The NBD server: listening sockets (TCP and unix), the exports it serves by
 * name, and its connections. One server per daemon, as QEMU's
 * nbd-server-start; exports come and go through the export registry.
 */
import { removeStaleSocket } from '../unix-socket.js';
import type { IoStats } from '../metrics/stats.js';
import fs from 'node:fs';
import net from 'node:net';
import { VdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import type { DirtyBitmap } from '../block/dirty-bitmap.js';
import type { BlockExport, ExportDriver, ExportHandle } from '../export/registry.js';
import { lookupBitmap } from '../block/bitmap-ops.js';
import { BLOCK_DIRTY_BITMAP } from '../qapi/block.js';
import { type Type, bool, check, int, str, struct, arrayOf, alternate } from '../qapi/schema.js';
import { SOCKET_ADDRESS, type SocketAddress, unixSocketPath } from '../qapi/sockets.js';
import type { ObjectRegistry } from '../objects/registry.js';
import type { TlsCreds } from '../objects/tls-creds.js';
import { NbdConnection } from './connection.js';
import { checkSocketDirectory, takeListenFds, unixSocketPathOfFd } from '../systemd.js';
import { BufferBudget, DEFAULT_BUFFER_LIMIT } from './limits.js';
import type { ExportedBitmap } from './meta.js';
import { NBD_MAX_STRING, QEMU_ALLOCATION_DEPTH, QEMU_DIRTY_BITMAP } from './protocol.js';

export interface NbdServerOptions {
  addr: SocketAddress;
  /** Clients at once across every listener; 0 = unlimited (QEMU's default for nbd-server-start). */
  'max-connections'?: number;
  /** Seconds a client in transmission may stay idle before it is disconnected; 0 = never (vdisk's addition). */
  'x-idle-timeout'?: number;
  /** Bytes all clients together may make the server buffer (write payloads, unsent replies); 0 = no limit. */
  'x-buffer-limit'?: number;
  /** Seconds a client may take to finish the handshake (vdisk's addition). */
  'handshake-timeout'?: number;
  /** Id of server-endpoint TLS credentials: clients must NBD_OPT_STARTTLS first. */
  'tls-creds'?: string;
  /** Id of an authz object the client's identity (certificate DN, PSK username) must pass. */
  'tls-authz'?: string;
}

/** The server's TLS: its credentials and, optionally, who may connect. */
export interface NbdServerTls {
  creds: TlsCreds;
  authzId: string | undefined;
}

export const NBD_SERVER_OPTIONS: Type = struct('NbdServerOptions', {
  addr: SOCKET_ADDRESS,
  '*tls-creds': str,
  '*tls-authz': str,
  '*max-connections': int('uint32'),
  '*handshake-timeout': int('uint32'),
  '*x-idle-timeout': int('uint32'),
  '*x-buffer-limit': int('size'),
});

export interface NbdExport {
  name: string;
  description?: string;
  node: BlockNode;
  writable: boolean;
  writethrough: boolean;
  connections: Set<NbdConnection>;
  /** Set when the export is being removed: no new clients. */
  closing: boolean;
  /** Published as qemu:allocation-depth. */
  allocationDepth: boolean;
  /** Published as qemu:dirty-bitmap:NAME, in the order given (which fixes their context ids). */
  bitmaps: ExportedBitmap[];
  /** Clients at once on this export (x-max-connections); 0 = only the server's limit. */
  maxConnections: number;
  /** The export's own request counters (BlockExport.stats). */
  stats: IoStats;
}

export class NbdServer {
  readonly maxConnections: number;
  readonly handshakeTimeoutMs: number;
  /** 0: idle clients stay. */
  readonly idleTimeoutMs: number;
  /** Write payloads and unsent replies of every connection together. */
  readonly budget: BufferBudget;
  /** Clients turned away at accept because of max-connections (for x-query-nbd-server). */
  private refusedAtAccept = 0;
  private readonly exports = new Map<string, NbdExport>();
  private readonly connections = new Set<NbdConnection>();
  private readonly listeners: net.Server[] = [];
  private readonly unixPaths: string[] = [];
  /** Human-readable addresses, for logs and the start-up banner. */
  readonly endpoints: string[] = [];
  /** Listening addresses beyond this machine (not loopback), for the unencrypted-export warning. */
  private readonly exposed: string[] = [];

  /** Set when clients must negotiate TLS before anything else. */
  readonly tls: NbdServerTls | undefined;

  private constructor(
    options: NbdServerOptions,
    private readonly objects: ObjectRegistry | undefined,
  ) {
    this.maxConnections = options['max-connections'] ?? 0;
    this.handshakeTimeoutMs = (options['handshake-timeout'] ?? 10) * 1000;
    this.idleTimeoutMs = (options['x-idle-timeout'] ?? 0) * 1000;
    this.budget = new BufferBudget(options['x-buffer-limit'] ?? DEFAULT_BUFFER_LIMIT, () => this.connections.size);
    const credsId = options['tls-creds'];
    const authzId = options['tls-authz'];
    if (credsId === undefined) {
      // QEMU: "tls-authz is not supported without tls-creds".
      if (authzId !== undefined) throw new VdiskError('EINVAL', 'tls-authz is not supported without tls-creds');
      return;
    }
    if (!objects) throw new VdiskError('ENOENT', `No TLS credentials with id '${credsId}'`);
    const creds = objects.tlsCreds(credsId, 'server');
    if (authzId !== undefined && creds.qomType === 'tls-creds-x509' && !creds.verifyPeer) {
      // QEMU would accept this and check nothing: the name is only known once the certificate is verified.
      throw new VdiskError('EINVAL', `tls-authz needs TLS credentials with verify-peer=on ('${credsId}' has verify-peer=off, so no client is identified)`);
    }
    this.tls = { creds, authzId };
  }

  /** Starts listening on options.addr. */
  static async start(options: NbdServerOptions, objects?: ObjectRegistry): Promise<NbdServer> {
    const server = new NbdServer(options, objects);
    if (server.tls) objects!.hold(server.tls.creds.id, 'the NBD server');
    try {
      await server.listen(options.addr);
    } catch (err) {
      if (server.tls) objects!.release(server.tls.creds.id, 'the NBD server');
      throw err;
    }
    if (server.tls) logEvent('info', 'nbd-server-tls', { tlsCreds: server.tls.creds.id, type: server.tls.creds.qomType, tlsAuthz: server.tls.authzId });
    return server;
  }

  /** Whether a later --nbd-server's TLS options agree with the server's (one server, one TLS setting). */
  sameTls(options: NbdServerOptions): boolean {
    return options['tls-creds'] === this.tls?.creds.id && options['tls-authz'] === this.tls?.authzId;
  }

  /**
   * Whether a client identity passes tls-authz. A missing authz object denies
   * everyone, as QEMU's qauthz_is_allowed_by_id.
   */
  authorize(identity: string | undefined): { ok: true } | { ok: false; reason: string } {
    const id = this.tls?.authzId;
    if (id === undefined) return { ok: true };
    const authz = this.objects?.get(id);
    if (!authz || !('isAllowed' in authz)) return { ok: false, reason: `No authorization object with id '${id}'` };
    if (identity === undefined) return { ok: false, reason: 'the client has no identity to authorize' };
    if (!authz.isAllowed(identity)) return { ok: false, reason: `TLS authz check for ${identity} is denied` };
    return { ok: true };
  }

  /** Listens on one more address (the server may have several). */
  async listen(addr: SocketAddress): Promise<void> {
    if (addr.type !== 'fd') return this.listenOn(addr);
    // A systemd .socket unit passes all its sockets under one name: serve every one of them.
    for (const fd of takeListenFds(addr.str, 'nbd-server addr.type=fd')) await this.listenOn(addr, fd);
  }

  private async listenOn(addr: SocketAddress, fd?: number): Promise<void> {
    // max-connections is counted in accept() across all listeners, not by net.Server (per listener).
    // Accepted paused: a connection reads its socket itself (NbdConnection, direct reading).
    const srv = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => this.accept(socket));
    const unixPath = addr.type === 'unix' ? unixSocketPath(addr) : '';
    if (addr.type === 'unix' && !addr.abstract) {
      checkSocketDirectory(addr.path, 'nbd-server');
      await removeStaleSocket(addr.path, { busy: `Failed to listen on ${addr.path}: another server is listening there`, notSocket: `Failed to listen on ${addr.path}: a file that is not a socket exists there` });
    }
    // keep-alive=on: the kernel probes an idle client and ends the connection of one that is gone.
    const keepAlive = addr.type === 'inet' && addr['keep-alive'] === true;
    if (keepAlive) srv.on('connection', (socket: net.Socket) => socket.setKeepAlive(true));
    await new Promise<void>((resolve, reject) => {
      srv.once('error', (err: NodeJS.ErrnoException) => {
        const where = addr.type === 'unix' ? addr.path : addr.type === 'inet' ? `${addr.host}:${addr.port}` : `fd ${addr.str}`;
        const errno = err.code === 'EADDRINUSE' ? 'EBUSY' : err.code === 'EACCES' ? 'EACCES' : 'EIO';
        reject(new VdiskError(errno, `Failed to listen on ${where}: ${err.message}`));
      });
      if (addr.type === 'unix') srv.listen(unixPath, resolve);
      else if (addr.type === 'inet') srv.listen({ host: addr.host, port: Number(addr.port) }, resolve);
      else srv.listen({ fd }, resolve);
    });
    srv.on('error', (err) => logEvent('error', 'nbd-listener-error', { error: err.message }));
    this.listeners.push(srv);
    let endpoint: string;
    if (addr.type === 'unix' && addr.abstract) {
      endpoint = `unix:@${addr.path}`; // no file to remove at stop
    } else if (addr.type === 'unix') {
      this.unixPaths.push(addr.path);
      endpoint = `unix:${addr.path}`;
    } else if (addr.type === 'inet') {
      const a = srv.address() as net.AddressInfo;
      endpoint = `tcp:${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}`;
    } else {
      // A passed socket is described by what it is bound to, so URIs and the exposure check work;
      // its file (if any) belongs to whoever made it (systemd), so it is not removed at stop.
      const a = srv.address();
      const unix = typeof a === 'string' || !a ? (a || unixSocketPathOfFd(fd!)) : undefined;
      endpoint = a && typeof a === 'object' ? `tcp:${a.family === 'IPv6' ? `[${a.address}]` : a.address}:${a.port}` : unix ? `unix:${unix}` : `fd:${fd}`;
    }
    this.endpoints.push(endpoint);
    logEvent('info', 'nbd-server-listening', {
      address: endpoint,
      ...(keepAlive ? { keepAlive } : {}),
      maxConnections: this.maxConnections || 'unlimited',
      ...(this.idleTimeoutMs ? { idleTimeout: this.idleTimeoutMs / 1000 } : {}),
      bufferLimit: this.budget.limit || 'unlimited',
      tls: this.tls ? this.tls.creds.id : 'off',
    });
    const bound = srv.address();
    if (bound && typeof bound === 'object' && !isLoopback(bound.address)) {
      this.exposed.push(endpoint);
      for (const e of this.exports.values()) if (e.writable) this.warnUnencrypted(e.name, [endpoint]);
    }
  }

  /** One line for each writable export anyone on the network could write without TLS. */
  private warnUnencrypted(exportName: string, endpoints: string[]): void {
    if (this.tls || endpoints.length === 0) return;
    logEvent('warn', 'nbd-writable-export-without-tls', {
      export: exportName,
      endpoints,
      advice: 'anyone who can reach these addresses can write this disk; use tls-creds, a loopback address or a unix socket',
    });
  }

  /** The TCP port actually bound (useful with port 0). */
  get tcpPort(): number | undefined {
    for (const l of this.listeners) {
      const a = l.address();
      if (a && typeof a === 'object') return a.port;
    }
    return undefined;
  }

  /**
   * A second --nbd-server adds a listener to this server: limits given there
   * must be the server's (they are totals, not per listener).
   */
  checkSameLimits(options: NbdServerOptions): void {
    const given = options['max-connections'];
    if (given !== undefined && given !== this.maxConnections) {
      throw new VdiskError('EINVAL', `max-connections is the NBD server's total over all its addresses: every --nbd-server must give the same value (the server has ${this.maxConnections})`);
    }
    const idle = options['x-idle-timeout'];
    if (idle !== undefined && idle * 1000 !== this.idleTimeoutMs) {
      throw new VdiskError('EINVAL', `every --nbd-server must give the same x-idle-timeout (the server has ${this.idleTimeoutMs / 1000})`);
    }
    const buffer = options['x-buffer-limit'];
    if (buffer !== undefined && buffer !== this.budget.limit) {
      throw new VdiskError('EINVAL', `every --nbd-server must give the same x-buffer-limit (the server has ${this.budget.limit})`);
    }
  }

  /**
   * Over max-connections the client is accepted and closed at once (no
   * greeting): it gets a clean EOF instead of waiting in the backlog as in
   * QEMU, and the refusal is logged with who it was (docs/design/limits.md).
   */
  private accept(socket: net.Socket): void {
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    if (this.maxConnections > 0 && this.connections.size >= this.maxConnections) {
      this.refusedAtAccept++;
      logEvent('warn', 'nbd-client-refused', { peer, reason: 'the server has max-connections clients', limit: this.maxConnections, connections: this.connections.size });
      socket.on('error', () => undefined);
      socket.destroy();
      return;
    }
    const conn = new NbdConnection(socket, this, peer);
    this.connections.add(conn);
    logEvent('debug', 'nbd-connection-accepted', { connection: conn.id, peer });
  }

  connectionClosed(conn: NbdConnection): void {
    this.connections.delete(conn);
    conn.export?.connections.delete(conn);
    this.budget.leave(conn);
  }

  /**
   * Whether a client may select an export (NBD_OPT_GO, NBD_OPT_INFO, which
   * must answer as GO would, and NBD_OPT_EXPORT_NAME): the refusal message,
   * or undefined. Logged once per connection, however often it asks.
   */
  admit(conn: NbdConnection, exp: NbdExport): string | undefined {
    if (exp.maxConnections === 0 || exp.connections.size < exp.maxConnections) return undefined;
    const reason = `export '${exp.name}' has reached its limit of ${exp.maxConnections} client${exp.maxConnections === 1 ? '' : 's'} (x-max-connections)`;
    if (!this.refusalLogged.has(conn)) {
      this.refusalLogged.add(conn);
      logEvent('warn', 'nbd-client-refused', { connection: conn.id, peer: conn.peer, export: exp.name, reason, limit: exp.maxConnections });
    }
    return reason;
  }

  private readonly refusalLogged = new WeakSet<NbdConnection>();

  /** Whether NBD_FLAG_CAN_MULTI_CONN may be advertised: not when only one client can connect. */
  multiConn(exp: NbdExport): boolean {
    return this.maxConnections !== 1 && exp.maxConnections !== 1;
  }

  /** x-query-nbd-server: limits, what is buffered, and each connection. */
  query(): Record<string, unknown> {
    return {
      endpoints: this.endpoints,
      'max-connections': this.maxConnections,
      'idle-timeout': this.idleTimeoutMs / 1000,
      'buffer-limit': this.budget.limit,
      buffered: this.budget.total,
      'buffered-peak': this.budget.peak,
      'budget-waiters': this.budget.waiters,
      'budget-waits': this.budget.waits,
      'refused-at-accept': this.refusedAtAccept,
      exports: [...this.exports.values()].map((e) => ({ name: e.name, clients: e.connections.size, 'max-connections': e.maxConnections })),
      connections: [...this.connections].map((c) => c.stats()),
    };
  }

  findExport(name: string): NbdExport | undefined {
    let exp = this.exports.get(name);
    // The empty name selects the default export: the only one, or the first one added.
    if (exp === undefined && name === '') exp = this.exports.values().next().value;
    return exp && !exp.closing ? exp : undefined;
  }

  listExports(): NbdExport[] {
    return [...this.exports.values()].filter((e) => !e.closing);
  }

  /** Whether a name is taken, by a live export or one still closing (its name is not free yet). */
  hasExport(name: string): boolean {
    return this.exports.has(name);
  }

  addExport(exp: NbdExport): void {
    if (this.exports.has(exp.name)) throw new VdiskError('EEXIST', `NBD server already has export named '${exp.name}'`);
    this.exports.set(exp.name, exp);
    if (exp.writable) this.warnUnencrypted(exp.name, this.exposed);
  }

  /** Stops serving an export; with hard, disconnects its clients at once, else waits for them. */
  async removeExport(exp: NbdExport, hard: boolean): Promise<void> {
    exp.closing = true;
    const conns = [...exp.connections];
    await Promise.all(conns.map((c) => (hard ? (c.destroy(), c.whenClosed()) : c.whenClosed())));
    this.exports.delete(exp.name);
  }

  /**
   * Stops listening, finishes requests in flight, closes every connection.
   * A listener's close() calls back only once its last connection is gone,
   * so the connections are closed while it waits, not after (else a client
   * that stays attached, as the kernel's nbd-client does, hangs the stop).
   */
  async stop(): Promise<void> {
    const listenersClosed = this.listeners.map((l) => new Promise<void>((r) => l.close(() => r())));
    this.listeners.length = 0;
    await Promise.all([...this.connections].map((c) => c.gracefulClose()));
    await Promise.all(listenersClosed);
    for (const p of this.unixPaths) fs.rmSync(p, { force: true });
    if (this.tls) this.objects?.release(this.tls.creds.id, 'the NBD server');
    logEvent('info', 'nbd-server-stopped', { endpoints: this.endpoints });
  }
}

/** 127.0.0.0/8 and ::1 (also as IPv4-mapped addresses). */
function isLoopback(address: string): boolean {
  return /^127\./.test(address) || /^::ffff:127\./i.test(address) || address === '::1';
}


/**
 * The bitmaps option of block-export-add, resolved as QEMU's nbd_export_create
 * does: a name is looked for on the exported node and then down its chain
 * of filters and backing files; {node, name} names one bitmap exactly. An
 * enabled bitmap found by name on a writable node cannot go out on a
 * read-only export (it would keep changing under a client that was
 * promised a fixed view); a busy or inconsistent bitmap cannot go at all.
 */
function resolveBitmaps(graph: BlockGraph, exp: BlockExport, items: Array<string | { node: string; name: string }>): DirtyBitmap[] {
  return items.map((item) => {
    if (typeof item !== 'string') {
      const { bitmap } = lookupBitmap(graph, item.node, item.name);
      bitmap.check({ busy: true, inconsistent: true });
      return bitmap;
    }
    let node: BlockNode | undefined = exp.node;
    let bitmap: DirtyBitmap | undefined;
    for (; node; node = node.filterOrBacking) {
      bitmap = node.dirtyBitmaps.find((b) => b.name === item);
      if (bitmap) break;
    }
    if (!bitmap || !node) throw new VdiskError('ENOENT', `Bitmap '${item}' is not found`);
    if (!exp.writable && !node.readOnly && bitmap.enabled) {
      throw new VdiskError('EINVAL', `Enabled bitmap '${item}' incompatible with readonly export`);
    }
    bitmap.check({ busy: true, inconsistent: true });
    return bitmap;
  });
}

/** The nbd type of block-export-add. */
export function nbdExportDriver(getServer: () => NbdServer | undefined, graph: BlockGraph): ExportDriver {
  return {
    type: 'nbd',
    members: {
      '*name': str,
      '*description': str,
      '*bitmaps': arrayOf(alternate('BlockDirtyBitmapOrStr', [str, BLOCK_DIRTY_BITMAP])),
      '*allocation-depth': bool,
      // vdisk's extension: a per-export client limit within the server's max-connections.
      '*x-max-connections': int('uint32'),
    },
    async create(exp: BlockExport, options: Record<string, unknown>): Promise<ExportHandle> {
      // Checks in QEMU's order, so the first problem reported is the one QEMU reports.
      const server = getServer();
      if (!server) throw new VdiskError('ENOENT', 'NBD server not running');
      const name = (options.name as string | undefined) ?? exp.node.nodeName;
      if (Buffer.byteLength(name) > NBD_MAX_STRING) throw new VdiskError('EINVAL', `export name '${name}' too long`);
      const description = options.description as string | undefined;
      if (description !== undefined && Buffer.byteLength(description) > NBD_MAX_STRING) {
        throw new VdiskError('EINVAL', `description '${description}' too long`);
      }
      if (server.hasExport(name)) throw new VdiskError('EEXIST', `NBD server already has export named '${name}'`);
      const bitmaps = resolveBitmaps(graph, exp, (options.bitmaps as Array<string | { node: string; name: string }> | undefined) ?? []);
      const nbdExp: NbdExport = {
        name,
        description,
        // Read per request: a filter inserted above the node (a backup) takes the next ones.
        get node() {
          return exp.node;
        },
        writable: exp.writable,
        writethrough: exp.writethrough,
        connections: new Set(),
        closing: false,
        allocationDepth: (options['allocation-depth'] as boolean | undefined) ?? false,
        bitmaps: bitmaps.map((bitmap) => ({ bitmap, context: QEMU_DIRTY_BITMAP + bitmap.name! })),
        maxConnections: (options['x-max-connections'] as number | undefined) ?? 0,
        stats: exp.stats,
      };
      server.addExport(nbdExp);
      // Nothing can fail from here on, and nothing awaited since the checks: the claims cannot collide.
      for (const b of bitmaps) b.claim(exp);
      if (bitmaps.length || nbdExp.allocationDepth) {
        logEvent('info', 'nbd-export-contexts', {
          export: name,
          contexts: [...(nbdExp.allocationDepth ? [QEMU_ALLOCATION_DEPTH] : []), ...nbdExp.bitmaps.map((b) => b.context)],
        });
      }
      return {
        clientCount: () => nbdExp.connections.size,
        shutdown: async (hard) => {
          await server.removeExport(nbdExp, hard);
          // Free once no client can ask about them any more, before the export is reported gone.
          for (const b of bitmaps) b.release(exp);
        },
      };
    },
  };
}

export function checkNbdServerOptions(raw: unknown, mode: 'json' | 'keyval'): NbdServerOptions {
  return check(NBD_SERVER_OPTIONS, raw, '', mode) as unknown as NbdServerOptions;
}
