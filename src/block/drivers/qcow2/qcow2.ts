/**
 * The qcow2 format driver.
 *
 * Guest clusters map through the L1 table (in memory) and L2 tables (an LRU
 * cache) to host clusters of the `file` child; unallocated clusters read
 * from the `backing` child, or as zeroes.
 *
 * Metadata is written back, not through: a write into a new cluster writes
 * the data at once and changes the L2 table in memory; a flush (one at a
 * time; a full L2 cache asks for one) writes metadata in an order that keeps
 * the image consistent at every point, on disk and in the page cache alike:
 *   0. copies of the dirty L2 tables and L1 entries are taken, at once;
 *   1. refcount blocks (only increments are ever pending; all made so far,
 *      so those of every cluster the copies reference), then sync;
 *   2. the L2 copies, then sync, then the L1 entries and the header;
 *   3. sync; only now are refcount decrements applied (a cluster that lost
 *      its last reference becomes free, and may be reused).
 * What requests change meanwhile waits for the next flush. So a crash at any
 * point loses unflushed writes at worst and leaks clusters at worst;
 * refcounts on disk never drop below the references to them.
 *
 * Concurrency: a guest cluster being allocated (or copied on write, or
 * zeroed, or discarded) is locked; other requests on that cluster wait and
 * then look again. Reads never wait: they see the cluster before or after
 * the change, never in between, because the L2 entry changes only after the
 * data is written. Freed clusters are not reused while a read or write that
 * started before they were freed may still be in flight (epochs).
 *
 * The dirty bit is set while the image is open writable (v3) and cleared on
 * a clean close; an image opened dirty has its refcounts rebuilt first.
 */
import { promisify } from 'node:util';
import zlib from 'node:zlib';
import { VdiskError } from '../../../errors.js';
import { logEvent } from '../../../log.js';
import { type BackingControl, BlockNode, type ChildRole, type Extent, type FormatInfo, ReqFlags, Status } from '../../node.js';
import type { DirtyBitmap } from '../../dirty-bitmap.js';
import {
  AUTOCLEAR_BITMAPS,
  type DecodedL2,
  EntryKind,
  INCOMPAT_CORRUPT,
  INCOMPAT_DIRTY,
  type Qcow2Header,
  decodeL2,
  encodeCompressedEntry,
  encodeEntry,
  l1Offset,
  parseHeader,
  serializeHeader,
} from './format.js';
import { Refcounts } from './refcounts.js';
import { resolveBackingName } from '../../image-name.js';
import { type BitmapLayout, type StoreOptions, type StoredBitmap, bitmapChunkBytes, checkCanStore, loadBitmaps, storeBitmaps, writeBitmapChunks } from './bitmaps.js';
import { PersistentBitmaps, type StoreEntry } from '../../persistent-bitmaps.js';
import { qcow2FormatInfo } from './info.js';

const inflateRaw = promisify(zlib.inflateRaw);
const deflateRaw = promisify(zlib.deflateRaw);

/** Memory for cached L2 tables at most (covers 256 GiB of guest disk with 64 KiB clusters). */
const L2_CACHE_BYTES = 32 * 1024 * 1024;

interface CachedL2 {
  offset: number;
  buf: Buffer;
  dirty: boolean;
}

export interface Qcow2Options {
  nodeName: string;
  file: BlockNode;
  /** undefined: open the backing file named in the header; null: none; a node: that one. */
  backing: BlockNode | null | undefined;
  readOnly?: boolean;
  /**
   * Opened by check/repair (QEMU's BDRV_O_CHECK): a corrupt image may be
   * opened writable and a dirty one is not repaired on open.
   */
  forCheck?: boolean;
  /** x-crash-safe-bitmaps: persistent bitmaps are kept crash-safe (default) or in QEMU's mode (in use while open). */
  crashSafeBitmaps?: boolean;
}

/** Opens the backing file named in an image header (the graph supplies this). */
export type BackingOpener = (filename: string, format: string | undefined) => Promise<BlockNode>;

export class Qcow2Node extends BlockNode {
  readonly driverName = 'qcow2';
  header!: Qcow2Header;
  readonly file: BlockNode;
  backing: BlockNode | undefined;
  private clusterBits = 16;
  private clusterSize = 65536;
  private l2Entries = 8192;
  private l1!: Buffer;
  /** L1 indices whose entry changed in memory since the last write-back. */
  private l1Dirty = new Set<number>();
  refcounts!: Refcounts;
  private readonly l2Cache = new Map<number, CachedL2>();
  private readonly l2Loading = new Map<number, Promise<CachedL2>>();
  private l2CachedBytes = 0;
  /** L2 table offsets in use (from L1), for the metadata overlap check. */
  private readonly l2Clusters = new Set<number>();
  /** Guest clusters being allocated or rewritten: others wait on these. */
  private readonly clusterLocks = new Map<number, Promise<void>>();
  /** L1 indices whose L2 table is being allocated. */
  private readonly l2Allocating = new Map<number, Promise<void>>();
  /** Reads and writes in flight, by the epoch they started in; a flush starts a new epoch. */
  private epoch = 0;
  private readonly writesByEpoch = new Map<number, number>();
  private headerDirty = false;
  /** Last decompressed cluster, as QEMU keeps one. */
  private compressedCache: { offset: number; data: Buffer } | undefined;
  private flushing: Promise<void> | undefined;
  /** The L1 table is being moved (growL1): no new L2 table until it is done. */
  private l1Moving: Promise<void> | undefined;
  /** A metadata flush to make room in the L2 cache is under way. */
  private l2Evicting = false;
  /**
   * The persistent bitmaps' directory as QEMU would find it on disk now:
   * what was loaded (marked in use while open writable), less the bitmaps
   * removed since (QEMU deletes them from the image at once; vdisk rewrites
   * the directory at close), then what the close stored.
   */
  private directory: StoredBitmap[] = [];
  /**
   * The order QEMU would store the bitmaps in: the directory as loaded, less
   * what was removed since (QEMU's on-disk list during a session). Runtime
   * rewrites (crash-safe bitmaps) keep to it, so the final directory is the
   * one QEMU would write.
   */
  private storeOrder: string[] = [];
  /** Keeps the persistent bitmaps true on disk while open writable (src/block/persistent-bitmaps.ts). */
  private persistentBitmaps: PersistentBitmaps | undefined;
  /** Where each stored bitmap's table and data clusters are, as the last store left them. */
  private bitmapLayout = new Map<string, BitmapLayout>();
  private readonly crashSafeBitmaps: boolean;

  private constructor(options: Qcow2Options) {
    super({ nodeName: options.nodeName, readOnly: options.readOnly || options.file.readOnly });
    this.file = options.file;
    this.nativeFua = false;
    // Guest I/O is announced to the file (read_aio / write_aio) for blkdebug rules, as QEMU's qcow2.
    this.announcesIo = true;
    this.crashSafeBitmaps = options.crashSafeBitmaps ?? true;
    const node = this;
    this.bitmapDriver = {
      get clusterSize() {
        return node.clusterSize;
      },
      crashSafeDefault: this.crashSafeBitmaps,
      checkCanStore: (name, granularity) => checkCanStore(this, name, granularity),
      removePersistent: (name) => {
        this.directory = this.directory.filter((e) => e.name !== name);
        this.storeOrder = this.storeOrder.filter((n) => n !== name);
      },
      persistentChanged: (change, bitmap, name) => this.persistentBitmaps?.changed(change, bitmap, name) ?? Promise.resolve(),
    };
  }

