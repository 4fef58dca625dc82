/**
 * The transmission phase of vdisk's NBD client without a socket: reply
 * bytes in, completed requests out. NbdClientNode (client.ts) registers each
 * request it sends here (cookie, command, range, the buffer a READ fills),
 * pushes whatever the socket reads, and settles the requests this core
 * reports done. Simple replies and structured chunks (data, hole, block
 * status, error) are matched by cookie in any order; a reply the protocol
 * does not allow is a protocol error, after which nothing more is parsed.
 *
 * Every length in a reply is the server's word: data is only ever copied
 * inside the request's own buffer and range, and no chunk may make the
 * client buffer more than MAX_CHUNK_BUFFER bytes, so a hostile or broken
 * server can neither write outside a read's buffer nor grow the client's
 * memory (test/fuzz/nbd-client-core.test.ts).
 */
import { ByteQueue } from './byte-queue.js';
import * as P from './protocol.js';

/** Most bytes of one non-data chunk (block status, error) held at once: 2^17 extents, QEMU's limit, and a header. */
export const MAX_CHUNK_BUFFER = 4 + 8 * 2 ** 17;

export interface ClientRequest {
  type: number;
  offset: number;
  length: number;
  /** READ: where the data goes (length bytes). */
  buf?: Buffer;
  /** BLOCK_STATUS: the extents of the negotiated context, [length, flags] pairs. */
  extents?: number[];
  /** The first error the server sent for it: NBD error value and message. */
  error?: { code: number; message: string };
  /** Set when the server's reply broke a rule that is the request's own (not the stream's). */
  localError?: string;
}

export type ClientEvent =
  /** Every reply of this request has arrived (look at error / localError / extents). */
  | { type: 'done'; cookie: number; req: ClientRequest }
  /** The server broke the protocol: hang up; nothing more is parsed. */
  | { type: 'protocol-error'; message: string };

const enum State {
  Magic,
  SimpleHeader,
  SimpleData,
  ChunkHeader,
  ChunkBody,
  ChunkData,
  /** The rest of an error chunk (error offsets), dropped as it comes. */
  ChunkSkip,
  Broken,
}

export class NbdClientCore {
  private readonly queue = new ByteQueue();
  private readonly requests = new Map<number, ClientRequest>();
  private state = State.Magic;
  private out: ClientEvent[] = [];
  /** The reply being parsed. */
  private cookie = 0;
  private req: ClientRequest | undefined;
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkLength = 0;
  /** SimpleData / ChunkData: where the rest of the data goes. */
  private dataAt = 0;
  private dataLeft = 0;

  constructor(
    /** Structured replies were negotiated. */
    public structured = false,
    /** The id of the context whose extents BLOCK_STATUS reports. */
    public metaContextId: number | undefined = undefined,
  ) {}

  /** Registers a request sent with this cookie. */
  add(cookie: number, req: ClientRequest): void {
    this.requests.set(cookie, req);
  }

  has(cookie: number): boolean {
    return this.requests.has(cookie);
  }

  /** Drops every request (the connection is gone) and returns them. */
  takeAll(): ClientRequest[] {
    const all = [...this.requests.values()];
    this.requests.clear();
    return all;
  }

  get pending(): number {
    return this.requests.size;
  }

  /** Bytes received and not yet parsed. */
  get buffered(): number {
    return this.queue.length;
  }

  /** How many bytes the parser needs before its next step (0: broken). */
  get needs(): number {
    switch (this.state) {
      case State.Magic:
        return 4;
      case State.SimpleHeader:
        return 12;
      case State.ChunkHeader:
        return 16;
      case State.ChunkBody:
        return this.bodyNeed();
      case State.SimpleData:
      case State.ChunkData:
      case State.ChunkSkip:
        return 1;
      default:
        return 0;
    }
  }

  push(chunk: Buffer): ClientEvent[] {
    if (this.state === State.Broken) return [];
    this.queue.push(chunk);
    try {
      this.process();
    } catch (err) {
      this.state = State.Broken;
      this.out.push({ type: 'protocol-error', message: (err as Error).message });
    }
    const out = this.out;
    this.out = [];
    return out;
  }

