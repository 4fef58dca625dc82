/**
 * The qcow2 driver under a random load, checked against a plain byte model
 * and then by QEMU: thousands of writes, zero writes (with and without
 * MAY_UNMAP), discards, flushes and growth, some issued concurrently, with
 * small and default cluster sizes, with and without a backing file, v3 and
 * v2. Afterwards `qemu-img compare` with the model must say identical and
 * `qemu-img check` must find nothing, and block status must agree with
 * `qemu-img map`. Also the concurrency cases one by one: two writes into
 * one new cluster, a write racing a read of a backing cluster, 64 writes
 * into new clusters at once, writes into L2 tables shared with an internal
 * snapshot, more L2 tables in use than the cache holds, and a resize (a new
 * L1 table) while writes go on.
 *
 * The seed is fixed (VDISK_SEED overrides it) and is part of every test
 * name, so a failure says how to reproduce it.
 *
 * Discard: the block layer leaves a discarded range's content unspecified
 * (QEMU's qcow2 reads zeroes in v3 and the backing file in v2, for
 * example). So after a discard the model takes what vdisk reads back, but
 * only after checking that every discarded cluster reads as its old data,
 * zeroes or the backing file's data, and that the bytes around whole
 * clusters did not change.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { type BlockNode, ReqFlags } from '../../src/block/node.js';
import { setLogLevel } from '../../src/log.js';
import { patternBuffer, requireTool, tempDir } from '../helpers/tools.js';
import { assertCleanCheck, compareImage, compareMap, describeDifference, openQcow2, qemuImg, qemuIo, qemuMap, readAll, rng } from '../helpers/qcow2.js';
import { run } from '../helpers/tools.js';

setLogLevel('error');

const KiB = 1024;
const MiB = 1024 * KiB;
const SEED = process.env.VDISK_SEED ? Number(process.env.VDISK_SEED) : 20261122;
const OPS = process.env.VDISK_OPS ? Number(process.env.VDISK_OPS) : 3000;

interface Variant {
  name: string;
  cs: number;
  compat?: '0.10';
  /** A qcow2 base (64 KiB clusters) made and written by qemu-io. */
  backing?: 'qcow2' | 'raw';
}

const VARIANTS: Variant[] = [
  { name: '4k clusters', cs: 4 * KiB },
  { name: '64k clusters', cs: 64 * KiB },
  { name: '4k clusters over a qcow2 backing file', cs: 4 * KiB, backing: 'qcow2' },
  { name: '64k clusters over a raw backing file', cs: 64 * KiB, backing: 'raw' },
  { name: '512-byte clusters, compat=0.10, over a qcow2 backing file', cs: 512, compat: '0.10', backing: 'qcow2' },
];

/** One request of a concurrent batch. */
type Req = { kind: 'write'; offset: number; data: Buffer } | { kind: 'zero'; offset: number; length: number; flags: number } | { kind: 'read'; offset: number; length: number };

function reqEnd(r: Req): number {
  return r.offset + (r.kind === 'write' ? r.data.length : r.length);
}