  static async open(options: Qcow2Options, openBacking: BackingOpener): Promise<Qcow2Node> {
    const node = new Qcow2Node(options);
    await node.load(options, openBacking);
    return node;
  }

  override get filename(): string {
    return this.file.filename;
  }

  /** The backing link may be swapped while open (a fleecing view put between a target and its source). */
  protected override canReplaceChild(role: ChildRole): boolean {
    return role === 'backing';
  }

  protected override childReplaced(_role: ChildRole, node: BlockNode): void {
    this.backing = node;
  }

  get clusterBytes(): number {
    return this.clusterSize;
  }

  override formatInfo(): FormatInfo {
    return qcow2FormatInfo(this);
  }

  /** The header's backing file name and format; rebase changes them. */
  override get backingControl(): BackingControl {
    const header = (): Qcow2Header => this.header;
    return {
      // Read when asked, so a holder of this object sees what setBackingFile recorded.
      get backingFile() {
        return header().backingFile;
      },
      get backingFormat() {
        return header().backingFormat;
      },
      setBackingFile: (name, format) => this.setBackingFile(name, format),
    };
  }

  /** The bitmap directory as QEMU would read it from the image now, in its order (qemu-img info lists it). */
  get storedBitmaps(): readonly StoredBitmap[] {
    return this.directory;
  }

