/**
 * Block copy: the state shared by a backup job's background copy and its
 * copy-before-write hook (QEMU's block/block-copy.c).
 *
 * A bitmap at the job's cluster size says which clusters still have to be
 * copied from source to target. Whoever copies a cluster first (the job's
 * workers, or a guest write that is about to overwrite it) clears its bit;
 * a cluster being copied is "in flight", and anyone else who needs it waits
 * for that copy instead of starting another. A copy reads the source's
 * current data, so a cluster must be copied before any write changes it:
 * that is what keeps the backup at the point in time the job started.
 *
 * Snapshot reads (fleecing: readers of the target see the point in time)
 * take a cluster from the source while it is still to copy, holding it so
 * that a guest write waits until the read is over, and from the target once
 * it was copied. The decision and the hold are one synchronous step, so no
 * guest write can slip between them. When the point in time is given up
 * (the scratch limit is exceeded, or the job has ended) snapshot reads of
 * clusters that were never saved fail instead of returning newer data.
 */
import { DirtyBitmap } from '../block/dirty-bitmap.js';
import type { BlockNode, Extent } from '../block/node.js';
import { ReqFlags, Status } from '../block/node.js';
import { VdiskError } from '../errors.js';

/** Largest single copy (contiguous clusters are copied together up to this). */
const MAX_COPY = 1024 * 1024;
/** Copy buffers kept for reuse: one per copy in flight (the job's 8 workers, and copies for guest writes). */
const SPARE_BUFFERS = 16;

/** A failed copy, with the side that failed (for on-source-error / on-target-error). */
export class CopyError extends VdiskError {
  constructor(
    readonly operation: 'read' | 'write',
    readonly inner: VdiskError,
  ) {
    super(inner.errno, inner.message, { cause: inner });
  }
}

export class BlockCopy {
  /** Set bits: clusters still to copy. An anonymous, disabled bitmap (QEMU lists it on the filter node). */
  readonly toCopy: DirtyBitmap;
  private readonly inflight = new Map<number, Promise<void>>();
  /** Called with the bytes each finished copy moved (job progress). */
  onProgress: (bytes: number) => void = () => undefined;
  /** sync=top: ranges the source's top layer does not allocate are skipped. */
  topOnly = false;
  /** compress=on: data goes to the target as compressed clusters (qcow2). */
  compress = false;
  /** Called with the bytes of each copy started for a guest write (they count against the job's speed). */
  onGuestCopy: (bytes: number) => void = () => undefined;
  /** Called with the bytes skipped as unallocated (sync=top). */
  onSkip: (bytes: number) => void = () => undefined;
  /** Most bytes copies for guest writes may put in the target (x-scratch-limit); 0: no limit. */
  scratchLimit = 0;
  /** Bytes copied for guest writes so far. */
  guestCopied = 0;
  /** Why the point in time was given up; snapshot reads of clusters never saved fail with it. */
  broken: VdiskError | undefined;
  /** Called once when the point in time is given up because of the scratch limit. */
  onBreak: (err: VdiskError) => void = () => undefined;
  /** Snapshot readers holding source clusters: cluster -> readers, and who waits for them to go. */
  private readonly held = new Map<number, { readers: number; gone: Promise<void>; release: () => void }>();
  /**
   * Copy buffers, reused from one run to the next. A fresh buffer per copy cost more than the
   * copy itself: its memory is new to the process (malloc, or mmap for 1 MiB) and first touching
   * it page-faults every 4 KiB, then the garbage collector frees it again (measured in this VM:
   * a cached 64 KiB read into a fresh buffer ~210 us, into a reused one ~13 us;
   * docs/design/backup.md, "Backup benchmark").
   */
  private readonly spare: Buffer[] = [];

  constructor(
    readonly source: BlockNode,
    readonly target: BlockNode,
    readonly clusterSize: number,
  ) {
    this.toCopy = new DirtyBitmap(undefined, clusterSize, source.size, { enabled: false });
  }

  get size(): number {
    return this.source.size;
  }

  /** Bytes still to copy. */
  get remaining(): number {
    return Math.min(this.toCopy.count, this.size);
  }

