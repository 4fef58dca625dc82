/**
 * Crash-safe persistent bitmaps: vdisk's addition to QEMU's persistent
 * bitmaps, and the default for them.
 *
 * QEMU marks a persistent bitmap "in use" on disk while the image is open and
 * stores it at a clean close; after a crash it is inconsistent and the next
 * backup must be a full one. Here a bit is made durable on disk before the
 * write it describes is issued, so after kill -9 the stored bitmap is a
 * superset of what changed and the next incremental backup is still right.
 *
 * The cost is paid once per granule per backup cycle: a write whose granules
 * are already durable goes straight on (one range check per bitmap). Writes
 * needing new bits queue them; rounds of chunk writes run one after another,
 * each followed by one sync, so concurrent writers share a sync (group
 * commit). Bits are also marked in memory before the write (QEMU marks after;
 * a failed write marks too, as there), and writes in flight are remembered,
 * so that when a backup or a clear takes bits away, the content written back
 * ("resync") still covers every write that has not finished.
 *
 * The bits go where the node's BitmapStore keeps them (qcow2: the bitmap's
 * data clusters in the image; raw: a sidecar file), a chunk at a time.
 */
import { logEvent } from '../log.js';
import { toVdiskError } from '../errors.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import { SparseBitmap } from './sparse-bitmap.js';

/** What a store offers the tracker: in-place chunk writes and one sync. */
export interface ChunkStore {
  /** Bytes of bitmap data written in place at once (qcow2: one bitmap data cluster; sidecar: 4 KiB). */
  readonly chunkBytes: number;
  /** Writes chunks of a bitmap's data in place (each `chunkBytes` long, the last maybe shorter). */
  writeChunks(bitmap: DirtyBitmap, chunks: Array<{ index: number; data: Buffer }>): Promise<void>;
  /** Makes every chunk written so far durable. */
  sync(): Promise<void>;
}

interface Tracked {
  /** What is on disk, as far as the last finished round knows. */
  durable: SparseBitmap;
  /** What must be on disk: durable plus bits waiting for a round. */
  queued: SparseBitmap;
  /** Chunks of `queued` that differ from `durable`. */
  dirty: Set<number>;
}

export class CrashSafeBitmaps {
  private readonly tracked = new Map<string, Tracked>();
  /** Writes between before() and the moment they settled: [offset, end). */
  private readonly inflight: Array<[number, number]> = [];
  private running: Promise<void> | undefined;
  private waiting: Promise<void> | undefined;
  /** Rounds and store rewrites never overlap (a rewrite moves the chunks a round writes to). */
  private exclusive: Promise<void> = Promise.resolve();

  constructor(
    private readonly store: ChunkStore,
    /** The node's bitmaps, looked up by name each time (a backup's success gives the name to another object). */
    private readonly bitmaps: () => readonly DirtyBitmap[],
  ) {}

  /** Whether any bitmap is tracked (the node's write hook is installed while so). */
  get active(): boolean {
    return this.tracked.size > 0;
  }

  /** Starts tracking a crash-safe bitmap whose on-disk content is `onDisk` (a copy is kept). */
  track(name: string, onDisk: SparseBitmap): void {
    this.tracked.set(name, { durable: onDisk.clone(), queued: onDisk.clone(), dirty: new Set() });
  }

  untrack(name: string): void {
    this.tracked.delete(name);
  }

  isTracked(name: string): boolean {
    return this.tracked.has(name);
  }

  /**
   * Runs `change` (track or untrack bitmaps), then `rewrite` (the store
   * writing its bitmaps afresh: a new directory, a new sidecar), with no
   * round in progress. It is handed, for each tracked
   * bitmap, the content to write: a snapshot of everything promised so far.
   * Afterwards that snapshot is what the disk holds; bits queued meanwhile
   * are written by the next round.
   */
  async exclusively(change: () => void, rewrite: (content: Map<string, SparseBitmap>) => Promise<void>): Promise<void> {
    const turn = this.exclusive.then(async () => {
      // Tracking starts or stops inside the turn, so no round writes a bitmap the store has no place for yet.
      change();
      const snapshot = new Map<string, SparseBitmap>();
      for (const [name, t] of this.tracked) snapshot.set(name, t.queued.clone());
      await rewrite(snapshot);
      const chunkBits = this.store.chunkBytes * 8;
      for (const [name, written] of snapshot) {
        const t = this.tracked.get(name);
        if (!t) continue;
        t.durable = written;
        t.dirty.clear();
        for (let c = 0; c * chunkBits < t.queued.size; c++) {
          if (!t.queued.bytesOf(c * chunkBits, chunkBits).equals(written.bytesOf(c * chunkBits, chunkBits))) t.dirty.add(c);
        }
      }
      if ([...this.tracked.values()].some((t) => t.dirty.size)) void this.requestRound().catch(() => undefined);
    });
    this.exclusive = turn.catch(() => undefined);
    return turn;
  }

