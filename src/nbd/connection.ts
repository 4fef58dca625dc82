/**
 * One NBD client connection: the socket side of NbdServerCore
 * (server-core.ts), which parses the handshake and the requests and encodes
 * every reply. This class moves bytes between the socket and the core, runs
 * the requests the core hands out on the export's node, and does what only
 * a socket can: corking, pausing, TLS, closing.
 *
 * Every request becomes one call on the export's node; its reply is written
 * when that call settles, so replies go out of order and many requests are
 * in flight. Replies produced in one turn of the event loop are corked into
 * one writev. Backpressure: the core stops taking requests past its
 * in-flight caps or while the socket's send buffer is full ('pause'), and
 * takes them again as requests finish or the socket drains ('resume').
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
import { NBD_CMD_OP, Op } from '../metrics/stats.js';
import type { Socket } from 'node:net';
import fs from 'node:fs';
import tls from 'node:tls';
import util from 'node:util';
import { VdiskError } from '../errors.js';
import { logEvent, isLogLevelEnabled } from '../log.js';
import { ReqFlags, Status } from '../block/node.js';
import { EAGAIN, native } from '../native.js';
import {
  META_ID_BASE_ALLOCATION,
  META_ID_ALLOCATION_DEPTH,
  META_ID_DIRTY_BITMAP,
  addExtent,
  allocationFlags,
  dirtyExtents,
  selectedContexts,
  statusExtents,
} from './meta.js';
import * as P from './protocol.js';
import { HOLE_SCAN_MIN, NbdServerCore, type NbdAction, type NbdOutcome, type NbdRequest } from './server-core.js';
import type { BudgetUser } from './limits.js';
import { MIN_POOLED, payloadPool } from './payload-pool.js';
import type { NbdExport, NbdServer } from './server.js';

const SOCKET_BUFFER_BYTES = 4 * 1024 * 1024;
/** Direct reading: the chunk size for request headers and small payloads (libuv's read size). */
const CHUNK_BYTES = 64 * 1024;
/** Direct reading: a chunk with less room than this is replaced by a new one. */
const CHUNK_MIN_READ = 16 * 1024;
/** Direct reading: most reads per wake-up (libuv's stream reads at most 32 per wake-up too). */
const READS_PER_WAKE = 32;
/** Payloads from this size on are read straight into their buffers rather than partly copied out of a chunk. */
const LARGE_PAYLOAD = MIN_POOLED;
/** How long a closing connection may take to deliver its last replies. */
const GRACEFUL_CLOSE_MS = 10_000;

let nextConnectionId = 1;

export class NbdConnection implements BudgetUser {
  readonly id = nextConnectionId++;
  private readonly core: NbdServerCore;
  private closedFlag = false;
  /** A protocol error or ABORT: no more input is taken. */
  private ending = false;
  private tlsHandshaking = false;
  private handshakeTimer: NodeJS.Timeout | undefined;
  private corked = false;
  private closeWaiters: Array<() => void> = [];
  /** The socket in use: the accepted one, or the TLS socket over it after STARTTLS. */
  private socket: Socket;
  /**
   * Direct reading (see readDirect()): a duplicate of the socket's
   * descriptor, read by this connection under its own poll watcher; -1 when
   * the socket's stream reads instead.
   */
  private directFd = -1;
  /** The poll watcher on directFd, while input is taken. */
  private directWatch: object | undefined;
  /** Where request headers and small payloads are read: the unused tail of this chunk. */
  private chunk = Buffer.alloc(0);
  private chunkUsed = 0;
  /** The last requests were large WRITEs: read just the next header, so their payloads go straight to their buffers. */
  private largeWrites = false;
  /** Who the client is by TLS: its certificate's DN or its PSK username (for logs). */
  private tlsIdentity: string | undefined;
  /** Unsent replies charged to the server's buffer budget, as last seen. */
  private unsentCharged = 0;
  /** Idle timeout: when data last arrived (ms, Date.now()). */
  private lastInput = 0;
  private idleTimer: NodeJS.Timeout | undefined;
  private readonly listeners = {
    data: (chunk: Buffer) => this.onData(chunk),
    drain: () => {
      this.syncUnsent();
      this.run(this.core.drained());
    },
    error: (err: Error) => {
      this.closeReason ??= `socket error: ${(err as NodeJS.ErrnoException).code ?? err.message}`;
      if (!this.closedFlag) logEvent('debug', 'nbd-socket-error', { connection: this.id, error: err.message });
    },
    end: () => {
      this.closeReason ??= 'the client closed the connection';
    },
    close: () => this.onClose(),
  };
  /** Why the connection ended, for its disconnect line: the first cause seen wins. */
  private closeReason: string | undefined;

