/**
 * The NBD server protocol without I/O (as ws's Receiver, undici's llhttp
 * and ssh2's protocol core): bytes in, actions out. NbdConnection moves bytes
 * between its socket and this core and runs the requests it is handed; the
 * core parses the fixed newstyle handshake and the transmission phase,
 * validates every request, and encodes every reply. Because it never
 * touches a socket or a node, the tests (test/fuzz/) drive it with arbitrary
 * bytes and check what it asks for: a request action is the only way a node
 * is ever touched, so "no write on a read-only export, no write past the
 * end" is a property of the action stream.
 *
 * Flow: push(bytes) -> actions; the host sends 'send' data in order, runs each
 * 'request' against the export's node and hands its outcome to complete(),
 * which returns the reply (and, once the in-flight caps have room again, the
 * actions of requests that were waiting in the buffer).
 *
 * Validation follows the spec and nbdkit's order: unknown command or flag,
 * range, read-only, size. A bad request gets an error reply and the
 * connection goes on; a bad magic or an unreadable write payload is a
 * protocol error: an 'end' action with the reason, after which nothing more
 * is parsed.
 */
import { logEvent, isLogLevelEnabled } from '../log.js';
import { ByteQueue } from './byte-queue.js';
import { MAX_EXTENTS, type MetaSelection, selectContexts, selectedContexts } from './meta.js';
import { MIN_POOLED, payloadPool } from './payload-pool.js';
import * as P from './protocol.js';
import type { NbdExport } from './server.js';

/** Requests in flight past which no more are taken (the socket is paused). */
export const MAX_IN_FLIGHT = 64;
export const MAX_IN_FLIGHT_BYTES = 64 * 1024 * 1024;
/** Replies queued in the socket but not yet sent; past this the client is not keeping up. */
export const MAX_UNSENT_BYTES = 32 * 1024 * 1024;
/** Most option requests one handshake may send (each one costs a reply). */
export const MAX_OPTIONS = 1000;
/** Reads at least this long look for holes and send them as hole chunks. */
export const HOLE_SCAN_MIN = 64 * 1024;

