/**
 * Direct reading (src/nbd/connection.ts): a plain connection reads its socket
 * itself, WRITE payloads straight into their (pooled) buffers, and after
 * large WRITEs only the next header. These tests send what makes those paths
 * switch: payloads cut at odd places and sent in pieces over several
 * wake-ups, large and small WRITEs mixed, a READ right after large WRITEs,
 * a client that vanishes in the middle of a payload; and large READs, whose
 * data goes out of pooled buffers. What must hold: every
 * byte lands where it was written, nothing stays charged to the buffer
 * budget, and the server goes on serving.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { RawClient } from '../helpers/nbd-raw.js';
import { QmpWire } from '../helpers/qmp.js';
import { sparseFile, tempDir } from '../helpers/tools.js';
import { PayloadPool, MIN_POOLED } from '../../src/nbd/payload-pool.js';

const MiB = 1024 * 1024;
const NBD_CMD_READ = 0;
const NBD_CMD_WRITE = 1;
const NBD_CMD_FLUSH = 3;

/** Deterministic bytes, different for every seed. */
function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed * 2654435761 + 1;
  for (let i = 0; i < length; i++) {
    x = (x * 1103515245 + 12345) >>> 0;
    b[i] = x >>> 24;
  }
  return b;
}

function header(type: number, offset: number, length: number, cookie: number): Buffer {
  const h = Buffer.alloc(28);
  h.writeUInt32BE(0x25609513, 0);
  h.writeUInt16BE(type, 6);
  h.writeBigUInt64BE(BigInt(cookie), 8);
  h.writeBigUInt64BE(BigInt(offset), 16);
  h.writeUInt32BE(length, 24);
  return h;
}

/** Writes bytes in pieces of the given sizes (cycled), yielding to the event loop between them. */
async function sendInPieces(c: RawClient, bytes: Buffer, sizes: number[]): Promise<void> {
  for (let at = 0, i = 0; at < bytes.length; i++) {
    const n = Math.min(sizes[i % sizes.length], bytes.length - at);
    c.write(bytes.subarray(at, at + n));
    at += n;
    await new Promise((r) => setTimeout(r, 1));
  }
}

async function serverStats(qmp: QmpWire): Promise<{ buffered: number; connections: unknown[] }> {
  const r = await qmp.cmd('x-query-nbd-server');
  return r.return as { buffered: number; connections: unknown[] };
}

t.test('writes of mixed sizes, cut anywhere, land intact', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.img'), 64 * MiB);
  const qmpSock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, {
    dir,
    args: ['--blockdev', `driver=file,node-name=f0,filename=${img}`, '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on', '--qmp', `unix:${qmpSock}`],
  });
  const qmp = await QmpWire.connect(qmpSock);
  t.teardown(() => qmp.socket.destroy());
  const c = await RawClient.connect(d.socket);
  t.teardown(() => c.close());
  await c.go('disk');

  // Large WRITEs (header-only reads after them), small ones in between (chunk reads), sizes
  // that are not powers of two (a pooled buffer's view), and a READ right after large WRITEs.
  const writes = [
    { offset: 0, length: MiB },
    { offset: MiB, length: MiB },
    { offset: 2 * MiB, length: 4096 },
    { offset: 3 * MiB, length: 3 * MiB + 512 },
    { offset: 7 * MiB, length: 512 },
    { offset: 8 * MiB, length: 65536 },
    { offset: 9 * MiB, length: 200 * 1024 + 7 },
    { offset: 10 * MiB, length: 65535 },
    { offset: 11 * MiB, length: MiB },
  ];
  const stream: Buffer[] = [];
  writes.forEach((w, i) => stream.push(header(NBD_CMD_WRITE, w.offset, w.length, i + 1), pattern(w.length, i + 1)));
  // The READ is not ordered after the WRITEs (replies come as requests finish): it reads
  // a range none of them touches.
  stream.push(header(NBD_CMD_READ, 20 * MiB, 4096, 100));
  // Pieces of odd sizes, so headers and payloads are cut at every kind of place.
  await sendInPieces(c, Buffer.concat(stream), [1, 27, 70000, 3, 300000, 13, 1 << 20, 4095]);

  const cookies = new Set<number>();
  for (let i = 0; i <= writes.length; i++) {
    const r = await c.simpleReply();
    t.equal(r.error, 0, `request ${r.cookie} succeeded`);
    cookies.add(r.cookie);
    if (r.cookie === 100) t.ok((await c.read(4096)).equals(Buffer.alloc(4096)), 'the READ after the WRITEs reads its range');
  }
  t.equal(cookies.size, writes.length + 1, 'every request got its own reply');

  c.request(NBD_CMD_FLUSH, 0, 0, 200);
  t.same(await c.simpleReply(), { error: 0, cookie: 200 }, 'flush');
  const file = fs.readFileSync(img);
  writes.forEach((w, i) => t.ok(file.subarray(w.offset, w.offset + w.length).equals(pattern(w.length, i + 1)), `bytes of write ${i + 1} (${w.length} at ${w.offset}) are in the file`));
  t.equal((await serverStats(qmp)).buffered, 0, 'nothing stays charged to the buffer budget');

  // Large READs go out of pooled buffers: many at once, each must carry its own range's bytes.
  const reads = [0, 1, 3, 11, 0, 3, 11, 1].map((mib, i) => ({ offset: mib * MiB, cookie: 300 + i }));
  for (const r of reads) c.request(NBD_CMD_READ, r.offset, MiB, r.cookie);
  const expected = new Map(writes.map((w, i) => [w.offset, pattern(w.length, i + 1).subarray(0, MiB)]));
  for (let i = 0; i < reads.length; i++) {
    const r = await c.simpleReply();
    const read = reads.find((x) => x.cookie === r.cookie)!;
    t.ok((await c.read(MiB)).equals(expected.get(read.offset)!), `READ ${r.cookie} of 1 MiB at ${read.offset} has its bytes`);
  }
});

