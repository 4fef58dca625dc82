/**
 * One NBD client connection: fixed newstyle handshake, then transmission.
 *
 * Bytes arrive in a ByteQueue; a loop takes as many whole messages as are
 * buffered, so partial messages need no special code. Every request becomes
 * one call on the export's node; its reply is written when that call
 * settles, so replies go out of order and many requests are in flight.
 * Replies produced in one turn of the event loop are corked into one writev.
 *
 * Backpressure: past MAX_IN_FLIGHT requests or MAX_IN_FLIGHT_BYTES of payload
 * and reply buffers, or while the socket's send buffer is full, the loop stops
 * taking requests and the socket is paused; it resumes as requests finish.
 *
 * Validation follows the spec and nbdkit's order: unknown command or flag,
 * range, read-only, size. A bad request gets an error reply and the connection
 * goes on; a bad magic or an unreadable write payload ends the connection.
 * A client that vanishes loses nothing it was told is written: a write is
 * acknowledged only after the node has it.
 *
 * TLS (when the server has tls-creds): before NBD_OPT_STARTTLS every option
 * but ABORT is refused with ERR_TLS_REQD (EXPORT_NAME, which has no error
 * reply, ends the connection). STARTTLS is acknowledged on the plain socket,
 * then a TLSSocket wraps it and replaces it for the rest of the connection,
 * so everything after (corking, writev, backpressure) works on the TLS
 * socket as it did on the plain one. The client is checked once the
 * handshake is done (certificate, then tls-authz), as QEMU does.
 */
import type { Socket } from 'node:net';
import tls from 'node:tls';
import { VdiskError } from '../errors.js';
import { logEvent, isLogLevelEnabled } from '../log.js';
import { ReqFlags, Status } from '../block/node.js';
import { native } from '../native.js';
import { ByteQueue } from './byte-queue.js';
import {
  MAX_EXTENTS,
  META_ID_BASE_ALLOCATION,
  META_ID_ALLOCATION_DEPTH,
  META_ID_DIRTY_BITMAP,
  type MetaSelection,
  addExtent,
  allocationFlags,
  dirtyExtents,
  selectContexts,
  selectedContexts,
  statusExtents,
} from './meta.js';
import * as P from './protocol.js';
import type { BudgetUser } from './limits.js';
import type { NbdExport, NbdServer } from './server.js';

const MAX_IN_FLIGHT = 64;
const MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
/** Replies queued in the socket but not yet sent; past this the client is not keeping up. */
const MAX_UNSENT_BYTES = 32 * 1024 * 1024;
const SOCKET_BUFFER_BYTES = 4 * 1024 * 1024;
/** How long a closing connection may take to deliver its last replies. */
const GRACEFUL_CLOSE_MS = 10_000;
/** Most option requests one handshake may send (each one costs a reply). */
const MAX_OPTIONS = 1000;
/** Reads at least this long look for holes and send them as hole chunks. */
const HOLE_SCAN_MIN = 64 * 1024;

const enum State {
  ClientFlags,
  OptionHeader,
  OptionData,
  OptionSkip,
  RequestHeader,
  WritePayload,
  WriteSkip,
  /** NBD_OPT_ABORT was answered; the rest of the input is ignored until the socket closes. */
  Ending,
  /** NBD_OPT_STARTTLS was answered; nothing is read until the TLS handshake is done and the client accepted. */
  TlsHandshake,
  Closed,
}

const KNOWN_FLAGS = P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_DF | P.NBD_CMD_FLAG_REQ_ONE | P.NBD_CMD_FLAG_FAST_ZERO;

/** Flags each command may carry (FUA is accepted on every command and ignored where meaningless). */
const ALLOWED_FLAGS: number[] = [];
ALLOWED_FLAGS[P.NBD_CMD_READ] = P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_DF;
ALLOWED_FLAGS[P.NBD_CMD_WRITE] = P.NBD_CMD_FLAG_FUA;
ALLOWED_FLAGS[P.NBD_CMD_DISC] = P.NBD_CMD_FLAG_FUA;
ALLOWED_FLAGS[P.NBD_CMD_FLUSH] = P.NBD_CMD_FLAG_FUA;
ALLOWED_FLAGS[P.NBD_CMD_TRIM] = P.NBD_CMD_FLAG_FUA;
ALLOWED_FLAGS[P.NBD_CMD_CACHE] = P.NBD_CMD_FLAG_FUA;
ALLOWED_FLAGS[P.NBD_CMD_WRITE_ZEROES] = P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FAST_ZERO;
ALLOWED_FLAGS[P.NBD_CMD_BLOCK_STATUS] = P.NBD_CMD_FLAG_FUA | P.NBD_CMD_FLAG_REQ_ONE;

let nextConnectionId = 1;

export class NbdConnection implements BudgetUser {
  readonly id = nextConnectionId++;
  private readonly queue = new ByteQueue();
  private state = State.ClientFlags;
  private noZeroes = false;
  private fixedNewstyle = false;
  private structured = false;
  private optionCount = 0;
  private option = 0;
  private optionLength = 0;
  /** What the last NBD_OPT_SET_META_CONTEXT selected, and on which export. */
  private metaSelection: MetaSelection | undefined;
  private handshakeTimer: NodeJS.Timeout | undefined;

  /** Transmission phase. */
  private exp: NbdExport | undefined;
  private exportSize = 0;
  /** The contexts BLOCK_STATUS answers for; undefined when none was negotiated for this export. */
  private meta: MetaSelection | undefined;
  /** Only base:allocation: block status takes the path that allocates no more than it must. */
  private metaBaseOnly = false;
  private inFlight = 0;
  private inFlightBytes = 0;
  /** Requests received in transmission, and the bytes they covered, by command (for the disconnect log line). */
  private readonly requestCounts: number[] = P.CMD_NAMES.map(() => 0);
  private readonly requestBytes: number[] = P.CMD_NAMES.map(() => 0);
  private paused = false;
  private corked = false;
  private disconnectRequested = false;
  private ending = false;
  private closeWaiters: Array<() => void> = [];
  /** A WRITE whose payload is still arriving. */
  private pending: { cookieHi: number; cookieLo: number; flags: number; offset: number; buf: Buffer; filled: number } | undefined;
  private skipRemaining = 0;
  /** Bytes charged to the server's buffer budget: unsent replies, as last seen, and a write being received. */
  private unsentCharged = 0;
  private pendingCharged = 0;
  /** Idle timeout: when data last arrived (ms, Date.now()). */
  private lastInput = 0;
  private idleTimer: NodeJS.Timeout | undefined;
  /** The socket in use: the accepted one, or the TLS socket over it after STARTTLS. */
  private socket: Socket;
  /** TLS is negotiated and the client accepted. */
  private tlsActive = false;
  /** Who the client is by TLS: its certificate's DN or its PSK username (for logs). */
  private tlsIdentity: string | undefined;
  private readonly listeners = {
    data: (chunk: Buffer) => this.onData(chunk),
    drain: () => {
      this.syncUnsent();
      this.maybeResume();
    },
    error: (err: Error) => {
      if (this.state !== State.Closed) logEvent('debug', 'nbd-socket-error', { connection: this.id, error: err.message });
    },
    close: () => this.onClose(),
  };