  constructor(
    socket: Socket,
    private readonly server: NbdServer,
    readonly peer: string,
  ) {
    this.socket = socket;
    this.core = new NbdServerCore(
      server,
      this.id,
      () => this.socket.writableLength,
      {
        charge: (n) => server.budget.charge(n),
        release: (n) => server.budget.release(n),
        // All clients together hold the server's buffer budget: this one waits its turn.
        mustPause: () => {
          this.syncUnsent();
          if (!server.budget.mustWait(this.buffered)) return false;
          server.budget.wait(this);
          return true;
        },
      },
      this,
    );
    this.core.onRefused = (type) => {
      const op = NBD_CMD_OP[type] ?? -1;
      const stats = this.core.export?.stats;
      if (op >= 0 && stats) stats.invalid[op]++;
    };
    socket.setNoDelay(true);
    // Big socket buffers: a 1 MiB read reply then leaves in one or two writes instead of
    // many wake-ups (measured: 1M reads 1.6 -> 2.6 GB/s on a unix socket). The kernel caps
    // them at net.core.wmem_max / rmem_max.
    const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
    if (typeof fd === 'number' && fd >= 0) native.setSocketBuffers(fd, SOCKET_BUFFER_BYTES, SOCKET_BUFFER_BYTES);
    // The server accepts sockets paused (pauseOnConnect), so the stream has read nothing yet.
    const dup = typeof fd === 'number' && fd >= 0 && socket.readableFlowing === false && socket.readableLength === 0 ? native.dupFd(fd) : -1;
    if (dup >= 0) {
      this.directFd = dup;
      this.watchDirect();
    } else {
      this.toStreamReading(true);
    }
    socket.on('drain', this.listeners.drain);
    socket.on('error', this.listeners.error);
    socket.on('close', this.listeners.close);
    socket.on('end', this.listeners.end);
    this.handshakeTimer = setTimeout(() => {
      this.closeReason ??= 'handshake timeout';
      logEvent('warn', 'nbd-handshake-timeout', { connection: this.id, peer: this.peer, seconds: server.handshakeTimeoutMs / 1000 });
      this.destroy();
    }, server.handshakeTimeoutMs);
    this.handshakeTimer.unref();
    this.run(this.core.greeting());
  }

  get export(): NbdExport | undefined {
    return this.core.export;
  }

  get closed(): boolean {
    return this.closedFlag;
  }

  /** Resolves when the socket has closed. */
  whenClosed(): Promise<void> {
    if (this.closedFlag) return Promise.resolve();
    return new Promise((resolve) => this.closeWaiters.push(resolve));
  }

  /**
   * Stops taking requests, lets those in flight finish and their replies go
   * out, then closes. A client that does not read its replies is cut off
   * after GRACEFUL_CLOSE_MS, so a shutdown never hangs on it.
   */
  gracefulClose(): Promise<void> {
    if (this.closedFlag) return Promise.resolve();
    this.closeReason ??= 'the server is stopping or the export is removed';
    if (this.core.export === undefined) {
      this.destroy();
    } else {
      this.run(this.core.disconnect());
      setTimeout(() => this.destroy(), GRACEFUL_CLOSE_MS).unref();
    }
    return this.whenClosed();
  }

  /** Closes at once; requests in flight still complete on the node but get no reply. */
  destroy(): void {
    this.closeReason ??= 'closed by the server';
    // The duplicate descriptor too: the client sees the connection end now, not at 'close'.
    this.endDirect();
    this.socket.destroy();
  }