t.test('a client that vanishes in the middle of a payload', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.img'), 16 * MiB);
  const qmpSock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, {
    dir,
    args: ['--blockdev', `driver=file,node-name=f0,filename=${img}`, '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on', '--qmp', `unix:${qmpSock}`],
  });
  const qmp = await QmpWire.connect(qmpSock);
  t.teardown(() => qmp.socket.destroy());

  const gone = await RawClient.connect(d.socket);
  await gone.go('disk');
  // One whole large WRITE (acknowledged), then the next one cut off after part of its payload.
  gone.write(Buffer.concat([header(NBD_CMD_WRITE, 0, MiB, 1), pattern(MiB, 7)]));
  t.same(await gone.simpleReply(), { error: 0, cookie: 1 }, 'the first WRITE is acknowledged');
  gone.write(Buffer.concat([header(NBD_CMD_WRITE, MiB, MiB, 2), pattern(300 * 1024, 8)]));
  await new Promise((r) => setTimeout(r, 50));
  gone.close();
  for (let i = 0; (await serverStats(qmp)).connections.length !== 0; i++) {
    if (i > 500) throw new Error('the connection did not close');
    await new Promise((r) => setTimeout(r, 20));
  }
  t.equal((await serverStats(qmp)).buffered, 0, 'the half-received payload is no longer charged');

  const c = await RawClient.connect(d.socket);
  t.teardown(() => c.close());
  await c.go('disk');
  c.request(NBD_CMD_READ, 0, MiB, 3);
  t.same(await c.simpleReply(), { error: 0, cookie: 3 }, 'a new client is served');
  t.ok((await c.read(MiB)).equals(pattern(MiB, 7)), 'and reads the acknowledged WRITE');
  c.request(NBD_CMD_READ, MiB, 4096, 4);
  t.same(await c.simpleReply(), { error: 0, cookie: 4 }, 'read where the cut WRITE was');
  t.ok((await c.read(4096)).equals(Buffer.alloc(4096)), 'nothing of the cut WRITE was written');
});

t.test('PayloadPool: classes, views, and the idle bound', async (t) => {
  const pool = new PayloadPool(4 * MiB);
  const small = pool.take(MIN_POOLED - 1);
  t.equal(small.backing, undefined, 'below MIN_POOLED nothing is pooled');
  t.equal(small.data.length, MIN_POOLED - 1);

  const a = pool.take(MiB + 1);
  t.equal(a.data.length, MiB + 1, 'the view has the length asked for');
  t.equal(a.backing!.length, 2 * MiB, 'inside a power-of-two buffer');
  pool.give(a.backing!);
  t.equal(pool.idleBytes, 2 * MiB);
  const b = pool.take(2 * MiB);
  t.equal(b.backing, a.backing, 'a buffer given back is taken again for the same class');
  t.equal(pool.idleBytes, 0);

  const c = pool.take(2 * MiB);
  const e = pool.take(2 * MiB);
  pool.give(b.backing!);
  pool.give(c.backing!);
  pool.give(e.backing!);
  t.equal(pool.idleBytes, 4 * MiB, 'past the idle bound buffers are dropped, not kept');
});
