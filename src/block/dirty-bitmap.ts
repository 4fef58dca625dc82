/**
 * Dirty bitmaps: which granules of a node were written since a point in
 * time, as QEMU's BdrvDirtyBitmap (block/dirty-bitmap.c; the contract is in
 * qapi/block-core.json and docs/interop/bitmaps.rst).
 *
 * A bitmap belongs to one node and sees every write, write-zeroes and
 * discard that reaches that node (the request path calls markDirty), while
 * it is enabled. A job that uses it (backup) makes it busy and gives it a
 * successor: the successor records new writes while the parent stays frozen
 * at the job's point in time; the job's outcome then abdicates (the
 * successor replaces the parent) or reclaims (the successor's bits go back
 * into the parent), so no write is ever lost track of. An NBD export that
 * publishes a bitmap holds it busy too, for the export's life.
 */
import { VdiskError } from '../errors.js';
import { SparseBitmap } from './sparse-bitmap.js';

export const MIN_GRANULARITY = 512;
export const MAX_GRANULARITY = 2 ** 31;
export const MAX_NAME_BYTES = 1023;

/** Whoever holds a bitmap busy: a backup job, an NBD export, a pending transaction action. */
export interface BitmapHolder {
  readonly userDescription: string;
}

/**
 * What a driver contributes to dirty bitmaps, as QEMU's BlockDriver
 * callbacks do (bdrv_get_info's cluster size, bdrv_co_can_store_new_dirty_bitmap,
 * bdrv_co_remove_persistent_dirty_bitmap). A node whose image can keep
 * persistent bitmaps (qcow2) sets BlockNode.bitmapDriver; the bitmap
 * operations (bitmap-ops.ts) ask it, so they need not know the driver.
 */
export interface BitmapDriverHooks {
  /** The image's cluster size: a new bitmap's default granularity follows it. */
  readonly clusterSize: number;
  /** Throws QEMU's error when a new persistent bitmap of this name and granularity could not be stored. */
  checkCanStore(name: string, granularity: number): void;
  /** A persistent bitmap was removed: it is no longer part of the image. */
  removePersistent(name: string): void;
  /**
   * Keeps the image's copy of a persistent bitmap true after a change (added,
   * removed, enabled or disabled, content changed other than by writes,
   * node resized), when the image is open writable. Crash-safe bitmaps need
   * this at once; QEMU-mode ones are marked in use and stored at close.
   */
  persistentChanged?(change: 'added' | 'removed' | 'flags' | 'content' | 'resized', bitmap?: DirtyBitmap, name?: string): Promise<void>;
  /** Whether new persistent bitmaps on this node are crash-safe unless asked otherwise. */
  readonly crashSafeDefault?: boolean;
}

export class DirtyBitmap {
  readonly bits: SparseBitmap;
  enabled: boolean;
  /**
   * Who holds the bitmap busy, if anyone. One holder at a time: a job, an
   * export and a pending remove all exclude each other, as in QEMU. Keeping
   * the holder (not a bare flag) means one user's release can never clear a
   * claim another user made.
   */
  private holder: BitmapHolder | undefined;
  persistent: boolean;
  /** A persistent bitmap found in use at load: its content cannot be trusted. */
  inconsistent = false;
  /** Why it is inconsistent, for query output and errors (set with `inconsistent` at load). */
  inconsistentReason: string | undefined;
  /**
   * Persistent and crash-safe (vdisk's default): its bits are on disk before
   * the writes they describe, so a crash leaves a superset, not an
   * inconsistent bitmap. False: QEMU's mode (in use while open).
   */
  crashSafe = false;
  /** This process keeps it true on disk (its image is open writable); false: as loaded, at rest. */
  maintained = false;
  /** Loaded after an unclean stop and still usable (crash-safe): it may hold more than what changed. */
  recovered = false;
  successor: DirtyBitmap | undefined;
  /** The node length it covers, in bytes. */
  size: number;