  /**
   * Copies every cluster of [offset, offset + length) that still needs it,
   * and waits for ones others are copying. After this resolves, none of the
   * range's old data remains to be saved.
   */
  async copyRange(offset: number, length: number): Promise<void> {
    const cs = this.clusterSize;
    const first = Math.floor(offset / cs);
    const end = Math.min(Math.ceil((offset + length) / cs), this.toCopy.bits.size);
    const waits: Array<Promise<void>> = [];
    let c = first;
    while (c < end && !this.broken) {
      const busy = this.inflight.get(c);
      if (busy) {
        waits.push(busy);
        c++;
        continue;
      }
      if (!this.toCopy.bits.get(c)) {
        c++;
        continue;
      }
      // A run of clusters to copy that nobody else is copying.
      let n = 1;
      while (c + n < end && n * cs < MAX_COPY && this.toCopy.bits.get(c + n) && !this.inflight.has(c + n)) n++;
      const bytes = this.runBytes(c, n);
      if (this.scratchLimit > 0 && this.guestCopied + bytes > this.scratchLimit) {
        // Saving this would pass the limit: the backup gives up its point in time, the guest's
        // write goes on (a full scratch disk must not fail the guest).
        this.giveUp(
          new VdiskError('ENOSPC', `copy-before-write needs more than the scratch limit of ${this.scratchLimit} bytes (x-scratch-limit): the point in time is given up`, {
            code: 'VDISK_SCRATCH_LIMIT',
          }),
        );
        this.onBreak(this.broken!);
        break;
      }
      this.guestCopied += bytes;
      waits.push(this.copyClusters(c, n));
      this.onGuestCopy(bytes);
      c += n;
    }
    await Promise.all(waits);
    // A snapshot reader may still be reading these clusters from the source: the write waits for it.
    await this.readersGone(first, end);
  }

  /** Gives up the point in time: snapshot reads of clusters never saved fail with `why` from now on. */
  giveUp(why: VdiskError): void {
    this.broken ??= why;
    // Nothing is copied any more; a fleecing view may keep this object for as long as its overlay lives.
    this.spare.length = 0;
  }

  /**
   * Reads the point-in-time content of [offset, offset + buf.length): from
   * the source for clusters still to copy (held, so guest writes wait for the
   * read), from the target for clusters already copied.
   */
  async snapshotRead(offset: number, buf: Buffer): Promise<void> {
    const end = offset + buf.length;
    for (let pos = offset; pos < end; ) {
      const run = this.snapshotRun(pos, end);
      if (run.kind === 'inflight') {
        await run.wait;
        continue;
      }
      const part = buf.subarray(pos - offset, run.end - offset);
      if (run.kind === 'source') {
        try {
          await this.source.read(pos, part);
        } finally {
          this.unhold(run.first, run.count);
        }
      } else {
        await this.target.read(pos, part);
      }
      pos = run.end;
    }
  }

  /** Block status of the point in time at offset (the run it starts), by the same rules as snapshotRead. */
  async snapshotBlockStatus(offset: number, length: number): Promise<Extent> {
    for (;;) {
      const run = this.snapshotRun(offset, offset + length);
      if (run.kind === 'inflight') {
        await run.wait;
        continue;
      }
      if (run.kind === 'target') return this.target.blockStatus(offset, run.end - offset);
      try {
        return await this.source.blockStatus(offset, run.end - offset);
      } finally {
        this.unhold(run.first, run.count);
      }
    }
  }

  /**
   * Classifies the clusters from pos on, as one synchronous step: a run still
   * to copy (then held for the caller), one being copied, or one copied.
   */
  private snapshotRun(pos: number, end: number):
    | { kind: 'source'; end: number; first: number; count: number }
    | { kind: 'target'; end: number }
    | { kind: 'inflight'; wait: Promise<unknown> } {
    const cs = this.clusterSize;
    const c = Math.floor(pos / cs);
    const busy = this.inflight.get(c);
    if (busy) return { kind: 'inflight', wait: busy.catch(() => undefined) };
    const last = Math.ceil(end / cs);
    const toCopy = this.toCopy.bits.get(c);
    if (toCopy && this.broken) throw new VdiskError('EACCES', `cannot read the point in time at ${pos}: ${this.broken.message}`);
    let n = 1;
    while (c + n < last && this.toCopy.bits.get(c + n) === toCopy && !this.inflight.has(c + n)) n++;
    const runEnd = Math.min(end, (c + n) * cs);
    if (!toCopy) return { kind: 'target', end: runEnd };
    for (let i = 0; i < n; i++) this.hold(c + i);
    return { kind: 'source', end: runEnd, first: c, count: n };
  }

  private hold(c: number): void {
    const h = this.held.get(c);
    if (h) {
      h.readers++;
      return;
    }
    let release!: () => void;
    const gone = new Promise<void>((r) => (release = r));
    this.held.set(c, { readers: 1, gone, release });
  }

  private unhold(first: number, count: number): void {
    for (let c = first; c < first + count; c++) {
      const h = this.held.get(c);
      if (!h) continue;
      if (--h.readers === 0) {
        this.held.delete(c);
        h.release();
      }
    }
  }

  /** Resolves when no snapshot reader holds a cluster of [first, end). */
  private async readersGone(first: number, end: number): Promise<void> {
    if (this.held.size === 0) return;
    for (const [c, h] of [...this.held]) if (c >= first && c < end) await h.gone;
  }