  private async load(options: Qcow2Options, openBacking: BackingOpener): Promise<void> {
    const file = this.file;
    const first = Buffer.alloc(Math.min(file.size, 2 * 1024 * 1024));
    await file.read(0, first);
    const h = parseHeader(first, file.size);
    this.header = h;
    this.clusterBits = h.clusterBits;
    this.clusterSize = 2 ** h.clusterBits;
    this.l2Entries = this.clusterSize / 8;
    this.length = h.size;
    this.limits = { requestAlignment: 1, maxTransfer: 32 * 1024 * 1024, preferredSize: Math.max(4096, Math.min(this.clusterSize, 65536)) };
    this.children.push({ role: 'file', node: file });

    if (h.incompatibleFeatures & INCOMPAT_CORRUPT && !this.readOnly && !options.forCheck) {
      throw new VdiskError('EIO', `qcow2: image '${file.filename}' is marked corrupt; it can only be opened read-only (repair with 'vdisk img check -r all')`, {
        code: 'VDISK_QCOW2_CORRUPT',
      });
    }
    this.l1 = Buffer.alloc(h.l1Size * 8);
    if (h.l1Size) await file.read(h.l1TableOffset, this.l1);
    for (let i = 0; i < h.l1Size; i++) {
      const off = this.l1Entry(i);
      if (off === 0) continue;
      if (off % this.clusterSize !== 0) throw corrupt(`L2 table offset ${off} (L1 entry ${i}) is not cluster aligned`);
      if (off + this.clusterSize > file.size) throw corrupt(`L2 table offset ${off} (L1 entry ${i}) is past the end of the image (${file.size})`);
      this.l2Clusters.add(off / this.clusterSize);
    }
    this.refcounts = await Refcounts.load(file, {
      clusterBits: h.clusterBits,
      refcountOrder: h.refcountOrder,
      tableOffset: h.refcountTableOffset,
      tableClusters: h.refcountTableClusters,
    });

    if (options.backing === null) this.backing = undefined;
    else if (options.backing) this.backing = options.backing;
    else if (h.backingFile) {
      const name = resolveBackingName(file.filename, h.backingFile);
      this.backing = await openBacking(name, h.backingFormat);
    }
    if (this.backing) this.children.push({ role: 'backing', node: this.backing });

    // Persistent bitmaps are valid only with their autoclear bit (a writer that did not know them
    // cleared it). They are loaded onto the node, marked in use on disk while the image is open
    // writable, and stored again at a clean close.
    const bitmapsValid = h.bitmapsExtension !== undefined && (h.autoclearFeatures & AUTOCLEAR_BITMAPS) !== 0n;
    const unclean = (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
    if (bitmapsValid && !options.forCheck) {
      const loaded = await loadBitmaps(this);
      for (const b of loaded.bitmaps) {
        if (b.inconsistent) {
          b.inconsistentReason = 'it was left in use: the image was not closed cleanly while the bitmap recorded writes in QEMU\'s mode';
          logEvent('warn', 'bitmap-inconsistent', { nodeName: this.nodeName, filename: file.filename, bitmap: b.name, reason: b.inconsistentReason, advice: 'take a full backup, then remove and re-add the bitmap' });
        } else if (unclean) {
          // Kept up to date bit by bit (crash-safe), so still usable after the crash: a superset.
          b.recovered = true;
        }
      }
      // QEMU adds each at the head of the node's list as it loads them: the last stored comes first.
      this.dirtyBitmaps.push(...loaded.bitmaps.reverse());
      this.directory = loaded.directory;
      this.storeOrder = loaded.directory.map((e) => e.name);
    }
    if (!this.readOnly) {
      if (unclean && !options.forCheck) {
        logEvent('warn', 'qcow2-repairing-dirty-image', { filename: file.filename });
        const { checkImage } = await import('./check.js');
        await checkImage(this, { repair: 'all' });
      }
      // A writer that did not know the bitmaps cleared the autoclear bit: the extension is stale and
      // its clusters may be reused by now, so it is dropped, never freed (QEMU ignores it too).
      if (!bitmapsValid) {
        h.bitmapsExtension = undefined;
        h.autoclearFeatures = 0n;
        this.directory = [];
        this.storeOrder = [];
      }
      if (h.version === 3) h.incompatibleFeatures |= INCOMPAT_DIRTY;
      await this.writeHeader();
      await file.flush();
      if (h.version === 3 && !options.forCheck) {
        // Persistent bitmaps stay true on disk while open: crash-safe ones bit by bit, the others
        // marked in use as QEMU marks them (a crash leaves them inconsistent, never silently wrong).
        for (const b of this.dirtyBitmaps) if (b.persistent && !b.inconsistent) b.crashSafe = this.crashSafeBitmaps;
        this.persistentBitmaps = new PersistentBitmaps(this, {
          chunkBytes: bitmapChunkBytes(this.clusterSize),
          rewrite: (list) => this.rewriteBitmaps(list),
          writeChunks: (b, chunks) => {
            const layout = this.bitmapLayout.get(b.name ?? '');
            if (!layout) return Promise.reject(new VdiskError('EIO', `qcow2: bitmap '${b.name}' has no stored table`));
            return writeBitmapChunks(this, layout, chunks, () => this.flushMetadata());
          },
          // Chunk writes are FUA, each durable alone: a sync of the image file would flush the
          // guest's dirty data with them (measured: a quarter of the write rate on a first pass).
          sync: () => Promise.resolve(),
        });
        await this.persistentBitmaps.start();
      }
    }
  }

  /**
   * Stores the persistent bitmaps afresh while the image is open: crash-safe
   * ones with the given content, the others in use. New clusters first, made
   * durable, then the header names the new directory, then the old clusters
   * are freed (a crash in between leaks, never corrupts).
   */
  private async rewriteBitmaps(list: StoreEntry[]): Promise<void> {
    const byName = new Map(list.map((e) => [e.bitmap.name, e]));
    // A QEMU-mode bitmap is on disk (in use) only if it was there already: new ones wait for the close, as in QEMU.
    const onDisk = new Set(this.directory.map((e) => e.name));
    await this.storeBitmapsNow(
      { inUse: (b) => !byName.get(b.name)?.crashSafe, content: (b) => byName.get(b.name)?.content },
      () => undefined,
      (b) => byName.get(b.name)?.crashSafe === true || onDisk.has(b.name!),
    );
  }

  /** storeBitmaps, then the refcounts, the header naming the new directory, and the old clusters freed. */
  private async storeBitmapsNow(options: StoreOptions, beforeHeader: () => void = () => undefined, include: (b: DirtyBitmap) => boolean = () => true): Promise<void> {
    const stored = await storeBitmaps(this, this.bitmapsToStore().filter(include), options);
    await this.flushMetadata();
    // Anything still pending (released during the flush) is applied now.
    if (this.refcounts.hasPendingReleases) await this.flushMetadata();
    await this.file.flush();
    beforeHeader();
    this.header.bitmapsExtension = stored.ext;
    this.header.autoclearFeatures = stored.ext ? AUTOCLEAR_BITMAPS : 0n;
    this.directory = stored.directory;
    this.bitmapLayout = stored.layout;
    await this.writeHeader();
    await this.file.flush();
    if (stored.old.length) {
      // The old bitmap clusters are unreferenced only now; a crash before this leaks them.
      for (const c of stored.old) this.refcounts.release(c, 1);
      await this.flushMetadata();
      if (this.refcounts.hasPendingReleases) await this.flushMetadata();
      await this.file.flush();
    }
  }

  /** The L2 table offset of an L1 entry (0: none). */
  l1Entry(index: number): number {
    return l1Offset(this.l1.readUInt32BE(index * 8), this.l1.readUInt32BE(index * 8 + 4));
  }

  get l1Size(): number {
    return this.header.l1Size;
  }

  get l2EntriesPerTable(): number {
    return this.l2Entries;
  }

  private async writeHeader(): Promise<void> {
    const h = this.header;
    // The table last written back (with its blocks), not a newer one still in memory only.
    h.refcountTableOffset = this.refcounts.diskLayout.tableOffset;
    h.refcountTableClusters = this.refcounts.diskLayout.tableClusters;
    await this.file.write(0, serializeHeader(h));
    this.headerDirty = false;
  }

  // ---- L2 cache -------------------------------------------------------------

  /** The L2 table at a host offset, from the cache or the file. */
  async l2Table(offset: number): Promise<CachedL2> {
    const hit = this.l2Cache.get(offset);
    if (hit) {
      this.l2Cache.delete(offset);
      this.l2Cache.set(offset, hit);
      return hit;
    }
    let p = this.l2Loading.get(offset);
    if (!p) {
      p = (async () => {
        const buf = Buffer.alloc(this.clusterSize);
        this.file.debugEvent('l2_load');
        await this.file.read(offset, buf);
        const existing = this.l2Cache.get(offset);
        if (existing) return existing;
        const t = { offset, buf, dirty: false };
        await this.cacheL2(t);
        return t;
      })().finally(() => this.l2Loading.delete(offset));
      this.l2Loading.set(offset, p);
    }
    return p;
  }

  private async cacheL2(t: CachedL2): Promise<void> {
    this.l2Cache.set(t.offset, t);
    this.l2CachedBytes += this.clusterSize;
    if (this.l2CachedBytes <= L2_CACHE_BYTES) return;
    // Only clean tables are dropped. Dirty ones are written by a flush, never here: a table written on
    // eviction could land after (or before) a flush's older copy of it, and it could carry entries
    // whose refcounts are not on disk yet (see flushMetadata).
    if (this.evictClean(t) && !this.l2Evicting) {
      // Too many dirty tables: write them back (a metadata flush) and drop them then.
      this.l2Evicting = true;
      try {
        await this.flushMetadata();
      } finally {
        this.l2Evicting = false;
      }
      this.evictClean(t);
    }
  }

  /** Drops clean tables, least recently used first, down to the budget; true if still over it. */
  private evictClean(keep: CachedL2): boolean {
    for (const [off, old] of this.l2Cache) {
      if (this.l2CachedBytes <= L2_CACHE_BYTES) break;
      if (old === keep || old.dirty) continue;
      this.l2Cache.delete(off);
      this.l2CachedBytes -= this.clusterSize;
    }
    return this.l2CachedBytes > L2_CACHE_BYTES;
  }

  /**
   * The cached L2 table to change an entry in, given one obtained before some awaits. A table may be
   * evicted while a request holds it (others load tables meanwhile): an entry set in the evicted
   * object would never reach the disk, and later lookups read the table without it. So the entry goes
   * into the copy now cached, or the held table goes back into the cache.
   */
  private live(t: CachedL2): CachedL2 {
    const cached = this.l2Cache.get(t.offset);
    if (cached) return cached;
    this.l2Cache.set(t.offset, t);
    this.l2CachedBytes += this.clusterSize;
    return t;
  }

  // ---- lookups --------------------------------------------------------------------

  /** Decodes the L2 entry of a guest cluster, loading its table if needed. */
  private async entry(guestCluster: number): Promise<DecodedL2> {
    const l1Index = Math.floor(guestCluster / this.l2Entries);
    const l2Off = this.l1Entry(l1Index);
    if (l2Off === 0) return UNALLOCATED;
    const t = await this.l2Table(l2Off);
    return this.decodeAt(t.buf, guestCluster % this.l2Entries, guestCluster);
  }

  private decodeAt(buf: Buffer, i: number, guestCluster: number): DecodedL2 {
    const e = decodeL2(buf.readUInt32BE(i * 8), buf.readUInt32BE(i * 8 + 4), this.clusterBits, this.header.version === 3);
    if (e.kind === EntryKind.Normal || (e.kind === EntryKind.Zero && e.offset !== 0)) {
      if (e.offset % this.clusterSize !== 0) {
        throw corrupt(`L2 entry for guest offset ${guestCluster * this.clusterSize} points to unaligned host offset ${e.offset}`);
      }
      if (this.isMetadata(e.offset / this.clusterSize)) {
        throw corrupt(`L2 entry for guest offset ${guestCluster * this.clusterSize} points into metadata at host offset ${e.offset}`);
      }
      // A data cluster starts inside the file: its data is written before the entry points at it. One
      // that starts past the end is a corrupt entry; reading it as zeroes would hide that, and an
      // in-place write would grow the file to wherever the entry points (seen: 4 GiB for one bad entry).
      if (e.kind === EntryKind.Normal && e.offset >= this.file.size) {
        throw corrupt(`L2 entry for guest offset ${guestCluster * this.clusterSize} points past the end of the image file: host offset ${e.offset}, file size ${this.file.size}`);
      }
    }
    return e;
  }

  private isMetadata(cluster: number): boolean {
    if (cluster === 0) return true;
    const l1First = this.header.l1TableOffset / this.clusterSize;
    if (cluster >= l1First && cluster < l1First + Math.ceil((this.header.l1Size * 8) / this.clusterSize)) return true;
    return this.l2Clusters.has(cluster) || this.refcounts.metadataClusters.has(cluster);
  }

  // ---- reads ---------------------------------------------------------------------

  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    // Reads count as in flight for the epochs too: a host cluster this read has looked up must not be
    // freed and handed to another guest cluster (and written) before the read has read it, or the read
    // returns another cluster's data.
    await this.inEpoch(() => this.readClusters(offset, buf));
  }