  constructor(
    /** undefined for internal, anonymous bitmaps (a successor). */
    public name: string | undefined,
    readonly granularity: number,
    size: number,
    options: { enabled?: boolean; persistent?: boolean } = {},
  ) {
    if (!Number.isInteger(Math.log2(granularity)) || granularity < MIN_GRANULARITY || granularity > MAX_GRANULARITY) {
      throw new VdiskError('EINVAL', 'Granularity must be power of 2 and at least 512');
    }
    this.size = size;
    this.bits = new SparseBitmap(Math.ceil(size / granularity));
    this.enabled = options.enabled ?? true;
    this.persistent = options.persistent ?? false;
  }

  /** Records a write to [offset, offset + length), rounded out to whole granules. */
  mark(offset: number, length: number): void {
    if (length <= 0) return;
    const g = this.granularity;
    const first = Math.floor(offset / g);
    const last = Math.ceil((offset + length) / g);
    this.bits.set(first, last - first);
  }

  /** Forgets writes to [offset, offset + length) (whole granules inside it only). */
  unmark(offset: number, length: number): void {
    const g = this.granularity;
    const first = Math.floor(offset / g);
    const last = Math.ceil((offset + length) / g);
    this.bits.reset(first, last - first);
  }

  /** Follows the node's size: new granules are clean, granules past a new end are dropped. */
  resize(size: number): void {
    this.size = size;
    this.bits.resize(Math.ceil(size / this.granularity));
    this.successor?.resize(size);
  }

  /** Dirty bytes, as QEMU counts them: set granules times the granularity. */
  get count(): number {
    return this.bits.count() * this.granularity;
  }

  /** Recording: enabled itself, or through a successor during a job. */
  get recording(): boolean {
    return this.enabled || (this.successor?.enabled ?? false);
  }

  /** The first dirty byte range at or after offset, at most maxLength long, or undefined. */
  nextDirtyArea(offset: number, end: number): { offset: number; length: number } | undefined {
    const g = this.granularity;
    const first = this.bits.nextSet(Math.floor(offset / g));
    if (first < 0 || first * g >= end) return undefined;
    const clear = this.bits.nextClear(first);
    const stop = Math.min(end, (clear < 0 ? this.bits.size : clear) * g);
    const start = Math.max(offset, first * g);
    return { offset: start, length: stop - start };
  }

  /** In use by a job, an export or a pending transaction (QEMU's "busy"). */
  get busy(): boolean {
    return this.holder !== undefined;
  }

  /**
   * Makes the bitmap busy on behalf of holder; refused with QEMU's busy error
   * when someone else holds it. Claiming again by the same holder is a no-op
   * (an export may list one bitmap twice, as QEMU allows).
   */
  claim(holder: BitmapHolder): void {
    if (this.holder !== undefined && this.holder !== holder) this.check({ busy: true });
    this.holder = holder;
  }

  /** Ends holder's claim; a release by anyone else changes nothing. */
  release(holder: BitmapHolder): void {
    if (this.holder === holder) this.holder = undefined;
  }

  /** QEMU's check flags for commands (bdrv_dirty_bitmap_check). */
  check(flags: { busy?: boolean; readOnly?: boolean; inconsistent?: boolean }, nodeReadOnly = false): void {
    const name = this.name ?? '';
    if (flags.busy && this.busy) throw new VdiskError('EBUSY', `Bitmap '${name}' is currently in use by another operation and cannot be used`);
    if (flags.readOnly && nodeReadOnly) throw new VdiskError('EROFS', `Bitmap '${name}' is readonly and cannot be modified`);
    if (flags.inconsistent && this.inconsistent) {
      // QEMU appends this hint for humans: qemu-img prints it, QMP never sends it.
      throw new VdiskError('EINVAL', `Bitmap '${name}' is inconsistent and cannot be used`, {
        hint: 'Try block-dirty-bitmap-remove to delete this bitmap from disk',
        advice: this.state().reason,
      });
    }
  }