const enum State {
  ClientFlags,
  OptionHeader,
  OptionData,
  OptionSkip,
  RequestHeader,
  WritePayload,
  WriteSkip,
  /** The connection is ending (ABORT answered, protocol error): the rest of the input is ignored. */
  Ending,
  /** NBD_OPT_STARTTLS was answered; nothing is parsed until tlsEstablished(). */
  TlsHandshake,
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

/** One validated request for the host to run on the export's node. */
export interface NbdRequest {
  /** NBD_CMD_READ, WRITE, FLUSH, TRIM, CACHE, WRITE_ZEROES or BLOCK_STATUS (DISC never becomes a request). */
  type: number;
  flags: number;
  cookieHi: number;
  cookieLo: number;
  offset: number;
  length: number;
  /** WRITE: the payload. */
  data?: Buffer;
  /**
   * The pooled buffer (payload-pool.ts) of a WRITE's payload (data is a view
   * of it), or of a READ's data (readData): given back when the write
   * succeeded, or when the read's reply has been sent.
   */
  pooled?: Buffer;
  /** READ into a pooled buffer: the data, sent after the reply buffer (which then holds only the header). */
  readData?: Buffer;
  /** Bytes this request holds while in flight (payload or reply), for the in-flight cap. */
  bytes: number;
  /** performance.now() when the host started running it (the host sets it; for the export's latency counters). */
  start: number;
}

/** What the server the core answers for offers (NbdServer has these). */
export interface NbdCoreServer {
  findExport(name: string): NbdExport | undefined;
  listExports(): NbdExport[];
  /** Set when the server requires TLS. */
  readonly tls?: unknown;
  readonly maxConnections: number;
  /** Whether the connection may use this export (per-export client limits); a reason when not. */
  admit?(conn: never, exp: NbdExport): string | undefined;
  /** Whether the export is advertised with NBD_FLAG_CAN_MULTI_CONN (default: unless max-connections is 1). */
  multiConn?(exp: NbdExport): boolean;
}

/** What the host's daemon-wide accounting needs to see (the buffer budget, docs/design/limits.md). */
export interface NbdCoreHooks {
  /** Bytes this connection now holds more of (a request's payload or reply, a write being received). */
  charge(bytes: number): void;
  release(bytes: number): void;
  /** Beyond the core's own caps: whether no more requests may be taken now. */
  mustPause(): boolean;
}

export type NbdAction =
  | { type: 'send'; data: Buffer; pooled?: Buffer }
  | { type: 'request'; req: NbdRequest }
  /** The handshake chose this export: transmission starts. */
  | { type: 'transmission'; exp: NbdExport }
  /** STARTTLS was acknowledged (the ack is the 'send' before this): run the TLS handshake, then call tlsEstablished(). */
  | { type: 'starttls' }
  /** Stop reading input: too much in flight, the client is not reading, or it asked to disconnect. */
  | { type: 'pause' }
  | { type: 'resume' }
  /**
   * End the connection once what was sent is flushed. reason: 'abort'
   * (NBD_OPT_ABORT), 'disconnect' (NBD_CMD_DISC or a graceful close, every
   * reply sent), 'refused' (EXPORT_NAME over the export's client limit: it
   * has no error reply), 'protocol-error' (message says what was wrong).
   */
  | { type: 'end'; reason: 'abort' | 'disconnect' | 'refused' | 'protocol-error'; message?: string };

/** How a request ended, handed back to complete(). */
export type NbdOutcome =
  | { kind: 'ok' }
  /** A READ into the buffer from readBuffer(): the header is filled in here. */
  | { kind: 'read'; reply: Buffer }
  /** A structured READ in parts: a part without data is a hole. */
  | { kind: 'read-parts'; parts: Array<{ offset: number; length: number; data?: Buffer; pooled?: Buffer }> }
  /** BLOCK_STATUS: one chunk per context, in this order. */
  | { kind: 'block-status'; contexts: Array<{ id: number; lengths: number[]; values: number[] }> }
  | { kind: 'error'; code: number; message: string }
  /** No reply at all (the host dropped the connection). */
  | { kind: 'none' };

export class NbdServerCore {
  private readonly queue = new ByteQueue();
  private state = State.ClientFlags;
  private noZeroes = false;
  private fixedNewstyle = false;
  private _structured = false;
  /** NBD_OPT_EXTENDED_HEADERS was acknowledged: 32-byte requests and replies, 64-bit lengths. */
  private _extended = false;
  private optionCount = 0;
  private option = 0;
  private optionLength = 0;
  /** What the last NBD_OPT_SET_META_CONTEXT selected, and on which export. */
  private metaSelection: MetaSelection | undefined;
  private _tlsActive = false;

  private exp: NbdExport | undefined;
  private exportSize = 0;
  private _meta: MetaSelection | undefined;
  private _metaBaseOnly = false;
  private _inFlight = 0;
  private _answerable = 0;
  private inFlightBytes_ = 0;
  private readonly requestCounts: number[] = P.CMD_NAMES.map(() => 0);
  private readonly requestBytes: number[] = P.CMD_NAMES.map(() => 0);
  private paused = false;
  private disconnectRequested = false;
  private ending = false;
  /** A WRITE whose payload is still arriving. */
  private pending: { cookieHi: number; cookieLo: number; flags: number; offset: number; buf: Buffer; backing: Buffer | undefined; filled: number } | undefined;
  private skipRemaining = 0;
  /** Bytes of a WRITE being received, charged to the budget until its payload is in. */
  private _pendingCharged = 0;
  private out: NbdAction[] = [];
  /** Called for each request the core refuses itself (bad range, read-only, bad flags): the export counts them as invalid. */
  onRefused: ((type: number) => void) | undefined;

  constructor(
    private readonly server: NbdCoreServer,
    /** For log lines. */
    readonly id: number = 0,
    /** Bytes written to the transport but not yet sent (the socket's writableLength). */
    private readonly unsentBytes: () => number = () => 0,
    private readonly hooks?: NbdCoreHooks,
    /** What server.admit() is told the client is (the host connection). */
    private readonly owner?: unknown,
  ) {}

  /** The greeting, sent first. */
  greeting(): NbdAction[] {
    const b = Buffer.allocUnsafe(18);
    b.writeBigUInt64BE(P.NBDMAGIC, 0);
    b.writeBigUInt64BE(P.IHAVEOPT, 8);
    b.writeUInt16BE(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES, 16);
    return [{ type: 'send', data: b }];
  }

  get export(): NbdExport | undefined {
    return this.exp;
  }
  get structured(): boolean {
    return this._structured;
  }
  /** Extended headers negotiated (replies are always extended chunks then; structured is true too). */
  get extended(): boolean {
    return this._extended;
  }
  /** Size of one request header: 28 bytes, or 32 with extended headers. */
  private get requestHeaderSize(): number {
    return this._extended ? 32 : 28;
  }
  /** The contexts BLOCK_STATUS answers for; undefined when none was negotiated for this export. */
  get meta(): MetaSelection | undefined {
    return this._meta;
  }
  /** Only base:allocation: block status may take the path that allocates no more than it must. */
  get metaBaseOnly(): boolean {
    return this._metaBaseOnly;
  }
  /** Requests fully received that must each get one reply (all but DISC, known command or not). */
  get answerable(): number {
    return this._answerable;
  }
  get inFlight(): number {
    return this._inFlight;
  }
  /** Payload and reply bytes of the requests in flight. */
  get inFlightBytes(): number {
    return this.inFlightBytes_;
  }
  /** Bytes of a WRITE payload being received. */
  get pendingCharged(): number {
    return this._pendingCharged;
  }
  /** Paused by backpressure (the caps or the budget). */
  get isPaused(): boolean {
    return this.paused;
  }
  /** Request headers received in transmission, of known commands. */
  get requestsReceived(): number {
    return this.requestCounts.reduce((a, b) => a + b, 0);
  }

  /** The connection is gone: the bytes of a half-received WRITE are given back (returned, for the host's accounting). */
  releasePending(): number {
    const n = this._pendingCharged;
    this._pendingCharged = 0;
    if (n) this.hooks?.release(n);
    return n;
  }
  get tlsActive(): boolean {
    return this._tlsActive;
  }
  /** Whether the core parses no more input (ending, or waiting for TLS). */
  get ended(): boolean {
    return this.state === State.Ending;
  }
  /** Bytes received but not yet parsed. */
  get buffered(): number {
    return this.queue.length;
  }

  /**
   * How many buffered bytes the parser needs before it can take its next
   * step, or 0 when it is not reading (ending, in the TLS handshake, paused,
   * disconnecting). buffered >= needs would mean a message fully received
   * and left waiting: a hang, which the fuzz tests look for.
   */
  get needs(): number {
    switch (this.state) {
      case State.ClientFlags:
        return 4;
      case State.OptionHeader:
        return 16;
      case State.OptionData:
        return Math.max(1, this.optionLength);
      case State.OptionSkip:
        return 1;
      case State.RequestHeader:
        return this.disconnectRequested || this.paused ? 0 : this.requestHeaderSize;
      case State.WritePayload:
        return this.pending!.buf.length - this.pending!.filled;
      case State.WriteSkip:
        return 1;
      default:
        return 0;
    }
  }

  push(chunk: Buffer): NbdAction[] {
    if (this.state === State.Ending) return [];
    this.queue.push(chunk);
    this.run();
    return this.flush();
  }

  /**
   * Where the rest of a WRITE payload goes, when the host may read it
   * straight from its transport: the payload's buffer and the window still
   * to fill. Only while every byte received so far has been parsed (the
   * queue is empty), so bytes read into the window are the next ones.
   */
  payloadWindow(): { buf: Buffer; at: number; length: number } | undefined {
    if (this.state !== State.WritePayload || this.queue.length !== 0) return undefined;
    const p = this.pending!;
    return { buf: p.buf, at: p.filled, length: p.buf.length - p.filled };
  }

  /** The host put n bytes (n <= the window's length) into payloadWindow()'s window. */
  payloadReceived(n: number): NbdAction[] {
    if (this.state !== State.WritePayload || n <= 0) return [];
    const p = this.pending!;
    if (n > p.buf.length - p.filled) throw new Error(`${n} bytes received into a payload window of ${p.buf.length - p.filled}`);
    p.filled += n;
    this.run();
    return this.flush();
  }

  /** The transport can take more (the socket drained). */
  drained(): NbdAction[] {
    this.maybeResume();
    return this.flush();
  }

  /** The TLS handshake succeeded and the client is accepted: options go on over TLS. */
  tlsEstablished(): NbdAction[] {
    if (this.state !== State.TlsHandshake) return [];
    this._tlsActive = true;
    this.state = State.OptionHeader;
    return [];
  }

  /**
   * Stop taking requests; once those in flight are answered, end. Before
   * transmission there is nothing to finish: end at once.
   */
  disconnect(): NbdAction[] {
    if (this.exp === undefined) {
      this.state = State.Ending;
      return [{ type: 'end', reason: 'disconnect' }];
    }
    this.requestDisconnect();
    return this.flush();
  }

  /**
   * The buffer a READ of req is read into. A small one lies inside the
   * buffer its reply is sent from (one write, no copy); a large one is
   * pooled (no fresh allocation, page faults and GC per READ, see
   * payload-pool.ts) and sent after a reply buffer that holds the header.
   */
  readBuffer(req: NbdRequest): { reply: Buffer; data: Buffer } {
    const hdr = this._extended ? 40 : this._structured ? 28 : 16;
    if (req.length >= MIN_POOLED) {
      const { data, backing } = payloadPool.take(req.length);
      req.pooled = backing;
      req.readData = data;
      return { reply: Buffer.allocUnsafe(hdr), data };
    }
    const reply = Buffer.allocUnsafe(hdr + req.length);
    return { reply, data: reply.subarray(hdr) };
  }

  /** A request handed out by a 'request' action ended: its reply, and whatever that unblocks. */
  complete(req: NbdRequest, outcome: NbdOutcome): NbdAction[] {
    switch (outcome.kind) {
      case 'ok':
        this.replySimple(req, 0);
        // The node is done with the payload (a failed write may still have a child copying from it).
        if (req.pooled !== undefined) {
          payloadPool.give(req.pooled);
          req.pooled = undefined;
        }
        break;
      case 'read': {
        const reply = outcome.reply;
        if (this._extended) {
          writeExtendedHeader(reply, 0, req, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + req.length);
          writeU64(reply, 32, req.offset);
        } else if (this._structured) {
          writeChunkHeader(reply, req.cookieHi, req.cookieLo, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + req.length);
          writeU64(reply, 20, req.offset);
        } else {
          writeSimpleHeader(reply, req.cookieHi, req.cookieLo, 0);
        }
        this.send(reply);
        if (req.readData !== undefined) {
          // The host gives the pooled buffer back once the socket has sent it.
          this.send(req.readData, req.pooled);
          req.readData = undefined;
          req.pooled = undefined;
        }
        break;
      }
      case 'read-parts': {
        const parts = outcome.parts;
        for (let i = 0; i < parts.length; i++) {
          const p = parts[i];
          const flags = i === parts.length - 1 ? P.NBD_REPLY_FLAG_DONE : 0;
          const hdr = this.chunkHeaderSize;
          if (p.data === undefined) {
            const c = Buffer.allocUnsafe(hdr + 12);
            this.writeChunkHeader(c, req, flags, P.NBD_REPLY_TYPE_OFFSET_HOLE, 12);
            writeU64(c, hdr, p.offset);
            c.writeUInt32BE(p.length, hdr + 8);
            this.send(c);
          } else {
            const c = Buffer.allocUnsafe(hdr + 8);
            this.writeChunkHeader(c, req, flags, P.NBD_REPLY_TYPE_OFFSET_DATA, 8 + p.data.length);
            writeU64(c, hdr, p.offset);
            this.send(c);
            this.send(p.data, p.pooled);
          }
        }
        break;
      }
      case 'block-status': {
        const cs = outcome.contexts;
        let total = 0;
        for (const c of cs) total += this._extended ? 40 + 16 * c.lengths.length : 24 + 8 * c.lengths.length;
        const b = Buffer.allocUnsafe(total);
        let at = 0;
        for (let i = 0; i < cs.length; i++) {
          const done = i === cs.length - 1;
          at = this._extended
            ? writeBlockStatusExtChunk(b, at, req, done, cs[i].id, cs[i].lengths, cs[i].values)
            : writeBlockStatusChunk(b, at, req.cookieHi, req.cookieLo, done, cs[i].id, cs[i].lengths, cs[i].values);
        }
        this.send(b);
        break;
      }
      case 'error':
        this.replyError(req, outcome.code, outcome.message, req.type, true);
        break;
      case 'none':
        break;
    }
    this._inFlight--;
    this.inFlightBytes_ -= req.bytes;
    this.hooks?.release(req.bytes);
    if (this.paused) this.maybeResume();
    if (this.disconnectRequested) this.maybeFinishDisconnect();
    return this.flush();
  }

  /** `{requests: {read: 3, trim: 1}, requestBytes: {read: 12288, trim: 65536}}`: the commands this connection received. */
  requestSummary(): { requests: Record<string, number>; requestBytes: Record<string, number> } {
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

  /** Most extents one BLOCK_STATUS reply of req may carry per context. */
  maxExtents(req: NbdRequest): number {
    return req.flags & P.NBD_CMD_FLAG_REQ_ONE ? 1 : MAX_EXTENTS;
  }

  // ---- parsing ------------------------------------------------------------

  private flush(): NbdAction[] {
    const out = this.out;
    this.out = [];
    return out;
  }

  /** Queues data to send; pooled: the pool buffer data is a view of, for the host to give back once sent. */
  private send(data: Buffer, pooled?: Buffer): void {
    this.out.push(pooled === undefined ? { type: 'send', data } : { type: 'send', data, pooled });
  }

  /** Parses what is buffered; a protocol violation ends the connection. */
  private run(): void {
    try {
      this.process();
    } catch (err) {
      this.protocolError((err as Error).message);
    }
  }

  private protocolError(message: string): void {
    this.state = State.Ending;
    this.out.push({ type: 'end', reason: 'protocol-error', message });
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
            if (!this.paused) {
              this.paused = true;
              this.out.push({ type: 'pause' });
            }
            return;
          }
          if (this.queue.length < this.requestHeaderSize) return;
          this.onRequest(this.queue.take(this.requestHeaderSize));
          break;
        case State.WritePayload: {
          const p = this.pending!;
          p.filled += this.queue.copyInto(p.buf, p.filled, p.buf.length - p.filled);
          if (p.filled < p.buf.length) return;
          this.pending = undefined;
          this.hooks?.release(this._pendingCharged);
          this._pendingCharged = 0;
          this.state = State.RequestHeader;
          this.doWrite(p.cookieHi, p.cookieLo, p.flags, p.offset, p.buf, p.backing);
          break;
        }
        case State.WriteSkip:
          this.skipRemaining -= this.queue.skip(this.skipRemaining);
          if (this.skipRemaining > 0) return;
          this.state = State.RequestHeader;
          break;
        case State.Ending:
        case State.TlsHandshake:
          return;
      }
    }
  }

  /** Too much in flight, or the client is not reading its replies. */
  private overloaded(): boolean {
    if (this._inFlight >= MAX_IN_FLIGHT || this.inFlightBytes_ >= MAX_IN_FLIGHT_BYTES || this.unsentBytes() >= MAX_UNSENT_BYTES) return true;
    return this.hooks?.mustPause() ?? false;
  }

  private maybeResume(): void {
    if (!this.paused || this.state === State.Ending) return;
    if (this.overloaded()) return;
    this.paused = false;
    if (!this.disconnectRequested) this.out.push({ type: 'resume' });
    this.run();
  }

  // ---- handshake ----------------------------------------------------------

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
    if (this.server.tls && !this._tlsActive) {
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
        this.state = State.Ending;
        this.out.push({ type: 'end', reason: 'abort' });
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
        if (this._tlsActive) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'TLS already enabled');
        return this.optionError(option, P.NBD_REP_ERR_POLICY, 'TLS not configured');
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO:
        return this.optInfoGo(option, data);
      case P.NBD_OPT_STRUCTURED_REPLY:
        if (data.length !== 0) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STRUCTURED_REPLY takes no data');
        // The spec's answer to a downgrade: extended headers stay, and the client is told why.
        if (this._extended) return this.optionError(option, P.NBD_REP_ERR_EXT_HEADER_REQD, 'extended headers are negotiated; structured replies cannot replace them');
        if (this._structured) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'structured replies already negotiated');
        this._structured = true;
        return this.optionReply(option, P.NBD_REP_ACK);
      case P.NBD_OPT_EXTENDED_HEADERS:
        if (data.length !== 0) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_EXTENDED_HEADERS takes no data');
        if (this._extended) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'extended headers already negotiated');
        // Extended replies carry everything structured replies do (chunks, holes, errors with text).
        this._extended = true;
        this._structured = true;
        return this.optionReply(option, P.NBD_REP_ACK);
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT:
        return this.optMetaContext(option, data);
      default:
        return this.optionError(option, P.NBD_REP_ERR_UNSUP, `option ${option} not supported`);
    }
  }

  /**
   * NBD_OPT_STARTTLS: acknowledged in the clear, then the host runs the TLS
   * handshake. The client may send nothing between its option and our reply,
   * so anything already buffered breaks the protocol.
   */
  private startTls(option: number, data: Buffer): void {
    if (data.length !== 0) return this.optionError(option, P.NBD_REP_ERR_INVALID, 'NBD_OPT_STARTTLS takes no data');
    if (this.queue.length !== 0) throw new Error('data after NBD_OPT_STARTTLS before the TLS handshake');
    this.optionReply(option, P.NBD_REP_ACK);
    this.state = State.TlsHandshake;
    this.out.push({ type: 'starttls' });
  }

  private optExportName(data: Buffer): void {
    // EXPORT_NAME has no way to say "extended headers" back, and the spec forbids it after them.
    if (this._extended) throw new Error('NBD_OPT_EXPORT_NAME after NBD_OPT_EXTENDED_HEADERS');
    const name = data.toString('utf8');
    const exp = this.server.findExport(name);
    if (!exp) throw new Error(`client asked for unknown export '${name}' with NBD_OPT_EXPORT_NAME`);
    // EXPORT_NAME has no error reply: a client over the export's limit can only be hung up on.
    if (this.server.admit?.(this.owner as never, exp) !== undefined) {
      this.state = State.Ending;
      this.out.push({ type: 'end', reason: 'refused' });
      return;
    }
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
    const refused = this.server.admit?.(this.owner as never, exp);
    if (refused !== undefined) return this.optionError(option, P.NBD_REP_ERR_POLICY, refused);

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
    if (set && !this._structured) return this.optionError(option, P.NBD_REP_ERR_INVALID, `request option '${what}' when structured reply is not negotiated`);
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
    if (this._structured) f |= P.NBD_FLAG_SEND_DF;
    // Every connection shares one node, so a flush on any of them covers writes done on all.
    if (this.server.multiConn ? this.server.multiConn(exp) : this.server.maxConnections !== 1) f |= P.NBD_FLAG_CAN_MULTI_CONN;
    return f;
  }

  private enterTransmission(exp: NbdExport): void {
    this.exp = exp;
    this.exportSize = exp.node.size;
    // Contexts selected for another export (or an export since replaced under the same name) do not count.
    const sel = this.metaSelection;
    this._meta = sel !== undefined && sel.exp === exp && sel.count > 0 ? sel : undefined;
    this._metaBaseOnly = this._meta !== undefined && this._meta.count === 1 && this._meta.baseAllocation;
    this.state = State.RequestHeader;
    this.out.push({ type: 'transmission', exp });
  }

  // ---- transmission -------------------------------------------------------

  private onRequest(h: Buffer): void {
    const magic = h.readUInt32BE(0);
    if (magic !== (this._extended ? P.NBD_EXTENDED_REQUEST_MAGIC : P.NBD_REQUEST_MAGIC)) {
      throw new Error(this._extended && magic === P.NBD_REQUEST_MAGIC ? 'compact request after extended headers were negotiated' : 'bad request magic');
    }
    let flags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const cookieHi = h.readUInt32BE(8);
    const cookieLo = h.readUInt32BE(12);
    const offsetHi = h.readUInt32BE(16);
    const offsetLo = h.readUInt32BE(20);
    const offset = offsetHi * 2 ** 32 + offsetLo;
    // Extended headers: a 64-bit length. Past 2^53 it is only compared with the export's size
    // (and refused), so the float's lost precision changes nothing.
    const lengthHi = this._extended ? h.readUInt32BE(24) : 0;
    const length = this._extended ? lengthHi * 2 ** 32 + h.readUInt32BE(28) : h.readUInt32BE(24);
    const to: ReplyTo = { cookieHi, cookieLo, offset, offsetHi, offsetLo };
    let hasPayload = type === P.NBD_CMD_WRITE;
    if (this._extended) {
      // The flag, not the command, says whether a payload follows; it is framing, not a request flag.
      hasPayload = (flags & P.NBD_CMD_FLAG_PAYLOAD_LEN) !== 0;
      flags &= ~P.NBD_CMD_FLAG_PAYLOAD_LEN;
      // The spec's hard disconnect, before the request counts as one to answer (it never will be).
      if (hasPayload && length > P.NBD_MAX_PAYLOAD) throw new Error(`payload of ${length} bytes is over the ${P.NBD_MAX_PAYLOAD} byte limit`);
    }
    if (type < this.requestCounts.length) {
      this.requestCounts[type]++;
      this.requestBytes[type] += length;
    }
    // A WRITE counts once its payload is in (or it is refused); DISC has no reply.
    if (type !== P.NBD_CMD_DISC && type !== P.NBD_CMD_WRITE) this._answerable++;

    if (this._extended) {
      if (type === P.NBD_CMD_WRITE && !hasPayload) {
        this._answerable++;
        this.onRefused?.(type);
        return this.replyError(to, P.NBD_EINVAL, 'NBD_CMD_WRITE needs NBD_CMD_FLAG_PAYLOAD_LEN with extended headers', type);
      }
      if (type !== P.NBD_CMD_WRITE && hasPayload) {
        // No other command takes a payload here (NBD_FLAG_BLOCK_STATUS_PAYLOAD is not offered):
        // consume it so the stream stays in step, and refuse the command.
        if (type === P.NBD_CMD_DISC) this._answerable++;
        this.onRefused?.(type);
        this.replyError(to, P.NBD_EINVAL, `${P.CMD_NAMES[type] ?? `command ${type}`} takes no payload`, type);
        this.skipRemaining = length;
        this.state = State.WriteSkip;
        return;
      }
    }

    if (type === P.NBD_CMD_WRITE) {
      const error = this.validate(type, flags, offsetHi, offset, length);
      if (error) {
        this._answerable++;
        this.onRefused?.(type);
        this.replyError(to, error.code, error.message, type);
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
      const { data: buf, backing } = payloadPool.take(length);
      this._pendingCharged = length;
      this.hooks?.charge(length);
      this.pending = { cookieHi, cookieLo, flags, offset, buf, backing, filled: 0 };
      this.state = State.WritePayload;
      return;
    }
    if (type === P.NBD_CMD_DISC) {
      logEvent('debug', 'nbd-disconnect-requested', { connection: this.id });
      this.requestDisconnect();
      return;
    }
    const error = this.validate(type, flags, offsetHi, offset, length);
    if (error) {
      this.onRefused?.(type);
      return this.replyError(to, error.code, error.message, type);
    }
    // Reads hold their reply buffer while in flight; the others hold nothing of size.
    this.request({ type, flags, cookieHi, cookieLo, offset, length, bytes: type === P.NBD_CMD_READ ? length : 0, start: 0 });
  }

  private requestDisconnect(): void {
    if (this.disconnectRequested) return;
    this.disconnectRequested = true;
    this.out.push({ type: 'pause' });
    this.maybeFinishDisconnect();
  }

  private maybeFinishDisconnect(): void {
    if (this._inFlight !== 0 || this.ending || this.state === State.Ending) return;
    this.ending = true;
    // Close once every reply is flushed; do not wait for the client to close its side.
    this.out.push({ type: 'end', reason: 'disconnect' });
  }

  /** Returns the error a request gets, or undefined if it is valid. */
  private validate(type: number, flags: number, offsetHi: number, offset: number, length: number): { code: number; message: string } | undefined {
    if (type > P.NBD_CMD_BLOCK_STATUS) return { code: P.NBD_EINVAL, message: `unknown command ${type}` };
    if (flags & ~KNOWN_FLAGS || flags & ~ALLOWED_FLAGS[type]) {
      return { code: P.NBD_EINVAL, message: `flags 0x${flags.toString(16)} not valid for ${P.CMD_NAMES[type]}` };
    }
    if (flags & P.NBD_CMD_FLAG_DF && !this._structured) return { code: P.NBD_EINVAL, message: 'DF flag needs structured replies' };
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
      if (this._meta === undefined) return { code: P.NBD_EINVAL, message: 'CMD_BLOCK_STATUS not negotiated' };
    }
    return undefined;
  }

  private doWrite(cookieHi: number, cookieLo: number, flags: number, offset: number, buf: Buffer, pooled?: Buffer): void {
    this._answerable++;
    this.request({ type: P.NBD_CMD_WRITE, flags, cookieHi, cookieLo, offset, length: buf.length, data: buf, pooled, bytes: buf.length, start: 0 });
  }

  private request(req: NbdRequest): void {
    this._inFlight++;
    this.inFlightBytes_ += req.bytes;
    this.hooks?.charge(req.bytes);
    this.out.push({ type: 'request', req });
  }

  /** A reply without data: a simple reply, or with extended headers (which forbid simple replies) a NONE chunk. */
  private replySimple(to: ReplyTo, error: number): void {
    if (this._extended) {
      const b = Buffer.allocUnsafe(32);
      writeExtendedHeader(b, 0, to, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_NONE, 0);
      this.send(b);
      return;
    }
    const b = Buffer.allocUnsafe(16);
    writeSimpleHeader(b, to.cookieHi, to.cookieLo, error);
    this.send(b);
  }

  /** An error reply: an error chunk (with a message) when structured or extended, else a simple reply. */
  private replyError(to: ReplyTo, code: number, message: string, type: number, logged = false): void {
    if (!logged && isLogLevelEnabled('debug')) {
      logEvent('debug', 'nbd-request-refused', { connection: this.id, command: P.CMD_NAMES[type] ?? type, error: message });
    }
    if (!this._structured) return this.replySimple(to, code);
    const msg = Buffer.from(message.slice(0, 1000));
    const hdr = this.chunkHeaderSize;
    const b = Buffer.allocUnsafe(hdr + 6 + msg.length);
    this.writeChunkHeader(b, to, P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_TYPE_ERROR, 6 + msg.length);
    b.writeUInt32BE(code, hdr);
    b.writeUInt16BE(msg.length, hdr + 4);
    msg.copy(b, hdr + 6);
    this.send(b);
  }

  /** Bytes of a reply chunk's header: 20 (structured) or 32 (extended). */
  private get chunkHeaderSize(): number {
    return this._extended ? 32 : 20;
  }

  private writeChunkHeader(b: Buffer, to: ReplyTo, flags: number, type: number, length: number): void {
    if (this._extended) writeExtendedHeader(b, 0, to, flags, type, length);
    else writeChunkHeader(b, to.cookieHi, to.cookieLo, flags, type, length);
  }
}