async function runVariant(t: Test, v: Variant, seed: number): Promise<void> {
  const dir = tempDir(t);
  const rand = rng(seed);
  const int = (n: number) => Math.floor(rand() * n);
  const cs = v.cs;
  let size = 8 * MiB;
  const maxSize = 12 * MiB;
  const img = path.join(dir, 'top.qcow2');
  // The backing file's content, zero-extended as the top grows (reads past its end are zeroes).
  let backing = Buffer.alloc(0);
  const opts = `cluster_size=${cs}${v.compat ? `,compat=${v.compat}` : ''}`;
  if (v.backing) {
    const base = path.join(dir, `base.${v.backing}`);
    if (v.backing === 'raw') await qemuImg('create', '-q', '-f', 'raw', base, String(size));
    else await qemuImg('create', '-q', '-f', 'qcow2', base, String(size));
    await qemuIo(base, ['write -P 0x61 0 3M', 'write -P 0x62 4M 1M', 'write -P 0x63 6M 1536K'], v.backing);
    backing = fs.readFileSync(path.join(dir, `base.${v.backing}`));
    if (v.backing === 'qcow2') {
      backing = Buffer.alloc(size);
      backing.fill(0x61, 0, 3 * MiB).fill(0x62, 4 * MiB, 5 * MiB).fill(0x63, 6 * MiB, 7 * MiB + 512 * KiB);
    }
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, '-b', base, '-F', v.backing, img);
  } else {
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', opts, img, String(size));
  }
  const backingAt = (off: number, len: number) => {
    const b = Buffer.alloc(len);
    if (off < backing.length) backing.copy(b, 0, off, Math.min(backing.length, off + len));
    return b;
  };
  let model = Buffer.alloc(maxSize);
  backing.copy(model, 0, 0, Math.min(backing.length, size));

  const { g, q } = await openQcow2(t, img, { discard: true });
  const counts: Record<string, number> = {};
  const count = (k: string) => (counts[k] = (counts[k] ?? 0) + 1);
  let failed = false;
  const fail = (i: number, message: string) => {
    failed = true;
    t.fail(`seed ${seed}, op ${i}: ${message} (rerun with VDISK_SEED=${seed})`);
  };

  const randomRange = (maxLen: number): [number, number] => {
    let off: number;
    let len: number;
    if (rand() < 0.4) {
      // Cluster aligned: exercises the whole-cluster paths.
      off = int(size / cs) * cs;
      len = (1 + int(Math.max(1, Math.floor(maxLen / cs)))) * cs;
    } else {
      off = int(size);
      len = 1 + int(maxLen);
    }
    return [off, Math.min(len, size - off)];
  };

  const doReq = async (r: Req): Promise<void> => {
    if (r.kind === 'write') await q.write(r.offset, r.data);
    else if (r.kind === 'zero') await q.writeZeroes(r.offset, r.length, r.flags);
    else {
      const b = Buffer.alloc(r.length);
      await q.read(r.offset, b);
      (r as { got?: Buffer }).got = b;
    }
  };
  const applyReq = (r: Req) => {
    if (r.kind === 'write') r.data.copy(model, r.offset);
    else if (r.kind === 'zero') model.fill(0, r.offset, r.offset + r.length);
  };
  /** A batch either spreads over the disk or crowds into a few clusters (to race on allocations). */
  let hot: [number, number] | undefined;
  const randomRangeIn = (maxLen: number): [number, number] => {
    if (!hot) return randomRange(maxLen);
    const off = hot[0] + int(hot[1]);
    return [off, Math.min(1 + int(maxLen), hot[0] + hot[1] - off, size - off)];
  };
  const randomReq = (): Req => {
    const p = rand();
    if (p < 0.6) {
      const [off, len] = randomRangeIn(3 * cs + 100);
      return { kind: 'write', offset: off, data: patternBuffer(len, int(2 ** 31)) };
    }
    if (p < 0.85) {
      const [off, len] = randomRangeIn(4 * cs);
      return { kind: 'zero', offset: off, length: len, flags: rand() < 0.5 ? ReqFlags.MAY_UNMAP : 0 };
    }
    const [off, len] = randomRangeIn(3 * cs);
    return { kind: 'read', offset: off, length: len };
  };

  for (let i = 0; i < OPS && !failed; i++) {
    const p = rand();
    try {
      if (p < 0.5) {
        count('write');
        const [off, len] = randomRange(3 * cs + 100);
        const data = patternBuffer(len, int(2 ** 31));
        await q.write(off, data);
        data.copy(model, off);
      } else if (p < 0.62) {
        count('zero');
        const [off, len] = randomRange(5 * cs);
        const flags = rand() < 0.5 ? ReqFlags.MAY_UNMAP : 0;
        await q.writeZeroes(off, len, flags);
        model.fill(0, off, off + len);
      } else if (p < 0.72) {
        count('discard');
        const [off, len] = randomRange(6 * cs);
        await q.discard(off, len);
        const got = Buffer.alloc(len);
        await q.read(off, got);
        const first = Math.ceil(off / cs) * cs;
        const end = Math.floor((off + len) / cs) * cs;
        // Outside whole clusters nothing changes.
        const headLen = Math.min(len, Math.max(0, first - off));
        if (!got.subarray(0, headLen).equals(model.subarray(off, off + headLen))) fail(i, `discard at ${off}+${len} changed bytes before its first whole cluster`);
        const tailStart = Math.max(end, first, off);
        if (tailStart < off + len && !got.subarray(tailStart - off).equals(model.subarray(tailStart, off + len))) {
          fail(i, `discard at ${off}+${len} changed bytes after its last whole cluster`);
        }
        for (let c = first; c < end; c += cs) {
          const g1 = got.subarray(c - off, c - off + cs);
          if (!g1.equals(model.subarray(c, c + cs)) && !g1.equals(Buffer.alloc(cs)) && !g1.equals(backingAt(c, cs))) {
            fail(i, `discarded cluster at ${c} reads neither its old data, zeroes nor the backing file`);
            break;
          }
        }
        got.copy(model, off);
      } else if (p < 0.75) {
        count('flush');
        await q.flush();
      } else if (p < 0.76) {
        if (size < maxSize) {
          count('truncate');
          const grown = Math.min(maxSize, size + 512 * (1 + int(2048)));
          await q.truncate(grown);
          // What lies past the old end reads zeroes, even where a backing file has data.
          model.fill(0, size, grown);
          size = grown;
        }
      } else if (p < 0.92) {
        count('batch');
        // A few requests at once on ranges that do not overlap (they may share clusters).
        const batch: Req[] = [];
        const n = 2 + int(5);
        hot = rand() < 0.6 ? [int(size / cs - 4) * cs, 4 * cs] : undefined;
        for (let k = 0; k < n * 4 && batch.length < n; k++) {
          const r = randomReq();
          if (r.offset >= size || reqEnd(r) > size) continue;
          if (batch.some((b) => b.offset < reqEnd(r) && r.offset < reqEnd(b))) continue;
          batch.push(r);
        }
        hot = undefined;
        const expected = batch.map((r) => (r.kind === 'read' ? Buffer.from(model.subarray(r.offset, reqEnd(r))) : undefined));
        await Promise.all(batch.map(doReq));
        for (const [k, r] of batch.entries()) {
          if (r.kind === 'read') {
            const got = (r as { got?: Buffer }).got!;
            if (!got.equals(expected[k]!)) fail(i, `concurrent read at ${r.offset}+${r.length}: ${describeDifference(got, expected[k]!)}`);
          }
          applyReq(r);
        }
      } else {
        count('check');
        const [off, len] = randomRange(8 * cs);
        const got = Buffer.alloc(len);
        await q.read(off, got);
        const want = model.subarray(off, off + len);
        if (!got.equals(want)) fail(i, `read at ${off}+${len}: ${describeDifference(got, want)}`);
      }
    } catch (err) {
      fail(i, `request failed: ${(err as Error).stack}`);
    }
  }
  model = model.subarray(0, size);
  t.equal(q.size, size, `seed ${seed}: size`);
  const all = await readAll(q);
  t.ok(all.equals(model), `seed ${seed}: vdisk reads the model: ${describeDifference(all, model)}`);
  await g.closeAll();
  t.comment(`seed ${seed}: ${JSON.stringify(counts)}`);
  await assertCleanCheck(t, img, `seed ${seed}`);
  const r = await compareImage(img, model, dir);
  t.equal(r.code, 0, `seed ${seed}: qemu-img compare says identical to the model${r.code === 0 ? '' : `\n${r.stdout}${r.stderr}`}`);
  // Whatever mix of data, zero (with and without a host cluster), unallocated and backing clusters
  // the load left: block status says what qemu-img map says.
  const ro = await openQcow2(t, img, { readOnly: true });
  await compareMap(t, ro.q, img, `seed ${seed}`);
  await ro.g.closeAll();
}

