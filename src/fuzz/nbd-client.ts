/**
 * Fuzzing the NBD client's reply parser (src/nbd/client-core.ts): reply
 * stream generators and properties, shared by
 * test/fuzz/nbd-client-core.test.ts and scripts/fuzz.mjs. Never loaded by
 * the daemon.
 */
import fc from 'fast-check';
import { MAX_CHUNK_BUFFER, NbdClientCore, type ClientRequest } from '../nbd/client-core.js';
import * as P from '../nbd/protocol.js';

/** The requests in flight when the replies come: cookie -> command, range. */
export const CLIENT_REQUESTS: Array<{ cookie: number; type: number; offset: number; length: number }> = [
  { cookie: 1, type: P.NBD_CMD_READ, offset: 4096, length: 512 },
  { cookie: 2, type: P.NBD_CMD_READ, offset: 0, length: 8192 },
  { cookie: 3, type: P.NBD_CMD_WRITE, offset: 0, length: 512 },
  { cookie: 4, type: P.NBD_CMD_BLOCK_STATUS, offset: 0, length: 65536 },
  { cookie: 5, type: P.NBD_CMD_FLUSH, offset: 0, length: 0 },
];
const GUARD = 16;

export function simpleReply(cookie: number, error: number, data?: Buffer): Buffer {
  const h = Buffer.alloc(16);
  h.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  h.writeUInt32BE(error >>> 0, 4);
  h.writeUInt32BE(cookie >>> 0, 12);
  return data ? Buffer.concat([h, data]) : h;
}

export function chunk(cookie: number, flags: number, type: number, payload: Buffer, length = payload.length): Buffer {
  const h = Buffer.alloc(20);
  h.writeUInt32BE(P.NBD_STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(flags & 0xffff, 4);
  h.writeUInt16BE(type & 0xffff, 6);
  h.writeUInt32BE(cookie >>> 0, 12);
  h.writeUInt32BE(length >>> 0, 16);
  return Buffer.concat([h, payload]);
}

const u64 = (v: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};
const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0);
  return b;
};

const cookieArb = fc.oneof({ weight: 5, arbitrary: fc.constantFrom(1, 2, 3, 4, 5) }, fc.integer({ min: 0, max: 0xffffffff }));
const offArb = fc.oneof({ weight: 3, arbitrary: fc.integer({ min: 0, max: 12288 }) }, fc.constantFrom(2 ** 32, 2 ** 53 - 1));
const flagsArb = fc.constantFrom(0, 1, 1, 2, 0xffff);

const replyArb: fc.Arbitrary<Buffer> = fc.oneof(
  fc.record({ cookie: cookieArb, error: fc.constantFrom(0, 0, 1, 5, 22, 0xffffffff), n: fc.integer({ min: 0, max: 9000 }) }).map(({ cookie, error, n }) => simpleReply(cookie, error, Buffer.alloc(n, 0xd0))),
  fc.record({ cookie: cookieArb, flags: flagsArb, off: offArb, n: fc.integer({ min: 0, max: 9000 }) }).map(({ cookie, flags, off, n }) =>
    chunk(cookie, flags, P.NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(off), Buffer.alloc(n, 0xda)])),
  ),
  fc.record({ cookie: cookieArb, flags: flagsArb, off: offArb, n: fc.integer({ min: 0, max: 2 ** 32 - 1 }) }).map(({ cookie, flags, off, n }) =>
    chunk(cookie, flags, P.NBD_REPLY_TYPE_OFFSET_HOLE, Buffer.concat([u64(off), u32(n)])),
  ),
  fc.record({ cookie: cookieArb, flags: flagsArb, id: fc.constantFrom(0, 1), ext: fc.array(fc.tuple(fc.integer({ min: 0, max: 70000 }), fc.integer({ min: 0, max: 3 })), { maxLength: 6 }) }).map(({ cookie, flags, id, ext }) =>
    chunk(cookie, flags, P.NBD_REPLY_TYPE_BLOCK_STATUS, Buffer.concat([u32(id), ...ext.flatMap(([l, f]) => [u32(l), u32(f)])])),
  ),
  fc.record({ cookie: cookieArb, flags: flagsArb, type: fc.constantFrom(P.NBD_REPLY_TYPE_ERROR, P.NBD_REPLY_TYPE_ERROR_OFFSET, 0x8123), code: fc.constantFrom(0, 5, 22), msg: fc.string({ maxLength: 20 }), extra: fc.integer({ min: 0, max: 12 }), lie: fc.integer({ min: 0, max: 3 }) }).map(
    ({ cookie, flags, type, code, msg, extra, lie }) => {
      const m = Buffer.from(msg);
      const b = Buffer.alloc(6 + m.length + extra);
      b.writeUInt32BE(code, 0);
      b.writeUInt16BE(m.length + (lie === 3 ? 5 : 0), 4);
      m.copy(b, 6);
      return chunk(cookie, flags, type, b);
    },
  ),
  fc.record({ cookie: cookieArb, flags: flagsArb, type: fc.integer({ min: 0, max: 0xffff }), len: fc.integer({ min: 0, max: 2 ** 32 - 1 }), body: fc.uint8Array({ maxLength: 32 }) }).map(({ cookie, flags, type, len, body }) =>
    chunk(cookie, flags, type, Buffer.from(body), len),
  ),
  fc.constant(chunk(1, 1, P.NBD_REPLY_TYPE_NONE, Buffer.alloc(0))),
);

