/**
 * vdisk's NBD client: a BlockNode (driver 'nbd') whose bytes live on an NBD
 * server, as QEMU's nbd block driver.
 *
 * Handshake (fixed newstyle): NBD_OPT_STARTTLS first when TLS credentials
 * are given (the TLS socket then replaces the plain one), then
 * NBD_OPT_STRUCTURED_REPLY, then
 * NBD_OPT_SET_META_CONTEXT for base:allocation, then NBD_OPT_GO asking for
 * NBD_INFO_BLOCK_SIZE; a server without NBD_OPT_GO gets NBD_OPT_EXPORT_NAME.
 * Transmission: every request gets a cookie and many are in flight at once;
 * replies (simple, or structured chunks: data, hole, block status, error)
 * are matched to requests by cookie, in whatever order they come, by
 * NbdClientCore (src/nbd/client-core.ts: the reply parser without the socket).
 *
 * The node follows what the server advertises: its size, read-only flag,
 * FUA, flush, trim, write-zeroes and fast-zero support, and its block sizes
 * (minimum -> requestAlignment, preferred -> preferredSize, maximum ->
 * maxTransfer, at most 32 MiB). Errors from the server become VdiskError
 * with the matching errno. When the connection breaks, every request in
 * flight and every later one fails with EIO: nothing waits forever.
 */
import net from 'node:net';
import tls from 'node:tls';
import { BlockNode, type Extent, ReqFlags, Status } from '../node.js';
import type { DriverDef } from './index.js';
import { type Errno, VdiskError } from '../../errors.js';
import { logEvent } from '../../log.js';
import { int, str } from '../../qapi/schema.js';
import { SOCKET_ADDRESS, unixSocketPath } from '../../qapi/sockets.js';
import type { TlsCreds } from '../../objects/tls-creds.js';
import { ByteQueue } from '../../nbd/byte-queue.js';
import { type ClientEvent, type ClientRequest, NbdClientCore } from '../../nbd/client-core.js';
import * as P from '../../nbd/protocol.js';

/** Where the server listens. */
export type NbdClientAddress = { type: 'unix'; path: string; abstract?: boolean; tight?: boolean } | { type: 'inet'; host: string; port?: string | number };

export interface NbdClientOptions {
  nodeName: string;
  server: NbdClientAddress;
  /** The export to attach to ('' is the server's default). */
  exportName?: string;
  /** Open read-only even if the export is writable. */
  readOnly?: boolean;
  /** Negotiate structured replies (default true); false forces simple replies. */
  structuredReplies?: boolean;
  /** Negotiate base:allocation for block status (default true; needs structured replies). */
  blockStatus?: boolean;
  /** How long connecting and the handshake may take (default 30 s). */
  openTimeoutMs?: number;
  /** Client-endpoint TLS credentials: negotiate TLS before anything else. */
  tlsCreds?: TlsCreds;
  /** The name the server's certificate must carry (default: the inet host; none for unix sockets, as QEMU). */
  tlsHostname?: string;
}

const NBD_DEFAULT_PORT = 10809;
const OLDSTYLE_MAGIC = 0x00420281861253n;
/** Largest TRIM, WRITE_ZEROES or BLOCK_STATUS length sent at once (a 32-bit field, kept aligned). */
const MAX_LENGTH_REQUEST = 2 ** 31;
/** How long the extents of a block-status reply may answer later queries. */
const STATUS_CACHE_MS = 1000;
/** How long close() waits for the server to hang up after NBD_CMD_DISC. */
const CLOSE_TIMEOUT_MS = 2000;

/** strerror() of the errors connect() reports, for QEMU's wording of a failed connection. */
const SOCKET_ERRORS: Record<string, string> = {
  ECONNREFUSED: 'Connection refused',
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  ETIMEDOUT: 'Connection timed out',
  EHOSTUNREACH: 'No route to host',
  ENETUNREACH: 'Network is unreachable',
  ECONNRESET: 'Connection reset by peer',
  ENOTSOCK: 'Socket operation on non-socket',
  EADDRNOTAVAIL: 'Cannot assign requested address',
  ENOTFOUND: 'Name or service not known',
  EAI_AGAIN: 'Temporary failure in name resolution',
};

/** NBD error values to errno names, as QEMU's nbd_errno_to_system_errno (unknown values are EINVAL). */
export function errnoFromNbd(value: number): Errno {
  switch (value) {
    case P.NBD_EPERM:
      return 'EPERM';
    case P.NBD_EIO:
      return 'EIO';
    case P.NBD_ENOMEM:
      return 'ENOMEM';
    case P.NBD_ENOSPC:
      return 'ENOSPC';
    case P.NBD_EOVERFLOW:
      return 'EOVERFLOW';
    case P.NBD_ENOTSUP:
      return 'ENOTSUP';
    case P.NBD_ESHUTDOWN:
      return 'ESHUTDOWN';
    default:
      return 'EINVAL';
  }
}

