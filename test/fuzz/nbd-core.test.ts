/**
 * The NBD server core (src/nbd/server-core.ts) fed bytes directly, no
 * socket: exact replies for valid sessions, then fast-check properties for
 * arbitrary and damaged streams (fixed seed, bounded runs; the long runs are
 * scripts/fuzz.mjs). The properties themselves live in src/fuzz/nbd.ts.
 */
import t from 'tap';
import fc from 'fast-check';
import { NbdServerCore, type NbdAction } from '../../src/nbd/server-core.js';
import * as P from '../../src/nbd/protocol.js';
import { EXPORT_SIZE, clientFlags, fakeServer, goData, handshake, metaData, nbdScheduleArb, nbdStreamArb, option, request, runNbdCore } from '../../src/fuzz/nbd.js';

const sent = (acts: NbdAction[]): Buffer => Buffer.concat(acts.flatMap((a) => (a.type === 'send' ? [a.data] : [])));
const optReply = (opt: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer => {
  const h = Buffer.alloc(20);
  h.writeBigUInt64BE(P.NBD_OPT_REPLY_MAGIC, 0);
  h.writeUInt32BE(opt, 8);
  h.writeUInt32BE(type, 12);
  h.writeUInt32BE(data.length, 16);
  return Buffer.concat([h, data]);
};
const simpleReply = (cookie: number, error: number): Buffer => {
  const b = Buffer.alloc(16);
  b.writeUInt32BE(P.NBD_SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeUInt32BE(cookie, 12);
  return b;
};

t.test('a valid session, byte for byte', async (t) => {
  const core = new NbdServerCore(fakeServer());
  t.same(sent(core.greeting()), Buffer.from('4e42444d4147494349484156454f50540003', 'hex'), 'greeting: NBDMAGIC IHAVEOPT, fixed newstyle + no zeroes');
  t.same(core.push(clientFlags()), [], 'client flags: no reply');
  t.same(sent(core.push(option(P.NBD_OPT_STRUCTURED_REPLY))), optReply(P.NBD_OPT_STRUCTURED_REPLY, P.NBD_REP_ACK), 'structured replies acknowledged');
  let acts = core.push(option(P.NBD_OPT_GO, goData('ro')));
  const info = (d: string) => optReply(P.NBD_OPT_GO, P.NBD_REP_INFO, Buffer.from(d, 'hex'));
  t.same(
    sent(acts),
    Buffer.concat([
      info('0003' + '00000001' + '00001000' + '00100000'),
      // size 1 MiB; flags HAS_FLAGS|READ_ONLY|SEND_FLUSH|SEND_FUA|SEND_DF|SEND_CACHE|CAN_MULTI_CONN
      info('0000' + '0000000000100000' + (0x1 | 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x400).toString(16).padStart(4, '0')),
      optReply(P.NBD_OPT_GO, P.NBD_REP_ACK),
    ]),
    'GO on the read-only export: block sizes, size and flags, ACK',
  );
  t.equal(acts.at(-1)?.type, 'transmission', 'transmission starts');

  acts = core.push(request(P.NBD_CMD_READ, 0, 7, 4096, 512));
  t.equal(acts.length, 1);
  const read = acts[0].type === 'request' ? acts[0].req : undefined;
  t.match(read, { type: P.NBD_CMD_READ, offset: 4096, length: 512, cookieLo: 7 }, 'a READ becomes a request');
  const { reply, data } = core.readBuffer(read!);
  data.fill(0x33);
  const r = sent(core.complete(read!, { kind: 'read', reply }));
  t.equal(r.readUInt32BE(0), P.NBD_STRUCTURED_REPLY_MAGIC, 'structured OFFSET_DATA chunk');
  t.equal(r.readUInt16BE(4), P.NBD_REPLY_FLAG_DONE);
  t.equal(r.readUInt16BE(6), P.NBD_REPLY_TYPE_OFFSET_DATA);
  t.equal(r.readUInt32BE(16), 8 + 512);
  t.equal(r.readBigUInt64BE(20), 4096n);
  t.equal(r.length, 28 + 512);

  acts = core.push(request(P.NBD_CMD_WRITE, 0, 8, 0, 4, Buffer.from('abcd')));
  t.equal(acts.filter((a) => a.type === 'request').length, 0, 'no write is handed out on a read-only export');
  const err = sent(acts);
  t.equal(err.readUInt16BE(6), P.NBD_REPLY_TYPE_ERROR, 'an error chunk');
  t.equal(err.readUInt32BE(20), P.NBD_EPERM, 'EPERM');
  t.equal(err.subarray(26).toString(), 'export is read-only');

  acts = core.push(request(P.NBD_CMD_DISC, 0, 9, 0, 0));
  t.same(
    acts.map((a) => a.type),
    ['pause', 'end'],
    'DISC with nothing in flight: stop reading, end',
  );
});

t.test('simple replies, writes, out-of-range and disconnect with requests in flight', async (t) => {
  const core = new NbdServerCore(fakeServer());
  core.greeting();
  let acts = core.push(handshake('rw', false));
  t.equal(acts.at(-1)?.type, 'transmission');
  // A write whose payload arrives in three pieces.
  const w = request(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FUA, 1, EXPORT_SIZE - 8, 8, Buffer.from('12345678'));
  t.same(core.push(w.subarray(0, 30)), []);
  t.same(core.push(w.subarray(30, 33)), []);
  acts = core.push(w.subarray(33));
  t.equal(acts.length, 1);
  const req = acts[0].type === 'request' ? acts[0].req : undefined;
  t.match(req, { type: P.NBD_CMD_WRITE, offset: EXPORT_SIZE - 8, length: 8, flags: P.NBD_CMD_FLAG_FUA });
  t.equal(req?.data?.toString(), '12345678', 'the payload, reassembled');
  // One byte past the end: ENOSPC, and the payload is skipped.
  acts = core.push(request(P.NBD_CMD_WRITE, 0, 2, EXPORT_SIZE - 8, 9, Buffer.alloc(9)));
  t.same(sent(acts), simpleReply(2, P.NBD_ENOSPC), 'write past the end: ENOSPC, no request');
  acts = core.push(request(P.NBD_CMD_READ, 0, 3, EXPORT_SIZE, 1));
  t.same(sent(acts), simpleReply(3, P.NBD_EINVAL), 'read past the end: EINVAL');
  acts = core.push(request(P.NBD_CMD_DISC, 0, 4, 0, 0));
  t.same(
    acts.map((a) => a.type),
    ['pause'],
    'DISC with a write in flight: stop reading, wait',
  );
  acts = core.complete(req!, { kind: 'ok' });
  t.same(sent(acts), simpleReply(1, 0), 'the write is answered');
  t.equal(acts.at(-1)?.type, 'end', 'then the connection ends');
});

t.test('TLS required: only STARTTLS goes through, and nothing may follow it unencrypted', async (t) => {
  const core = new NbdServerCore(fakeServer(true));
  core.greeting();
  core.push(clientFlags());
  let acts = core.push(option(P.NBD_OPT_GO, goData('rw')));
  t.equal(sent(acts).readUInt32BE(12), P.NBD_REP_ERR_TLS_REQD, 'GO before TLS: ERR_TLS_REQD');
  t.notOk(acts.some((a) => a.type === 'transmission'));
  acts = core.push(option(P.NBD_OPT_EXPORT_NAME, Buffer.from('rw')));
  t.match(acts, [{ type: 'end', reason: 'protocol-error' }], 'EXPORT_NAME before TLS ends the connection');

  const c2 = new NbdServerCore(fakeServer(true));
  c2.greeting();
  acts = c2.push(Buffer.concat([clientFlags(), option(P.NBD_OPT_STARTTLS)]));
  t.same(
    acts.map((a) => a.type),
    ['send', 'starttls'],
    'STARTTLS: ACK, then the handshake',
  );
  t.same(c2.push(option(P.NBD_OPT_GO, goData('rw'))), [], 'nothing is parsed during the TLS handshake');
  c2.tlsEstablished();

  const c3 = new NbdServerCore(fakeServer(true));
  c3.greeting();
  acts = c3.push(Buffer.concat([clientFlags(), option(P.NBD_OPT_STARTTLS), option(P.NBD_OPT_GO, goData('rw'))]));
  t.match(acts, [{ type: 'end', reason: 'protocol-error', message: /data after NBD_OPT_STARTTLS/ }], 'bytes after STARTTLS before the handshake: protocol error');
});

t.test('meta contexts: SET then BLOCK_STATUS', async (t) => {
  const core = new NbdServerCore(fakeServer());
  core.greeting();
  core.push(clientFlags());
  core.push(option(P.NBD_OPT_STRUCTURED_REPLY));
  let acts = core.push(option(P.NBD_OPT_SET_META_CONTEXT, metaData('rw', ['base:allocation', 'qemu:allocation-depth', 'nope:x'])));
  const ctx = (id: number, name: string) => {
    const b = Buffer.alloc(4 + name.length);
    b.writeUInt32BE(id);
    b.write(name, 4);
    return optReply(P.NBD_OPT_SET_META_CONTEXT, P.NBD_REP_META_CONTEXT, b);
  };
  t.same(sent(acts), Buffer.concat([ctx(0, 'base:allocation'), ctx(1, 'qemu:allocation-depth'), optReply(P.NBD_OPT_SET_META_CONTEXT, P.NBD_REP_ACK)]));
  core.push(option(P.NBD_OPT_GO, goData('rw')));
  acts = core.push(request(P.NBD_CMD_BLOCK_STATUS, P.NBD_CMD_FLAG_REQ_ONE, 5, 0, 4096));
  const req = acts[0].type === 'request' ? acts[0].req : undefined;
  t.equal(core.maxExtents(req!), 1, 'REQ_ONE: one extent');
  const r = sent(core.complete(req!, { kind: 'block-status', contexts: [{ id: 0, lengths: [4096], values: [3] }, { id: 1, lengths: [4096], values: [0] }] }));
  t.equal(r.length, 2 * (24 + 8), 'two chunks');
  t.equal(r.readUInt16BE(4), 0, 'first not DONE');
  t.equal(r.readUInt16BE(32 + 4), P.NBD_REPLY_FLAG_DONE, 'last DONE');
});

t.test('handshake refusals, byte for byte', async (t) => {
  const core = new NbdServerCore(fakeServer());
  core.greeting();
  core.push(clientFlags());
  const refusal = (opt: number, type: number, msg: string) => optReply(opt, type, Buffer.from(msg));
  t.same(sent(core.push(option(99, Buffer.from('x')))), refusal(99, P.NBD_REP_ERR_UNSUP, 'option 99 not supported'));
  t.same(sent(core.push(option(P.NBD_OPT_LIST, Buffer.from('x')))), refusal(P.NBD_OPT_LIST, P.NBD_REP_ERR_INVALID, 'NBD_OPT_LIST takes no data'));
  t.same(sent(core.push(option(P.NBD_OPT_STARTTLS))), refusal(P.NBD_OPT_STARTTLS, P.NBD_REP_ERR_POLICY, 'TLS not configured'));
  t.same(sent(core.push(option(P.NBD_OPT_GO, goData('nope')))), refusal(P.NBD_OPT_GO, P.NBD_REP_ERR_UNKNOWN, "export 'nope' not present"));
  // Declared far too long: refused at once, then its data is skipped unread as it arrives.
  t.same(sent(core.push(option(P.NBD_OPT_INFO, Buffer.alloc(0), 100000))), refusal(P.NBD_OPT_INFO, P.NBD_REP_ERR_TOO_BIG, 'option data of 100000 bytes is too long'));
  t.same(core.push(Buffer.alloc(99999)), []);
  t.equal(core.needs, 1, 'one byte of it still to skip');
  core.push(Buffer.alloc(1));
  // INFO on an export wanting 512-byte alignment from a client that did not ask for block sizes.
  const acts = sent(core.push(option(P.NBD_OPT_INFO, goData('al'))));
  const want = refusal(P.NBD_OPT_INFO, P.NBD_REP_ERR_BLOCK_SIZE_REQD, "request NBD_INFO_BLOCK_SIZE to use export 'al'");
  t.same(acts.subarray(acts.length - want.length), want, 'after the INFO replies: BLOCK_SIZE_REQD');
  const list = sent(core.push(option(P.NBD_OPT_LIST)));
  t.equal(list.length, 3 * (20 + 4 + 2 + 'xx export'.length) + 20, 'LIST: three exports with descriptions, then ACK');
  const abort = core.push(option(P.NBD_OPT_ABORT));
  t.same(
    abort.map((a) => a.type),
    ['send', 'end'],
  );
  t.same(core.push(option(P.NBD_OPT_GO, goData('rw'))), [], 'nothing after ABORT');
});

t.test('oldstyle EXPORT_NAME: size, flags and the 124 zero bytes unless NO_ZEROES', async (t) => {
  for (const noZeroes of [false, true]) {
    const core = new NbdServerCore(fakeServer());
    core.greeting();
    core.push(clientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0)));
    const acts = core.push(option(P.NBD_OPT_EXPORT_NAME, Buffer.from('rw')));
    const b = sent(acts);
    t.equal(b.length, noZeroes ? 10 : 134);
    t.equal(b.readBigUInt64BE(0), BigInt(EXPORT_SIZE));
    t.equal(b.readUInt16BE(8), 0x1 | 0x4 | 0x8 | 0x20 | 0x40 | 0x100 | 0x400 | 0x800, 'writable: trim, write zeroes, fast zero; no DF without structured replies');
    t.equal(acts.at(-1)?.type, 'transmission');
  }
  const core = new NbdServerCore(fakeServer());
  core.greeting();
  core.push(clientFlags());
  t.match(core.push(option(P.NBD_OPT_EXPORT_NAME, Buffer.from('nope'))), [{ type: 'end', reason: 'protocol-error', message: "client asked for unknown export 'nope' with NBD_OPT_EXPORT_NAME" }]);
  const bad = new NbdServerCore(fakeServer());
  bad.greeting();
  t.match(bad.push(Buffer.from('GET / HTTP/1.1\r\n')), [{ type: 'end', reason: 'protocol-error', message: 'unknown client flags 0x47455420' }]);
});

