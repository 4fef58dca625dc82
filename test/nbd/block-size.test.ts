/**
 * Block size negotiation on an export whose node wants aligned requests (a
 * file with cache.direct=on: O_DIRECT, 4 KiB). As in QEMU's server:
 *   - NBD_OPT_GO without NBD_INFO_BLOCK_SIZE (what Debian 12's nbd-client
 *     3.24 sends, so the kernel's NBD client depends on it) is accepted,
 *     with a minimum block size of 1, and unaligned requests are served;
 *   - NBD_OPT_INFO without it gets NBD_REP_ERR_BLOCK_SIZE_REQD;
 *   - a client that asks learns the 4096-byte minimum.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { RawClient } from '../helpers/nbd-raw.js';
import { patternBuffer, sparseFile, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const NBD_OPT_INFO = 6;
const NBD_OPT_GO = 7;
const NBD_REP_ACK = 1;
const NBD_REP_INFO = 3;
const NBD_REP_ERR_BLOCK_SIZE_REQD = 2 ** 31 + 8;
const NBD_INFO_BLOCK_SIZE = 3;
const NBD_CMD_READ = 0;
const NBD_CMD_WRITE = 1;
const NBD_CMD_FLUSH = 3;

/** The data of NBD_OPT_INFO / NBD_OPT_GO: the export name, then the info requests. */
function infoRequest(name: string, requests: number[]): Buffer {
  const n = Buffer.from(name);
  const b = Buffer.alloc(4 + n.length + 2 + 2 * requests.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(requests.length, 4 + n.length);
  requests.forEach((r, i) => b.writeUInt16BE(r, 6 + n.length + 2 * i));
  return b;
}

/** Option replies up to and including the final one (ACK or an error). */
async function replies(c: RawClient): Promise<Array<{ type: number; data: Buffer }>> {
  const out: Array<{ type: number; data: Buffer }> = [];
  for (;;) {
    const r = await c.optionReply();
    out.push(r);
    if (r.type !== NBD_REP_INFO) return out;
  }
}

/** The [minimum, preferred, maximum] of the NBD_INFO_BLOCK_SIZE reply among `rs`. */
function blockSizes(rs: Array<{ type: number; data: Buffer }>): number[] | undefined {
  const r = rs.find((x) => x.type === NBD_REP_INFO && x.data.readUInt16BE(0) === NBD_INFO_BLOCK_SIZE);
  return r && [r.data.readUInt32BE(2), r.data.readUInt32BE(6), r.data.readUInt32BE(10)];
}

t.test('an export that wants 4 KiB alignment: GO without INFO_BLOCK_SIZE is served, INFO without it is refused', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.img'), 4 * MiB);
  const d = await startDaemon(t, {
    dir,
    args: [
      '--blockdev', `driver=raw,node-name=d0,file.driver=file,file.filename=${img},file.cache.direct=on`,
      '--export', 'type=nbd,id=e0,node-name=d0,name=disk,writable=on',
    ],
  });

  const asks = await RawClient.connect(d.socket);
  t.teardown(() => asks.close());
  await asks.greet();
  asks.sendOption(NBD_OPT_INFO, infoRequest('disk', [NBD_INFO_BLOCK_SIZE]));
  let rs = await replies(asks);
  t.equal(rs.at(-1)?.type, NBD_REP_ACK, 'NBD_OPT_INFO with NBD_INFO_BLOCK_SIZE: answered');
  t.same(blockSizes(rs), [4096, 4096, 32 * MiB], 'minimum 4096 (the O_DIRECT alignment), preferred 4096, maximum 32 MiB');

  asks.sendOption(NBD_OPT_INFO, infoRequest('disk', []));
  rs = await replies(asks);
  t.equal(rs.at(-1)?.type, NBD_REP_ERR_BLOCK_SIZE_REQD, 'NBD_OPT_INFO without it: NBD_REP_ERR_BLOCK_SIZE_REQD');

  // What nbd-client 3.24 sends: NBD_OPT_GO with no information requests.
  asks.sendOption(NBD_OPT_GO, infoRequest('disk', []));
  rs = await replies(asks);
  t.equal(rs.at(-1)?.type, NBD_REP_ACK, 'NBD_OPT_GO without it: accepted');
  t.same(blockSizes(rs), [1, 4096, 32 * MiB], 'with a minimum of 1: the client never promised to align');

  // Unaligned requests then work (the node's read-modify-write).
  const data = patternBuffer(1000, 7);
  asks.request(NBD_CMD_WRITE, 4000, data.length, 1, 0, data);
  t.same(await asks.simpleReply(), { error: 0, cookie: 1 }, 'an unaligned write (1000 bytes at 4000) succeeds');
  asks.request(NBD_CMD_FLUSH, 0, 0, 2);
  t.same(await asks.simpleReply(), { error: 0, cookie: 2 }, 'flush');
  asks.request(NBD_CMD_READ, 3990, 1020, 3);
  t.same(await asks.simpleReply(), { error: 0, cookie: 3 }, 'an unaligned read succeeds');
  const back = await asks.read(1020);
  t.ok(back.subarray(10, 1010).equals(data) && back.subarray(0, 10).every((b) => b === 0) && back.subarray(1010).every((b) => b === 0), 'and returns the write with zeroes around it');
  t.ok(fs.readFileSync(img).subarray(4000, 5000).equals(data), 'the image holds the write');
});