/**
 * Parses an NBD URI as QEMU does: nbd://host[:port]/export (also nbd+tcp),
 * nbd+unix:///export?socket=PATH. The export name is the path without its
 * first '/', percent-decoded; a unix URI has no host and exactly the socket
 * parameter, a TCP URI no parameters.
 */
export function parseNbdUri(uri: string): { server: NbdClientAddress; exportName: string } {
  const bad = () => new VdiskError('EINVAL', `No valid URL specified: '${uri}'`);
  const m = /^([a-z+]+):\/\/([^/?#]*)([^?#]*)(?:\?([^#]*))?$/i.exec(uri);
  if (!m) throw bad();
  const scheme = m[1].toLowerCase();
  const authority = m[2];
  const path = m[3];
  const query = m[4];
  let exportName: string;
  try {
    exportName = decodeURIComponent(path.startsWith('/') ? path.slice(1) : path);
  } catch {
    throw bad();
  }
  const params: Array<[string, string]> = [];
  if (query !== undefined && query !== '') {
    for (const part of query.split('&')) {
      const eq = part.indexOf('=');
      try {
        params.push(eq < 0 ? [decodeURIComponent(part), ''] : [decodeURIComponent(part.slice(0, eq)), decodeURIComponent(part.slice(eq + 1))]);
      } catch {
        throw bad();
      }
    }
  }
  if (scheme === 'nbd+unix') {
    if (authority !== '' || params.length !== 1 || params[0][0] !== 'socket' || params[0][1] === '') throw bad();
    return { server: { type: 'unix', path: params[0][1] }, exportName };
  }
  if (scheme === 'nbd' || scheme === 'nbd+tcp') {
    if (params.length !== 0 || authority === '') throw bad();
    const hm = /^(?:\[([^\]]+)\]|([^:]+))(?::(\d+))?$/.exec(authority);
    if (!hm) throw bad();
    const host = hm[1] ?? hm[2];
    return { server: { type: 'inet', host, port: hm[3] !== undefined ? Number(hm[3]) : NBD_DEFAULT_PORT }, exportName };
  }
  throw bad();
}

/** Whether a file name is an NBD URI (nbd://, nbd+tcp://, nbd+unix://). */
export function isNbdUri(name: string): boolean {
  return /^nbd(\+tcp|\+unix)?:\/\//i.test(name);
}

/** The URI that names an export, for listings (QEMU's filename of an nbd node). */
export function nbdUri(server: NbdClientAddress, exportName: string): string {
  const name = encodeURI(exportName);
  if (server.type === 'unix') return `nbd+unix:///${name}?socket=${server.path}`;
  const host = server.host.includes(':') ? `[${server.host}]` : server.host;
  return `nbd://${host}:${server.port ?? NBD_DEFAULT_PORT}/${name}`;
}

/** Incoming bytes during the handshake, and a way to wait for them (the handshake reads sequentially). */
class Reader {
  private readonly queue = new ByteQueue();
  private waiter: { n: number; resolve: () => void; reject: (err: Error) => void } | undefined;
  private failure: Error | undefined;

  push(chunk: Buffer): void {
    this.queue.push(chunk);
    if (this.waiter && this.queue.length >= this.waiter.n) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve();
    }
  }

  fail(err: Error): void {
    this.failure ??= err;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(this.failure);
  }

  private wait(n: number): Promise<void> {
    if (this.queue.length >= n) return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.waiter = { n, resolve, reject }));
  }

  /** Bytes received and not yet taken. */
  get length(): number {
    return this.queue.length;
  }

  /** Takes everything buffered (the handshake is over; the rest is replies). */
  drain(): Buffer {
    return this.queue.take(this.queue.length);
  }

  async take(n: number): Promise<Buffer> {
    await this.wait(n);
    return this.queue.take(n);
  }

  async skip(n: number): Promise<void> {
    while (n > 0) {
      await this.wait(1);
      n -= this.queue.skip(n);
    }
  }
}

/** A request in flight: what the reply parser needs (ClientRequest) and who waits for it. */
interface Request extends ClientRequest {
  resolve: () => void;
  reject: (err: VdiskError) => void;
}

/** What the handshake learnt. */
interface ExportInfo {
  size: number;
  flags: number;
  structured: boolean;
  metaContextId: number | undefined;
  minBlock: number;
  preferredBlock: number;
  maxBlock: number;
}