t.test('property: arbitrary and damaged streams break no rule', async (t) => {
  let requests = 0;
  let writes = 0;
  let extended = 0;
  fc.assert(
    fc.property(nbdStreamArb, nbdScheduleArb, (stream, schedule) => {
      const r = runNbdCore(stream, schedule);
      requests += r.requests.length;
      writes += r.requests.filter((q) => q.type === P.NBD_CMD_WRITE).length;
      if (r.extended) extended += r.requests.length;
    }),
    { seed: 1313, numRuns: 4000 },
  );
  // The generators must reach the transmission phase, or the property proves little.
  t.ok(requests > 800, `requests handed out: ${requests}`);
  t.ok(writes > 100, `writes handed out: ${writes}`);
  t.ok(extended > 200, `requests handed out with extended headers: ${extended}`);
});

t.test('property: how the bytes are cut does not change what is sent', async (t) => {
  fc.assert(
    fc.property(nbdStreamArb, nbdScheduleArb, (stream, schedule) => {
      // Complete nothing until the end, so the two runs see the same order of events.
      const whole = runNbdCore(stream, [stream.length + 1]);
      const cut = runNbdCore(stream, schedule.map((n) => n * 3));
      if (whole.requests.length !== cut.requests.length) throw new Error(`${whole.requests.length} vs ${cut.requests.length} requests`);
    }),
    { seed: 4242, numRuns: 500 },
  );
  t.pass('same requests however the stream is cut');
});

t.test('property: a read-only export never gets a write-type request', async (t) => {
  const reqArb = fc.array(
    fc.record({ type: fc.constantFrom(1, 4, 6), flags: fc.integer({ min: 0, max: 31 }), offset: fc.integer({ min: 0, max: EXPORT_SIZE }), length: fc.integer({ min: 0, max: 4096 }) }),
    { maxLength: 20 },
  );
  fc.assert(
    fc.property(reqArb, fc.boolean(), (reqs, structured) => {
      const body = reqs.map((r, i) => request(r.type, r.flags, i, r.offset, r.length, r.type === 1 ? Buffer.alloc(r.length) : undefined));
      const res = runNbdCore(Buffer.concat([handshake('ro', structured), ...body]), [4096]);
      if (res.requests.length !== 0) throw new Error('a request on the read-only export');
      if (res.ended) throw new Error('refusals must not end the connection');
    }),
    { seed: 7, numRuns: 300 },
  );
  t.pass();
});
