/**
 * Fuzzing the NBD server core (src/nbd/server-core.ts): input generators
 * and the properties every input must keep. Shared by test/fuzz/ (bounded
 * runs with a fixed seed) and scripts/fuzz.mjs (long runs); the daemon never
 * loads this module. fast-check is a devDependency for that reason.
 */
import fc from 'fast-check';
import { NbdServerCore, type NbdAction, type NbdRequest, type NbdCoreServer } from '../nbd/server-core.js';
import type { NbdExport } from '../nbd/server.js';
import * as P from '../nbd/protocol.js';

export const EXPORT_SIZE = 1024 * 1024;

/** Three exports: writable, read-only, and one that wants 512-byte aligned requests. */
export function fakeServer(tls = false): NbdCoreServer {
  const mk = (name: string, writable: boolean, align: number): NbdExport =>
    ({
      name,
      description: `${name} export`,
      node: { size: EXPORT_SIZE, limits: { requestAlignment: align, maxTransfer: 1024 * 1024, preferredSize: 4096 } },
      writable,
      writethrough: false,
      connections: new Set(),
      closing: false,
      allocationDepth: name === 'rw',
      bitmaps: [],
    }) as unknown as NbdExport;
  const exports = [mk('rw', true, 1), mk('ro', false, 1), mk('al', true, 512)];
  return {
    findExport: (name) => exports.find((e) => e.name === name),
    listExports: () => exports,
    tls: tls ? {} : undefined,
    maxConnections: 0,
  };
}

// ---- building valid messages --------------------------------------------

export function clientFlags(flags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0);
  return b;
}

export function option(opt: number, data: Buffer = Buffer.alloc(0), length = data.length): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(P.IHAVEOPT, 0);
  h.writeUInt32BE(opt >>> 0, 8);
  h.writeUInt32BE(length >>> 0, 12);
  return Buffer.concat([h, data]);
}

export function goData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((t, i) => b.writeUInt16BE(t, 6 + n.length + 2 * i));
  return b;
}