function u64(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 2 ** 32 + b.readUInt32BE(at + 4);
}

function optionReplyError(type: number, option: string, exportName: string, message: string): VdiskError {
  const server = message ? ` (server reported: ${message})` : '';
  switch (type) {
    case P.NBD_REP_ERR_UNKNOWN:
      return new VdiskError('ENOENT', `Requested export not available: '${exportName}'${server}`);
    case P.NBD_REP_ERR_POLICY:
      return new VdiskError('EACCES', `Denied by server for option ${option}${server}`);
    case P.NBD_REP_ERR_TLS_REQD:
      return new VdiskError('EACCES', `TLS negotiation required before option ${option}${server}`);
    case P.NBD_REP_ERR_SHUTDOWN:
      return new VdiskError('ESHUTDOWN', `Server shutting down before option ${option}${server}`);
    case P.NBD_REP_ERR_BLOCK_SIZE_REQD:
      return new VdiskError('EINVAL', `Server requires INFO_BLOCK_SIZE for option ${option}${server}`);
    case P.NBD_REP_ERR_INVALID:
      return new VdiskError('EINVAL', `Server rejected option ${option} as invalid${server}`);
    case P.NBD_REP_ERR_TOO_BIG:
      return new VdiskError('EINVAL', `Server considers option ${option} too large${server}`);
    default:
      return new VdiskError('EIO', `Option ${option} failed with reply 0x${type.toString(16)}${server}`);
  }
}

export class NbdClientNode extends BlockNode {
  readonly driverName = 'nbd';
  readonly server: NbdClientAddress;
  readonly exportName: string;
  /** Transmission flags the server sent (NBD_FLAG_*). */
  private exportFlags = 0;
  private structured = false;
  private metaContextId: number | undefined;
  private socket!: net.Socket;
  private readonly reader = new Reader();
  /** Parses replies once the handshake is over (client-core.ts) and holds the requests in flight. */
  private readonly core = new NbdClientCore();
  private transmitting = false;
  private lost = false;
  private nextCookie = 1;
  /** Set once the connection is unusable; every request then fails with it. */
  private broken: VdiskError | undefined;
  private socketClosed!: Promise<void>;
  /** Called once when the node closes (lets go of the TLS credentials it holds). */
  onClosed: (() => void) | undefined;
  /**
   * Extents of the last block-status reply beyond the one returned, so a
   * caller walking the disk in order (map) asks once per reply, not once per
   * extent. Dropped on any write through this node and after STATUS_CACHE_MS
   * (other clients of the server may change the disk too).
   */
  private statusCache: { start: number; lengths: number[]; flags: number[]; generation: number; expires: number } | undefined;
  private writeGeneration = 0;

  private constructor(options: NbdClientOptions) {
    super({ nodeName: options.nodeName, readOnly: options.readOnly });
    this.server = options.server;
    this.exportName = options.exportName ?? '';
  }

  /** Connects, negotiates and returns the node, ready for requests. */
  static async connect(options: NbdClientOptions): Promise<NbdClientNode> {
    const node = new NbdClientNode(options);
    await node.open(options);
    return node;
  }

  /** Connects to an nbd:// or nbd+unix:// URI. */
  static fromUri(uri: string, options: Omit<NbdClientOptions, 'server' | 'exportName'>): Promise<NbdClientNode> {
    const { server, exportName } = parseNbdUri(uri);
    return NbdClientNode.connect({ ...options, server, exportName });
  }

  override get filename(): string {
    return nbdUri(this.server, this.exportName);
  }

  /** Whether structured replies were negotiated. */
  get structuredReplies(): boolean {
    return this.structured;
  }

  /** Whether block status comes from the server (base:allocation was negotiated). */
  get hasBlockStatus(): boolean {
    return this.metaContextId !== undefined;
  }

  /** The server's transmission flags for the export (NBD_FLAG_*). */
  get transmissionFlags(): number {
    return this.exportFlags;
  }

  // ---- connection and handshake ----------------------------------------------