  /**
   * What a bitmap must hold on disk now: its bits, its successor's (a
   * backup's outcome may keep either), and the granules of writes in flight.
   */
  exactContent(b: DirtyBitmap): SparseBitmap {
    const exact = b.bits.clone();
    if (b.successor) exact.merge(b.successor.bits);
    for (const [o, e] of this.inflight) {
      const first = Math.floor(o / b.granularity);
      const last = Math.min(Math.ceil(e / b.granularity), exact.size);
      if (last > first) exact.set(first, last - first);
    }
    return exact;
  }

  /** The node's size changed: every tracked bitmap follows (the store rewrites its layout). */
  resize(bits: (name: string) => number): void {
    for (const [name, t] of this.tracked) {
      const n = bits(name);
      t.durable.resize(n);
      t.queued.resize(n);
    }
  }

  /**
   * Before a write, write-zeroes or discard reaches the driver: marks the
   * recording bitmaps in memory and waits until their bits for the range are
   * durable. Returns what the node calls once the request has settled.
   */
  readonly before = async (offset: number, length: number): Promise<(() => void) | undefined> => {
    if (this.tracked.size === 0) return undefined;
    const end = offset + length;
    const entry: [number, number] = [offset, end];
    this.inflight.push(entry);
    const settled = (): void => {
      const i = this.inflight.indexOf(entry);
      if (i >= 0) this.inflight.splice(i, 1);
    };
    let wait = false;
    for (const b of this.bitmaps()) {
      if (b.name === undefined) continue;
      const t = this.tracked.get(b.name);
      if (!t) continue;
      const recording = b.successor?.enabled ? b.successor : b.enabled ? b : undefined;
      if (!recording) continue;
      recording.mark(offset, length);
      const g = b.granularity;
      const first = Math.floor(offset / g);
      const last = Math.min(Math.ceil(end / g), t.durable.size);
      if (first >= last) continue;
      const clear = t.durable.nextClear(first);
      if (clear < 0 || clear >= last) continue;
      t.queued.set(first, last - first);
      const chunkBits = this.store.chunkBytes * 8;
      for (let c = Math.floor(first / chunkBits); c <= Math.floor((last - 1) / chunkBits); c++) t.dirty.add(c);
      wait = true;
    }
    if (wait) {
      try {
        await this.requestRound();
      } catch (err) {
        settled();
        throw err;
      }
    }
    return settled;
  };

  /**
   * A tracked bitmap lost bits (a backup succeeded, a clear): writes back its
   * exact content plus every write still in flight, so the next cycle pays
   * for its own writes again instead of carrying old ones forever.
   */
  async resync(name: string): Promise<void> {
    const t = this.tracked.get(name);
    const b = this.bitmaps().find((x) => x.name === name);
    if (!t || !b) return;
    const exact = this.exactContent(b);
    t.queued = exact;
    const chunkBits = this.store.chunkBytes * 8;
    for (let c = 0; c * chunkBits < exact.size; c++) {
      if (!exact.bytesOf(c * chunkBits, chunkBits).equals(t.durable.bytesOf(c * chunkBits, chunkBits))) t.dirty.add(c);
    }
    if (t.dirty.size) await this.requestRound();
  }

  /** Resolves after a round that starts now or later has finished (group commit). */
  private requestRound(): Promise<void> {
    if (this.waiting) return this.waiting;
    if (!this.running) return (this.running = this.round());
    this.waiting = this.running
      .catch(() => undefined)
      .then(() => {
        this.waiting = undefined;
        return (this.running = this.round());
      });
    return this.waiting;
  }

  private round(): Promise<void> {
    const turn = this.exclusive.then(async () => {
      try {
        const work: Array<{ t: Tracked; b: DirtyBitmap; chunks: Array<{ index: number; data: Buffer }> }> = [];
        const chunkBits = this.store.chunkBytes * 8;
        for (const b of this.bitmaps()) {
          const t = b.name === undefined ? undefined : this.tracked.get(b.name);
          if (!t || t.dirty.size === 0) continue;
          const chunks = [...t.dirty].sort((x, y) => x - y).map((index) => ({ index, data: t.queued.bytesOf(index * chunkBits, chunkBits) }));
          t.dirty.clear();
          work.push({ t, b, chunks });
        }
        if (work.length === 0) return;
        try {
          for (const w of work) await this.store.writeChunks(w.b, w.chunks);
          await this.store.sync();
        } catch (err) {
          // Nothing can be promised: the waiting writes fail (their data must not land without its bit).
          for (const w of work) for (const c of w.chunks) w.t.dirty.add(c.index);
          const e = toVdiskError(err, 'storing crash-safe bitmap bits');
          logEvent('error', 'bitmap-persist-failed', { bitmaps: work.map((w) => w.b.name), error: e.message });
          throw e;
        }
        // What the disk now holds is what was written, not what has been queued since.
        for (const w of work) {
          for (const c of w.chunks) {
            const first = c.index * chunkBits;
            const n = Math.min(chunkBits, w.t.durable.size - first);
            if (n <= 0) continue;
            w.t.durable.reset(first, n);
            w.t.durable.setFromBytes(c.data, first, n);
          }
        }
      } finally {
        this.running = undefined;
      }
    });
    this.exclusive = turn.catch(() => undefined);
    return turn;
  }
}