  private async readClusters(offset: number, buf: Buffer): Promise<void> {
    const cs = this.clusterSize;
    let done = 0;
    while (done < buf.length) {
      const pos = offset + done;
      const cluster = Math.floor(pos / cs);
      const within = pos % cs;
      // Extend over following clusters that map contiguously (one file read for a long run).
      const e = await this.entry(cluster);
      let n = Math.min(cs - within, buf.length - done);
      if (e.kind === EntryKind.Normal) {
        for (let k = 1; done + n < buf.length; k++) {
          const next = await this.entry(cluster + k);
          if (next.kind !== EntryKind.Normal || next.offset !== e.offset + k * cs) break;
          n = Math.min(n + cs, buf.length - done);
        }
        await this.readHost(e.offset + within, buf.subarray(done, done + n));
      } else if (e.kind === EntryKind.Zero) {
        buf.fill(0, done, done + n);
      } else if (e.kind === EntryKind.Compressed) {
        const data = await this.decompress(e, cluster);
        data.copy(buf, done, within, within + n);
      } else {
        await this.readBacking(pos, buf.subarray(done, done + n));
      }
      done += n;
    }
  }

  /**
   * Reads data clusters from the file. The file may end inside the last
   * cluster (qemu-img and vdisk write only the part of a new cluster that
   * holds data): what lies past the end reads as zeroes.
   */
  private async readHost(offset: number, buf: Buffer): Promise<void> {
    const inFile = Math.max(0, Math.min(buf.length, this.file.size - offset));
    if (inFile > 0) await this.file.read(offset, inFile === buf.length ? buf : buf.subarray(0, inFile));
    if (inFile < buf.length) buf.fill(0, inFile);
  }

  /** Reads from the backing file, zeroes where there is none or past its end. */
  private async readBacking(offset: number, buf: Buffer): Promise<void> {
    const b = this.backing;
    if (!b || offset >= b.size) {
      buf.fill(0);
      return;
    }
    const inside = Math.min(buf.length, b.size - offset);
    this.file.debugEvent('read_backing_aio');
    await b.read(offset, buf.subarray(0, inside));
    if (inside < buf.length) buf.fill(0, inside);
  }

  private async decompress(e: DecodedL2, guestCluster: number): Promise<Buffer> {
    if (this.compressedCache?.offset === e.offset) return this.compressedCache.data;
    const input = Buffer.alloc(e.compressedLength);
    // Compressed data may end short of its last sector at the end of the file.
    const avail = Math.max(0, Math.min(input.length, this.file.size - e.offset));
    if (avail === 0) throw corrupt(`compressed cluster for guest offset ${guestCluster * this.clusterSize} at host offset ${e.offset} is past the end of the image`);
    this.file.debugEvent('read_compressed');
    await this.file.read(e.offset, input.subarray(0, avail));
    let data: Buffer;
    try {
      data = await inflateRaw(input.subarray(0, avail), { finishFlush: zlib.constants.Z_SYNC_FLUSH });
    } catch (err) {
      throw corrupt(`compressed cluster for guest offset ${guestCluster * this.clusterSize} at host offset ${e.offset} does not inflate: ${(err as Error).message}`);
    }
    if (data.length < this.clusterSize) {
      throw corrupt(`compressed cluster for guest offset ${guestCluster * this.clusterSize} inflates to ${data.length} bytes, not ${this.clusterSize}`);
    }
    data = data.subarray(0, this.clusterSize);
    this.compressedCache = { offset: e.offset, data };
    return data;
  }

  // ---- writes ---------------------------------------------------------------------

  protected override async doWrite(offset: number, buf: Buffer, _flags: number): Promise<void> {
    await this.inEpoch(async () => {
      const cs = this.clusterSize;
      let done = 0;
      while (done < buf.length) {
        const pos = offset + done;
        const cluster = Math.floor(pos / cs);
        const within = pos % cs;
        const e = await this.entry(cluster);
        if (e.kind === EntryKind.Normal && e.copied && !this.clusterLocks.has(cluster)) {
          // In place: extend over contiguous in-place clusters.
          let n = Math.min(cs - within, buf.length - done);
          for (let k = 1; done + n < buf.length; k++) {
            const next = await this.entry(cluster + k);
            if (next.kind !== EntryKind.Normal || !next.copied || this.clusterLocks.has(cluster + k) || next.offset !== e.offset + k * cs) break;
            n = Math.min(n + cs, buf.length - done);
          }
          this.checkOverlap(e.offset, within + n);
          await this.file.write(e.offset + within, buf.subarray(done, done + n));
          done += n;
        } else {
          done += await this.allocatingWriteRun(cluster, within, buf, done);
        }
      }
    });
  }

  /** Runs a request counted in the current epoch, so clusters it may use are not reused under it. */
  private async inEpoch(fn: () => Promise<void>): Promise<void> {
    const epoch = this.beginWrite();
    try {
      await fn();
    } finally {
      this.endWrite(epoch);
    }
  }

  private beginWrite(): number {
    const e = this.epoch;
    this.writesByEpoch.set(e, (this.writesByEpoch.get(e) ?? 0) + 1);
    return e;
  }

  private endWrite(epoch: number): void {
    const n = this.writesByEpoch.get(epoch)! - 1;
    if (n === 0) this.writesByEpoch.delete(epoch);
    else this.writesByEpoch.set(epoch, n);
  }

  /** Refuses a data write that would land on metadata (a corrupt L2 entry). */
  private checkOverlap(hostOffset: number, length: number): void {
    const first = Math.floor(hostOffset / this.clusterSize);
    const last = Math.floor((hostOffset + length - 1) / this.clusterSize);
    for (let c = first; c <= last; c++) {
      if (this.isMetadata(c)) {
        const reason = `refusing a data write at host offset ${c * this.clusterSize}: it holds metadata`;
        void this.markCorrupt(reason);
        throw corrupt(reason);
      }
    }
  }

  /** Waits until no one holds the lock on a guest cluster, then takes it. */
  private async lockCluster(cluster: number): Promise<() => void> {
    for (;;) {
      const held = this.clusterLocks.get(cluster);
      if (!held) break;
      await held;
    }
    let release!: () => void;
    this.clusterLocks.set(cluster, new Promise<void>((r) => (release = r)));
    return () => {
      this.clusterLocks.delete(cluster);
      release();
    };
  }

