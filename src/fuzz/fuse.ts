/**
 * Fuzzing the FUSE core (src/fuse/core.ts): request generators and the
 * properties every request must keep, shared by test/fuzz/fuse-core.test.ts
 * and scripts/fuzz.mjs. Never loaded by the daemon.
 */
import fc from 'fast-check';
import { FuseCore, type FuseOp } from '../fuse/core.js';
import { IN_HEADER_SIZE, OUT_HEADER_SIZE, Opcode } from '../fuse/protocol.js';

export const FILE_SIZE = 1024 * 1024;

export interface FuseMode {
  writable: boolean;
  growable: boolean;
  directory: boolean;
}

/** One kernel request: header (len, opcode, unique, nodeid, uid, gid, pid) and a body. */
export function fuseRequest(opcode: number, unique: number, nodeid: number, body: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(IN_HEADER_SIZE + body.length);
  b.writeUInt32LE(b.length, 0);
  b.writeUInt32LE(opcode >>> 0, 4);
  b.writeUInt32LE(unique >>> 0, 8);
  b.writeUInt32LE(nodeid >>> 0, 16);
  body.copy(b, IN_HEADER_SIZE);
  return b;
}

const u64 = (v: number): Buffer => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
};
const u32 = (v: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
};

const offArb = fc.oneof({ weight: 3, arbitrary: fc.integer({ min: 0, max: FILE_SIZE }) }, fc.constantFrom(FILE_SIZE - 1, FILE_SIZE + 1, 2 ** 32, 2 ** 52, 2 ** 63));
const lenArb = fc.oneof({ weight: 3, arbitrary: fc.integer({ min: 0, max: 8192 }) }, fc.constantFrom(0, FILE_SIZE, 2 ** 32 - 1));
const opcodes = Object.values(Opcode);

/** Well-formed bodies for the opcodes that take one, with edge values. */
const requestArb: fc.Arbitrary<Buffer> = fc.oneof(
  fc.record({ off: offArb, len: lenArb, ino: fc.constantFrom(1, 2, 3) }).map(({ off, len, ino }) =>
    fuseRequest(Opcode.READ, 1, ino, Buffer.concat([u64(0), u64(off), u32(len), Buffer.alloc(20)])),
  ),
  fc.record({ off: offArb, len: fc.integer({ min: 0, max: 4096 }), short: fc.integer({ min: 0, max: 3 }) }).map(({ off, len, short }) =>
    // A WRITE whose declared size may exceed the data that follows (short > 0).
    fuseRequest(Opcode.WRITE, 2, 1, Buffer.concat([u64(0), u64(off), u32(len + short), Buffer.alloc(20), Buffer.alloc(len, 0xee)])),
  ),
  fc.record({ valid: fc.integer({ min: 0, max: 0x7ff }), size: offArb, mode: fc.integer({ min: 0, max: 0o7777 }), uid: fc.constantFrom(0, 1000), gid: fc.constantFrom(0, 1000), ino: fc.constantFrom(1, 2, 9) }).map(
    ({ valid, size, mode, uid, gid, ino }) => {
      const body = Buffer.alloc(88);
      body.writeUInt32LE(valid, 0);
      body.writeBigUInt64LE(BigInt(size), 16);
      body.writeUInt32LE(mode, 68);
      body.writeUInt32LE(uid, 76);
      body.writeUInt32LE(gid, 80);
      return fuseRequest(Opcode.SETATTR, 3, ino, body);
    },
  ),
  fc.record({ off: offArb, len: offArb, mode: fc.constantFrom(0, 1, 2, 3, 0x10, 0x11, 0x40) }).map(({ off, len, mode }) =>
    fuseRequest(Opcode.FALLOCATE, 4, 1, Buffer.concat([u64(0), u64(off), u64(len), u32(mode), u32(0)])),
  ),
  fc.record({ off: offArb, whence: fc.constantFrom(0, 3, 4, 9) }).map(({ off, whence }) => fuseRequest(Opcode.LSEEK, 5, 1, Buffer.concat([u64(0), u64(off), u32(whence), u32(0)]))),
  fc.record({ flags: fc.integer({ min: 0, max: 3 }), ino: fc.constantFrom(1, 2, 5) }).map(({ flags, ino }) => fuseRequest(Opcode.OPEN, 6, ino, Buffer.concat([u32(flags), u32(0)]))),
  fc.record({ name: fc.constantFrom('disk', 'other', ''), ino: fc.constantFrom(1, 2) }).map(({ name, ino }) => fuseRequest(Opcode.LOOKUP, 7, ino, Buffer.from(name + '\0'))),
  fc.record({ off: fc.integer({ min: 0, max: 5 }), size: fc.integer({ min: 0, max: 4096 }) }).map(({ off, size }) =>
    fuseRequest(Opcode.READDIR, 8, 1, Buffer.concat([u64(0), u64(off), u32(size), Buffer.alloc(20)])),
  ),
  fc.record({ major: fc.constantFrom(6, 7, 8), minor: fc.integer({ min: 0, max: 40 }), flags: fc.integer({ min: 0, max: 2 ** 32 - 1 }) }).map(({ major, minor, flags }) =>
    fuseRequest(Opcode.INIT, 9, 0, Buffer.concat([u32(major), u32(minor), u32(65536), u32(flags)])),
  ),
  // Any opcode with any short or random body.
  fc.record({ opcode: fc.oneof(fc.constantFrom(...opcodes), fc.integer({ min: 0, max: 100 })), ino: fc.constantFrom(0, 1, 2, 3), body: fc.uint8Array({ maxLength: 100 }) }).map(({ opcode, ino, body }) =>
    fuseRequest(opcode, 10, ino, Buffer.from(body)),
  ),
  // Not even a whole header.
  fc.uint8Array({ maxLength: IN_HEADER_SIZE + 8 }).map((u) => Buffer.from(u)),
);