  constructor(
    socket: Socket,
    private readonly server: NbdServer,
    readonly peer: string,
  ) {
    this.socket = socket;
    socket.setNoDelay(true);
    // Big socket buffers: a 1 MiB read reply then leaves in one or two writes instead of
    // many wake-ups (measured: 1M reads 1.6 -> 2.6 GB/s on a unix socket). The kernel caps
    // them at net.core.wmem_max / rmem_max.
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd === 'number' && fd >= 0) native.setSocketBuffers(fd, SOCKET_BUFFER_BYTES, SOCKET_BUFFER_BYTES);
    socket.on('data', this.listeners.data);
    socket.on('drain', this.listeners.drain);
    socket.on('error', this.listeners.error);
    socket.on('close', this.listeners.close);
    this.handshakeTimer = setTimeout(() => {
      logEvent('warn', 'nbd-handshake-timeout', { connection: this.id, peer: this.peer, seconds: server.handshakeTimeoutMs / 1000 });
      this.destroy();
    }, server.handshakeTimeoutMs);
    this.handshakeTimer.unref();
    this.sendGreeting();
  }

  get export(): NbdExport | undefined {
    return this.exp;
  }

  get closed(): boolean {
    return this.state === State.Closed;
  }

  /** Resolves when the socket has closed. */
  whenClosed(): Promise<void> {
    if (this.state === State.Closed) return Promise.resolve();
    return new Promise((resolve) => this.closeWaiters.push(resolve));
  }

  /**
   * Stops taking requests, lets those in flight finish and their replies go
   * out, then closes. A client that does not read its replies is cut off
   * after GRACEFUL_CLOSE_MS, so a shutdown never hangs on it.
   */
  gracefulClose(): Promise<void> {
    if (this.state === State.Closed) return Promise.resolve();
    if (this.exp === undefined) {
      this.destroy();
    } else {
      this.disconnectRequested = true;
      this.socket.pause();
      this.maybeFinishDisconnect();
      setTimeout(() => this.destroy(), GRACEFUL_CLOSE_MS).unref();
    }
    return this.whenClosed();
  }

  /** Closes at once; requests in flight still complete on the node but get no reply. */
  destroy(): void {
    this.socket.destroy();
  }

  // ---- input --------------------------------------------------------------

  private onData(chunk: Buffer): void {
    if (this.state === State.Closed) return;
    if (this.idleTimer !== undefined) this.lastInput = Date.now();
    this.queue.push(chunk);
    this.cork();
    try {
      this.process();
    } catch (err) {
      this.protocolError((err as Error).message);
    }
  }

  private process(): void {
    for (;;) {
      switch (this.state) {
        case State.ClientFlags:
          if (this.queue.length < 4) return;
          this.onClientFlags(this.queue.take(4).readUInt32BE(0));
          break;
        case State.OptionHeader:
          if (this.queue.length < 16) return;
          this.onOptionHeader(this.queue.take(16));
          break;
        case State.OptionData:
          if (this.queue.length < this.optionLength) return;
          this.state = State.OptionHeader;
          this.onOption(this.option, this.queue.take(this.optionLength));
          break;
        case State.OptionSkip:
          this.optionLength -= this.queue.skip(this.optionLength);
          if (this.optionLength > 0) return;
          this.state = State.OptionHeader;
          break;
        case State.RequestHeader:
          if (this.disconnectRequested) return;
          if (this.overloaded()) {
            this.pause();
            return;
          }
          if (this.queue.length < 28) return;
          this.onRequest(this.queue.take(28));
          break;
        case State.WritePayload: {
          const p = this.pending!;
          p.filled += this.queue.copyInto(p.buf, p.filled, p.buf.length - p.filled);
          if (p.filled < p.buf.length) return;
          this.pending = undefined;
          this.server.budget.release(this.pendingCharged);
          this.pendingCharged = 0;
          this.state = State.RequestHeader;
          this.doWrite(p.cookieHi, p.cookieLo, p.flags, p.offset, p.buf);
          break;
        }
        case State.WriteSkip:
          this.skipRemaining -= this.queue.skip(this.skipRemaining);
          if (this.skipRemaining > 0) return;
          this.state = State.RequestHeader;
          break;
        case State.Ending:
        case State.TlsHandshake:
        case State.Closed:
          return;
      }
    }
  }

  /** Too much in flight, the client is not reading its replies, or all clients together hold the server's buffer budget. */
  private overloaded(): boolean {
    if (this.inFlight >= MAX_IN_FLIGHT || this.inFlightBytes >= MAX_IN_FLIGHT_BYTES || this.socket.writableLength >= MAX_UNSENT_BYTES) return true;
    this.syncUnsent();
    if (!this.server.budget.mustWait(this.buffered)) return false;
    this.server.budget.wait(this);
    return true;
  }

  /** What this connection holds against the server's buffer budget. */
  get buffered(): number {
    return this.inFlightBytes + this.unsentCharged + this.pendingCharged;
  }

  resumeFromBudget(): void {
    this.maybeResume();
  }

  /**
   * Brings the budget's view of this connection's unsent replies up to date.
   * The socket says how much it holds but not when that shrinks, except by
   * 'drain' (when a write found it over its high-water mark): so the charge
   * is synced at every send, every drain and every check; it may be stale
   * by less than the high-water mark (16 KiB), never by a reply.
   */
  private syncUnsent(): void {
    const now = this.state === State.Closed ? 0 : this.socket.writableLength;
    const delta = now - this.unsentCharged;
    if (delta === 0) return;
    this.unsentCharged = now;
    if (delta > 0) this.server.budget.charge(delta);
    else this.server.budget.release(-delta);
  }

  /** x-query-nbd-server's view of this connection. */
  stats(): Record<string, unknown> {
    if (this.state !== State.Closed) this.syncUnsent();
    return {
      id: this.id,
      peer: this.peer,
      ...(this.exp ? { export: this.exp.name } : { handshake: true }),
      'in-flight': this.inFlight,
      'in-flight-bytes': this.inFlightBytes,
      'unsent-bytes': this.unsentCharged,
      buffered: this.buffered,
      paused: this.paused,
      requests: this.requestCounts.reduce((a, b) => a + b, 0),
    };
  }

  private pause(): void {
    if (!this.paused) {
      this.paused = true;
      this.socket.pause();
    }
  }

  private maybeResume(): void {
    if (!this.paused || this.state === State.Closed) return;
    if (this.overloaded()) return;
    this.paused = false;
    if (!this.disconnectRequested) this.socket.resume();
    this.cork();
    try {
      this.process();
    } catch (err) {
      this.protocolError((err as Error).message);
    }
  }

  /** The client broke the protocol: send what is queued (an error reply, maybe), then hang up. */
  private protocolError(message: string): void {
    logEvent('warn', 'nbd-protocol-error', { connection: this.id, peer: this.peer, error: message });
    if (this.state === State.Closed) return;
    this.state = State.Ending;
    this.socket.pause();
    // end() uncorks and flushes; a client that does not read its replies is cut off after a second.
    const timer = setTimeout(() => this.destroy(), 1000);
    timer.unref();
    this.socket.end(() => this.destroy());
  }

  private onClose(): void {
    if (this.state === State.Closed) return;
    const wasTransmitting = this.exp !== undefined;
    this.state = State.Closed;
    clearTimeout(this.handshakeTimer);
    clearTimeout(this.idleTimer);
    // Requests still in flight release their own bytes when they settle (end()).
    this.syncUnsent();
    this.server.budget.release(this.pendingCharged);
    this.pendingCharged = 0;
    logEvent(wasTransmitting ? 'info' : 'debug', 'nbd-client-disconnected', {
      connection: this.id,
      peer: this.peer,
      export: this.exp?.name,
      inFlight: this.inFlight,
      ...(wasTransmitting ? this.requestSummary() : {}),
    });
    this.server.connectionClosed(this);
    for (const w of this.closeWaiters.splice(0)) w();
  }

  /** `{requests: {read: 3, trim: 1}, requestBytes: {read: 12288, trim: 65536}}`: the commands this connection received. */
  private requestSummary(): { requests: Record<string, number>; requestBytes: Record<string, number> } {
    const requests: Record<string, number> = {};
    const requestBytes: Record<string, number> = {};
    this.requestCounts.forEach((n, type) => {
      if (n === 0) return;
      const name = P.CMD_NAMES[type].toLowerCase();
      requests[name] = n;
      if (type !== P.NBD_CMD_DISC && type !== P.NBD_CMD_FLUSH) requestBytes[name] = this.requestBytes[type];
    });
    return { requests, requestBytes };
  }

  // ---- output -------------------------------------------------------------

  /** Corks the socket until the end of this event-loop turn, so replies leave in one writev. */
  private cork(): void {
    if (this.corked) return;
    this.corked = true;
    this.socket.cork();
    setImmediate(() => {
      this.corked = false;
      this.socket.uncork();
    });
  }

  private send(buf: Buffer): void {
    if (this.state === State.Closed) return;
    this.socket.write(buf);
    if (this.exp !== undefined) this.syncUnsent();
  }

  // ---- handshake ----------------------------------------------------------

  private sendGreeting(): void {
    const b = Buffer.allocUnsafe(18);
    b.writeBigUInt64BE(P.NBDMAGIC, 0);
    b.writeBigUInt64BE(P.IHAVEOPT, 8);
    b.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    this.send(b);
  }

  private onClientFlags(flags: number): void {
    if (flags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) {
      throw new Error(`unknown client flags 0x${flags.toString(16)}`);
    }
    this.fixedNewstyle = (flags & P.NBD_FLAG_C_FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
    this.state = State.OptionHeader;
  }

  private onOptionHeader(h: Buffer): void {
    if (h.readBigUInt64BE(0) !== P.IHAVEOPT) throw new Error('bad option magic');
    if (++this.optionCount > MAX_OPTIONS) throw new Error(`more than ${MAX_OPTIONS} options`);
    this.option = h.readUInt32BE(8);
    this.optionLength = h.readUInt32BE(12);
    if (!this.fixedNewstyle && this.option !== P.NBD_OPT_EXPORT_NAME) {
      // Without fixed newstyle there is no way to reply to an option: disconnect, as the spec says.
      throw new Error(`option ${this.option} from a client without fixed newstyle`);
    }
    if (this.optionLength > P.NBD_MAX_OPTION_LENGTH) {
      this.optionReply(this.option, P.NBD_REP_ERR_TOO_BIG, Buffer.from(`option data of ${this.optionLength} bytes is too long`));
      this.state = State.OptionSkip;
      return;
    }
    this.state = State.OptionData;
  }

  private optionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): void {
    const h = Buffer.allocUnsafe(20);
    h.writeBigUInt64BE(P.NBD_OPT_REPLY_MAGIC, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(type, 12);
    h.writeUInt32BE(data.length, 16);
    this.send(h);
    if (data.length) this.send(data);
  }

  private optionError(option: number, type: number, message: string): void {
    logEvent('debug', 'nbd-option-refused', { connection: this.id, option, reply: type - 2 ** 31, message });
    this.optionReply(option, type, Buffer.from(message));
  }

  private onOption(option: number, data: Buffer): void {
    if (this.server.tls && !this.tlsActive) {
      // Nothing but STARTTLS (or ABORT) before TLS: no export names, no sizes, nothing to learn.
      if (option === P.NBD_OPT_STARTTLS) return this.startTls(option, data);
      if (option === P.NBD_OPT_EXPORT_NAME) throw new Error('NBD_OPT_EXPORT_NAME before TLS (the server requires TLS)');
      if (option !== P.NBD_OPT_ABORT) return this.optionError(option, P.NBD_REP_ERR_TLS_REQD, `Option 0x${option.toString(16)} not permitted before TLS`);
    }
    switch (option) {
      case P.NBD_OPT_EXPORT_NAME:
        return this.optExportName(data);
      case P.NBD_OPT_ABORT:
        this.optionReply(option, P.NBD_REP_ACK);
        this.socket.end();
        this.state = State.Ending;
        return;
      case P.NBD_OPT_LIST:
        if (data.length !== 0) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data');
        for (const e of this.server.listExports()) {
          const name = Buffer.from(e.name);
          const desc = Buffer.from(e.description ?? '');
          const b = Buffer.allocUnsafe(4 + name.length + desc.length);
          b.writeUInt32BE(name.length, 0);
          name.copy(b, 4);
          desc.copy(b, 4 + name.length);
          this.optionReply(option, P.NBD_REP_SERVER, b);
        }
        return this.optionReply(option, P.NBD_REP_ACK);
      case P.NBD_OPT_STARTTLS:
        if (this.tlsActive) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'TLS already enabled');
        return this.optionError(option, P.NBD_REP_ERR_POLICY, 'TLS not configured');
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO:
        return this.optInfoGo(option, data);
      case P.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        if (this.structured) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'structured replies already negotiated');
        this.structured = true;
        return this.optionReply(option, P.NBD_REP_ACK);
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT:
        return this.optMetaContext(option, data);
      default:
        return this.optionError(option, P.NBD_REP_ERR_UNSUP, `option ${option} not supported`);
    }
  }

  /**
   * NBD_OPT_STARTTLS: acknowledge on the plain socket, then run the server
   * side of a TLS handshake over it. The client may send nothing between its
   * option and our reply, so anything already buffered breaks the protocol.
   */
  private startTls(option: number, data: Buffer): void {
    if (data.length !== 0) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
    if (this.queue.length !== 0) throw new Error('data after NBD_OPT_STARTTLS before the TLS handshake');
    const creds = this.server.tls!.creds;
    this.optionReply(option, P.NBD_REP_ACK);
    this.state = State.TlsHandshake;
    const raw = this.socket;
    // The acknowledgement must leave before the TLS layer takes the socket over.
    while (raw.writableCorked > 0) raw.uncork();
    raw.removeListener('data', this.listeners.data);
    raw.removeListener('drain', this.listeners.drain);
    raw.removeListener('close', this.listeners.close);
    let pskIdentity: string | undefined;
    const secure = new tls.TLSSocket(raw, creds.serverOptions((identity) => (pskIdentity = identity)));
    this.socket = secure;
    secure.on('error', (err: Error) => {
      if (this.state === State.Closed) return;
      if (this.state === State.TlsHandshake) {
        logEvent('warn', 'nbd-tls-handshake-failed', { connection: this.id, peer: this.peer, identity: pskIdentity, reason: tlsReason(err) });
        this.destroy();
      } else {
        this.listeners.error(err);
      }
    });
    secure.on('close', this.listeners.close);
    secure.on('drain', this.listeners.drain);
    secure.once('secure', () => {
      const check = creds.checkClient(secure, pskIdentity);
      const auth = check.ok ? this.server.authorize(check.identity) : check;
      if (!auth.ok) {
        // A client that is not who it must be learns nothing more: the connection just ends.
        logEvent('warn', 'nbd-tls-client-refused', { connection: this.id, peer: this.peer, tlsCreds: creds.id, reason: auth.reason });
        this.destroy();
        return;
      }
      this.tlsActive = true;
      this.tlsIdentity = check.ok ? check.identity : undefined;
      logEvent('debug', 'nbd-tls-established', { connection: this.id, peer: this.peer, identity: this.tlsIdentity, protocol: secure.getProtocol(), cipher: secure.getCipher()?.name });
      this.state = State.OptionHeader;
      secure.on('data', this.listeners.data);
    });
  }

  private optExportName(data: Buffer): void {
    const name = data.toString('utf8');
    const exp = this.server.findExport(name);
    if (!exp) throw new Error(`client asked for unknown export '${name}' with NBD_OPT_EXPORT_NAME`);
    // EXPORT_NAME has no error reply: a client over the export's limit can only be hung up on.
    const refused = this.server.admit(this, exp);
    if (refused) return this.hangUp();
    const b = Buffer.alloc(this.noZeroes ? 10 : 134);
    b.writeBigUInt64BE(BigInt(exp.node.size), 0);
    b.writeUInt16BE(this.transmissionFlags(exp), 8);
    this.send(b);
    this.enterTransmission(exp);
  }

  private optInfoGo(option: number, data: Buffer): void {
    if (data.length < 6) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'option data too short');
    const nameLength = data.readUInt32BE(0);
    if (nameLength > P.NBD_MAX_STRING || 4 + nameLength + 2 > data.length) {
      return this.optionError(option, P.NBD_REP_ERR_INVALID, 'bad export name length');
    }
    const name = data.toString('utf8', 4, 4 + nameLength);
    const count = data.readUInt16BE(4 + nameLength);
    if (6 + nameLength + 2 * count !== data.length) {
      return this.optionError(option, P.NBD_REP_ERR_INVALID, 'bad number of information requests');
    }
    const requests = new Set<number>();
    for (let i = 0; i < count; i++) requests.add(data.readUInt16BE(6 + nameLength + 2 * i));
    const exp = this.server.findExport(name);
    if (!exp) return this.optionError(option, P.NBD_REP_ERR_UNKNOWN, `export '${name}' not present`);
    const refused = this.server.admit(this, exp);
    if (refused) return this.optionError(option, P.NBD_REP_ERR_POLICY, refused);

    if (requests.has(P.NBD_INFO_NAME)) {
      const n = Buffer.from(exp.name);
      const b = Buffer.allocUnsafe(2 + n.length);
      b.writeUInt16BE(P.NBD_INFO_NAME, 0);
      n.copy(b, 2);
      this.optionReply(option, P.NBD_REP_INFO, b);
    }
    if (requests.has(P.NBD_INFO_DESCRIPTION) && exp.description) {
      const d = Buffer.from(exp.description);
      const b = Buffer.allocUnsafe(2 + d.length);
      b.writeUInt16BE(P.NBD_INFO_DESCRIPTION, 0);
      d.copy(b, 2);
      this.optionReply(option, P.NBD_REP_INFO, b);
    }
    // Block sizes: the minimum is the node's alignment only if the client promised to honour it.
    const align = exp.node.limits.requestAlignment;
    const clientHonoursSizes = requests.has(P.NBD_INFO_BLOCK_SIZE);
    const min = clientHonoursSizes ? align : 1;
    const bs = Buffer.allocUnsafe(14);
    bs.writeUInt16BE(P.NBD_INFO_BLOCK_SIZE, 0);
    bs.writeUInt32BE(min, 2);
    // Preferred: 4096 (or the minimum), as QEMU advertises whatever the node; a qcow2 node's cluster
    // size would make nbdinfo's answer differ from qemu-storage-daemon's for no gain to clients.
    bs.writeUInt32BE(Math.max(min, 4096), 6);
    bs.writeUInt32BE(Math.min(P.NBD_MAX_PAYLOAD, Math.max(min, exp.node.limits.maxTransfer)), 10);
    this.optionReply(option, P.NBD_REP_INFO, bs);
    const ex = Buffer.allocUnsafe(12);
    ex.writeUInt16BE(P.NBD_INFO_EXPORT, 0);
    ex.writeBigUInt64BE(BigInt(exp.node.size), 2);
    ex.writeUInt16BE(this.transmissionFlags(exp), 10);
    this.optionReply(option, P.NBD_REP_INFO, ex);
    if (option === P.NBD_OPT_INFO && align > 1 && !clientHonoursSizes) {
      // As QEMU: a client only asking about an export that wants aligned requests is told to ask
      // for the block sizes, but NBD_OPT_GO takes every client (Debian 12's nbd-client 3.24 never
      // asks) and its unaligned requests go through the node's read-modify-write.
      return this.optionError(option, P.NBD_REP_ERR_BLOCK_SIZE_REQD, `request NBD_INFO_BLOCK_SIZE to use export '${exp.name}'`);
    }
    this.optionReply(option, P.NBD_REP_ACK);
    if (option === P.NBD_OPT_GO) this.enterTransmission(exp);
  }

  private optMetaContext(option: number, data: Buffer): void {
    const set = option === P.NBD_OPT_SET_META_CONTEXT;
    const what = set ? 'NBD_OPT_SET_META_CONTEXT' : 'NBD_OPT_LIST_META_CONTEXT';
    // Only SET needs structured replies (BLOCK_STATUS answers in chunks); LIST is just a question.
    if (set && !this.structured) return this.optionError(option, P.NBD_REP_ERR_INVALID, `request option '${what}' when structured reply is not negotiated`);
    // A SET replaces the selection whatever follows, even if it then fails (QEMU clears it first).
    if (set) this.metaSelection = undefined;
    let pos = 0;
    const need = (n: number): boolean => pos + n <= data.length;
    const inconsistent = `Inconsistent lengths in option ${what}`;
    if (!need(4)) return this.optionError(option, P.NBD_REP_ERR_INVALID, inconsistent);
    const nameLength = data.readUInt32BE(pos);
    pos += 4;
    if (nameLength > P.NBD_MAX_STRING) return this.optionError(option, P.NBD_REP_ERR_INVALID, `Invalid name length: ${nameLength}`);
    if (!need(nameLength + 4)) return this.optionError(option, P.NBD_REP_ERR_INVALID, inconsistent);
    const name = data.toString('utf8', pos, pos + nameLength);
    pos += nameLength;
    const count = data.readUInt32BE(pos);
    pos += 4;
    const queries: string[] = [];
    for (let i = 0; i < count; i++) {
      if (!need(4)) return this.optionError(option, P.NBD_REP_ERR_INVALID, inconsistent);
      const len = data.readUInt32BE(pos);
      pos += 4;
      if (!need(len)) return this.optionError(option, P.NBD_REP_ERR_INVALID, inconsistent);
      // A query longer than any context name cannot match: skipped, as QEMU does, not an error.
      if (len <= P.NBD_MAX_STRING) {
        if (data.subarray(pos, pos + len).includes(0)) {
          return this.optionError(option, P.NBD_REP_ERR_INVALID, `Unexpected embedded NUL in option ${what}`);
        }
        queries.push(data.toString('utf8', pos, pos + len));
      }
      pos += len;
    }
    if (pos !== data.length) return this.optionError(option, P.NBD_REP_ERR_INVALID, `option '${what}' has unexpected length`);
    const exp = this.server.findExport(name);
    if (!exp) return this.optionError(option, P.NBD_REP_ERR_UNKNOWN, `export '${name}' not present`);
    const sel = selectContexts(exp, queries, !set);
    const contexts = selectedContexts(sel);
    for (const c of contexts) {
      const n = Buffer.from(c.name);
      const b = Buffer.allocUnsafe(4 + n.length);
      b.writeUInt32BE(set ? c.id : 0, 0);
      n.copy(b, 4);
      this.optionReply(option, P.NBD_REP_META_CONTEXT, b);
    }
    if (set) this.metaSelection = sel;
    if (isLogLevelEnabled('debug')) {
      logEvent('debug', 'nbd-meta-context', { connection: this.id, option: set ? 'set' : 'list', export: exp.name, queries, contexts: contexts.map((c) => c.name) });
    }
    this.optionReply(option, P.NBD_REP_ACK);
  }

  private transmissionFlags(exp: NbdExport): number {
    let f = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_CACHE;
    if (!exp.writable) f |= P.NBD_FLAG_READ_ONLY;
    else f |= P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO;
    if (this.structured) f |= P.NBD_FLAG_SEND_DF;
    // Every connection shares one node, so a flush on any of them covers writes done on all.
    if (this.server.multiConn(exp)) f |= P.NBD_FLAG_CAN_MULTI_CONN;
    return f;
  }

  private enterTransmission(exp: NbdExport): void {
    clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
    this.exp = exp;
    this.exportSize = exp.node.size;
    // Contexts selected for another export (or an export since replaced under the same name) do not count.
    const sel = this.metaSelection;
    this.meta = sel !== undefined && sel.exp === exp && sel.count > 0 ? sel : undefined;
    this.metaBaseOnly = this.meta !== undefined && this.meta.count === 1 && this.meta.baseAllocation;
    this.state = State.RequestHeader;
    exp.connections.add(this);
    if (this.server.idleTimeoutMs > 0) this.armIdleTimer(this.server.idleTimeoutMs);
    logEvent('info', 'nbd-client-connected', {
      connection: this.id,
      peer: this.peer,
      export: exp.name,
      structured: this.structured,
      contexts: this.meta ? selectedContexts(this.meta).map((c) => c.name) : [],
      ...(this.tlsActive ? { tls: this.tlsIdentity ?? 'on' } : {}),
    });
  }

  /**
   * x-idle-timeout: a client with nothing in flight, no reply waiting to be
   * read and no input for that long is disconnected. The timer is re-armed
   * lazily (input only stamps a time), so the data path pays one Date.now()
   * per chunk, not a timer per request.
   */
  private armIdleTimer(delayMs: number): void {
    this.lastInput = Date.now();
    const check = (): void => {
      if (this.state === State.Closed || this.state === State.Ending || this.ending) return;
      const idleMs = this.server.idleTimeoutMs;
      const quietFor = Date.now() - this.lastInput;
      if (this.inFlight > 0 || this.socket.writableLength > 0) {
        // Busy is not idle: the quiet time starts again when the work is done.
        this.lastInput = Date.now();
        this.idleTimer = setTimeout(check, idleMs).unref();
      } else if (quietFor < idleMs) {
        this.idleTimer = setTimeout(check, idleMs - quietFor).unref();
      } else {
        logEvent('info', 'nbd-client-idle-timeout', { connection: this.id, peer: this.peer, export: this.exp?.name, seconds: idleMs / 1000 });
        this.hangUp();
      }
    };
    this.idleTimer = setTimeout(check, delayMs).unref();
  }

  /** Ends the connection with nothing in flight: what is queued is sent, then the socket closes. */
  private hangUp(): void {
    this.state = State.Ending;
    this.socket.pause();
    setTimeout(() => this.destroy(), GRACEFUL_CLOSE_MS).unref();
    this.socket.end(() => this.destroy());
  }

  // ---- transmission -------------------------------------------------------

  private onRequest(h: Buffer): void {
    if (h.readUInt32BE(0) !== P.NBD_REQUEST_MAGIC) throw new Error('bad request magic');
    const flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const cookieHi = h.readUInt32BE(8);
    const cookieLo = h.readUInt32BE(12);
    const offsetHi = h.readUInt32BE(16);
    const offset = offsetHi * 2 ** 32 + h.readUInt32BE(20);
    const length = h.readUInt32BE(24);
    if (type < this.requestCounts.length) {
      this.requestCounts[type]++;
      this.requestBytes[type] += length;
    }

    if (type === P.NBD_CMD_WRITE) {
      const error = this.validate(type, flags, offsetHi, offset, length);
      if (error) {
        this.replyError(cookieHi, cookieLo, error.code, error.message, type);
        if (length > P.NBD_MAX_PAYLOAD) throw new Error(`write of ${length} bytes is over the ${P.NBD_MAX_PAYLOAD} byte limit`);
        this.skipRemaining = length;
        this.state = State.WriteSkip;
        return;
      }
      // Take the payload as a view when the whole of it has arrived in one chunk (no copy).
      if (this.queue.length >= length && this.queue.contiguous(length)) {
        this.doWrite(cookieHi, cookieLo, flags, offset, this.queue.take(length));
        return;
      }
      const buf = Buffer.allocUnsafe(length);
      this.pendingCharged = length;
      this.server.budget.charge(length);
      this.pending = { cookieHi, cookieLo, flags, offset, buf, filled: 0 };
      this.state = State.WritePayload;
      return;
    }
    if (type === P.NBD_CMD_DISC) {
      logEvent('debug', 'nbd-disconnect-requested', { connection: this.id });
      this.disconnectRequested = true;
      this.socket.pause();
      this.maybeFinishDisconnect();
      return;
    }
    const error = this.validate(type, flags, offsetHi, offset, length);
    if (error) return this.replyError(cookieHi, cookieLo, error.code, error.message, type);
    switch (type) {
      case P.NBD_CMD_READ:
        return this.doRead(cookieHi, cookieLo, flags, offset, length);
      case P.NBD_CMD_FLUSH:
        return this.track(cookieHi, cookieLo, type, 0, this.exp!.node.flush());
      case P.NBD_CMD_TRIM:
        return this.track(cookieHi, cookieLo, type, 0, this.trim(offset, length, flags));
      case P.NBD_CMD_WRITE_ZEROES: {
        let zf = flags & P.NBD_CMD_FLAG_NO_HOLE ? 0 : ReqFlags.MAY_UNMAP;
        if (flags & P.NBD_CMD_FLAG_FAST_ZERO) zf |= ReqFlags.NO_FALLBACK;
        if (flags & P.NBD_CMD_FLAG_FUA || this.exp!.writethrough) zf |= ReqFlags.FUA;
        return this.track(cookieHi, cookieLo, type, 0, this.exp!.node.writeZeroes(offset, length, zf));
      }
      case P.NBD_CMD_CACHE:
        return this.track(cookieHi, cookieLo, type, 0, this.exp!.node.cache(offset, length));
      case P.NBD_CMD_BLOCK_STATUS:
        return this.doBlockStatus(cookieHi, cookieLo, flags, offset, length);
    }
  }

  /** Returns the error a request gets, or undefined if it is valid. */
  private validate(type: number, flags: number, offsetHi: number, offset: number, length: number): { code: number; message: string } | undefined {
    if (type > P.NBD_CMD_BLOCK_STATUS) return { code: P.NBD_EINVAL, message: `unknown command ${type}` };
    if (flags & ~KNOWN_FLAGS || flags & ~ALLOWED_FLAGS[type]) {
      return { code: P.NBD_EINVAL, message: `flags 0x${flags.toString(16)} not valid for ${P.CMD_NAMES[type]}` };
    }
    if (flags & P.NBD_CMD_FLAG_DF && !this.structured) return { code: P.NBD_EINVAL, message: 'DF flag needs structured replies' };
    const isWrite = type === P.NBD_CMD_WRITE || type === P.NBD_CMD_WRITE_ZEROES || type === P.NBD_CMD_TRIM;
    if (type === P.NBD_CMD_FLUSH) {
      return undefined;
    }
    if ((type === P.NBD_CMD_READ || type === P.NBD_CMD_WRITE) && length > P.NBD_MAX_PAYLOAD) {
      return { code: P.NBD_EINVAL, message: `${P.CMD_NAMES[type]} of ${length} bytes is over the ${P.NBD_MAX_PAYLOAD} byte limit` };
    }
    if (offsetHi >= 2 ** 21 || offset + length > this.exportSize) {
      return {
        code: isWrite && type !== P.NBD_CMD_TRIM ? P.NBD_ENOSPC : P.NBD_EINVAL,
        message: `${P.CMD_NAMES[type]} at offset ${offset} length ${length} is past the end of the export (${this.exportSize} bytes)`,
      };
    }
    if (isWrite && !this.exp!.writable) return { code: P.NBD_EPERM, message: 'export is read-only' };
    if (type === P.NBD_CMD_BLOCK_STATUS) {
      if (length === 0) return { code: P.NBD_EINVAL, message: 'need non-zero length' };
      if (this.meta === undefined) return { code: P.NBD_EINVAL, message: 'CMD_BLOCK_STATUS not negotiated' };
    }
    return undefined;
  }

  private trim(offset: number, length: number, flags: number): Promise<void> {
    const p = this.exp!.node.discard(offset, length);
    return flags & P.NBD_CMD_FLAG_FUA ? p.then(() => this.exp!.node.flush()) : p;
  }

  private doWrite(cookieHi: number, cookieLo: number, flags: number, offset: number, buf: Buffer): void {
    const fua = flags & P.NBD_CMD_FLAG_FUA || this.exp!.writethrough ? ReqFlags.FUA : 0;
    this.track(cookieHi, cookieLo, P.NBD_CMD_WRITE, buf.length, this.exp!.node.write(offset, buf, fua));
  }

  /** Counts a request in flight and sends its simple reply when it settles. */
  private track(cookieHi: number, cookieLo: number, type: number, bytes: number, op: Promise<void>): void {
    this.begin(bytes);
    op.then(
      () => {
        this.replySimple(cookieHi, cookieLo, 0);
        this.end(bytes);
      },
      (err: unknown) => {
        this.replyIoError(cookieHi, cookieLo, type, err);
        this.end(bytes);
      },
    );
  }

  private begin(bytes: number): void {
    this.inFlight++;
    this.inFlightBytes += bytes;
    this.server.budget.charge(bytes);
  }

  private end(bytes: number): void {
    this.inFlight--;
    this.inFlightBytes -= bytes;
    this.server.budget.release(bytes);
    if (this.paused) this.maybeResume();
    if (this.disconnectRequested) this.maybeFinishDisconnect();
  }

  private maybeFinishDisconnect(): void {
    if (this.inFlight !== 0 || this.state === State.Closed || this.ending) return;
    this.ending = true;
    // Close once every reply is flushed; do not wait for the client to close its side.
    this.socket.end(() => this.socket.destroy());
  }

  private doRead(cookieHi: number, cookieLo: number, flags: number, offset: number, length: number): void {
    const node = this.exp!.node;
    if (this.structured && !(flags & P.NBD_CMD_FLAG_DF) && length >= HOLE_SCAN_MIN) {
      this.begin(length);
      this.readSparse(cookieHi, cookieLo, offset, length).then(
        () => this.end(length),
        (err) => {
          this.replyIoError(cookieHi, cookieLo, P.NBD_CMD_READ, err);
          this.end(length);
        },
      );
      return;
    }
    // One buffer holds the reply header and the data, so the reply is a single write.
    const hdr = this.structured ? 28 : 16;
    const reply = Buffer.allocUnsafe(hdr + length);
    this.begin(length);
    node.read(offset, reply.subarray(hdr)).then(
      () => {
        if (this.structured) {
          writeChunkHeader(reply, cookieHi, cookieLo, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + length);
          writeU64(reply, 20, offset);
        } else {
          writeSimpleHeader(reply, cookieHi, cookieLo, 0);
        }
        this.send(reply);
        this.end(length);
      },
      (err) => {
        this.replyIoError(cookieHi, cookieLo, P.NBD_CMD_READ, err);
        this.end(length);
      },
    );
  }

  /** A structured read that sends zero ranges as hole chunks instead of data. */
  private async readSparse(cookieHi: number, cookieLo: number, offset: number, length: number): Promise<void> {
    const node = this.exp!.node;
    const chunks: Buffer[] = [];
    let pos = offset;
    const end = offset + length;
    while (pos < end) {
      const ext = await node.blockStatus(pos, end - pos);
      if (ext.flags & Status.ZERO) {
        const c = Buffer.allocUnsafe(32);
        writeChunkHeader(c, cookieHi, cookieLo, 0, P.NBD_REPLY_TYPE_OFFSET_HOLE, 12);
        writeU64(c, 20, pos);
        c.writeUInt32BE(ext.length, 28);
        chunks.push(c);
      } else {
        const c = Buffer.allocUnsafe(28 + ext.length);
        await node.read(pos, c.subarray(28));
        writeChunkHeader(c, cookieHi, cookieLo, 0, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + ext.length);
        writeU64(c, 20, pos);
        chunks.push(c);
      }
      pos += ext.length;
    }
    // Nothing is sent until every part is read, so an error can still be one clean error reply.
    chunks[chunks.length - 1].writeUInt16BE(P.NBD_REPLY_FLAG_DONE, 4);
    for (const c of chunks) this.send(c);
  }

  private doBlockStatus(cookieHi: number, cookieLo: number, flags: number, offset: number, length: number): void {
    this.begin(0);
    this.blockStatusReply(cookieHi, cookieLo, flags, offset, length).then(
      () => this.end(0),
      (err) => {
        this.replyIoError(cookieHi, cookieLo, P.NBD_CMD_BLOCK_STATUS, err);
        this.end(0);
      },
    );
  }

  private blockStatusReply(cookieHi: number, cookieLo: number, flags: number, offset: number, length: number): Promise<void> {
    const max = flags & P.NBD_CMD_FLAG_REQ_ONE ? 1 : MAX_EXTENTS;
    if (this.metaBaseOnly) return this.baseAllocationReply(cookieHi, cookieLo, max, offset, length);
    return this.contextsReply(cookieHi, cookieLo, max, offset, length);
  }

  /**
   * The common case, base:allocation alone: the walk is inline (no extra
   * async frame) and the reply costs two arrays and one buffer, exactly what
   * it cost before other contexts existed.
   */
  private async baseAllocationReply(cookieHi: number, cookieLo: number, max: number, offset: number, length: number): Promise<void> {
    const node = this.exp!.node;
    const lengths: number[] = [];
    const states: number[] = [];
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const ext = await node.blockStatus(pos, end - pos);
      if (!addExtent(lengths, states, max, ext.length, allocationFlags(ext.flags))) break;
      pos += ext.length;
    }
    const b = Buffer.allocUnsafe(24 + 8 * lengths.length);
    writeBlockStatusChunk(b, 0, cookieHi, cookieLo, true, META_ID_BASE_ALLOCATION, lengths, states);
    this.send(b);
  }

  /**
   * One BLOCK_STATUS chunk per selected context, in QEMU's order, DONE on the
   * last. Every context is worked out before anything is sent, so a failure
   * is one clean error reply rather than chunks followed by an error.
   */
  private async contextsReply(cookieHi: number, cookieLo: number, max: number, offset: number, length: number): Promise<void> {
    const exp = this.exp!;
    const sel = this.meta!;
    const ids: number[] = [];
    const lengths: number[][] = [];
    const values: number[][] = [];
    const add = (id: number): [number[], number[]] => {
      const l: number[] = [];
      const v: number[] = [];
      ids.push(id);
      lengths.push(l);
      values.push(v);
      return [l, v];
    };
    const [bl, bf] = sel.baseAllocation ? add(META_ID_BASE_ALLOCATION) : [undefined, undefined];
    const [dl, dv] = sel.allocationDepth ? add(META_ID_ALLOCATION_DEPTH) : [undefined, undefined];
    if (bl || dl) await statusExtents(exp.node, offset, length, max, bl, bf, dl, dv);
    // Bitmaps are read after the node walk's last await, so every bitmap chunk shows one instant.
    for (let i = 0; i < exp.bitmaps.length; i++) {
      if (!sel.bitmaps[i]) continue;
      const [l, v] = add(META_ID_DIRTY_BITMAP + i);
      dirtyExtents(exp.bitmaps[i].bitmap, offset, length, max, l, v);
    }
    let total = 0;
    for (const l of lengths) total += 24 + 8 * l.length;
    const b = Buffer.allocUnsafe(total);
    let at = 0;
    for (let c = 0; c < ids.length; c++) {
      at = writeBlockStatusChunk(b, at, cookieHi, cookieLo, c === ids.length - 1, ids[c], lengths[c], values[c]);
    }
    if (isLogLevelEnabled('debug')) {
      logEvent('debug', 'nbd-block-status', { connection: this.id, offset, length, contexts: ids, extents: lengths.map((l) => l.length) });
    }
    this.send(b);
  }

  private replySimple(cookieHi: number, cookieLo: number, error: number): void {
    const b = Buffer.allocUnsafe(16);
    writeSimpleHeader(b, cookieHi, cookieLo, error);
    this.send(b);
  }

  private replyIoError(cookieHi: number, cookieLo: number, type: number, err: unknown): void {
    const e = err instanceof VdiskError ? err : new VdiskError('EIO', String((err as Error)?.message ?? err));
    if (e.code === 'VDISK_DROP_CONNECTION') {
      // A blkdebug rule wants the client to see its server vanish: no reply, the socket goes.
      logEvent('warn', 'nbd-connection-dropped', { connection: this.id, reason: e.message });
      this.destroy();
      return;
    }
    const code = P.nbdErrno(e.errno);
    // I/O errors are worth a line; refusals of bad requests were logged at validation.
    logEvent(e.errno === 'EINVAL' || e.errno === 'ENOTSUP' ? 'debug' : 'warn', 'nbd-request-failed', {
      connection: this.id,
      command: P.CMD_NAMES[type],
      errno: e.errno,
      error: e.message,
    });
    this.replyError(cookieHi, cookieLo, code, e.message, type, true);
  }

  /** An error reply: a structured error chunk (with a message) when negotiated, else a simple reply. */
  private replyError(cookieHi: number, cookieLo: number, code: number, message: string, type: number, logged = false): void {
    if (!logged && isLogLevelEnabled('debug')) {
      logEvent('debug', 'nbd-request-refused', { connection: this.id, command: P.CMD_NAMES[type] ?? type, error: message });
    }
    if (!this.structured) return this.replySimple(cookieHi, cookieLo, code);
    const msg = Buffer.from(message.slice(0, 1000));
    const b = Buffer.allocUnsafe(20 + 6 + msg.length);
    writeChunkHeader(b, cookieHi, cookieLo, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, 6 + msg.length);
    b.writeUInt32BE(code, 20);
    b.writeUInt16BE(msg.length, 24);
    msg.copy(b, 26);
    this.send(b);
  }
}

