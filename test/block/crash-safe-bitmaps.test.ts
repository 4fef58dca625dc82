/**
 * The crash-safe bitmap tracker against a store that records what reached
 * "disk" and when: a write waits until its bits are synced; writes whose
 * bits are durable pay nothing; concurrent writers share one sync; a resync
 * after a clear writes back less but never drops a write still in flight; a
 * failed store fails the write. Plus SparseBitmap's byte-range helpers.
 */
import t from 'tap';
import { CrashSafeBitmaps, type ChunkStore } from '../../src/block/crash-safe-bitmaps.js';
import { DirtyBitmap } from '../../src/block/dirty-bitmap.js';
import { SparseBitmap } from '../../src/block/sparse-bitmap.js';

const G = 65536;
const SIZE = 64 * 1024 * 1024; // 1024 granules

/** A store whose "disk" is a SparseBitmap per bitmap, updated only by sync(). */
class FakeStore implements ChunkStore {
  readonly chunkBytes = 16; // 128 bits a chunk, so ranges cross chunks in the tests
  disk = new Map<string, SparseBitmap>();
  private pending: Array<{ name: string; index: number; data: Buffer }> = [];
  syncs = 0;
  writes = 0;
  failNext = false;
  gate: Promise<void> | undefined;

  async writeChunks(b: DirtyBitmap, chunks: Array<{ index: number; data: Buffer }>): Promise<void> {
    this.writes += chunks.length;
    for (const c of chunks) this.pending.push({ name: b.name!, ...c });
  }

  async sync(): Promise<void> {
    if (this.gate) await this.gate;
    if (this.failNext) {
      this.failNext = false;
      this.pending = [];
      throw new Error('EIO on the bitmap store');
    }
    this.syncs++;
    for (const p of this.pending) {
      const d = this.disk.get(p.name)!;
      const first = p.index * this.chunkBytes * 8;
      const n = Math.min(this.chunkBytes * 8, d.size - first);
      d.reset(first, n);
      d.setFromBytes(p.data, first, n);
    }
    this.pending = [];
  }
}

function setUp() {
  const store = new FakeStore();
  const b = new DirtyBitmap('b', G, SIZE, { persistent: true });
  const list = [b];
  store.disk.set('b', new SparseBitmap(b.bits.size));
  const cs = new CrashSafeBitmaps(store, () => list);
  cs.track('b', store.disk.get('b')!);
  return { store, b, list, cs };
}

const onDisk = (store: FakeStore, granule: number) => store.disk.get('b')!.get(granule);

t.test('a write goes on only once its bits are synced; durable bits cost nothing', async (t) => {
  const { store, cs, b } = setUp();
  let release!: () => void;
  store.gate = new Promise((r) => (release = r));
  let through = false;
  let done: (() => void) | undefined;
  const w = cs.before(5 * G + 100, 3 * G).then((d) => {
    through = true;
    done = d ?? undefined;
  });
  await new Promise((r) => setImmediate(r));
  t.notOk(through, 'held until the sync');
  t.ok(b.bits.get(5) && b.bits.get(8), 'marked in memory before the write');
  release();
  store.gate = undefined;
  await w;
  t.ok([5, 6, 7, 8].every((g) => onDisk(store, g)), 'granules 5..8 are on disk before the write goes on');
  t.notOk(onDisk(store, 4) || onDisk(store, 9), 'and nothing else');
  done!();
  const syncs = store.syncs;
  await cs.before(6 * G, 4096);
  t.equal(store.syncs, syncs, 'a write into durable granules needs no sync');
});

t.test('concurrent writers share a sync (group commit)', async (t) => {
  const { store, cs } = setUp();
  let release!: () => void;
  store.gate = new Promise((r) => (release = r));
  const first = cs.before(0, G);
  await new Promise((r) => setImmediate(r));
  // While the first round is held, 50 more writers queue bits: they must all go in one more round.
  const more = Array.from({ length: 50 }, (_, i) => cs.before((100 + i * 3) * G, G));
  release();
  store.gate = undefined;
  await Promise.all([first, ...more]);
  t.equal(store.syncs, 2, 'two syncs for 51 writers');
  t.ok(Array.from({ length: 50 }, (_, i) => onDisk(store, 100 + i * 3)).every(Boolean), 'every bit is on disk');
});

t.test('a disabled bitmap is not touched; a successor records during a backup', async (t) => {
  const { store, cs, b, list } = setUp();
  b.enabled = false;
  await cs.before(10 * G, G);
  t.notOk(onDisk(store, 10), 'disabled: no bit');
  b.enabled = true;
  const s = b.createSuccessor(SIZE, { userDescription: 'test job' } as never);
  list.unshift(s);
  await cs.before(20 * G, G);
  t.ok(s.bits.get(20), 'the successor is marked');
  t.notOk(b.bits.get(20), 'the frozen bitmap is not');
  t.ok(onDisk(store, 20), 'but the stored bitmap (under its name) has the bit');
});

t.test('resync after a clear writes less, but keeps writes still in flight', async (t) => {
  const { store, cs, b } = setUp();
  const first = await cs.before(1 * G, G);
  first!();
  const inflight = await cs.before(300 * G, G); // still in flight (not settled)
  t.ok(onDisk(store, 1) && onDisk(store, 300));
  b.bits.clear();
  await cs.resync('b');
  t.notOk(onDisk(store, 1), 'a finished write is forgotten after the clear');
  t.ok(onDisk(store, 300), 'the write in flight keeps its bit');
  inflight!();
  const syncs = store.syncs;
  await cs.before(1 * G, 512);
  t.equal(store.syncs, syncs + 1, 'the next cycle pays again for granule 1');
});

t.test('a store that fails fails the write that needed it', async (t) => {
  const { store, cs } = setUp();
  store.failNext = true;
  await t.rejects(cs.before(7 * G, G), /EIO on the bitmap store/);
  t.notOk(onDisk(store, 7));
  await cs.before(7 * G, G);
  t.ok(onDisk(store, 7), 'a later write retries the bits');
});

t.test('a rewrite takes a snapshot; bits queued during it go in the next round', async (t) => {
  const { store, cs } = setUp();
  let during: Promise<void> | undefined;
  await cs.exclusively(() => undefined, async (content) => {
    t.ok(content.has('b'));
    during = cs.before(42 * G, G);
    // The rewrite "writes" the snapshot it was given.
    store.disk.set('b', content.get('b')!.clone());
  });
  await during;
  t.ok(onDisk(store, 42), 'the write queued during the rewrite still got its bit');
});

t.test('SparseBitmap.bytesOf and copyRange', async (t) => {
  const s = new SparseBitmap(100000);
  s.set(8, 3);
  s.set(40000, 17);
  const bytes = s.bytesOf(0, 64);
  t.equal(bytes[1], 0b111, 'bits 8..10 are byte 1, bits 0..2');
  const far = s.bytesOf(40000, 24);
  t.same([...far], [0xff, 0xff, 0x01], 'a range across the chunk boundary');
  const d = new SparseBitmap(100000);
  d.set(0, 100000);
  d.copyRange(s, 39936, 256);
  t.equal(d.get(39999), false);
  t.equal(d.get(40000), true);
  t.equal(d.get(40017), false);
  t.equal(d.get(39935), true, 'outside the range stays');
  const end = new SparseBitmap(12);
  end.set(0, 12);
  t.same([...end.bytesOf(8, 16)], [0x0f, 0], 'bits past the end read as clear');
});
