/**
 * The NBD client's reply parser (src/nbd/client-core.ts) fed bytes
 * directly: exact results for valid replies, the finding kept as a
 * regression test, then fast-check properties (src/fuzz/nbd-client.ts).
 */
import t from 'tap';
import fc from 'fast-check';
import { NbdClientCore, type ClientRequest } from '../../src/nbd/client-core.js';
import * as P from '../../src/nbd/protocol.js';
import { chunk, clientScheduleArb, clientStreamArb, runClientCore, simpleReply } from '../../src/fuzz/nbd-client.js';

const u64 = (v: number) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt(v));
  return b;
};

t.test('replies in any order, chunks, holes, errors', async (t) => {
  const core = new NbdClientCore(true, 0);
  const read: ClientRequest = { type: P.NBD_CMD_READ, offset: 1000, length: 8, buf: Buffer.alloc(8, 0xff) };
  const status: ClientRequest = { type: P.NBD_CMD_BLOCK_STATUS, offset: 0, length: 4096 };
  const write: ClientRequest = { type: P.NBD_CMD_WRITE, offset: 0, length: 4 };
  core.add(7, read);
  core.add(8, status);
  core.add(9, write);
  const bs = Buffer.alloc(4 + 16);
  bs.writeUInt32BE(0, 0);
  bs.writeUInt32BE(1024, 4);
  bs.writeUInt32BE(3, 8);
  bs.writeUInt32BE(3072, 12);
  bs.writeUInt32BE(0, 16);
  const stream = Buffer.concat([
    simpleReply(9, 0),
    chunk(7, 0, P.NBD_REPLY_TYPE_OFFSET_DATA, Buffer.concat([u64(1000), Buffer.from('abcd')])),
    chunk(8, 1, P.NBD_REPLY_TYPE_BLOCK_STATUS, bs),
    chunk(7, 1, P.NBD_REPLY_TYPE_OFFSET_HOLE, Buffer.concat([u64(1004), Buffer.from([0, 0, 0, 4])])),
  ]);
  // One byte at a time: the parser must not care how the bytes are cut.
  const events = [];
  for (let i = 0; i < stream.length; i++) events.push(...core.push(stream.subarray(i, i + 1)));
  t.same(
    events.map((e) => (e.type === 'done' ? e.cookie : e.type)),
    [9, 8, 7],
  );
  t.equal(read.buf!.toString('latin1'), 'abcd\0\0\0\0', 'data then a hole');
  t.same(status.extents, [1024, 3, 3072, 0]);
  t.equal(core.pending, 0);

  const err: ClientRequest = { type: P.NBD_CMD_TRIM, offset: 0, length: 1 };
  core.add(10, err);
  const e = Buffer.alloc(6 + 3 + 8);
  e.writeUInt32BE(P.NBD_EPERM, 0);
  e.writeUInt16BE(3, 4);
  e.write('ro!', 6);
  t.match(core.push(chunk(10, 1, P.NBD_REPLY_TYPE_ERROR_OFFSET, e)), [{ type: 'done', cookie: 10 }]);
  t.same(err.error, { code: P.NBD_EPERM, message: 'ro!' }, 'the error and its message; the offset is skipped');
  t.match(core.push(simpleReply(99, 0)), [{ type: 'protocol-error', message: 'reply for unknown cookie 0:99' }]);
  t.same(core.push(simpleReply(10, 0)), [], 'nothing is parsed after a protocol error');
});

t.test('finding: a block status chunk could make the client buffer up to 4 GiB', async (t) => {
  // The whole chunk was read with one take(length), length being the server's 32-bit field: a
  // server declaring 0xfffffff4 bytes made the client buffer everything it sent, without bound.
  // Now a chunk larger than 2^17 extents is a protocol error as soon as its header arrives.
  const core = new NbdClientCore(true, 0);
  core.add(1, { type: P.NBD_CMD_BLOCK_STATUS, offset: 0, length: 4096 });
  const header = chunk(1, 1, P.NBD_REPLY_TYPE_BLOCK_STATUS, Buffer.alloc(0), 0xfffffff4);
  t.match(core.push(header), [{ type: 'protocol-error', message: 'block status chunk of 4294967284 bytes' }]);
});

t.test('property: arbitrary reply streams break no rule', async (t) => {
  let done = 0;
  let errors = 0;
  fc.assert(
    fc.property(clientStreamArb, clientScheduleArb, (input, schedule) => {
      const r = runClientCore(input, schedule);
      done += r.done;
      if (r.protocolError) errors++;
    }),
    { seed: 1304, numRuns: 3000 },
  );
  t.ok(done > 300, `requests completed: ${done}`);
  t.ok(errors > 500, `streams ended by a protocol error: ${errors}`);
});