for (const v of VARIANTS) {
  t.test(`random load, ${v.name}, seed ${SEED} (VDISK_SEED=${SEED})`, (t) => {
    if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
    return runVariant(t, v, SEED);
  });
}

t.test('concurrency: two writes into one new cluster (different halves) both land', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  for (const backing of [false, true]) {
    for (const cs of [4 * KiB, 64 * KiB]) {
      const what = `${backing ? 'over a backing file' : 'no backing file'}, cluster ${cs}`;
      const img = path.join(dir, `halves-${backing}-${cs}.qcow2`);
      const size = 4 * MiB;
      const model = Buffer.alloc(size);
      if (backing) {
        const base = path.join(dir, `base-${cs}.qcow2`);
        await qemuImg('create', '-q', '-f', 'qcow2', base, String(size));
        await qemuIo(base, [`write -P 0x7e 0 ${size}`]);
        model.fill(0x7e);
        await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, '-b', base, '-F', 'qcow2', img);
      } else {
        await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(size));
      }
      const { g, q } = await openQcow2(t, img);
      // Many clusters, each written by two requests at once: the first half and the second half,
      // and (third request) a small piece in the middle of the next cluster too.
      const jobs: Array<Promise<void>> = [];
      for (let c = 0; c < 32; c++) {
        const base = c * 2 * cs;
        const a = patternBuffer(cs / 2, c * 3 + 1);
        const b = patternBuffer(cs / 2, c * 3 + 2);
        const m = patternBuffer(100, c * 3 + 3);
        jobs.push(q.write(base, a), q.write(base + cs / 2, b), q.write(base + cs + 1000, m));
        a.copy(model, base);
        b.copy(model, base + cs / 2);
        m.copy(model, base + cs + 1000);
      }
      await Promise.all(jobs);
      const got = await readAll(q);
      t.ok(got.equals(model), `${what}: both halves landed: ${describeDifference(got, model)}`);
      await g.closeAll();
      await assertCleanCheck(t, img, what);
      const r = await compareImage(img, model, dir);
      t.equal(r.code, 0, `${what}: qemu-img compare${r.code === 0 ? '' : `\n${r.stdout}${r.stderr}`}`);
    }
  }
});