  private async open(options: NbdClientOptions): Promise<void> {
    const timeoutMs = options.openTimeoutMs ?? 30_000;
    const socket =
      this.server.type === 'unix'
        ? net.connect({ path: unixSocketPath(this.server) })
        : net.connect({ host: this.server.host, port: Number(this.server.port ?? NBD_DEFAULT_PORT) });
    socket.setNoDelay(true);
    this.attach(socket);
    const timer = setTimeout(() => {
      this.connectionLost(`no answer from the server within ${timeoutMs / 1000} s`);
      this.socket.destroy();
    }, timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once('connect', resolve);
        socket.once('error', reject);
      });
      const info = await this.handshake(options);
      this.applyExportInfo(info, options);
    } catch (err) {
      this.socket.destroy();
      if (err instanceof VdiskError) throw err;
      // QEMU's words: "Failed to connect to '/path/sock': Connection refused".
      const target = this.server.type === 'unix' ? this.server.path : `${this.server.host}:${this.server.port ?? NBD_DEFAULT_PORT}`;
      const code = (err as NodeJS.ErrnoException).code ?? '';
      const errno: Errno = code === 'ENOENT' ? 'ENOENT' : code === 'EACCES' ? 'EACCES' : 'EIO';
      throw new VdiskError(errno, `Failed to connect to '${target}': ${SOCKET_ERRORS[code] ?? (err as Error).message}`, { cause: err });
    } finally {
      clearTimeout(timer);
    }
    logEvent('debug', 'nbd-client-connected', { uri: this.filename, size: this.length, structured: this.structured, blockStatus: this.hasBlockStatus });
    // From here on the socket carries replies: what the handshake left unread is their start.
    this.transmitting = true;
    const rest = this.reader.drain();
    if (rest.length) this.onReplies(rest);
  }

  private readonly onSocketData = (chunk: Buffer) => (this.transmitting ? this.onReplies(chunk) : this.reader.push(chunk));
  private readonly onSocketError = (err: Error) => this.connectionLost(err.message);
  private readonly onSocketClose = () => this.connectionLost('the server closed the connection');

  /** Makes `socket` the one requests go out on and replies come from. */
  private attach(socket: net.Socket): void {
    this.socket = socket;
    this.socketClosed = new Promise((resolve) => socket.once('close', () => resolve()));
    socket.on('data', this.onSocketData);
    socket.on('error', this.onSocketError);
    socket.on('close', this.onSocketClose);
  }

  /**
   * NBD_OPT_STARTTLS, then the client side of the TLS handshake over the
   * same socket; the server is checked (certificate and name, as QEMU's
   * qcrypto_tls_session_check_credentials) before anything else is sent.
   */
  private async startTls(creds: TlsCreds, hostname: string | undefined): Promise<void> {
    this.sendOption(P.NBD_OPT_STARTTLS);
    const r = await this.readOptionReply(P.NBD_OPT_STARTTLS);
    if (r.type !== P.NBD_REP_ACK) {
      const message = r.data.toString('utf8');
      throw new VdiskError('EACCES', `Server rejected request to start TLS${message ? ` (server reported: ${message})` : ''}`);
    }
    if (this.reader.length !== 0) throw new VdiskError('EIO', 'the server sent data after accepting NBD_OPT_STARTTLS');
    const raw = this.socket;
    raw.removeListener('data', this.onSocketData);
    raw.removeListener('close', this.onSocketClose);
    raw.removeListener('error', this.onSocketError);
    // A failed handshake surfaces as the promise's rejection below; later errors as connection loss.
    raw.on('error', () => undefined);
    const secure = tls.connect({ socket: raw, ...creds.clientOptions(hostname) });
    this.attach(secure);
    await new Promise<void>((resolve, reject) => {
      const fail = (err: Error) => reject(new VdiskError('EACCES', `TLS handshake failed: ${err.message}`));
      secure.once('error', fail);
      secure.once('secureConnect', () => {
        secure.removeListener('error', fail);
        resolve();
      });
      secure.once('close', () => fail(new Error('the server closed the connection')));
    });
    const check = creds.checkServer(secure, hostname);
    if (!check.ok) throw new VdiskError('EACCES', `TLS handshake failed: ${check.reason}`);
    logEvent('debug', 'nbd-client-tls', { uri: this.filename, protocol: secure.getProtocol(), cipher: secure.getCipher()?.name });
  }

  private sendBytes(...bufs: Buffer[]): void {
    if (bufs.length === 1) {
      this.socket.write(bufs[0]);
      return;
    }
    this.socket.cork();
    for (const b of bufs) this.socket.write(b);
    this.socket.uncork();
  }

  private sendOption(option: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.allocUnsafe(16);
    h.writeBigUInt64BE(P.IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(data.length, 12);
    this.sendBytes(h, data);
  }

  private async readOptionReply(option: number): Promise<{ type: number; data: Buffer }> {
    const h = await this.reader.take(20);
    if (h.readBigUInt64BE(0) !== P.NBD_OPT_REPLY_MAGIC) throw new VdiskError('EIO', 'bad option reply magic from the server');
    if (h.readUInt32BE(8) !== option) throw new VdiskError('EIO', `the server replied to option ${h.readUInt32BE(8)} instead of ${option}`);
    const type = h.readUInt32BE(12);
    const length = h.readUInt32BE(16);
    if (length > P.NBD_MAX_OPTION_LENGTH) throw new VdiskError('EIO', `option reply of ${length} bytes is too long`);
    const data = Buffer.from(await this.reader.take(length));
    return { type, data };
  }

  private async handshake(options: NbdClientOptions): Promise<ExportInfo> {
    const hello = await this.reader.take(18);
    if (hello.readBigUInt64BE(0) !== P.NBDMAGIC) throw new VdiskError('EIO', 'not an NBD server (bad magic)');
    const style = hello.readBigUInt64BE(8);
    if (style === OLDSTYLE_MAGIC) throw new VdiskError('ENOTSUP', 'the server speaks the oldstyle protocol, which is not supported');
    if (style !== P.IHAVEOPT) throw new VdiskError('EIO', 'not an NBD server (bad newstyle magic)');
    const serverFlags = hello.readUInt16BE(16);
    const fixed = (serverFlags & P.NBD_FLAG_FIXED_NEWSTYLE) !== 0;
    const noZeroes = (serverFlags & P.NBD_FLAG_NO_ZEROES) !== 0;
    const cf = Buffer.allocUnsafe(4);
    cf.writeUInt32BE((fixed ? P.NBD_FLAG_C_FIXED_NEWSTYLE : 0) | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
    this.sendBytes(cf);
    const name = Buffer.from(this.exportName);
    if (name.length > P.NBD_MAX_STRING) throw new VdiskError('EINVAL', 'export name is too long');

    const info: ExportInfo = { size: 0, flags: 0, structured: false, metaContextId: undefined, minBlock: 1, preferredBlock: 4096, maxBlock: P.NBD_MAX_PAYLOAD };
    if (options.tlsCreds) {
      if (!fixed) throw new VdiskError('EACCES', 'Server does not support STARTTLS (no fixed newstyle)');
      const hostname = options.tlsHostname ?? (this.server.type === 'inet' ? this.server.host : undefined);
      await this.startTls(options.tlsCreds, hostname);
    }
    if (!fixed) return this.exportNameOption(name, noZeroes, info);

    if (options.structuredReplies ?? true) {
      this.sendOption(P.NBD_OPT_STRUCTURED_REPLY);
      const r = await this.readOptionReply(P.NBD_OPT_STRUCTURED_REPLY);
      info.structured = r.type === P.NBD_REP_ACK;
    }
    if (info.structured && (options.blockStatus ?? true)) {
      const ctx = Buffer.from(P.BASE_ALLOCATION);
      const d = Buffer.allocUnsafe(4 + name.length + 4 + 4 + ctx.length);
      d.writeUInt32BE(name.length, 0);
      name.copy(d, 4);
      d.writeUInt32BE(1, 4 + name.length);
      d.writeUInt32BE(ctx.length, 8 + name.length);
      ctx.copy(d, 12 + name.length);
      this.sendOption(P.NBD_OPT_SET_META_CONTEXT, d);
      for (;;) {
        const r = await this.readOptionReply(P.NBD_OPT_SET_META_CONTEXT);
        if (r.type === P.NBD_REP_META_CONTEXT && r.data.length >= 4) {
          if (r.data.toString('utf8', 4) === P.BASE_ALLOCATION) info.metaContextId = r.data.readUInt32BE(0);
          continue;
        }
        // ACK ends the list; an error means no contexts (block status then reports everything as data).
        if (r.type !== P.NBD_REP_ACK) info.metaContextId = undefined;
        break;
      }
    }

    const go = Buffer.allocUnsafe(4 + name.length + 2 + 2);
    go.writeUInt32BE(name.length, 0);
    name.copy(go, 4);
    go.writeUInt16BE(1, 4 + name.length);
    go.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 6 + name.length);
    this.sendOption(P.NBD_OPT_GO, go);
    let haveExport = false;
    for (;;) {
      const r = await this.readOptionReply(P.NBD_OPT_GO);
      if (r.type === P.NBD_REP_INFO) {
        if (r.data.length < 2) throw new VdiskError('EIO', 'NBD_REP_INFO too short');
        const infoType = r.data.readUInt16BE(0);
        if (infoType === P.NBD_INFO_EXPORT && r.data.length === 12) {
          info.size = u64(r.data, 2);
          info.flags = r.data.readUInt16BE(10);
          haveExport = true;
        } else if (infoType === P.NBD_INFO_BLOCK_SIZE && r.data.length === 14) {
          info.minBlock = r.data.readUInt32BE(2);
          info.preferredBlock = r.data.readUInt32BE(6);
          info.maxBlock = r.data.readUInt32BE(10);
        }
        continue;
      }
      if (r.type === P.NBD_REP_ACK) {
        if (!haveExport) throw new VdiskError('EIO', 'the server did not send NBD_INFO_EXPORT');
        return info;
      }
      if (r.type === P.NBD_REP_ERR_UNSUP) {
        // An older server: NBD_OPT_EXPORT_NAME, which has no way to report errors.
        return this.exportNameOption(name, noZeroes, info);
      }
      throw optionReplyError(r.type, 'NBD_OPT_GO', this.exportName, r.data.toString('utf8'));
    }
  }

  private async exportNameOption(name: Buffer, noZeroes: boolean, info: ExportInfo): Promise<ExportInfo> {
    this.sendOption(P.NBD_OPT_EXPORT_NAME, name);
    let b: Buffer;
    try {
      b = await this.reader.take(10);
    } catch {
      throw new VdiskError('ENOENT', `Requested export not available: '${this.exportName}' (the server closed the connection)`);
    }
    info.size = u64(b, 0);
    info.flags = b.readUInt16BE(8);
    if (!noZeroes) await this.reader.skip(124);
    // Without NBD_OPT_GO there was no SET_META_CONTEXT for this export that counts.
    return info;
  }

  private applyExportInfo(info: ExportInfo, options: NbdClientOptions): void {
    if (!Number.isSafeInteger(info.size)) throw new VdiskError('EOVERFLOW', `export size ${info.size} is too large`);
    this.length = info.size;
    this.exportFlags = info.flags & P.NBD_FLAG_HAS_FLAGS ? info.flags : 0;
    this.structured = info.structured;
    this.metaContextId = info.metaContextId;
    this.core.structured = info.structured;
    this.core.metaContextId = info.metaContextId;
    this.readOnly = (options.readOnly ?? false) || (this.exportFlags & P.NBD_FLAG_READ_ONLY) !== 0;
    this.nativeFua = (this.exportFlags & P.NBD_FLAG_SEND_FUA) !== 0;
    const isPow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
    const min = isPow2(info.minBlock) && info.minBlock <= 65536 ? info.minBlock : 1;
    let max = Math.min(info.maxBlock || P.NBD_MAX_PAYLOAD, P.NBD_MAX_PAYLOAD);
    max = Math.max(min, max - (max % min));
    const preferred = Math.max(min, Math.min(info.preferredBlock || 4096, max));
    this.limits = { requestAlignment: min, maxTransfer: max, preferredSize: preferred };
  }

  // ---- transmission ----------------------------------------------------------------

  /** Fails everything in flight, and every later request, with EIO. */
  private connectionLost(reason: string): void {
    if (this.broken) return;
    this.broken = new VdiskError('EIO', `NBD connection to '${this.filename}' lost: ${reason}`);
    this.reader.fail(this.broken);
    this.lost = true;
    const pending = this.core.takeAll() as Request[];
    for (const r of pending) r.reject(this.broken);
    if (!this.isClosed && pending.length) logEvent('warn', 'nbd-client-disconnected', { uri: this.filename, reason, failedRequests: pending.length });
  }

  /** A reply the protocol does not allow: hang up (the spec's "hard disconnect"). */
  private protocolError(message: string): void {
    logEvent('warn', 'nbd-client-protocol-error', { uri: this.filename, error: message });
    this.connectionLost(message);
    this.socket.destroy();
  }

  private allocCookie(): number {
    for (;;) {
      const c = this.nextCookie;
      this.nextCookie = this.nextCookie >= 0xffffffff ? 1 : this.nextCookie + 1;
      if (!this.core.has(c)) return c;
    }
  }

  /** Sends one request and resolves when its reply (the last chunk of it) has arrived. */
  private request(type: number, flags: number, offset: number, length: number, payload?: Buffer, buf?: Buffer): Promise<Request> {
    if (this.broken) return Promise.reject(this.broken);
    const cookie = this.allocCookie();
    return new Promise<Request>((resolve, reject) => {
      const req: Request = { type, offset, length, buf, resolve: () => resolve(req), reject };
      this.core.add(cookie, req);
      const h = Buffer.allocUnsafe(28);
      h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
      h.writeUInt16BE(flags, 4);
      h.writeUInt16BE(type, 6);
      h.writeUInt32BE(0, 8);
      h.writeUInt32BE(cookie, 12);
      h.writeUInt32BE(Math.floor(offset / 2 ** 32), 16);
      h.writeUInt32BE(offset >>> 0, 20);
      h.writeUInt32BE(length, 24);
      if (payload) this.sendBytes(h, payload);
      else this.sendBytes(h);
    });
  }

  /** Reply bytes: each reply the core completes settles the request its cookie names. */
  private onReplies(chunk: Buffer): void {
    // After a connection loss nothing is read (a close by doClose still reads the last replies).
    if (this.lost) return;
    for (const e of this.core.push(chunk) as ClientEvent[]) {
      if (e.type === 'protocol-error') return this.protocolError(e.message);
      const req = e.req as Request;
      if (req.error) req.reject(this.serverError(req, req.error.code, req.error.message));
      else if (req.localError) req.reject(new VdiskError('EIO', req.localError));
      else req.resolve();
    }
  }

  private serverError(req: Request, code: number, message: string): VdiskError {
    const errno = errnoFromNbd(code);
    const what = P.CMD_NAMES[req.type] ?? String(req.type);
    return new VdiskError(errno, `NBD ${what} at ${req.offset} (${req.length} bytes) failed on the server: ${message || errno}`);
  }

  // ---- driver hooks -----------------------------------------------------------------

  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    await this.request(P.NBD_CMD_READ, 0, offset, buf.length, undefined, buf);
  }

  protected override doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    return this.changing(this.request(P.NBD_CMD_WRITE, flags & ReqFlags.FUA ? P.NBD_CMD_FLAG_FUA : 0, offset, buf.length, buf));
  }

  /**
   * Runs a request that changes the disk: cached block status is dropped when
   * it starts and again when it ends (a status reply that raced with it may
   * describe either state).
   */
  private async changing(op: Promise<unknown>): Promise<void> {
    this.writeGeneration++;
    this.statusCache = undefined;
    try {
      await op;
    } finally {
      this.writeGeneration++;
      this.statusCache = undefined;
    }
  }

  protected override async doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    if (!(this.exportFlags & P.NBD_FLAG_SEND_WRITE_ZEROES)) throw new VdiskError('ENOTSUP', 'the server does not support NBD_CMD_WRITE_ZEROES');
    let f = flags & ReqFlags.MAY_UNMAP ? 0 : P.NBD_CMD_FLAG_NO_HOLE;
    if (flags & ReqFlags.FUA) f |= P.NBD_CMD_FLAG_FUA;
    if (flags & ReqFlags.NO_FALLBACK) {
      if (!(this.exportFlags & P.NBD_FLAG_SEND_FAST_ZERO)) throw new VdiskError('ENOTSUP', 'the server does not support fast zeroing');
      f |= P.NBD_CMD_FLAG_FAST_ZERO;
    }
    await this.changing(this.chunked(offset, length, (o, n) => this.request(P.NBD_CMD_WRITE_ZEROES, f, o, n)));
  }

  protected override async doDiscard(offset: number, length: number): Promise<void> {
    if (!(this.exportFlags & P.NBD_FLAG_SEND_TRIM)) return;
    await this.changing(this.chunked(offset, length, (o, n) => this.request(P.NBD_CMD_TRIM, 0, o, n)));
  }

  protected override async doFlush(): Promise<void> {
    if (!(this.exportFlags & P.NBD_FLAG_SEND_FLUSH)) return;
    await this.request(P.NBD_CMD_FLUSH, 0, 0, 0);
  }

  protected override async doCache(offset: number, length: number): Promise<void> {
    if (!(this.exportFlags & P.NBD_FLAG_SEND_CACHE)) return;
    await this.chunked(offset, length, (o, n) => this.request(P.NBD_CMD_CACHE, 0, o, n));
  }

  /** NBD cannot resize an export (QEMU: "Cannot grow NBD nodes"). */
  protected override async doTruncate(size: number): Promise<void> {
    if (size > this.length) throw new VdiskError('ENOTSUP', 'Cannot grow NBD nodes');
    if (size < this.length) throw new VdiskError('ENOTSUP', 'Cannot resize NBD nodes');
  }

  /** Requests of at most MAX_LENGTH_REQUEST bytes (the length field has 32 bits), all in flight together. */
  private async chunked(offset: number, length: number, send: (offset: number, length: number) => Promise<unknown>): Promise<void> {
    const step = MAX_LENGTH_REQUEST - (MAX_LENGTH_REQUEST % this.limits.requestAlignment);
    const parts: Array<Promise<unknown>> = [];
    for (let done = 0; done < length; done += step) parts.push(send(offset + done, Math.min(step, length - done)));
    const results = await Promise.allSettled(parts);
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    if (this.metaContextId === undefined) return { length, flags: Status.DATA | Status.ALLOCATED, depth: 1, hostOffset: offset };
    const cached = this.fromCache(offset, length);
    if (cached) return cached;
    const generation = this.writeGeneration;
    const askFor = Math.min(length, MAX_LENGTH_REQUEST - (MAX_LENGTH_REQUEST % this.limits.requestAlignment));
    const req = await this.request(P.NBD_CMD_BLOCK_STATUS, 0, offset, askFor);
    const ext = req.extents;
    if (!ext || ext.length === 0) throw new VdiskError('EIO', 'the server sent no block status for base:allocation');
    if (generation === this.writeGeneration && ext.length > 2) {
      this.statusCache = { start: offset + ext[0], lengths: [], flags: [], generation, expires: Date.now() + STATUS_CACHE_MS };
      for (let i = 2; i < ext.length; i += 2) {
        this.statusCache.lengths.push(ext[i]);
        this.statusCache.flags.push(ext[i + 1]);
      }
    }
    return extentOf(offset, Math.min(ext[0], length), ext[1]);
  }

  /** The next cached extent when it starts exactly at offset (a caller walking the disk in order). */
  private fromCache(offset: number, length: number): Extent | undefined {
    const c = this.statusCache;
    if (!c || c.generation !== this.writeGeneration || c.start !== offset || c.lengths.length === 0 || Date.now() > c.expires) return undefined;
    const n = c.lengths.shift()!;
    const flags = c.flags.shift()!;
    c.start += n;
    if (c.lengths.length === 0) this.statusCache = undefined;
    return extentOf(offset, Math.min(n, length), flags);
  }

  protected override async doClose(): Promise<void> {
    if (!this.broken) {
      // NBD_CMD_DISC has no reply; the server closes once earlier replies are sent.
      const h = Buffer.alloc(28);
      h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
      h.writeUInt16BE(P.NBD_CMD_DISC, 6);
      this.socket.end(h);
      this.broken = new VdiskError('ESHUTDOWN', `node '${this.nodeName}' is closed`);
    }
    const timer = setTimeout(() => this.socket.destroy(), CLOSE_TIMEOUT_MS);
    await this.socketClosed;
    clearTimeout(timer);
    this.onClosed?.();
    this.onClosed = undefined;
  }
}