  private process(): void {
    for (;;) {
      switch (this.state) {
        case State.Magic: {
          if (this.queue.length < 4) return;
          const magic = this.queue.take(4).readUInt32BE(0);
          if (magic === P.NBD_SIMPLE_REPLY_MAGIC) this.state = State.SimpleHeader;
          else if (magic === P.NBD_STRUCTURED_REPLY_MAGIC) this.state = State.ChunkHeader;
          else throw new Error(`bad reply magic 0x${magic.toString(16)}`);
          break;
        }
        case State.SimpleHeader: {
          if (this.queue.length < 12) return;
          const h = this.queue.take(12);
          const error = h.readUInt32BE(0);
          const req = this.lookup(h.readUInt32BE(4), h.readUInt32BE(8));
          if (error !== 0) req.error = { code: error, message: '' };
          else if (req.type === P.NBD_CMD_READ) {
            this.dataAt = 0;
            this.dataLeft = req.length;
            this.state = State.SimpleData;
            break;
          } else if (req.type === P.NBD_CMD_BLOCK_STATUS) req.localError = 'the server answered NBD_CMD_BLOCK_STATUS with a simple reply';
          this.finish();
          this.state = State.Magic;
          break;
        }
        case State.SimpleData:
        case State.ChunkData: {
          const k = this.queue.copyInto(this.req!.buf!, this.dataAt, this.dataLeft);
          this.dataAt += k;
          this.dataLeft -= k;
          if (this.dataLeft > 0) return;
          if (this.state === State.SimpleData) this.finish();
          else if (this.chunkFlags & P.NBD_REPLY_FLAG_DONE) this.finish();
          this.state = State.Magic;
          break;
        }
        case State.ChunkSkip:
          this.dataLeft -= this.queue.skip(this.dataLeft);
          if (this.dataLeft > 0) return;
          if (this.chunkFlags & P.NBD_REPLY_FLAG_DONE) this.finish();
          this.state = State.Magic;
          break;
        case State.ChunkHeader: {
          if (this.queue.length < 16) return;
          const h = this.queue.take(16);
          this.chunkFlags = h.readUInt16BE(0);
          this.chunkType = h.readUInt16BE(2);
          const hi = h.readUInt32BE(4);
          const lo = h.readUInt32BE(8);
          this.chunkLength = h.readUInt32BE(12);
          if (!this.structured) throw new Error('structured reply without negotiation');
          const req = this.lookup(hi, lo);
          this.checkChunk(req);
          this.state = State.ChunkBody;
          break;
        }
        case State.ChunkBody:
          if (this.queue.length < this.bodyNeed()) return;
          this.chunkBody();
          break;
        case State.Broken:
          return;
      }
    }
  }

  private lookup(hi: number, lo: number): ClientRequest {
    const req = hi === 0 ? this.requests.get(lo) : undefined;
    if (!req) throw new Error(`reply for unknown cookie ${hi}:${lo}`);
    this.cookie = lo;
    this.req = req;
    return req;
  }

  private finish(): void {
    this.requests.delete(this.cookie);
    this.out.push({ type: 'done', cookie: this.cookie, req: this.req! });
  }

  /** What a chunk's header says, checked before any of its body is read. */
  private checkChunk(req: ClientRequest): void {
    const length = this.chunkLength;
    switch (this.chunkType) {
      case P.NBD_REPLY_TYPE_NONE:
        if (length !== 0 || !(this.chunkFlags & P.NBD_REPLY_FLAG_DONE)) throw new Error('bad NBD_REPLY_TYPE_NONE chunk');
        return;
      case P.NBD_REPLY_TYPE_OFFSET_DATA:
        if (req.type !== P.NBD_CMD_READ || length < 9) throw new Error('unexpected NBD_REPLY_TYPE_OFFSET_DATA chunk');
        return;
      case P.NBD_REPLY_TYPE_OFFSET_HOLE:
        if (req.type !== P.NBD_CMD_READ || length !== 12) throw new Error('unexpected NBD_REPLY_TYPE_OFFSET_HOLE chunk');
        return;
      case P.NBD_REPLY_TYPE_BLOCK_STATUS:
        if (req.type !== P.NBD_CMD_BLOCK_STATUS || length < 12 || (length - 4) % 8 !== 0) throw new Error('unexpected NBD_REPLY_TYPE_BLOCK_STATUS chunk');
        // The whole chunk is buffered before it is parsed: a server must not make that unbounded.
        if (length > MAX_CHUNK_BUFFER) throw new Error(`block status chunk of ${length} bytes`);
        return;
      default:
        if (!(this.chunkType & 0x8000)) throw new Error(`unknown structured reply type ${this.chunkType}`);
        if (length < 6) throw new Error('error chunk too short');
    }
  }