t.test('concurrency: a write racing a read of a backing-file cluster: the read sees old or new sectors, never garbage', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const size = 4 * MiB;
  const cs = 64 * KiB;
  const base = path.join(dir, 'base.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', base, String(size));
  await qemuIo(base, [`write -P 0x3c 0 ${size}`]);
  const img = path.join(dir, 'top.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, '-b', base, '-F', 'qcow2', img);
  const { g, q } = await openQcow2(t, img);
  const model = Buffer.alloc(size, 0x3c);
  const bad: string[] = [];
  for (let c = 0; c < size / cs; c++) {
    // Partial writes: the rest of the cluster is copied from the backing file while the read runs.
    const off = c * cs + (c % 4) * 512;
    const len = cs / 2 + (c % 3) * 512;
    const data = patternBuffer(len, c + 100);
    const readBuf = Buffer.alloc(cs);
    const before = Buffer.from(model.subarray(c * cs, (c + 1) * cs));
    const reads = c % 2 ? [q.read(c * cs, readBuf)] : [];
    const w = q.write(off, data);
    if (!(c % 2)) reads.push(q.read(c * cs, readBuf));
    await Promise.all([w, ...reads]);
    data.copy(model, off);
    const after = model.subarray(c * cs, (c + 1) * cs);
    for (let s = 0; s < cs; s += 512) {
      const got = readBuf.subarray(s, s + 512);
      if (!got.equals(before.subarray(s, s + 512)) && !got.equals(after.subarray(s, s + 512))) bad.push(`cluster ${c} sector ${s / 512}`);
    }
  }
  t.same(bad, [], 'every sector read during a write is either its old or its new content');
  const got = await readAll(q);
  t.ok(got.equals(model), `after the writes: ${describeDifference(got, model)}`);
  await g.closeAll();
  await assertCleanCheck(t, img, 'racing reads');
});