/** Reply streams: well-formed replies in any order, damaged ones, garbage. */
export const clientStreamArb: fc.Arbitrary<{ structured: boolean; stream: Buffer }> = fc.record({
  structured: fc.boolean(),
  stream: fc.oneof(
    { weight: 4, arbitrary: fc.array(replyArb, { maxLength: 8 }).map((r) => Buffer.concat(r)) },
    { weight: 1, arbitrary: fc.uint8Array({ maxLength: 200 }).map((u) => Buffer.from(u)) },
  ),
});

export const clientScheduleArb = fc.array(fc.integer({ min: 1, max: 700 }), { minLength: 1, maxLength: 6 });

/**
 * Feeds a reply stream to a core with CLIENT_REQUESTS in flight and throws if
 * a property breaks: nothing throws out; a READ's data lands only in its
 * own buffer (guard bytes around it stay); a request completes at most
 * once; the parser never waits for bytes it has, and never asks to buffer
 * more than MAX_CHUNK_BUFFER.
 */
export function runClientCore(input: { structured: boolean; stream: Buffer }, schedule: number[]): { done: number; protocolError: boolean } {
  const core = new NbdClientCore(input.structured, 0);
  const backing: Buffer[] = [];
  for (const r of CLIENT_REQUESTS) {
    const req: ClientRequest = { type: r.type, offset: r.offset, length: r.length };
    if (r.type === P.NBD_CMD_READ) {
      const b = Buffer.alloc(r.length + 2 * GUARD, 0x77);
      backing.push(b);
      req.buf = b.subarray(GUARD, GUARD + r.length);
    }
    core.add(r.cookie, req);
  }
  const completed = new Set<number>();
  let protocolError = false;
  let pos = 0;
  for (let step = 0; pos < input.stream.length; step++) {
    const n = schedule[step % schedule.length];
    for (const e of core.push(input.stream.subarray(pos, pos + n))) {
      if (e.type === 'protocol-error') {
        if (protocolError) throw new Error('two protocol errors');
        protocolError = true;
        continue;
      }
      if (protocolError) throw new Error('a completion after a protocol error');
      if (completed.has(e.cookie)) throw new Error(`request ${e.cookie} completed twice`);
      completed.add(e.cookie);
    }
    pos += n;
    if (core.needs > MAX_CHUNK_BUFFER) throw new Error(`the parser wants ${core.needs} bytes buffered`);
    if (core.needs > 0 && core.buffered >= core.needs) throw new Error(`hang: ${core.buffered} bytes buffered, ${core.needs} would do`);
  }
  for (const b of backing) {
    for (let i = 0; i < GUARD; i++) {
      if (b[i] !== 0x77 || b[b.length - 1 - i] !== 0x77) throw new Error('data written outside a read buffer');
    }
  }
  return { done: completed.size, protocolError };
}