  /**
   * Writes into a cluster that needs a new host cluster: unallocated, zero,
   * compressed, or shared (no COPIED flag). The parts of the cluster the
   * write does not cover are filled from what the cluster read before
   * (backing file, zeroes, compressed or shared data). Returns the bytes of
   * `buf` consumed (up to the end of the cluster).
   */
  private async allocatingWrite(cluster: number, within: number, buf: Buffer, done: number): Promise<number> {
    const cs = this.clusterSize;
    const n = Math.min(cs - within, buf.length - done);
    const unlock = await this.lockCluster(cluster);
    try {
      // Look again: another request may have allocated it while we waited.
      const e = await this.entry(cluster);
      if (e.kind === EntryKind.Normal && e.copied) {
        this.checkOverlap(e.offset + within, n);
        await this.file.write(e.offset + within, buf.subarray(done, done + n));
        return n;
      }
      const table = await this.l2ForWrite(cluster);
      const whole = within === 0 && n === cs;
      // A preallocated zero cluster with refcount 1 can be reused in place.
      const reuse = e.kind === EntryKind.Zero && e.offset !== 0 && e.copied;
      const host = reuse ? e.offset : (await this.refcounts.allocate(1)) * cs;
      if (!reuse && this.isMetadata(host / cs)) throw corrupt(`allocator returned metadata cluster ${host / cs}`);
      // A cluster past the end of the file has never been written: it reads as zeroes already.
      const fresh = !reuse && host >= this.file.size;
      const oldIsZero = e.kind === EntryKind.Zero || (e.kind === EntryKind.Unallocated && !this.backing);
      if (whole || (fresh && oldIsZero)) {
        await this.file.write(host + within, buf.subarray(done, done + n));
      } else {
        const data = Buffer.alloc(cs);
        await this.fillOld(e, cluster, data);
        buf.copy(data, within, done, done + n);
        await this.file.write(host, data);
      }
      // The data is in place: now the mapping may point at it.
      const live = this.live(table);
      encodeEntry(live.buf, (cluster % this.l2Entries) * 8, host, true);
      live.dirty = true;
      if (!reuse) this.releaseOld(e);
      return n;
    } finally {
      unlock();
    }
  }

  /**
   * Writes into a run of clusters that all need new host clusters, with one
   * contiguous allocation and one data write for the whole-cluster part (a
   * 2 MiB write is one pwrite, not 32, and sequential guest writes stay
   * sequential in the file). Clusters are locked in ascending order, as every
   * multi-cluster locker here does, so two runs cannot deadlock. Returns the
   * bytes of `buf` consumed; 0 if the first cluster no longer needs a new
   * host cluster (the caller looks again).
   */
  private async allocatingWriteRun(cluster: number, within: number, buf: Buffer, done: number): Promise<number> {
    const cs = this.clusterSize;
    const remaining = buf.length - done;
    const inTable = this.l2Entries - (cluster % this.l2Entries);
    const maxClusters = Math.min(Math.ceil((within + remaining) / cs), inTable);
    let k = 1;
    while (k < maxClusters && !this.clusterLocks.has(cluster + k) && needsNewCluster(await this.entry(cluster + k))) k++;
    if (k === 1) return this.allocatingWrite(cluster, within, buf, done);

    const unlocks: Array<() => void> = [];
    try {
      for (let i = 0; i < k; i++) unlocks.push(await this.lockCluster(cluster + i));
      // Look again under the locks: others may have written these clusters while we waited.
      const old: DecodedL2[] = [];
      for (let i = 0; i < k; i++) {
        const e = await this.entry(cluster + i);
        if (!needsNewCluster(e)) break;
        old.push(e);
      }
      if (old.length === 0) return 0;
      const count = old.length;
      const end = Math.min(within + remaining, count * cs); // bytes from the run's start that the write covers
      const table = await this.l2ForWrite(cluster);
      const first = await this.refcounts.allocate(count);
      for (let i = 0; i < count; i++) {
        if (this.isMetadata(first + i)) throw corrupt(`allocator returned metadata cluster ${first + i}`);
      }
      const host = first * cs;
      // Clusters past the end of the file have never been written: they read as zeroes already.
      const fresh = host >= this.file.size;
      const needsFill = (e: DecodedL2) => !(fresh && (e.kind === EntryKind.Zero || (e.kind === EntryKind.Unallocated && !this.backing)));
      const headPartial = within !== 0 && needsFill(old[0]);
      const tailPartial = end % cs !== 0 && needsFill(old[count - 1]);
      const writes: Array<Promise<void>> = [];
      // The part of the run written straight from the caller's buffer.
      const from = headPartial ? cs : within;
      const to = tailPartial ? end - (end % cs) : end;
      if (to > from) writes.push(this.file.write(host + from, buf.subarray(done + from - within, done + to - within)));
      if (headPartial) writes.push(this.writeFilled(old[0], cluster, host, within, buf.subarray(done, done + Math.min(cs, end) - within)));
      if (tailPartial && !(headPartial && count === 1)) {
        const last = count - 1;
        const start = Math.max(last * cs, within); // a run of one cluster starts inside it
        writes.push(this.writeFilled(old[last], cluster + last, host + last * cs, start - last * cs, buf.subarray(done + start - within, done + end - within)));
      }
      await Promise.all(writes);
      // The data is in place: now the mappings may point at it.
      const live = this.live(table);
      for (let i = 0; i < count; i++) {
        encodeEntry(live.buf, ((cluster + i) % this.l2Entries) * 8, host + i * cs, true);
        this.releaseOld(old[i]);
      }
      live.dirty = true;
      return end - within;
    } finally {
      for (const unlock of unlocks) unlock();
    }
  }

  override get compressionClusterSize(): number {
    return this.header.version === 3 || this.header.version === 2 ? this.clusterSize : 0;
  }

  /**
   * Compressed clusters (raw deflate with a 4 KiB window: QEMU inflates with
   * window bits 12). A cluster that does not shrink below a cluster minus a
   * sector is written normally, as QEMU does. Each compressed cluster gets a
   * host cluster of its own (QEMU packs several into one; both are valid).
   */
  protected override async doWriteCompressed(offset: number, buf: Buffer): Promise<void> {
    const cs = this.clusterSize;
    if (offset % cs !== 0 || (buf.length % cs !== 0 && offset + buf.length !== this.length)) {
      throw new VdiskError('EINVAL', `qcow2: compressed writes must cover whole clusters (offset ${offset}, ${buf.length} bytes)`);
    }
    await this.inEpoch(() => this.compressClusters(offset, buf));
  }

  private async compressClusters(offset: number, buf: Buffer): Promise<void> {
    const cs = this.clusterSize;
    for (let done = 0; done < buf.length; done += cs) {
      const cluster = (offset + done) / cs;
      let data = buf.subarray(done, Math.min(buf.length, done + cs));
      if (data.length < cs) data = Buffer.concat([data, Buffer.alloc(cs - data.length)]);
      const packed = await deflateRaw(data, { windowBits: 12, level: 6 });
      if (packed.length >= cs - 512) {
        await this.doWrite(offset + done, data.subarray(0, Math.min(cs, buf.length - done)), 0);
        continue;
      }
      const unlock = await this.lockCluster(cluster);
      try {
        const e = await this.entry(cluster);
        const table = await this.l2ForWrite(cluster);
        const host = (await this.refcounts.allocate(1)) * cs;
        if (this.isMetadata(host / cs)) throw corrupt(`allocator returned metadata cluster ${host / cs}`);
        this.file.debugEvent('write_compressed');
        await this.file.write(host, packed);
        encodeCompressedEntry(table.buf, (cluster % this.l2Entries) * 8, host, packed.length, this.clusterBits);
        table.dirty = true;
        this.releaseOld(e);
      } finally {
        unlock();
      }
    }
  }