/**
 * base:allocation flags as block status: not a hole = data, zero = zero; either makes it this
 * node's. The offset in the export is always the place (QEMU's nbd driver: OFFSET_VALID), so
 * `img map` shows it as qemu-img does.
 */
function extentOf(offset: number, length: number, state: number): Extent {
  let flags = 0;
  if (!(state & P.NBD_STATE_HOLE)) flags |= Status.DATA;
  if (state & P.NBD_STATE_ZERO) flags |= Status.ZERO;
  if (flags) flags |= Status.ALLOCATED;
  return { length, flags, depth: flags ? 1 : 0, hostOffset: offset };
}

/**
 * The 'nbd' block driver (BlockdevOptionsNbd: server, export, open-timeout),
 * for graphs that want NBD nodes: `graph.registerDriver(NBD_DRIVER)`.
 */
export const NBD_DRIVER: DriverDef = {
  name: 'nbd',
  members: { server: SOCKET_ADDRESS, '*export': str, '*open-timeout': int('uint32'), '*tls-creds': str, '*tls-hostname': str },
  async open(o, { common, objects }) {
    const server = o.server as Record<string, unknown>;
    if (server.type === 'fd') throw new VdiskError('ENOTSUP', 'NBD over a file descriptor is not supported');
    const address: NbdClientAddress =
      server.type === 'unix'
        ? { type: 'unix', path: server.path as string, abstract: server.abstract as boolean | undefined, tight: server.tight as boolean | undefined }
        : { type: 'inet', host: server.host as string, port: server.port as string | number };
    const timeout = o['open-timeout'] as number | undefined;
    const credsId = o['tls-creds'] as string | undefined;
    let tlsCreds: TlsCreds | undefined;
    if (credsId !== undefined) {
      if (!objects) throw new VdiskError('ENOENT', `No TLS credentials with id '${credsId}'`);
      tlsCreds = objects.tlsCreds(credsId, 'client');
    }
    const node = await NbdClientNode.connect({
      nodeName: common.nodeName,
      server: address,
      exportName: (o.export as string | undefined) ?? '',
      readOnly: common.readOnly,
      openTimeoutMs: timeout ? timeout * 1000 : undefined,
      tlsCreds,
      tlsHostname: o['tls-hostname'] as string | undefined,
    });
    if (tlsCreds) {
      const user = `node '${common.nodeName}'`;
      objects!.hold(tlsCreds.id, user);
      node.onClosed = () => objects!.release(tlsCreds.id, user);
    }
    return node;
  },
};
