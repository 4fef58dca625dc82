/**
 * The sparse bitmap under dirty bitmaps (src/block/sparse-bitmap.ts) against
 * a plain one-byte-per-bit model: random sets, resets, resizes and merges,
 * then every query (get, count, nextSet, nextClear, bytes) must agree. Also
 * the memory promise: a huge bitmap costs almost nothing until bits are set.
 */
import t from 'tap';
import { createHash } from 'node:crypto';
import { SparseBitmap } from '../../src/block/sparse-bitmap.js';
import { rng } from '../helpers/tools.js';

function check(t: Parameters<Parameters<typeof t.test>[1]>[0], b: SparseBitmap, model: Uint8Array, what: string): void {
  let count = 0;
  for (const v of model) count += v;
  t.equal(b.count(), count, `${what}: count`);
  // nextSet / nextClear from a sample of positions, compared with a scan of the model.
  const positions = [0, 1, 31, 32, 33, model.length - 1, model.length];
  for (let k = 0; k < 40; k++) positions.push(Math.floor((k / 40) * model.length));
  for (const p of positions) {
    let s = -1;
    for (let i = p; i < model.length; i++) if (model[i]) {
      s = i;
      break;
    }
    let c = -1;
    for (let i = p; i < model.length; i++) if (!model[i]) {
      c = i;
      break;
    }
    if (b.nextSet(p) !== s || b.nextClear(p) !== c) {
      t.fail(`${what}: nextSet(${p}) = ${b.nextSet(p)} (want ${s}), nextClear(${p}) = ${b.nextClear(p)} (want ${c})`);
      return;
    }
  }
  const bytes = b.bytes();
  t.equal(bytes.length, Math.max(1, Math.ceil(model.length / 64)) * 8, `${what}: bytes() is whole 64-bit words`);
  for (let i = 0; i < model.length; i++) {
    if (((bytes[i >> 3] >> (i & 7)) & 1) !== model[i] || b.get(i) !== (model[i] === 1)) {
      t.fail(`${what}: bit ${i} differs`);
      return;
    }
  }
  t.pass(`${what}: every bit agrees`);
}

t.test('random operations agree with a plain model', async (t) => {
  const seed = Number(process.env.VDISK_SEED ?? 20261122);
  t.comment(`seed ${seed} (set VDISK_SEED to reproduce)`);
  const random = rng(seed);
  for (const size of [1, 31, 32, 33, 100_000, 200_003]) {
    const b = new SparseBitmap(size);
    let model = new Uint8Array(size);
    for (let op = 0; op < 400; op++) {
      const r = random();
      const start = Math.floor(random() * size);
      const len = Math.floor(random() * (random() < 0.2 ? size : 70_000)) + 1;
      if (r < 0.45) {
        b.set(start, len);
        model.fill(1, start, Math.min(size, start + len));
      } else if (r < 0.85) {
        b.reset(start, len);
        model.fill(0, start, Math.min(size, start + len));
      } else if (r < 0.9) {
        const other = new SparseBitmap(size);
        const o0 = Math.floor(random() * size);
        const ol = Math.floor(random() * 50_000) + 1;
        other.set(o0, ol);
        b.merge(other);
        model.fill(1, o0, Math.min(size, o0 + ol));
      } else if (r < 0.93 && size > 1) {
        // Shrink and grow back: the dropped bits must come back clear.
        const smaller = Math.floor(random() * size);
        b.resize(smaller);
        b.resize(size);
        model = Uint8Array.from(model, (v, i) => (i < smaller ? v : 0));
      } else if (r < 0.95) {
        const c = b.clone();
        c.reset(0, size);
        t.equal(c.count(), 0, 'a cleared clone');
      } else if (r < 0.96) {
        b.clear();
        model.fill(0);
      }
    }
    check(t, b, model, `size ${size}`);
  }
});

t.test('a 16 TiB disk at 64 KiB granularity: cheap when clean, fast to search', async (t) => {
  const bits = (16 * 1024 ** 4) / 65536; // 2^28
  const b = new SparseBitmap(bits);
  t.ok(b.memoryBytes() < 64 * 1024, `empty: ${b.memoryBytes()} bytes`);
  t.equal(b.nextSet(0), -1);
  t.equal(b.nextClear(0), 0);
  b.set(bits - 1, 1);
  b.set(12345, 3);
  t.equal(b.nextSet(0), 12345);
  t.equal(b.nextSet(12348), bits - 1, 'skips 8000 empty chunks');
  t.equal(b.count(), 4);
  t.ok(b.memoryBytes() < 128 * 1024, `two dirty places: ${b.memoryBytes()} bytes`);
  b.set(0, bits);
  t.equal(b.count(), bits);
  t.ok(b.memoryBytes() <= 33 * 1024 * 1024, `all dirty: ${(b.memoryBytes() / 1048576).toFixed(1)} MiB (a flat bitmap is 32 MiB)`);
  t.equal(b.nextClear(0), -1);
  b.reset(0, bits);
  t.equal(b.count(), 0);
  t.ok(b.memoryBytes() < 64 * 1024, 'chunks are freed when cleared');
});

t.test('bytes(): the layout QEMU hashes (little-endian 64-bit words)', async (t) => {
  const b = new SparseBitmap(130);
  b.set(0, 1);
  b.set(9, 1);
  b.set(64, 2);
  b.set(129, 1);
  const bytes = b.bytes();
  t.same([...bytes], [0x01, 0x02, 0, 0, 0, 0, 0, 0, 0x03, 0, 0, 0, 0, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0]);
  // An empty bitmap of 0 bits still hashes one zero word, as QEMU's.
  t.equal(createHash('sha256').update(new SparseBitmap(0).bytes()).digest('hex'), createHash('sha256').update(Buffer.alloc(8)).digest('hex'));
});
