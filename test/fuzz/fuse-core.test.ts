/**
 * The FUSE core (src/fuse/core.ts) fed kernel request buffers directly, no
 * /dev/fuse: exact replies, the findings kept as regression tests, then
 * fast-check properties (src/fuzz/fuse.ts) with a fixed seed.
 */
import t from 'tap';
import fc from 'fast-check';
import { FuseCore, EACCES, EINVAL, ENOSPC, EPERM } from '../../src/fuse/core.js';
import { Fattr, Opcode } from '../../src/fuse/protocol.js';
import { FILE_SIZE, fuseRequest, fuseStreamArb, runFuseCore } from '../../src/fuzz/fuse.js';

const core = (writable: boolean, growable = false) => {
  let size = FILE_SIZE;
  return { c: new FuseCore({ id: 'disk', writable, growable, directory: false, uid: 0, gid: 0, size: () => size }), resize: (n: number) => (size = n) };
};
const big = (req: Buffer) => {
  const b = Buffer.alloc(1024 * 1024 + 4096);
  req.copy(b);
  return b;
};
const errnoOf = (reply: Buffer) => -reply.readInt32LE(4);
const u64 = (v: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
};
const u32 = (v: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v);
  return b;
};
const write = (off: number, data: Buffer, declared = data.length) => fuseRequest(Opcode.WRITE, 42, 1, Buffer.concat([u64(0), u64(off), u32(declared), Buffer.alloc(20), data]));

t.test('reads, writes and their replies', async (t) => {
  const { c } = core(true);
  const rq = fuseRequest(Opcode.READ, 7, 1, Buffer.concat([u64(0), u64(FILE_SIZE - 100), u32(4096), Buffer.alloc(20)]));
  const a = c.handle(big(rq), rq.length);
  t.match(a, { type: 'op', op: { kind: 'read', offset: FILE_SIZE - 100, length: 100 } }, 'a read past the end is short');
  if (a.type === 'op') {
    const reply = c.done(a.op);
    t.equal(reply.length, 16 + 100);
    t.equal(reply.readUInt32LE(0), 116, 'length field');
    t.equal(reply.readUInt32LE(8), 7, 'unique');
  }
  const w = write(FILE_SIZE - 2, Buffer.from('abcd'));
  const wa = c.handle(big(w), w.length);
  t.match(wa, { type: 'op', op: { kind: 'write', offset: FILE_SIZE - 2 } });
  if (wa.type === 'op' && wa.op.kind === 'write') {
    t.equal(wa.op.data.toString(), 'ab', 'a write across the end of a non-growable file is cut at the end');
    t.equal(c.done(wa.op).readUInt32LE(16), 2, 'and says so');
  }
  const past = write(FILE_SIZE, Buffer.from('x'));
  const pa = c.handle(big(past), past.length);
  t.equal(pa.type === 'reply' && errnoOf(pa.data), ENOSPC, 'a write at the end: ENOSPC');
  const short = write(0, Buffer.from('xy'), 3);
  const sa = c.handle(big(short), short.length);
  t.equal(sa.type === 'reply' && errnoOf(sa.data), EINVAL, 'a WRITE with less data than it declares: EINVAL');

  const ro = core(false).c;
  const ra = ro.handle(big(write(0, Buffer.from('x'))), write(0, Buffer.from('x')).length);
  t.equal(ra.type === 'reply' && errnoOf(ra.data), EACCES, 'read-only: EACCES, no op');
});

t.test('finding: a short request was parsed from the previous request\'s bytes', async (t) => {
  // The session reuses its 1 MiB request buffers. A WRITE of 40+40 bytes leaves its body in the
  // buffer; a later 40-byte request (header only) claiming to be a WRITE was parsed with that old
  // body: offset and size from the stale bytes. Now a request shorter than its opcode's body is EINVAL.
  const { c } = core(true);
  const buf = big(write(4096, Buffer.alloc(512, 1)));
  c.handle(buf, 40 + 40 + 512);
  const headerOnly = fuseRequest(Opcode.WRITE, 43, 1);
  headerOnly.copy(buf);
  const a = c.handle(buf, headerOnly.length);
  t.equal(a.type, 'reply', 'no op from stale bytes');
  t.equal(a.type === 'reply' && errnoOf(a.data), EINVAL);
  t.equal(c.handle(Buffer.from('0123456789'), 10).type, 'none', 'less than a header: nothing to answer');
});

t.test('finding: SETATTR with a size and a refused chown truncated the disk, then failed', async (t) => {
  // The size was applied (node.truncate) before the owner check threw EPERM: a failed request
  // had changed the disk. Now every check comes first; the op carries no truncate.
  const { c } = core(true, true);
  const body = Buffer.alloc(88);
  body.writeUInt32LE(Fattr.SIZE | Fattr.UID, 0);
  body.writeBigUInt64LE(4096n, 16);
  body.writeUInt32LE(1234, 76);
  const rq = fuseRequest(Opcode.SETATTR, 44, 1, body);
  const a = c.handle(big(rq), rq.length);
  t.equal(a.type, 'reply', 'refused before any op');
  t.equal(a.type === 'reply' && errnoOf(a.data), EPERM);
  body.writeUInt32LE(Fattr.SIZE, 0);
  const ok = fuseRequest(Opcode.SETATTR, 45, 1, body);
  t.match(c.handle(big(ok), ok.length), { type: 'op', op: { kind: 'setattr', truncate: 4096 } }, 'the size alone is applied');
});

t.test('property: arbitrary request sequences break no rule', async (t) => {
  let ops = 0;
  let replies = 0;
  fc.assert(
    fc.property(fuseStreamArb, (input) => {
      const r = runFuseCore(input);
      ops += r.ops;
      replies += r.replies;
    }),
    { seed: 1302, numRuns: 2000 },
  );
  t.ok(ops > 1000, `ops handed out: ${ops}`);
  t.ok(replies > 5000, `replies: ${replies}`);
});