t.test('concurrency: 64 writes into distinct new clusters at once; each cluster is allocated exactly once', async (t) => {
  if (!requireTool(t, 'qemu-img')) return;
  const dir = tempDir(t);
  for (const cs of [512, 4 * KiB, 64 * KiB]) {
    const what = `cluster ${cs}`;
    const img = path.join(dir, `c64-${cs}.qcow2`);
    // Big enough that the 64 clusters spread over several L2 tables (new tables are made concurrently too).
    const size = 64 * MiB;
    await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(size));
    const { g, q } = await openQcow2(t, img);
    const model = Buffer.alloc(size);
    const stride = Math.floor(size / 64 / cs) * cs;
    const jobs: Array<Promise<void>> = [];
    const guestClusters: number[] = [];
    for (let i = 0; i < 64; i++) {
      // Half of them in one L2 table, half spread out.
      const off = i < 32 ? i * cs : i * stride;
      guestClusters.push(off);
      const data = patternBuffer(cs, i + 1);
      data.copy(model, off);
      jobs.push(q.write(off, data));
    }
    await Promise.all(jobs);
    await g.closeAll();
    await assertCleanCheck(t, img, what);
    const r = await compareImage(img, model, dir);
    t.equal(r.code, 0, `${what}: qemu-img compare${r.code === 0 ? '' : `\n${r.stdout}${r.stderr}`}`);
    const check = JSON.parse((await qemuImg('check', '--output=json', img)).stdout);
    t.equal(check['allocated-clusters'], 64, `${what}: 64 clusters allocated`);
    const map = await qemuMap(img);
    const hosts = new Set<number>();
    let dataClusters = 0;
    for (const e of map) {
      if (!e.data) continue;
      for (let o = 0; o < e.length; o += cs) {
        dataClusters++;
        hosts.add(e.offset! + o);
      }
    }
    t.equal(dataClusters, 64, `${what}: 64 guest clusters have data`);
    t.equal(hosts.size, 64, `${what}: each at its own host cluster`);
  }
});

t.test('concurrency: writes into one L2 table shared with an internal snapshot copy it once', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  const cs = 512;
  const size = 4 * MiB;
  const img = path.join(dir, 'snap.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(size));
  await qemuIo(img, [`write -P 0x11 0 ${size}`]);
  await qemuImg('snapshot', '-c', 's1', img);
  const model = Buffer.alloc(size, 0x11);
  const { g, q } = await openQcow2(t, img);
  // One L2 table maps 64 clusters (32 KiB) here: 8 tables, each written by 8 requests at once.
  const jobs: Array<Promise<void>> = [];
  for (let table = 0; table < 8; table++) {
    for (let k = 0; k < 8; k++) {
      const off = table * 32 * KiB * 3 + k * 4 * cs + (k % 2) * 100;
      const data = patternBuffer(cs + 7, table * 8 + k + 1);
      data.copy(model, off);
      jobs.push(q.write(off, data));
    }
  }
  await Promise.all(jobs);
  const got = await readAll(q);
  t.ok(got.equals(model), `every write landed: ${describeDifference(got, model)}`);
  await g.closeAll();
  await assertCleanCheck(t, img, 'shared L2 tables');
  const r = await compareImage(img, model, dir);
  t.equal(r.code, 0, `qemu-img compare${r.code === 0 ? '' : `\n${r.stdout}${r.stderr}`}`);
  await qemuImg('snapshot', '-a', 's1', img);
  const r2 = await compareImage(img, Buffer.alloc(size, 0x11), dir);
  t.equal(r2.code, 0, `the snapshot is intact${r2.code === 0 ? '' : `\n${r2.stdout}${r2.stderr}`}`);
  await assertCleanCheck(t, img, 'snapshot applied');
});