  // ---- the core's actions -------------------------------------------------

  private onData(chunk: Buffer): void {
    if (this.closedFlag || this.ending) return;
    if (this.idleTimer !== undefined) this.lastInput = Date.now();
    this.cork();
    this.run(this.core.push(chunk));
  }

  // ---- direct reading -----------------------------------------------------
  //
  // A plain (not TLS) connection reads its socket itself instead of through
  // the net.Socket's stream: a WRITE payload is read straight into its
  // buffer, and nothing is allocated per read but the chunks headers land
  // in. The stream's way (64 KiB reads, each a fresh buffer handed through
  // the stream and then copied into the payload) cost the 1M write bench
  // about 40% of the daemon's CPU in copies, page faults and garbage
  // collection (docs/design/io-path.md). The net.Socket still does all the
  // writing and closing; it was accepted paused, so it has read nothing.
  // Input goes back to it (toStreamReading) at EOF, when the connection is
  // ending, and at STARTTLS (the TLS socket reads it); from then on
  // everything is as it always was.

  /** No more input is taken: the socket's stream, paused, keeps what arrives. */
  private stopInput(): void {
    if (this.directFd >= 0) this.toStreamReading(false);
    else this.socket.pause();
  }

  /** Starts (or restarts) taking input: the watcher calls readDirect() while the socket is readable. */
  private watchDirect(): void {
    if (this.directFd < 0 || this.directWatch !== undefined) return;
    this.directWatch = native.watchFd(this.directFd, (status) => this.readDirect(status));
  }

  /** Stops taking input (backpressure): unread bytes wait in the kernel. */
  private unwatchDirect(): void {
    if (this.directWatch === undefined) return;
    native.unwatchFd(this.directWatch);
    this.directWatch = undefined;
  }

  /** Ends direct reading for good: the watcher stops and the duplicate descriptor is closed. */
  private endDirect(): void {
    if (this.directFd < 0) return;
    this.unwatchDirect();
    fs.closeSync(this.directFd);
    this.directFd = -1;
  }

  /**
   * The socket's stream takes over the input (it has read nothing so far, and
   * every byte read directly was parsed): EOF and whatever follows reach
   * the connection as 'data' and 'end', as before direct reading existed.
   */
  private toStreamReading(resume: boolean): void {
    this.endDirect();
    if (this.socket.listeners('data').includes(this.listeners.data)) return;
    this.socket.on('data', this.listeners.data);
    if (resume) this.socket.resume();
  }

  /**
   * The socket is readable. Reads until the kernel has no more (a short
   * read), up to READS_PER_WAKE reads so one busy client does not hold the
   * loop (as libuv's own stream reading does). A WRITE payload's bytes go
   * straight into its buffer. Otherwise a chunk read takes what fits in the
   * current chunk, except after large WRITEs: then only the next header
   * is read, so the payload after it is not copied out of a chunk.
   */
  private readDirect(status: number): void {
    if (this.closedFlag) return this.endDirect();
    if (status < 0 || this.ending) return this.toStreamReading(!this.ending);
    if (this.idleTimer !== undefined) this.lastInput = Date.now();
    this.cork();
    for (let i = 0; i < READS_PER_WAKE && this.directWatch !== undefined; i++) {
      const w = this.core.payloadWindow();
      let n: number;
      let asked: number;
      if (w !== undefined) {
        asked = w.length;
        n = native.readFd(this.directFd, w.buf, w.at, asked);
        if (n > 0) this.run(this.core.payloadReceived(n));
      } else {
        asked = this.largeWrites ? Math.max(1, this.core.needs - this.core.buffered) : CHUNK_MIN_READ;
        if (this.chunk.length - this.chunkUsed < asked) {
          // Parts of the old chunk may still be in use (a payload taken as a view): never reused.
          this.chunk = Buffer.allocUnsafeSlow(Math.max(CHUNK_BYTES, asked));
          this.chunkUsed = 0;
        }
        if (!this.largeWrites) asked = this.chunk.length - this.chunkUsed;
        n = native.readFd(this.directFd, this.chunk, this.chunkUsed, asked);
        if (n > 0) {
          const bytes = this.chunk.subarray(this.chunkUsed, this.chunkUsed + n);
          this.chunkUsed += n;
          this.run(this.core.push(bytes));
          // Large WRITEs go on while headers keep announcing payloads too big to copy.
          const next = this.core.payloadWindow();
          this.largeWrites = next !== undefined && next.length >= LARGE_PAYLOAD;
        }
      }
      if (n === asked) continue;
      if (n > 0 || n === EAGAIN) return;
      if (n === 0) return this.toStreamReading(true);
      // As the stream reports a failed read: the socket is destroyed with the error.
      const code = util.getSystemErrorName(n);
      return void this.socket.destroy(Object.assign(new Error(`read ${code}`), { errno: n, code, syscall: 'read' }));
    }
  }