  /** Writes one whole new host cluster: its old content with `part` laid over at `within`. */
  private async writeFilled(e: DecodedL2, cluster: number, host: number, within: number, part: Buffer): Promise<void> {
    const data = Buffer.alloc(this.clusterSize);
    this.file.debugEvent('cow_read');
    await this.fillOld(e, cluster, data);
    part.copy(data, within);
    this.file.debugEvent('cow_write');
    await this.file.write(host, data);
  }

  /** The content a cluster had before a write that replaces it. */
  private async fillOld(e: DecodedL2, cluster: number, data: Buffer): Promise<void> {
    const cs = this.clusterSize;
    switch (e.kind) {
      case EntryKind.Zero:
        return;
      case EntryKind.Compressed:
        (await this.decompress(e, cluster)).copy(data);
        return;
      case EntryKind.Normal:
        await this.readHost(e.offset, data);
        return;
      case EntryKind.Unallocated:
        if (this.backing) await this.readBacking(cluster * cs, data.subarray(0, Math.min(cs, this.length - cluster * cs)));
    }
  }

  /** Drops the reference an old entry held (after the next durable flush). */
  private releaseOld(e: DecodedL2): void {
    if (e.kind === EntryKind.Normal || (e.kind === EntryKind.Zero && e.offset !== 0)) {
      this.refcounts.release(e.offset / this.clusterSize, 1, this.epoch);
    } else if (e.kind === EntryKind.Compressed) {
      const first = Math.floor(e.offset / this.clusterSize);
      const last = Math.floor((e.offset + e.compressedLength - 1) / this.clusterSize);
      for (let c = first; c <= last; c++) this.refcounts.release(c, 1, this.epoch);
      if (this.compressedCache?.offset === e.offset) this.compressedCache = undefined;
    }
  }

  /** The L2 table for a guest cluster, allocating a new (zeroed) one if there is none. */
  private async l2ForWrite(cluster: number): Promise<CachedL2> {
    const l1Index = Math.floor(cluster / this.l2Entries);
    for (;;) {
      const pending = this.l2Allocating.get(l1Index);
      if (pending) {
        await pending;
        continue;
      }
      const off = this.l1Entry(l1Index);
      if (off !== 0 && this.l1.readUInt32BE(l1Index * 8) & 0x80000000) {
        const t = await this.l2Table(off);
        if (this.l1Entry(l1Index) !== off) continue; // copied meanwhile: use the copy
        return t;
      }
      // No table, or one shared with a snapshot (no COPIED flag in L1) that must be copied first. One
      // request at a time per L1 entry makes the new table: two copies of one shared table made at once
      // lost the writes that went into the first and released the old table twice.
      if (this.l1Moving) {
        await this.l1Moving;
        continue;
      }
      let done!: () => void;
      this.l2Allocating.set(l1Index, new Promise<void>((r) => (done = r)));
      try {
        if (off !== 0) {
          await this.copyL2(l1Index, await this.l2Table(off));
          continue;
        }
        // As QEMU's l2_allocate: a metadata cluster is allocated (guest data clusters do not announce this).
        this.file.debugEvent('cluster_alloc');
        const host = (await this.refcounts.allocate(1)) * this.clusterSize;
        const t: CachedL2 = { offset: host, buf: Buffer.alloc(this.clusterSize), dirty: true };
        this.l2Clusters.add(host / this.clusterSize);
        await this.cacheL2(t);
        encodeEntry(this.l1, l1Index * 8, host, true);
        this.l1Dirty.add(l1Index);
        return t;
      } finally {
        this.l2Allocating.delete(l1Index);
        done();
      }
    }
  }

  /** Copies an L2 table whose refcount is above one (shared with an internal snapshot). */
  private async copyL2(l1Index: number, old: CachedL2): Promise<void> {
    const cs = this.clusterSize;
    const host = (await this.refcounts.allocate(1)) * cs;
    // The entries are copied as they are, as QEMU's l2_allocate does. A cluster's refcount counts the
    // L1 -> L2 paths to it: before, the shared table gave it one path from the active L1 and one from the
    // snapshot's; after, the copy gives one and the old table (now the snapshot's alone) the other. So no
    // refcount of a data cluster changes, and their COPIED flags (already clear, as the snapshot made
    // them) stay. (Adding a reference per entry here leaked every cluster of the table: qemu-img check
    // found refcount=3 reference=2.)
    const t: CachedL2 = { offset: host, buf: Buffer.from(old.buf), dirty: true };
    this.l2Clusters.add(host / cs);
    await this.cacheL2(t);
    encodeEntry(this.l1, l1Index * 8, host, true);
    this.l1Dirty.add(l1Index);
    this.refcounts.release(old.offset / cs, 1, this.epoch);
  }

  // ---- zeroes and discard -------------------------------------------------------------