  /** Bytes of the chunk's body that must be buffered before it is parsed (the rest streams). */
  private bodyNeed(): number {
    switch (this.chunkType) {
      case P.NBD_REPLY_TYPE_NONE:
        return 0;
      case P.NBD_REPLY_TYPE_OFFSET_DATA:
        return 8;
      case P.NBD_REPLY_TYPE_OFFSET_HOLE:
        return 12;
      case P.NBD_REPLY_TYPE_BLOCK_STATUS:
        return this.chunkLength;
      default:
        // An error: code and message length, then the message (at most 64 KiB), then whatever is left (skipped).
        if (this.queue.length < 6) return 6;
        {
          const msgLength = this.queue.peek(6).readUInt16BE(4);
          // A message longer than its chunk is refused as soon as its length is known.
          return msgLength > this.chunkLength - 6 ? 6 : 6 + msgLength;
        }
    }
  }

  private chunkBody(): void {
    const req = this.req!;
    const length = this.chunkLength;
    const done = (this.chunkFlags & P.NBD_REPLY_FLAG_DONE) !== 0;
    switch (this.chunkType) {
      case P.NBD_REPLY_TYPE_NONE:
        break;
      case P.NBD_REPLY_TYPE_OFFSET_DATA: {
        const offset = u64(this.queue.take(8), 0);
        const n = length - 8;
        if (offset < req.offset || offset + n > req.offset + req.length) throw new Error('data chunk outside the request');
        this.dataAt = offset - req.offset;
        this.dataLeft = n;
        this.state = State.ChunkData;
        return;
      }
      case P.NBD_REPLY_TYPE_OFFSET_HOLE: {
        const b = this.queue.take(12);
        const offset = u64(b, 0);
        const n = b.readUInt32BE(8);
        if (n === 0 || offset < req.offset || offset + n > req.offset + req.length) throw new Error('hole chunk outside the request');
        req.buf!.fill(0, offset - req.offset, offset - req.offset + n);
        break;
      }
      case P.NBD_REPLY_TYPE_BLOCK_STATUS: {
        const b = this.queue.take(length);
        if (b.readUInt32BE(0) !== this.metaContextId) break;
        const extents: number[] = [];
        for (let at = 4; at < length; at += 8) {
          const n = b.readUInt32BE(at);
          if (n === 0) throw new Error('block status extent of length 0');
          extents.push(n, b.readUInt32BE(at + 4));
        }
        req.extents = extents;
        break;
      }
      default: {
        const e = this.queue.take(6);
        const code = e.readUInt32BE(0);
        const msgLength = e.readUInt16BE(4);
        if (msgLength > length - 6) throw new Error('error message longer than its chunk');
        const message = this.queue.take(msgLength).toString('utf8');
        if (code === 0) throw new Error('error chunk with error 0');
        req.error ??= { code, message };
        // The rest of the chunk (error offsets) is skipped as it comes.
        const rest = length - 6 - msgLength;
        if (rest > 0) {
          this.dataLeft = rest;
          this.state = State.ChunkSkip;
          return;
        }
        break;
      }
    }
    if (done) this.finish();
    this.state = State.Magic;
  }
}

function u64(b: Buffer, at: number): number {
  return b.readUInt32BE(at) * 2 ** 32 + b.readUInt32BE(at + 4);
}