  private run(actions: NbdAction[]): void {
    for (const a of actions) {
      switch (a.type) {
        case 'send':
          if (!this.closedFlag) {
            // A pooled buffer goes back to the pool once the socket has sent it (not if the write failed).
            if (a.pooled !== undefined) {
              const pooled = a.pooled;
              this.socket.write(a.data, (err) => {
                if (!err) payloadPool.give(pooled);
              });
            } else {
              this.socket.write(a.data);
            }
            if (this.core.export !== undefined) this.syncUnsent();
          }
          break;
        case 'request':
          this.execute(a.req);
          break;
        case 'transmission':
          this.enterTransmission(a.exp);
          break;
        case 'starttls':
          this.startTls();
          break;
        case 'pause':
          if (this.directFd >= 0) this.unwatchDirect();
          else this.socket.pause();
          break;
        case 'resume':
          if (this.directFd >= 0) this.watchDirect();
          else this.socket.resume();
          this.cork();
          break;
        case 'end':
          this.end(a.reason, a.message);
          break;
      }
    }
  }

  private end(reason: 'abort' | 'disconnect' | 'refused' | 'protocol-error', message?: string): void {
    this.closeReason ??= reason === 'disconnect' ? 'NBD_CMD_DISC' : reason === 'abort' ? 'NBD_OPT_ABORT' : reason === 'refused' ? 'refused' : `protocol error: ${message}`;
    if (reason === 'refused') return this.hangUp();
    if (reason === 'disconnect') {
      // Close once every reply is flushed; do not wait for the client to close its side.
      this.socket.end(() => this.socket.destroy());
      return;
    }
    if (reason === 'abort') {
      this.ending = true;
      // The rest of the input is read and dropped until the client closes.
      this.toStreamReading(true);
      this.socket.end();
      return;
    }
    // The client broke the protocol: send what is queued (an error reply, maybe), then hang up.
    logEvent('warn', 'nbd-protocol-error', { connection: this.id, peer: this.peer, error: message });
    if (this.closedFlag) return;
    this.ending = true;
    this.stopInput();
    // end() uncorks and flushes; a client that does not read its replies is cut off after a second.
    const timer = setTimeout(() => this.destroy(), 1000);
    timer.unref();
    this.socket.end(() => this.destroy());
  }

  private onClose(): void {
    if (this.closedFlag) return;
    const exp = this.core.export;
    this.closedFlag = true;
    this.endDirect();
    clearTimeout(this.handshakeTimer);
    clearTimeout(this.idleTimer);
    // Requests still in flight release their own bytes when they settle (core.complete()).
    this.syncUnsent();
    this.core.releasePending();
    logEvent(exp !== undefined ? 'info' : 'debug', 'nbd-client-disconnected', {
      connection: this.id,
      peer: this.peer,
      export: exp?.name,
      inFlight: this.core.inFlight,
      closedBy: this.closeReason ?? 'unknown',
      ...(exp !== undefined ? this.core.requestSummary() : {}),
    });
    this.server.connectionClosed(this);
    for (const w of this.closeWaiters.splice(0)) w();
  }