  /** Starts a job's use: a successor records from now on, the bitmap itself is frozen and busy. */
  createSuccessor(size: number, job: BitmapHolder): DirtyBitmap {
    if (this.busy) throw new VdiskError('EBUSY', `Cannot create a successor for a bitmap currently in use`);
    if (this.successor) throw new VdiskError('EBUSY', 'Cannot create a successor for a bitmap that already has one');
    const s = new DirtyBitmap(undefined, this.granularity, size, { enabled: this.enabled });
    this.successor = s;
    this.enabled = false;
    this.holder = job;
    return s;
  }

  /**
   * Job success (or bitmap-mode always): the successor takes over, so the
   * bitmap now holds only what was written since the job started.
   * Returns the bitmap that now carries the name (the successor).
   */
  abdicate(): DirtyBitmap {
    const s = this.successor;
    if (!s) throw new VdiskError('EINVAL', `bitmap '${this.name}' has no successor`);
    s.name = this.name;
    s.persistent = this.persistent;
    s.crashSafe = this.crashSafe;
    s.maintained = this.maintained;
    this.successor = undefined;
    this.name = undefined;
    this.holder = undefined;
    return s;
  }

  /** Job failure or cancel (or bitmap-mode never): everything the successor saw goes back in. */
  reclaim(): DirtyBitmap {
    const s = this.successor;
    if (!s) throw new VdiskError('EINVAL', `bitmap '${this.name}' has no successor`);
    this.bits.merge(s.bits);
    this.enabled = s.enabled;
    this.successor = undefined;
    this.holder = undefined;
    return this;
  }

  /** ORs another bitmap's dirty ranges in (granularities may differ). */
  mergeFrom(other: DirtyBitmap): void {
    if (other.granularity === this.granularity) {
      this.bits.merge(other.bits);
      return;
    }
    const end = other.bits.size * other.granularity;
    for (let at = 0; at < end; ) {
      const area = other.nextDirtyArea(at, end);
      if (!area) break;
      this.mark(area.offset, area.length);
      at = area.offset + area.length;
    }
  }

  /**
   * What the bitmap is doing and why, in words (vdisk's addition to
   * BlockDirtyInfo, as x-state and x-reason): active, disabled, busy (and by
   * whom) or inconsistent (and why, with what to do).
   */
  state(): { state: 'active' | 'disabled' | 'busy' | 'inconsistent'; reason: string } {
    if (this.inconsistent) {
      return { state: 'inconsistent', reason: `${this.inconsistentReason ?? 'it was left in use by a writer that did not close the image'}; take a full backup, then remove the bitmap and add it again` };
    }
    const keeping = !this.persistent
      ? 'in memory only'
      : !this.maintained
        ? `persistent${this.crashSafe ? ', crash-safe' : ''}`
        : this.crashSafe
          ? 'crash-safe: each bit is on disk before its write'
          : "stored at a clean close (QEMU's mode: inconsistent after a crash)";
    const recovered = this.recovered ? '; recovered after an unclean stop: it may also mark clusters that did not change' : '';
    if (this.busy) return { state: 'busy', reason: `in use by ${this.holder?.userDescription ?? "an operation"}; ${keeping}${recovered}` };
    if (this.recording) return { state: 'active', reason: `recording writes; ${keeping}${recovered}` };
    return { state: 'disabled', reason: `not recording (disabled); ${keeping}${recovered}` };
  }

  /** BlockDirtyInfo, as query-named-block-nodes lists it. */
  info(): Record<string, unknown> {
    const i: Record<string, unknown> = {};
    if (this.name !== undefined) i.name = this.name;
    Object.assign(i, {
      recording: this.recording,
      persistent: this.persistent,
      busy: this.busy,
      granularity: this.granularity,
      count: this.count,
    });
    if (this.inconsistent) i.inconsistent = true;
    // vdisk's additions (QMP clients ignore members they do not know).
    if (this.name !== undefined) {
      const st = this.state();
      i['x-state'] = st.state;
      i['x-reason'] = st.reason;
      if (this.persistent && this.maintained) i['x-crash-safe'] = this.crashSafe;
    }
    return i;
  }
}