/** OpenSSL's reason ("binder does not verify") rather than its whole error-queue line. */
function tlsReason(err: Error): string {
  const reason = (err as Error & { reason?: string }).reason;
  return reason ?? err.message.split('\n')[0];
}

function writeSimpleHeader(b: Buffer, cookieHi: number, cookieLo: number, error: number): void {
  b.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
}

function writeChunkHeader(b: Buffer, cookieHi: number, cookieLo: number, flags: number, type: number, length: number): void {
  b.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(flags, 4);
  b.writeUInt16BE(type, 6);
  b.writeUInt32BE(cookieHi, 8);
  b.writeUInt32BE(cookieLo, 12);
  b.writeUInt32BE(length, 16);
}

/** Writes one NBD_REPLY_TYPE_BLOCK_STATUS chunk at `at`; returns where the next one goes. */
function writeBlockStatusChunk(b: Buffer, at: number, cookieHi: number, cookieLo: number, done: boolean, id: number, lengths: number[], flags: number[]): number {
  const payload = 4 + 8 * lengths.length;
  b.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(done ? P.NBD_REPLY_FLAG_DONE : 0, at + 4);
  b.writeUInt16BE(P.NBD_REPLY_TYPE_BLOCK_STATUS, at + 6);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
  b.writeUInt32BE(payload, at + 16);
  b.writeUInt32BE(id, at + 20);
  let p = at + 24;
  for (let i = 0; i < lengths.length; i++) {
    b.writeUInt32BE(lengths[i], p);
    b.writeUInt32BE(flags[i] >>> 0, p + 4);
    p += 8;
  }
  return p;
}

function writeU64(b: Buffer, at: number, value: number): void {
  b.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  b.writeUInt32BE(value >>> 0, at + 4);
}