/** Who a reply answers: the request's cookie, and (extended headers echo it) its offset as sent. */
interface ReplyTo {
  cookieHi: number;
  cookieLo: number;
  offset: number;
  /** The offset's two halves as received, for a refused request whose offset is past 2^53. */
  offsetHi?: number;
  offsetLo?: number;
}

/** An extended reply header: magic, flags, type, cookie, the request's offset, 64-bit payload length. */
function writeExtendedHeader(b: Buffer, at: number, to: ReplyTo, flags: number, type: number, length: number): void {
  b.writeUInt32BE(P.NBD_EXTENDED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(to.cookieHi, at + 8);
  b.writeUInt32BE(to.cookieLo, at + 12);
  b.writeUInt32BE(to.offsetHi ?? Math.floor(to.offset / 2 ** 32), at + 16);
  b.writeUInt32BE(to.offsetLo ?? to.offset >>> 0, at + 20);
  b.writeUInt32BE(Math.floor(length / 2 ** 32), at + 24);
  b.writeUInt32BE(length >>> 0, at + 28);
}

/** Writes one NBD_REPLY_TYPE_BLOCK_STATUS_EXT chunk at `at` (64-bit lengths and status); returns where the next one goes. */
function writeBlockStatusExtChunk(b: Buffer, at: number, to: ReplyTo, done: boolean, id: number, lengths: number[], flags: number[]): number {
  writeExtendedHeader(b, at, to, done ? P.NBD_REPLY_FLAG_DONE : 0, P.NBD_REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * lengths.length);
  b.writeUInt32BE(id, at + 32);
  b.writeUInt32BE(lengths.length, at + 36);
  let p = at + 40;
  for (let i = 0; i < lengths.length; i++) {
    writeU64(b, p, lengths[i]);
    b.writeUInt32BE(0, p + 8);
    b.writeUInt32BE(flags[i] >>> 0, p + 12);
    p += 16;
  }
  return p;
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