/** A sequence of requests (each one read(2) from /dev/fuse), with bytes damaged at random. */
export const fuseStreamArb: fc.Arbitrary<{ mode: FuseMode; requests: Buffer[] }> = fc.record({
  mode: fc.record({ writable: fc.boolean(), growable: fc.boolean(), directory: fc.boolean() }),
  requests: fc.array(
    fc.tuple(requestArb, fc.array(fc.record({ at: fc.nat(), byte: fc.integer({ min: 0, max: 255 }) }), { maxLength: 2 })).map(([r, edits]) => {
      const b = Buffer.from(r);
      // Damage the body, not the opcode and unique, so each request still names what it is.
      for (const e of edits) if (b.length > IN_HEADER_SIZE) b[IN_HEADER_SIZE + (e.at % (b.length - IN_HEADER_SIZE))] = e.byte;
      return b;
    }),
    { maxLength: 12 },
  ),
});

/**
 * Runs a request sequence through a core over a modelled node (its size;
 * growth happens as the ops say) and throws if a property breaks:
 *   - nothing throws out of the core;
 *   - every request of a whole header, but FORGET/BATCH_FORGET/INTERRUPT,
 *     gets exactly one reply, with its unique and a length field equal to
 *     the reply's size;
 *   - a read-only export never gets a write, truncate or fallocate op;
 *   - a non-growable export is never written, zeroed or resized past its end;
 *   - a READ never asks for more than fits the reply buffer.
 */
export function runFuseCore(input: { mode: FuseMode; requests: Buffer[] }): { ops: number; replies: number } {
  const { mode } = input;
  let size = FILE_SIZE;
  const core = new FuseCore({ id: 'disk', ...mode, uid: 0, gid: 0, size: () => size });
  let ops = 0;
  let replies = 0;
  const checkReply = (req: Buffer, reply: Buffer): void => {
    replies++;
    if (reply.length < OUT_HEADER_SIZE) throw new Error(`reply of ${reply.length} bytes`);
    if (reply.readUInt32LE(0) !== reply.length) throw new Error(`reply length field ${reply.readUInt32LE(0)} for ${reply.length} bytes`);
    if (reply.readUInt32LE(8) !== req.readUInt32LE(8)) throw new Error('reply to another request');
  };
  const checkOp = (op: FuseOp): void => {
    ops++;
    const writes = op.kind === 'write' || op.kind === 'fallocate' || (op.kind === 'setattr' && op.truncate !== undefined);
    if (writes && !mode.writable) throw new Error(`${op.kind} on a read-only export`);
    if (!mode.growable) {
      if (op.kind === 'write' && (op.growTo !== undefined || op.offset + op.data.length > size)) throw new Error(`write at ${op.offset}+${op.data.length} past ${size}`);
      if (op.kind === 'fallocate' && (op.growTo !== undefined || (op.zero && op.zero.offset + op.zero.length > size))) throw new Error('fallocate past the end');
      if (op.kind === 'setattr' && op.truncate !== undefined) throw new Error('resize of a non-growable export');
    }
    if (op.kind === 'read' && OUT_HEADER_SIZE + op.length > op.buf.length) throw new Error(`READ of ${op.length} into ${op.buf.length} bytes`);
  };
  for (const req of input.requests) {
    // The session reads into a 1 MiB buffer; the core gets the buffer and the count read.
    const buf = Buffer.alloc(Math.max(req.length, 4096));
    req.copy(buf);
    const a = core.handle(buf, req.length);
    const opcode = req.length >= 8 ? req.readUInt32LE(4) : -1;
    const silent = req.length < IN_HEADER_SIZE || opcode === Opcode.FORGET || opcode === Opcode.BATCH_FORGET || opcode === Opcode.INTERRUPT;
    if (a.type === 'none') {
      if (!silent) throw new Error(`no reply to opcode ${opcode}`);
      continue;
    }
    if (silent) throw new Error(`a reply to a request that takes none (opcode ${opcode}, ${req.length} bytes)`);
    if (a.type === 'reply') {
      checkReply(req, a.data);
      continue;
    }
    checkOp(a.op);
    const op = a.op;
    if (op.kind === 'write' && op.growTo !== undefined) size = Math.max(size, op.growTo);
    if (op.kind === 'fallocate' && op.growTo !== undefined) size = Math.max(size, op.growTo);
    if (op.kind === 'setattr' && op.truncate !== undefined) size = op.truncate;
    checkReply(req, op.kind === 'lseek' ? core.done(op, op.offset) : core.done(op));
  }
  return { ops, replies };
}