  /**
   * Starts copying the next run of clusters at or after `cluster` that needs
   * it and that nobody is copying; returns its end (to continue from) and
   * its promise, or undefined when nothing is left. Choosing and marking
   * in flight happen in one synchronous step, so a guest write can never
   * make a worker copy a cluster twice (the second copy would read data
   * written after the point in time).
   */
  startNext(cluster: number): { end: number; bytes: number; done: Promise<void> } | undefined {
    let c = this.toCopy.bits.nextSet(cluster);
    while (c >= 0 && this.inflight.has(c)) c = this.toCopy.bits.nextSet(c + 1);
    if (c < 0) return undefined;
    let n = 1;
    while (n * this.clusterSize < MAX_COPY && this.toCopy.bits.get(c + n) && !this.inflight.has(c + n)) n++;
    return { end: c + n, bytes: this.runBytes(c, n), done: this.copyClusters(c, n) };
  }

  /** The bytes of clusters [c, c + n) that lie inside the source. */
  private runBytes(c: number, n: number): number {
    return Math.max(0, Math.min(n * this.clusterSize, this.size - c * this.clusterSize));
  }

  /** Copies clusters [c, c + n) (all still to copy, none in flight): registered in flight at once. */
  private copyClusters(c: number, n: number): Promise<void> {
    const p = this.doCopy(c, n);
    for (let i = 0; i < n; i++) this.inflight.set(c + i, p);
    const cleanup = () => {
      for (let i = 0; i < n; i++) if (this.inflight.get(c + i) === p) this.inflight.delete(c + i);
    };
    p.then(cleanup, cleanup);
    return p;
  }

  private async doCopy(c: number, n: number): Promise<void> {
    const cs = this.clusterSize;
    const offset = c * cs;
    const length = Math.min(n * cs, this.size - offset);
    if (length <= 0) {
      this.toCopy.bits.reset(c, n);
      return;
    }
    if (this.compress && !this.topOnly) {
      await this.copyCompressed(offset, length);
      this.toCopy.bits.reset(c, n);
      this.onProgress(length);
      return;
    }
    let skipped = 0;
    // One buffer for the run (extents are its parts); given back only after a copy that went well:
    // a failed one may leave a request still using it.
    let buffer: Buffer | undefined;
    // Extent by extent: zero ranges are written as zeroes (a qcow2 target records them, so they
    // do not read through to its backing file); data is read now, before anything overwrites it.
    for (let at = offset; at < offset + length; ) {
      let st;
      try {
        st = await this.source.blockStatus(at, offset + length - at);
      } catch (err) {
        throw new CopyError('read', err as VdiskError);
      }
      const n = st.length;
      if (this.topOnly && st.depth !== 1) {
        // sync=top: the target shares the source's backing file; what the top layer does not
        // allocate needs no copy (and is not counted).
        skipped += n;
      } else if (st.flags & Status.ZERO) {
        try {
          await this.target.writeZeroes(at, n, ReqFlags.MAY_UNMAP);
        } catch (err) {
          throw new CopyError('write', err as VdiskError);
        }
      } else {
        buffer ??= this.takeBuffer(length);
        const buf = buffer.subarray(at - offset, at - offset + n);
        try {
          await this.source.read(at, buf);
        } catch (err) {
          throw new CopyError('read', err as VdiskError);
        }
        try {
          await this.target.write(at, buf);
        } catch (err) {
          throw new CopyError('write', err as VdiskError);
        }
      }
      at += n;
    }
    if (buffer) this.giveBack(buffer);
    this.toCopy.bits.reset(c, n);
    if (skipped) this.onSkip(skipped);
    this.onProgress(length - skipped);
  }

  /** A copy buffer for a run of `length` bytes (the spare ones hold the largest run, MAX_COPY or one job cluster). */
  private takeBuffer(length: number): Buffer {
    const size = Math.max(MAX_COPY, this.clusterSize);
    if (length > size) return Buffer.allocUnsafeSlow(length);
    return this.spare.pop() ?? Buffer.allocUnsafeSlow(size);
  }

  private giveBack(buf: Buffer): void {
    if (!this.broken && this.spare.length < SPARE_BUFFERS && buf.length === Math.max(MAX_COPY, this.clusterSize)) this.spare.push(buf);
  }

  /** The whole run read at once, then each target cluster written compressed (or as zeroes). */
  private async copyCompressed(offset: number, length: number): Promise<void> {
    const buffer = this.takeBuffer(length);
    const buf = buffer.subarray(0, length);
    try {
      await this.source.read(offset, buf);
    } catch (err) {
      throw new CopyError('read', err as VdiskError);
    }
    const tcs = this.target.compressionClusterSize;
    try {
      for (let at = 0; at < length; at += tcs) {
        const piece = buf.subarray(at, Math.min(length, at + tcs));
        if (piece.every((x) => x === 0)) await this.target.writeZeroes(offset + at, piece.length, ReqFlags.MAY_UNMAP);
        else await this.target.writeCompressed(offset + at, piece);
      }
    } catch (err) {
      throw new CopyError('write', err as VdiskError);
    }
    this.giveBack(buffer);
  }

  /** Waits for every copy in flight (before the job ends). */
  async drain(): Promise<void> {
    while (this.inflight.size) await Promise.allSettled([...new Set(this.inflight.values())]);
  }
}