  /** What this connection holds against the server's buffer budget. */
  get buffered(): number {
    return this.core.inFlightBytes + this.unsentCharged + this.core.pendingCharged;
  }

  resumeFromBudget(): void {
    this.run(this.core.drained());
  }

  /**
   * Brings the budget's view of this connection's unsent replies up to date.
   * The socket says how much it holds but not when that shrinks, except by
   * 'drain' (when a write found it over its high-water mark): so the charge
   * is synced at every send, every drain and every check; it may be stale
   * by less than the high-water mark (16 KiB), never by a reply.
   */
  private syncUnsent(): void {
    const now = this.closedFlag ? 0 : this.socket.writableLength;
    const delta = now - this.unsentCharged;
    if (delta === 0) return;
    this.unsentCharged = now;
    if (delta > 0) this.server.budget.charge(delta);
    else this.server.budget.release(-delta);
  }

  /** x-query-nbd-server's view of this connection. */
  stats(): Record<string, unknown> {
    if (!this.closedFlag) this.syncUnsent();
    const exp = this.core.export;
    return {
      id: this.id,
      peer: this.peer,
      ...(exp ? { export: exp.name } : { handshake: true }),
      'in-flight': this.core.inFlight,
      'in-flight-bytes': this.core.inFlightBytes,
      'unsent-bytes': this.unsentCharged,
      buffered: this.buffered,
      paused: this.core.isPaused,
      requests: this.core.requestsReceived,
    };
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
      if (this.closedFlag || this.ending || this.core.ended) return;
      const idleMs = this.server.idleTimeoutMs;
      const quietFor = Date.now() - this.lastInput;
      if (this.core.inFlight > 0 || this.socket.writableLength > 0) {
        // Busy is not idle: the quiet time starts again when the work is done.
        this.lastInput = Date.now();
        this.idleTimer = setTimeout(check, idleMs).unref();
      } else if (quietFor < idleMs) {
        this.idleTimer = setTimeout(check, idleMs - quietFor).unref();
      } else {
        this.closeReason ??= 'idle timeout';
        logEvent('info', 'nbd-client-idle-timeout', { connection: this.id, peer: this.peer, export: exp()?.name, seconds: idleMs / 1000 });
        this.hangUp();
      }
    };
    const exp = () => this.core.export;
    this.idleTimer = setTimeout(check, delayMs).unref();
  }

  /** Ends the connection with nothing in flight: what is queued is sent, then the socket closes. */
  private hangUp(): void {
    this.ending = true;
    this.stopInput();
    setTimeout(() => this.destroy(), GRACEFUL_CLOSE_MS).unref();
    this.socket.end(() => this.destroy());
  }

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

  private enterTransmission(exp: NbdExport): void {
    clearTimeout(this.handshakeTimer);
    this.handshakeTimer = undefined;
    exp.connections.add(this);
    if (this.server.idleTimeoutMs > 0) this.armIdleTimer(this.server.idleTimeoutMs);
    const meta = this.core.meta;
    logEvent('info', 'nbd-client-connected', {
      connection: this.id,
      peer: this.peer,
      export: exp.name,
      structured: this.core.structured,
      ...(this.core.extended ? { extendedHeaders: true } : {}),
      contexts: meta ? selectedContexts(meta).map((c) => c.name) : [],
      ...(this.core.tlsActive ? { tls: this.tlsIdentity ?? 'on' } : {}),
    });
  }

  /** Runs the TLS handshake over the socket the core just acknowledged STARTTLS on. */
  private startTls(): void {
    const creds = this.server.tls!.creds;
    this.tlsHandshaking = true;
    const raw = this.socket;
    // The TLS socket reads the raw socket from here on (the client sends nothing before the ack).
    this.endDirect();
    // The acknowledgement must leave before the TLS layer takes the socket over.
    while (raw.writableCorked > 0) raw.uncork();
    raw.removeListener('data', this.listeners.data);
    raw.removeListener('drain', this.listeners.drain);
    raw.removeListener('close', this.listeners.close);
    let pskIdentity: string | undefined;
    const secure = new tls.TLSSocket(raw, creds.serverOptions((identity) => (pskIdentity = identity)));
    this.socket = secure;
    secure.on('error', (err: Error) => {
      if (this.closedFlag) return;
      if (this.tlsHandshaking) {
        logEvent('warn', 'nbd-tls-handshake-failed', { connection: this.id, peer: this.peer, identity: pskIdentity, reason: tlsReason(err) });
        this.destroy();
      } else {
        this.listeners.error(err);
      }
    });
    secure.on('close', this.listeners.close);
    secure.on('end', this.listeners.end);
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
      this.tlsHandshaking = false;
      this.tlsIdentity = check.ok ? check.identity : undefined;
      logEvent('debug', 'nbd-tls-established', { connection: this.id, peer: this.peer, identity: this.tlsIdentity, protocol: secure.getProtocol(), cipher: secure.getCipher()?.name });
      this.run(this.core.tlsEstablished());
      secure.on('data', this.listeners.data);
    });
  }

  // ---- running requests ---------------------------------------------------

  private finish(req: NbdRequest, outcome: NbdOutcome): void {
    // The export's counters: what the client asked, as it asked it (a hole read counts its length).
    const op = NBD_CMD_OP[req.type] ?? -1;
    const stats = this.core.export?.stats;
    if (op >= 0 && stats) {
      if (outcome.kind === 'error') stats.fail(op as Op);
      else if (outcome.kind !== 'none') stats.done(op as Op, op === Op.Flush ? 0 : req.length, req.start);
    }
    // A sparse read is many chunks: one writev, as when they were one buffer each.
    if (outcome.kind === 'read-parts') this.cork();
    this.run(this.core.complete(req, outcome));
  }

  private fail(req: NbdRequest, err: unknown): void {
    const e = err instanceof VdiskError ? err : new VdiskError('EIO', String((err as Error)?.message ?? err));
    if (e.code === 'VDISK_DROP_CONNECTION') {
      // A blkdebug rule wants the client to see its server vanish: no reply, the socket goes.
      logEvent('warn', 'nbd-connection-dropped', { connection: this.id, reason: e.message });
      this.destroy();
      return this.finish(req, { kind: 'none' });
    }
    // I/O errors are worth a line; refusals of bad requests were logged at validation.
    logEvent(e.errno === 'EINVAL' || e.errno === 'ENOTSUP' ? 'debug' : 'warn', 'nbd-request-failed', {
      connection: this.id,
      command: P.CMD_NAMES[req.type],
      errno: e.errno,
      error: e.message,
    });
    this.finish(req, { kind: 'error', code: P.nbdErrno(e.errno), message: e.message });
  }

  private track(req: NbdRequest, op: () => Promise<void>): void {
    let p: Promise<void>;
    try {
      p = op();
    } catch (err) {
      p = Promise.reject(err);
    }
    p.then(
      () => this.finish(req, { kind: 'ok' }),
      (err: unknown) => this.fail(req, err),
    );
  }

  private execute(req: NbdRequest): void {
    req.start = performance.now();
    const exp = this.core.export!;
    const node = exp.node;
    const { offset, length, flags } = req;
    switch (req.type) {
      case P.NBD_CMD_READ:
        return this.doRead(req);
      case P.NBD_CMD_WRITE: {
        const fua = flags & P.NBD_CMD_FLAG_FUA || exp.writethrough ? ReqFlags.FUA : 0;
        return this.track(req, () => node.write(offset, req.data!, fua));
      }
      case P.NBD_CMD_FLUSH:
        return this.track(req, () => node.flush());
      case P.NBD_CMD_TRIM:
        return this.track(req, () => {
          const p = node.discard(offset, length);
          return flags & P.NBD_CMD_FLAG_FUA ? p.then(() => node.flush()) : p;
        });
      case P.NBD_CMD_WRITE_ZEROES: {
        let zf = flags & P.NBD_CMD_FLAG_NO_HOLE ? 0 : ReqFlags.MAY_UNMAP;
        if (flags & P.NBD_CMD_FLAG_FAST_ZERO) zf |= ReqFlags.NO_FALLBACK;
        if (flags & P.NBD_CMD_FLAG_FUA || exp.writethrough) zf |= ReqFlags.FUA;
        return this.track(req, () => node.writeZeroes(offset, length, zf));
      }
      case P.NBD_CMD_CACHE:
        return this.track(req, () => node.cache(offset, length));
      case P.NBD_CMD_BLOCK_STATUS:
        this.blockStatus(req).then(
          (outcome) => this.finish(req, outcome),
          (err) => this.fail(req, err),
        );
        return;
    }
  }

  private doRead(req: NbdRequest): void {
    const node = this.core.export!.node;
    if (this.core.structured && !(req.flags & P.NBD_CMD_FLAG_DF) && req.length >= HOLE_SCAN_MIN) {
      this.readSparse(req).then(
        (parts) => this.finish(req, { kind: 'read-parts', parts }),
        (err) => this.fail(req, err),
      );
      return;
    }
    const { reply, data } = this.core.readBuffer(req);
    node.read(req.offset, data).then(
      () => this.finish(req, { kind: 'read', reply }),
      (err) => this.fail(req, err),
    );
  }

  /**
   * A structured read that sends zero ranges as hole chunks instead of data.
   * Nothing is sent until every part is read, so an error can still be one clean error reply.
   */
  private async readSparse(req: NbdRequest): Promise<Array<{ offset: number; length: number; data?: Buffer; pooled?: Buffer }>> {
    const node = this.core.export!.node;
    const parts: Array<{ offset: number; length: number; data?: Buffer; pooled?: Buffer }> = [];
    let pos = req.offset;
    const end = req.offset + req.length;
    while (pos < end) {
      const ext = await node.blockStatus(pos, end - pos);
      if (ext.flags & Status.ZERO) {
        parts.push({ offset: pos, length: ext.length });
      } else {
        // Pooled (payload-pool.ts); a part read before a failure is left to the GC.
        const { data, backing } = payloadPool.take(ext.length);
        await node.read(pos, data);
        parts.push({ offset: pos, length: ext.length, data, pooled: backing });
      }
      pos += ext.length;
    }
    return parts;
  }

  /**
   * One BLOCK_STATUS chunk per selected context, in QEMU's order. Every
   * context is worked out before anything is sent, so a failure is one clean
   * error reply rather than chunks followed by an error.
   */
  private async blockStatus(req: NbdRequest): Promise<NbdOutcome> {
    const exp = this.core.export!;
    const max = this.core.maxExtents(req);
    const { offset, length } = req;
    if (this.core.metaBaseOnly) {
      // The common case, base:allocation alone: the walk is inline (no extra async frame).
      const lengths: number[] = [];
      const values: number[] = [];
      const end = offset + length;
      for (let pos = offset; pos < end; ) {
        const ext = await exp.node.blockStatus(pos, end - pos);
        if (!addExtent(lengths, values, max, ext.length, allocationFlags(ext.flags))) break;
        pos += ext.length;
      }
      return { kind: 'block-status', contexts: [{ id: META_ID_BASE_ALLOCATION, lengths, values }] };
    }
    const sel = this.core.meta!;
    const contexts: Array<{ id: number; lengths: number[]; values: number[] }> = [];
    const add = (id: number): [number[], number[]] => {
      const c = { id, lengths: [] as number[], values: [] as number[] };
      contexts.push(c);
      return [c.lengths, c.values];
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
    if (isLogLevelEnabled('debug')) {
      logEvent('debug', 'nbd-block-status', { connection: this.id, offset, length, contexts: contexts.map((c) => c.id), extents: contexts.map((c) => c.lengths.length) });
    }
    return { kind: 'block-status', contexts };
  }
}

/** OpenSSL's reason ("binder does not verify") rather than its whole error-queue line. */
function tlsReason(err: Error): string {
  const reason = (err as Error & { reason?: string }).reason;
  return reason ?? err.message.split('\n')[0];
}