export function metaData(name: string, queries: string[]): Buffer {
  const parts = [Buffer.alloc(4), Buffer.from(name), Buffer.alloc(4)];
  parts[0].writeUInt32BE(parts[1].length);
  parts[2].writeUInt32BE(queries.length);
  for (const q of queries) {
    const l = Buffer.alloc(4);
    const qb = Buffer.from(q);
    l.writeUInt32BE(qb.length);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

export function request(type: number, flags: number, cookie: number, offset: number, length: number, payload?: Buffer): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(P.NBD_REQUEST_MAGIC, 0);
  h.writeUInt16BE(flags & 0xffff, 4);
  h.writeUInt16BE(type & 0xffff, 6);
  h.writeUInt32BE(0, 8);
  h.writeUInt32BE(cookie >>> 0, 12);
  h.writeUInt32BE(Math.floor(offset / 2 ** 32) >>> 0, 16);
  h.writeUInt32BE(offset >>> 0, 20);
  h.writeUInt32BE(length >>> 0, 24);
  return payload ? Buffer.concat([h, payload]) : h;
}

/** An extended request (NBD_OPT_EXTENDED_HEADERS): 32 bytes, 64-bit offset and length. */
export function extRequest(type: number, flags: number, cookie: number, offset: number, length: number, payload?: Buffer): Buffer {
  const h = Buffer.alloc(32);
  h.writeUInt32BE(P.NBD_EXTENDED_REQUEST_MAGIC, 0);
  h.writeUInt16BE(flags & 0xffff, 4);
  h.writeUInt16BE(type & 0xffff, 6);
  h.writeUInt32BE(cookie >>> 0, 12);
  h.writeUInt32BE(Math.floor(offset / 2 ** 32) >>> 0, 16);
  h.writeUInt32BE(offset >>> 0, 20);
  h.writeUInt32BE(Math.floor(length / 2 ** 32) >>> 0, 24);
  h.writeUInt32BE(length >>> 0, 28);
  return payload ? Buffer.concat([h, payload]) : h;
}

/**
 * The handshake of a well-behaved client choosing `name`, structured replies (or extended
 * headers, which bring them) and base:allocation if asked.
 */
export function handshake(name: string, structured: boolean, extended = false): Buffer {
  const parts = [clientFlags()];
  if (structured || extended) {
    parts.push(option(extended ? P.NBD_OPT_EXTENDED_HEADERS : P.NBD_OPT_STRUCTURED_REPLY));
    parts.push(option(P.NBD_OPT_SET_META_CONTEXT, metaData(name, ['base:allocation'])));
  }
  parts.push(option(P.NBD_OPT_GO, goData(name, [P.NBD_INFO_BLOCK_SIZE])));
  return Buffer.concat(parts);
}

// ---- generators ---------------------------------------------------------

/** Offsets and lengths that hit the edges: 0, the end, past the end, 2^32 and 2^63 territory. */
const offsetArb = fc.oneof(
  { arbitrary: fc.integer({ min: 0, max: EXPORT_SIZE }), weight: 4 },
  fc.constantFrom(0, EXPORT_SIZE - 1, EXPORT_SIZE, EXPORT_SIZE + 1, 2 ** 32 - 1, 2 ** 32, 2 ** 53 - 1),
);
const lengthArb = fc.oneof({ arbitrary: fc.integer({ min: 0, max: 8192 }), weight: 4 }, fc.constantFrom(0, 1, 512, 65536, EXPORT_SIZE, 2 ** 25, 2 ** 25 + 1, 2 ** 32 - 1));

/** A request, mostly well-formed: any command number and flags, offsets at the edges, small payloads. */
const requestArb = fc
  .record({
    type: fc.oneof({ arbitrary: fc.constantFrom(0, 1, 1, 3, 4, 5, 6, 7), weight: 6 }, fc.integer({ min: 0, max: 0xffff })),
    flags: fc.oneof({ arbitrary: fc.constantFrom(0, 0, 0, 1, 2, 4, 8, 16), weight: 6 }, fc.integer({ min: 0, max: 0xffff })),
    cookie: fc.integer({ min: 0, max: 0xffffffff }),
    offset: offsetArb,
    length: lengthArb,
  })
  .map((r) => {
    // A WRITE carries its payload when it is small enough to build; a huge one is cut off (the stream ends).
    const payload = r.type === P.NBD_CMD_WRITE ? Buffer.alloc(Math.min(r.length, 9000), 0xa5) : undefined;
    return request(r.type, r.flags, r.cookie, r.offset, r.length, payload);
  });

/**
 * An extended request: 64-bit lengths (past 4 GiB too), PAYLOAD_LEN mostly where it belongs
 * (WRITE) and sometimes where it does not, or missing from a WRITE.
 */
const extRequestArb = fc
  .record({
    type: fc.oneof({ arbitrary: fc.constantFrom(0, 1, 1, 3, 4, 5, 6, 7), weight: 6 }, fc.integer({ min: 0, max: 0xffff })),
    flags: fc.oneof({ arbitrary: fc.constantFrom(0, 0, 1, 2, 4, 8, 16), weight: 6 }, fc.integer({ min: 0, max: 0xffff })),
    payloadFlag: fc.oneof({ arbitrary: fc.constant('usual'), weight: 6 }, fc.constantFrom('always', 'never')),
    cookie: fc.integer({ min: 0, max: 0xffffffff }),
    offset: offsetArb,
    length: fc.oneof({ arbitrary: lengthArb, weight: 4 }, fc.constantFrom(2 ** 32, 2 ** 33 + 5, 2 ** 53 - 1, 2 ** 60)),
  })
  .map((r) => {
    const withPayload = r.payloadFlag === 'always' || (r.payloadFlag === 'usual' && r.type === P.NBD_CMD_WRITE);
    const flags = withPayload ? r.flags | P.NBD_CMD_FLAG_PAYLOAD_LEN : r.flags & ~P.NBD_CMD_FLAG_PAYLOAD_LEN;
    const payload = withPayload ? Buffer.alloc(Math.min(r.length, 9000), 0xa5) : undefined;
    return extRequest(r.type, flags, r.cookie, r.offset, r.length, payload);
  });

/** Options as a client might send them, valid and not. */
const optionArb = fc.oneof(
  fc.constantFrom(
    option(P.NBD_OPT_STRUCTURED_REPLY),
    option(P.NBD_OPT_EXTENDED_HEADERS),
    option(P.NBD_OPT_LIST),
    option(P.NBD_OPT_STARTTLS),
    option(P.NBD_OPT_SET_META_CONTEXT, metaData('rw', ['base:allocation', 'qemu:allocation-depth'])),
    option(P.NBD_OPT_LIST_META_CONTEXT, metaData('ro', [])),
    option(P.NBD_OPT_INFO, goData('al')),
    option(P.NBD_OPT_INFO, goData('ro', [0, 1, 2, 3])),
  ),
  fc.record({ opt: fc.integer({ min: 0, max: 15 }), data: fc.uint8Array({ maxLength: 64 }) }).map(({ opt, data }) => option(opt, Buffer.from(data))),
  fc.record({ opt: fc.integer({ min: 0, max: 15 }), data: fc.uint8Array({ maxLength: 16 }), length: fc.integer({ min: 0, max: 2 ** 32 - 1 }) }).map(
    ({ opt, data, length }) => option(opt, Buffer.from(data), length),
  ),
);

/** Byte-level damage to a valid stream: flip, overwrite, insert, delete, truncate. */
export function mutate(base: Buffer, edits: ReadonlyArray<{ at: number; kind: number; byte: number }>): Buffer {
  let b = Buffer.from(base);
  for (const e of edits) {
    if (b.length === 0) break;
    const at = e.at % b.length;
    switch (e.kind % 5) {
      case 0:
        b[at] ^= 1 << (e.byte % 8);
        break;
      case 1:
        b[at] = e.byte;
        break;
      case 2:
        b = Buffer.concat([b.subarray(0, at), Buffer.from([e.byte]), b.subarray(at)]);
        break;
      case 3:
        b = Buffer.concat([b.subarray(0, at), b.subarray(at + 1)]);
        break;
      case 4:
        b = b.subarray(0, at);
        break;
    }
  }
  return b;
}

const editsArb = fc.oneof(
  { arbitrary: fc.constant([]), weight: 1 },
  { arbitrary: fc.array(fc.record({ at: fc.nat(), kind: fc.nat(), byte: fc.integer({ min: 0, max: 255 }) }), { minLength: 1, maxLength: 6 }), weight: 2 },
);

/** A whole client stream: valid handshake and requests, random bytes, or valid ones damaged. */
export const nbdStreamArb: fc.Arbitrary<Buffer> = fc.oneof(
  // Garbage from the first byte.
  { arbitrary: fc.uint8Array({ maxLength: 256 }).map((u) => Buffer.from(u)), weight: 1 },
  // Options, then maybe GO and garbage.
  {
    arbitrary: fc.tuple(fc.array(optionArb, { maxLength: 8 }), fc.uint8Array({ maxLength: 64 })).map(([opts, tail]) => Buffer.concat([clientFlags(), ...opts, Buffer.from(tail)])),
    weight: 2,
  },
  // A good handshake, then requests (and maybe trailing garbage), maybe damaged.
  { weight: 5, arbitrary: fc
    .tuple(fc.constantFrom('rw', 'ro', 'al', 'nope'), fc.boolean(), fc.array(requestArb, { maxLength: 12 }), fc.uint8Array({ maxLength: 40 }), editsArb)
    .map(([name, structured, reqs, tail, edits]) => {
      const hs = handshake(name, structured);
      const body = Buffer.concat([...reqs, Buffer.from(tail)]);
      // Mostly damage only the transmission part, so the handshake usually gets through.
      return edits.length % 3 !== 1 ? Buffer.concat([hs, mutate(body, edits)]) : mutate(Buffer.concat([hs, body]), edits);
    }) },
  // The same with extended headers: 32-byte requests, and sometimes a compact one among them.
  { weight: 3, arbitrary: fc
    .tuple(fc.constantFrom('rw', 'ro', 'al'), fc.array(fc.oneof({ arbitrary: extRequestArb, weight: 9 }, requestArb), { maxLength: 12 }), fc.uint8Array({ maxLength: 40 }), editsArb)
    .map(([name, reqs, tail, edits]) => Buffer.concat([handshake(name, true, true), mutate(Buffer.concat([...reqs, Buffer.from(tail)]), edits)])) },
);

/** How the stream is cut into reads, and when requests complete (drawn per step). */
export const nbdScheduleArb = fc.array(fc.integer({ min: 1, max: 97 }), { minLength: 1, maxLength: 16 });

// ---- the properties -----------------------------------------------------

export interface NbdRunResult {
  actions: NbdAction[];
  /** Bytes the core sent, in order. */
  sent: Buffer;
  requests: NbdRequest[];
  ended: boolean;
  /** Extended headers were negotiated. */
  extended: boolean;
}

/**
 * Feeds `stream` to a fresh core in chunks cut by `schedule`, completing
 * requests as it goes (in the order the schedule mixes them), and throws
 * an Error naming the broken property if any is broken:
 *   - nothing throws out of the core;
 *   - a request is only handed out in transmission, a write-type request
 *     only on a writable export and inside it, a WRITE's payload is as long
 *     as its length;
 *   - a read never asks for more than the payload limit;
 *   - once input stops and every request is complete, the core is ended or
 *     waiting for bytes it has not got (never sitting on a whole message).
 */
export function runNbdCore(stream: Buffer, schedule: number[], server: NbdCoreServer = fakeServer()): NbdRunResult {
  const core = new NbdServerCore(server);
  const actions: NbdAction[] = [...core.greeting()];
  const outstanding: NbdRequest[] = [];
  const requests: NbdRequest[] = [];
  const take = (acts: NbdAction[]): void => {
    for (const a of acts) {
      actions.push(a);
      if (a.type !== 'request') continue;
      const r = a.req;
      const exp = core.export;
      if (exp === undefined) throw new Error('request handed out before transmission');
      // FLUSH ignores its offset and length (as QEMU does); every other range must be real.
      if (r.type !== P.NBD_CMD_FLUSH && (!Number.isSafeInteger(r.offset) || r.offset < 0 || r.length < 0)) throw new Error(`bad range ${r.offset}+${r.length}`);
      const writes = r.type === P.NBD_CMD_WRITE || r.type === P.NBD_CMD_TRIM || r.type === P.NBD_CMD_WRITE_ZEROES;
      if (writes && !exp.writable) throw new Error(`${P.CMD_NAMES[r.type]} handed out on read-only export '${exp.name}'`);
      if (r.type !== P.NBD_CMD_FLUSH && r.offset + r.length > exp.node.size) throw new Error(`${P.CMD_NAMES[r.type]} at ${r.offset}+${r.length} past the end (${exp.node.size})`);
      if (r.type === P.NBD_CMD_WRITE && r.data?.length !== r.length) throw new Error(`WRITE of ${r.length} with a ${r.data?.length}-byte payload`);
      if (r.type === P.NBD_CMD_READ && r.length > P.NBD_MAX_PAYLOAD) throw new Error(`READ of ${r.length} bytes`);
      if (![0, 1, 3, 4, 5, 6, 7].includes(r.type)) throw new Error(`request type ${r.type} handed out`);
      outstanding.push(r);
      requests.push(r);
    }
  };
  const completeOne = (pick: number): void => {
    const r = outstanding.splice(pick % outstanding.length, 1)[0];
    if (r.type === P.NBD_CMD_READ) {
      const { reply, data } = core.readBuffer(r);
      data.fill(0x5a);
      take(core.complete(r, pick % 7 === 3 ? { kind: 'error', code: P.NBD_EIO, message: 'injected' } : { kind: 'read', reply }));
    } else if (r.type === P.NBD_CMD_BLOCK_STATUS) {
      take(core.complete(r, { kind: 'block-status', contexts: [{ id: 0, lengths: [r.length], values: [0] }] }));
    } else {
      take(core.complete(r, { kind: 'ok' }));
    }
  };
  let pos = 0;
  let step = 0;
  while (pos < stream.length) {
    const n = schedule[step % schedule.length];
    take(core.push(stream.subarray(pos, pos + n)));
    pos += n;
    // Complete some requests between reads, as a node would.
    const k = schedule[(step + 1) % schedule.length] % 3;
    for (let i = 0; i < k && outstanding.length > 0; i++) completeOne(schedule[(step + i) % schedule.length]);
    step++;
  }
  while (outstanding.length > 0) completeOne(step++);
  if (core.needs > 0 && core.buffered >= core.needs) throw new Error(`hang: ${core.buffered} bytes buffered, ${core.needs} would do`);
  // Every request header parsed in transmission (but DISC) got exactly one final reply: nothing
  // received is left unanswered, nothing is answered twice. (In this harness each reply is one send.)
  const start = actions.findIndex((a) => a.type === 'transmission');
  if (start >= 0) {
    const headers = core.answerable;
    let finals = 0;
    for (const a of actions.slice(start)) {
      if (a.type !== 'send') continue;
      const magic = a.data.readUInt32BE(0);
      const chunk = magic === P.NBD_STRUCTURED_REPLY_MAGIC || magic === P.NBD_EXTENDED_REPLY_MAGIC;
      if (magic === P.NBD_SIMPLE_REPLY_MAGIC || (chunk && a.data.readUInt16BE(4) & P.NBD_REPLY_FLAG_DONE)) finals++;
      if (core.extended && magic !== P.NBD_EXTENDED_REPLY_MAGIC) throw new Error(`a reply with magic 0x${magic.toString(16)} after extended headers were negotiated`);
    }
    if (finals !== headers) throw new Error(`${headers} requests received, ${finals} answered`);
  }
  const sent = Buffer.concat(actions.flatMap((a) => (a.type === 'send' ? [a.data] : [])));
  return { actions, sent, requests, ended: core.ended, extended: core.extended };
}