  protected override async doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    if (this.header.version < 3) {
      // No zero flag in version 2: with no backing file, deallocating gives zeroes.
      if (this.backing || !(flags & ReqFlags.MAY_UNMAP)) throw new VdiskError('ENOTSUP', 'qcow2 v2: no zero clusters');
    }
    const cs = this.clusterSize;
    const head = offset % cs;
    const tail = (offset + length) % cs;
    // Partial clusters: zero them with ordinary writes (the request path falls back on ENOTSUP).
    if (head !== 0 || tail !== 0) {
      const firstWhole = head ? offset - head + cs : offset;
      const endWhole = offset + length - tail;
      if (firstWhole >= endWhole) throw new VdiskError('ENOTSUP', 'qcow2: a zero range inside one cluster is written as data');
      if (flags & ReqFlags.NO_FALLBACK) throw new VdiskError('ENOTSUP', 'qcow2: partial clusters cannot be zeroed fast');
      if (head) await this.write(offset, Buffer.alloc(firstWhole - offset));
      await this.zeroClusters(firstWhole / cs, (endWhole - firstWhole) / cs, flags);
      if (tail) await this.write(endWhole, Buffer.alloc(tail));
      return;
    }
    await this.zeroClusters(offset / cs, length / cs, flags);
  }

  /** Marks whole clusters as reading zero; with MAY_UNMAP their host clusters are released. */
  private async zeroClusters(first: number, count: number, flags: number): Promise<void> {
    const unmap = (flags & ReqFlags.MAY_UNMAP) !== 0;
    const v3 = this.header.version === 3;
    for (let c = first; c < first + count; c++) {
      const e = await this.entry(c);
      if (e.kind === EntryKind.Zero && (!unmap || e.offset === 0)) continue;
      // Unallocated with no backing file already reads as zero.
      if (e.kind === EntryKind.Unallocated && !this.backing) continue;
      const unlock = await this.lockCluster(c);
      try {
        const cur = await this.entry(c);
        const table = await this.l2ForWrite(c);
        const i = (c % this.l2Entries) * 8;
        const keep = !unmap && cur.kind === EntryKind.Normal && cur.copied;
        const live = this.live(table);
        if (!v3) encodeEntry(live.buf, i, 0, false);
        else if (keep) encodeEntry(live.buf, i, cur.offset, true, true);
        else encodeEntry(live.buf, i, 0, false, true);
        live.dirty = true;
        if (!keep) this.releaseOld(cur);
      } finally {
        unlock();
      }
    }
  }

  protected override async doDiscard(offset: number, length: number): Promise<void> {
    const cs = this.clusterSize;
    // Only whole clusters can be discarded; discard is a hint, so partial ones are left alone.
    const first = Math.ceil(offset / cs);
    const end = Math.floor((offset + length) / cs);
    if (end <= first) return;
    if (this.backing && this.header.version === 3) {
      // With a backing file, a discarded cluster must not show the backing data: make it a zero cluster.
      return this.zeroClusters(first, end - first, ReqFlags.MAY_UNMAP);
    }
    for (let c = first; c < end; c++) {
      const e = await this.entry(c);
      if (e.kind === EntryKind.Unallocated) continue;
      if (this.backing) {
        // v2 with a backing file: no zero flag, and deallocating would expose the backing data. Leave it.
        continue;
      }
      const unlock = await this.lockCluster(c);
      try {
        const cur = await this.entry(c);
        const table = await this.l2ForWrite(c);
        const live = this.live(table);
        encodeEntry(live.buf, (c % this.l2Entries) * 8, 0, false);
        live.dirty = true;
        this.releaseOld(cur);
      } finally {
        unlock();
      }
    }
  }

  // ---- block status -------------------------------------------------------------------

  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    const cs = this.clusterSize;
    const cluster = Math.floor(offset / cs);
    const e = await this.entry(cluster);
    // A zero cluster that keeps its host cluster has a host offset, as QEMU reports it (qemu-img map
    // shows "offset" for it); one without has none. They are different kinds of extent.
    const hosted = (x: DecodedL2) => x.kind === EntryKind.Normal || (x.kind === EntryKind.Zero && x.offset !== 0);
    // Extend over clusters of the same kind (and, where there is a host cluster, contiguous on the
    // host: qemu-img map shows runs).
    let n = Math.min(cs - (offset % cs), length);
    while (n < length) {
      const c = Math.floor((offset + n) / cs);
      const next = await this.entry(c);
      if (next.kind !== e.kind || hosted(next) !== hosted(e)) break;
      if (hosted(e) && next.offset !== e.offset + (c - cluster) * cs) break;
      if (e.kind === EntryKind.Compressed) break;
      n = Math.min(n + cs, length);
    }
    switch (e.kind) {
      case EntryKind.Normal:
        return { length: n, flags: Status.DATA | Status.ALLOCATED, depth: 1, hostOffset: e.offset + (offset % cs) };
      case EntryKind.Compressed:
        return { length: n, flags: Status.DATA | Status.ALLOCATED, depth: 1, compressed: true };
      case EntryKind.Zero:
        if (e.offset !== 0) return { length: n, flags: Status.ZERO | Status.ALLOCATED, depth: 1, hostOffset: e.offset + (offset % cs) };
        return { length: n, flags: Status.ZERO | Status.ALLOCATED, depth: 1 };
      default: {
        const b = this.backing;
        if (!b) return { length: n, flags: Status.ZERO, depth: 0 };
        if (offset >= b.size) return { length: n, flags: Status.ZERO, depth: 0 };
        const inner = await b.blockStatus(offset, Math.min(n, b.size - offset));
        return {
          length: inner.length,
          flags: inner.flags & ~Status.ALLOCATED,
          depth: inner.depth === 0 ? 0 : inner.depth + 1,
          hostOffset: inner.hostOffset,
          compressed: inner.compressed,
          from: inner.from ?? b,
        };
      }
    }
  }

  // ---- resize -------------------------------------------------------------------------

  protected override async doTruncate(size: number): Promise<void> {
    if (size < this.length) throw new VdiskError('ENOTSUP', 'qcow2: shrinking an image is not supported');
    if (size % 512 !== 0) throw new VdiskError('EINVAL', 'qcow2: the size must be a multiple of 512');
    const needed = Math.ceil(size / this.clusterSize / this.l2Entries);
    if (needed > this.header.l1Size) await this.growL1(needed);
    const old = this.length;
    this.header.size = size;
    this.length = size;
    // The new part must read as zeroes; where the backing file is longer than the old size its data
    // would show through the unallocated clusters, so that part is zeroed (as QEMU's bdrv_co_truncate
    // does with BDRV_REQ_ZERO_WRITE). Before the header is written, so the image never opens grown with
    // the backing data showing.
    const b = this.backing;
    if (b && b.size > old) await this.writeZeroes(old, Math.min(size, b.size) - old, 0);
    // The header is written at once so a grown image opens grown even without a flush.
    await this.flushMetadata();
    await this.writeHeader();
  }

  /** Moves the L1 table to a bigger place; the old one is released after the next flush. */
  private async growL1(entries: number): Promise<void> {
    // No L1 entry may change while the table moves: a write that made a new L2 table meanwhile set its
    // entry in the old table after it had been copied, and the entry was lost with the old table
    // (writes lost, their clusters leaked; resizing does not wait for requests that come after it).
    // So new L2 tables wait at this gate, and those being made now finish first.
    let open!: () => void;
    this.l1Moving = new Promise<void>((r) => (open = r));
    try {
      while (this.l2Allocating.size) await Promise.all(this.l2Allocating.values());
      const cs = this.clusterSize;
      const clusters = Math.ceil((entries * 8) / cs);
      const host = (await this.refcounts.allocate(clusters)) * cs;
      const old = { offset: this.header.l1TableOffset, clusters: Math.ceil((this.header.l1Size * 8) / cs) };
      // Everything the new table points to must be on disk before the header points to the table.
      await this.flushMetadata();
      const table = Buffer.alloc(clusters * cs);
      this.l1.copy(table);
      await this.file.write(host, table.subarray(0, entries * 8));
      await this.file.flush();
      this.l1 = table.subarray(0, entries * 8);
      this.header.l1TableOffset = host;
      this.header.l1Size = entries;
      await this.writeHeader();
      await this.file.flush();
      for (let i = 0; i < old.clusters; i++) this.refcounts.release(old.offset / cs + i, 1, this.epoch);
    } finally {
      this.l1Moving = undefined;
      open();
    }
  }

  // ---- flush and close ------------------------------------------------------------------

  protected override doFlush(): Promise<void> {
    return this.flushMetadata();
  }

  /**
   * Writes metadata back (see flushMetadataNow), one write-back at a time: two at once could write
   * copies of one table in the wrong order. One that is asked for during another waits and runs its own.
   */
  flushMetadata(): Promise<void> {
    const run = (this.flushing ?? Promise.resolve()).then(() => this.flushMetadataNow());
    this.flushing = run
      .catch(() => undefined)
      .finally(() => {
        if (this.flushing === settled) this.flushing = undefined;
      });
    const settled = this.flushing;
    return run;
  }

  /**
   * Writes metadata back in the crash-safe order (see the top of this file).
   *
   * What this flush makes durable is taken at its start, at once and before any await: the dirty L2
   * tables (copies) and L1 entries. Requests go on while the flush awaits; what they change is left
   * for the next flush. Writing the live tables instead put on disk entries for clusters allocated
   * after the refcounts had been written (a crash then left refcount=0 reference=1, seen with kill -9),
   * and L1 entries for L2 tables made after the L2 tables had been written.
   */
  private async flushMetadataNow(): Promise<void> {
    if (this.readOnly) return;
    const flushEpoch = this.epoch++;
    const l2s: Array<{ table: CachedL2; buf: Buffer }> = [];
    for (const t of this.l2Cache.values()) {
      if (!t.dirty) continue;
      t.dirty = false;
      l2s.push({ table: t, buf: Buffer.from(t.buf) });
    }
    const l1Indices = [...this.l1Dirty].sort((a, b) => a - b);
    this.l1Dirty.clear();
    const l1Offset = this.header.l1TableOffset;
    const l1Copy = l1Indices.length ? Buffer.from(this.l1) : undefined;
    try {
      // 1. Refcounts: every increment so far, so at least those of every cluster the copies reference.
      //    Then sync: those refcounts and the data written into the clusters are durable.
      if (this.refcounts.dirty) await this.refcounts.writeBack();
      if (l2s.length || l1Indices.length || this.headerMustMove()) await this.file.flush();
      // 2. L2 tables, sync, then L1 entries.
      for (const { table, buf } of l2s) {
        this.file.debugEvent('l2_update');
        await this.file.write(table.offset, buf);
      }
      if (l1Copy) {
        if (l2s.length) await this.file.flush();
        for (const i of l1Indices) {
          this.file.debugEvent('l1_update');
          await this.file.write(l1Offset + i * 8, l1Copy.subarray(i * 8, i * 8 + 8));
        }
      }
    } catch (err) {
      // Not written: mark it dirty again for the next flush.
      for (const { table } of l2s) this.live(table).dirty = true;
      for (const i of l1Indices) this.l1Dirty.add(i);
      throw err;
    }
    // The header follows a refcount table that moved (its new table and blocks are durable now).
    if (this.headerDirty || this.headerMustMove()) await this.writeHeader();
    if (this.refcounts.hasRetired) {
      await this.file.flush();
      this.refcounts.releaseRetired(this.header.refcountTableOffset);
    }
    if (this.refcounts.hasPendingReleases) {
      // 3. The references are gone on disk once this sync is done; then the clusters may be freed.
      await this.file.flush();
      let oldest = this.epoch;
      for (const e of this.writesByEpoch.keys()) oldest = Math.min(oldest, e);
      const freed = await this.refcounts.applyReleases(Math.min(oldest, flushEpoch + 1));
      await this.refcounts.writeBack();
      for (const c of freed) {
        this.l2Clusters.delete(c);
        // A freed L2 table (a copied one nobody else held) must not be found in the cache if its
        // cluster comes back as another table.
        const stale = this.l2Cache.get(c * this.clusterSize);
        if (stale && !stale.dirty) {
          this.l2Cache.delete(c * this.clusterSize);
          this.l2CachedBytes -= this.clusterSize;
        }
        // Give the space back to the file system where the file node allows it.
        await this.file.discard(c * this.clusterSize, this.clusterSize).catch(() => undefined);
      }
    }
  }

  /** The refcount table on disk is not the one the header names (it grew and was written back). */
  private headerMustMove(): boolean {
    const d = this.refcounts.diskLayout;
    return d.tableOffset !== this.header.refcountTableOffset || d.tableClusters !== this.header.refcountTableClusters;
  }

  protected override async doClose(): Promise<void> {
    if (this.readOnly) return;
    // No bit write-back may be in progress while the bitmaps are stored for the last time.
    await this.persistentBitmaps?.close();
    this.persistentBitmaps = undefined;
    if (this.header.version !== 3) {
      await this.flushMetadata();
      if (this.refcounts.hasPendingReleases) await this.flushMetadata();
      await this.file.flush();
      this.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
      await this.writeHeader();
      await this.file.flush();
      return;
    }
    // Every persistent bitmap exactly, none in use; the clean header goes out with the new directory.
    await this.storeBitmapsNow({}, () => {
      this.header.incompatibleFeatures &= ~INCOMPAT_DIRTY;
    });
  }

  /**
   * The persistent bitmaps in the order QEMU's qcow2_store_persistent_dirty_bitmaps
   * gives the directory: a bitmap already stored keeps its place, new ones
   * follow in the node's list order (newest first). qemu-img info lists them
   * in this order, so a script sees the same list after either tool.
   */
  private bitmapsToStore(): DirtyBitmap[] {
    const place = new Map(this.storeOrder.map((name, i) => [name, i]));
    const persistent = this.dirtyBitmaps.filter((b) => b.persistent && b.name !== undefined);
    const kept = persistent.filter((b) => place.has(b.name!)).sort((a, b) => place.get(a.name!)! - place.get(b.name!)!);
    return [...kept, ...persistent.filter((b) => !place.has(b.name!))];
  }

  /** Marks the image corrupt on disk (QEMU's qcow2_signal_corruption), so nobody writes it again. */
  async markCorrupt(reason: string): Promise<void> {
    logEvent('error', 'qcow2-image-corrupt', { filename: this.file.filename, reason });
    if (this.readOnly || this.header.version < 3) return;
    this.header.incompatibleFeatures |= INCOMPAT_CORRUPT;
    await this.writeHeader().catch(() => undefined);
    this.readOnly = true;
  }

  /** After a repair left no corruption: clears the corrupt bit (QEMU's qcow2_mark_consistent). */
  async markConsistent(): Promise<void> {
    if (this.readOnly || !(this.header.incompatibleFeatures & INCOMPAT_CORRUPT)) return;
    this.header.incompatibleFeatures &= ~INCOMPAT_CORRUPT;
    await this.writeHeader();
    await this.file.flush();
  }

  /**
   * Records a new backing file name and format in the header (rebase), or
   * none. The caller has made the content right; this only rewrites cluster 0.
   */
  async setBackingFile(name: string | undefined, format: string | undefined): Promise<void> {
    if (this.readOnly) throw new VdiskError('EROFS', `node '${this.nodeName}' is read-only`);
    const h = this.header;
    const old = { file: h.backingFile, format: h.backingFormat };
    h.backingFile = name;
    h.backingFormat = name === undefined ? undefined : format;
    try {
      await this.writeHeader();
    } catch (err) {
      h.backingFile = old.file;
      h.backingFormat = old.format;
      throw err;
    }
    await this.file.flush();
  }

  /** For check and repair: every loaded L2 table, and direct access to the L1 table. */
  get l1Table(): Buffer {
    return this.l1;
  }

  /** For repair: replaces an L1 entry's value in memory and marks it for write-back. */
  setL1Entry(index: number, offset: number, copied: boolean): void {
    encodeEntry(this.l1, index * 8, offset, copied);
    this.l1Dirty.add(index);
  }
}

/** A write into this cluster needs a new host cluster (it cannot go in place). */
function needsNewCluster(e: DecodedL2): boolean {
  return !(e.kind === EntryKind.Normal && e.copied);
}

const UNALLOCATED: DecodedL2 = { kind: EntryKind.Unallocated, offset: 0, copied: false, compressedLength: 0 };

function corrupt(message: string): VdiskError {
  return new VdiskError('EIO', `qcow2: ${message}`, { code: 'VDISK_QCOW2_CORRUPT' });
}