t.test('concurrency under L2 cache pressure: more L2 tables than the cache holds, written at once', async (t) => {
  if (!requireTool(t, 'qemu-img') || !requireTool(t, 'qemu-io')) return;
  const dir = tempDir(t);
  // 2 MiB clusters: an L2 table is 2 MiB and maps 512 GiB, so the 32 MiB cache holds 16 of them.
  // 48 regions of a 24 TiB disk need 48 tables: writes evict tables other writes are using.
  const cs = 2 * MiB;
  const span = 512 * 1024 * MiB;
  const regions = 48;
  const img = path.join(dir, 'wide.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(regions * span));
  const { g, q } = await openQcow2(t, img);
  const rand = rng(SEED);
  const writes: Array<{ off: number; len: number; pattern: number }> = [];
  for (let round = 0; round < 4; round++) {
    const jobs: Array<Promise<void>> = [];
    for (let r = 0; r < regions; r++) {
      const off = r * span + round * 3 * cs + Math.floor(rand() * cs);
      const len = 1 + Math.floor(rand() * 8192);
      const pattern = 1 + ((r * 4 + round) % 250);
      writes.push({ off, len, pattern });
      jobs.push(q.write(off, Buffer.alloc(len, pattern)));
    }
    await Promise.all(jobs);
  }
  let bad = 0;
  for (const w of writes) {
    const b = Buffer.alloc(w.len);
    await q.read(w.off, b);
    if (!b.equals(Buffer.alloc(w.len, w.pattern))) bad++;
  }
  t.equal(bad, 0, 'vdisk reads back every write');
  await g.closeAll();
  await assertCleanCheck(t, img, 'wide disk');
  const r = await run('qemu-io', ['-f', 'qcow2', ...writes.flatMap((w) => ['-c', `read -P ${w.pattern} ${w.off} ${w.len}`]), img], { timeoutMs: 60_000 });
  t.notMatch(r.stdout, /Pattern verification failed|error|failed/i, 'qemu-io reads back every write');
  t.equal(r.code, 0, 'qemu-io exits 0');
});

t.test('concurrency: growing the disk (a bigger L1 table) while writes go on', async (t) => {
  if (!requireTool(t, 'qemu-img')) return;
  const dir = tempDir(t);
  const cs = 512;
  // 512-byte clusters: an L2 table maps 32 KiB, so 4 MiB needs 128 L1 entries (two clusters of L1).
  let size = 4 * MiB;
  const img = path.join(dir, 'grow.qcow2');
  await qemuImg('create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cs}`, img, String(size));
  const { g, q } = await openQcow2(t, img);
  const model = Buffer.alloc(64 * MiB);
  const rand = rng(SEED);
  // Four rounds: 4 MiB grows to 64 MiB.
  for (let round = 0; round < 4; round++) {
    const jobs: Array<Promise<void>> = [];
    const cur = size;
    // Writes into new L2 tables all over the current disk, and a resize among them.
    const used = new Set<number>();
    for (let k = 0; k < 40; k++) {
      // A different L2 region for each (concurrent writes must not overlap for the model to hold).
      let region: number;
      do region = Math.floor(rand() * (cur / (32 * KiB)));
      while (used.has(region));
      used.add(region);
      const off = region * 32 * KiB + Math.floor(rand() * 1000);
      const data = patternBuffer(700, round * 100 + k + 1);
      data.copy(model, off);
      if (k === 0) {
        // The resize starts with nothing in flight (so it does not wait for these writes to drain)
        // and the writes go on while it moves the L1 table.
        size *= 2;
        jobs.push(q.truncate(size));
      }
      jobs.push(q.write(off, data));
    }
    await Promise.all(jobs);
  }
  t.equal(q.size, size, 'grown');
  const got = await readAll(q);
  const want = model.subarray(0, size);
  t.ok(got.equals(want), `every write landed: ${describeDifference(got, want)}`);
  await g.closeAll();
  await assertCleanCheck(t, img, 'grown during writes');
  const r = await compareImage(img, want, dir);
  t.equal(r.code, 0, `qemu-img compare${r.code === 0 ? '' : `\n${r.stdout}${r.stderr}`}`);
});
