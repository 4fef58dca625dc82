/**
 * The node contract: what every driver and filter is, and the one request
 * path every caller goes through.
 *
 * A BlockNode is a disk: a length in bytes and operations on byte ranges.
 * Callers (protocol adapters, parent nodes, jobs) call the public methods
 * (read, write, writeZeroes, discard, flush, truncate, blockStatus, cache).
 * Those check the request once, make it fit the driver's limits, count it
 * for drain, and only then call the driver's hook (doRead, doWrite, ...).
 *
 * What a driver hook may rely on (the caller's guarantees, as in QEMU's
 * block_int-common.h):
 *   - offset and length are safe integers, in range: offset + length <= size,
 *     except that a read may cover the whole last aligned block when size
 *     is not aligned, and a growable node may be asked past its end (reads
 *     there return zeroes, writes grow it);
 *   - both are multiples of limits.requestAlignment;
 *   - length <= limits.maxTransfer for doRead / doWrite;
 *   - no write-like hook is called on a read-only node;
 *   - the buffer of a write is not modified by anyone until the hook settles,
 *     and the hook must not modify it either.
 * What a hook must give: settle only when the operation is complete (a write
 * is visible to every later read of any caller), throw only VdiskError.
 */
import { VdiskError, invalid, toVdiskError } from '../errors.js';
import type { BitmapDriverHooks, DirtyBitmap } from './dirty-bitmap.js';
import type { DebugControl } from './debug-control.js';
import { IoStats, Op } from '../metrics/stats.js';

/** Request flags, a bitmask so no object is allocated per request. */
export const ReqFlags = {
  NONE: 0,
  /** Force unit access: the write is durable when the request settles. */
  FUA: 1,
  /** writeZeroes may deallocate (punch a hole) instead of writing zeroes. */
  MAY_UNMAP: 2,
  /** writeZeroes must fail with ENOTSUP rather than fall back to slow writes. */
  NO_FALLBACK: 4,
} as const;

/** Block status flags of an extent. */
export const Status = {
  /** Reads of this range return data stored at this node or below. */
  DATA: 1,
  /** Reads of this range return zeroes. */
  ZERO: 2,
  /** This node (not a backing file) decides the content of this range. */
  ALLOCATED: 4,
} as const;

/** One extent of block status, starting at the queried offset. */
export interface Extent {
  length: number;
  flags: number;
  /** Where in a backing chain the content comes from: 0 = nowhere (unallocated), 1 = this node, 2 = its backing file, ... */
  depth: number;
  /** Where the range is stored in the file that holds it (qemu-img map's "offset"): data, and zero clusters that keep a host cluster. */
  hostOffset?: number;
  /** For data: stored compressed. */
  compressed?: boolean;
  /** The node whose file holds the data, when it is not this one (a backing file). */
  from?: BlockNode;
}

export interface BlockLimits {
  /** Offsets and lengths reaching the driver are multiples of this. */
  requestAlignment: number;
  /** The largest read or write the driver is handed at once. */
  maxTransfer: number;
  /** The size of I/O the driver is fastest at (advertised to clients). */
  preferredSize: number;
}

/** Child roles use QEMU's names. */
export type ChildRole = 'file' | 'backing' | 'image' | 'test' | 'raw' | 'target';

export interface ChildLink {
  role: ChildRole;
  node: BlockNode;
}

/** Something that holds a node open: a parent node, an export, a job. */
export interface NodeUser {
  /** For error messages: "node 'q0' (as file)", "export 'disk0'". */
  readonly userDescription: string;
  /**
   * Moves this user from `from` to `to`, a node showing the same content (a
   * filter inserted above the node it uses, or taken away). Users that cannot
   * move (jobs) leave it out; false means "not now".
   */
  moveTo?(from: BlockNode, to: BlockNode): boolean;
}

/** ImageInfo's format-specific member: what only this format has (qcow2's compat, bitmaps, ...). */
export interface FormatSpecific {
  type: string;
  data: Record<string, unknown>;
}

/**
 * What a driver tells about its image, QEMU's bdrv_get_info plus
 * bdrv_get_specific_info: qemu-img info, query-named-block-nodes and
 * qemu-io's info print it.
 */
export interface FormatInfo {
  /** The format's allocation unit; 0 when it has none (then no cluster-size is shown). */
  clusterSize: number;
  /** Where the format would keep VM state (qemu-io's info prints it). */
  vmStateOffset: number;
  /** The image says it was not closed cleanly (ImageInfo's dirty-flag). */
  dirty: boolean;
  specific?: FormatSpecific;
}

/** A format whose header names a backing file (qcow2): read it, and change it for rebase. */
export interface BackingControl {
  /** The backing file name as the header records it (relative names stay relative). */
  readonly backingFile: string | undefined;
  /** The backing format the header records, if any. */
  readonly backingFormat: string | undefined;
  /**
   * Records another backing file name and format in the header, or none.
   * Only the header changes: the caller has made the content right.
   */
  setBackingFile(name: string | undefined, format: string | undefined): Promise<void>;
}

/** Largest offset or length vdisk accepts: JavaScript numbers are exact below 2^53. */
export const MAX_OFFSET = Number.MAX_SAFE_INTEGER;

const DEFAULT_MAX_TRANSFER = 32 * 1024 * 1024;
const ZERO_BUFFER = Buffer.alloc(1024 * 1024);

export interface NodeOptions {
  nodeName: string;
  readOnly?: boolean;
}

export abstract class BlockNode {
  /** QEMU's driver name: 'file', 'raw', 'qcow2', 'null-co', ... */
  abstract readonly driverName: string;
  nodeName: string;
  readOnly: boolean;
  limits: BlockLimits = { requestAlignment: 1, maxTransfer: DEFAULT_MAX_TRANSFER, preferredSize: 4096 };
  readonly children: ChildLink[] = [];
  readonly users = new Set<NodeUser>();
  /** Set when the driver makes FUA writes durable itself; else FUA is emulated by a flush. */
  protected nativeFua = false;
  /**
   * Writes past the end grow the node, and reads past the end return zeroes
   * (a host file under a format driver, as in QEMU). Protocol adapters check
   * their own export size, so clients never grow a node this way.
   */
  protected growable = false;
  /**
   * discard=unmap: discards reach the driver and write-zeroes may deallocate.
   * When off (QEMU's discard=ignore), discards are dropped here and MAY_UNMAP
   * is cleared, as bdrv_co_pdiscard does. The graph sets it from the options.
   */
  discardEnabled = true;
  /**
   * Dirty bitmaps on this node, newest first (query order). Every write,
   * write-zeroes and discard that reaches this node marks the enabled ones,
   * whether it succeeded or not (a failed write may have changed the disk).
   */
  readonly dirtyBitmaps: DirtyBitmap[] = [];
  /** Set by drivers whose images hold persistent bitmaps (qcow2); undefined: bitmaps live in memory only. */
  bitmapDriver: BitmapDriverHooks | undefined = undefined;
  /**
   * Called before any write, write-zeroes or discard reaches the driver, with
   * the range it changes; the request waits for them and fails if one fails.
   * A hook may return a function, called once the request has settled
   * (success or not). The guard of a backup's copy-before-write filter and
   * crash-safe bitmaps hook in here, so every writer of the node goes
   * through them, whichever way it reaches the node.
   */
  readonly beforeWrite: Array<(offset: number, length: number) => Promise<(() => void) | void>> = [];
  /**
   * A format driver announces read_aio / write_aio to its file child before
   * guest I/O, as QEMU's raw and qcow2 do (blkdebug rules react to them).
   */
  protected announcesIo = false;
  /** Writes completed / writes covered by the last flush (flush_to_disk is announced only if they differ). */
  private writeGen = 0;
  private flushedGen = 0;
  /** cache.direct and cache.no-flush as opened (reported by query-named-block-nodes). */
  cacheMode = { direct: false, noFlush: false };
  /** Writes of all-zero buffers become write-zeroes ('unmap': allowed to deallocate). */
  detectZeroes: 'off' | 'on' | 'unmap' = 'off';
  /** The length in bytes; drivers set it when they open and truncate. */
  protected length = 0;
  /**
   * What this node was asked to do (query-blockstats, --metrics): counted by
   * the public request methods below, so every caller (exports, parents,
   * jobs) is seen once per request, whatever the driver does inside.
   */
  readonly stats = new IoStats();

  private inFlight = 0;
  /** Set while quiesced: writes wait for it before they start. */
  private writeGate: Promise<void> | undefined;
  private openGate: (() => void) | undefined;
  private quiesceCount = 0;
  private drainWaiters: Array<() => void> = [];
  private closed = false;
  private closing: Promise<void> | undefined;
  /** Writes in progress, tracked only when requestAlignment > 1 so read-modify-write can be serialised. */
  private tracked: Array<{ start: number; end: number; serialising: boolean; done: Promise<void> }> = [];

  constructor(options: NodeOptions) {
    this.nodeName = options.nodeName;
    this.readOnly = options.readOnly ?? false;
  }

  get size(): number {
    return this.length;
  }

  /** Whether writes past the end grow the node (a host file under a format driver). */
  get isGrowable(): boolean {
    return this.growable;
  }

  /**
   * The host file this node is, when it is a regular file: where a raw image
   * keeps its persistent bitmaps (a sidecar beside it, tied to its identity).
   */
  get hostFile(): { path: string; identity(): { dev: bigint; ino: bigint; mtimeNs: bigint } } | undefined {
    return undefined;
  }

  /**
   * What the driver knows about its image (cluster size, dirty flag,
   * format-specific data), or undefined when its QEMU counterpart reports
   * nothing (bdrv_get_info fails there). Formats and the file driver answer.
   */
  formatInfo(): FormatInfo | undefined {
    return undefined;
  }

  /** Set by formats whose header names a backing file (qcow2); undefined for the rest. */
  get backingControl(): BackingControl | undefined {
    return undefined;
  }

  /** Set by nodes that can be debugged at run time (blkdebug): breakpoints and rules. */
  get debugControl(): DebugControl | undefined {
    return undefined;
  }

  /** The file name a person would recognise, for listings and messages. */
  get filename(): string {
    return this.children[0]?.node.filename ?? '';
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** A debug event announced by a parent (blkdebug acts on them; other nodes ignore them). */
  debugEvent(_event: string): void {}

  /**
   * A filter names the child whose content it passes on (QEMU's filtered
   * child: blkdebug's image, blkverify's raw, copy-before-write's file);
   * undefined for formats and protocols.
   */
  readonly filteredRole: ChildRole | undefined = undefined;

  /** The next node down a chain of filters and backing files (QEMU's bdrv_filter_or_cow_bs). */
  get filterOrBacking(): BlockNode | undefined {
    return this.filteredRole !== undefined ? this.child(this.filteredRole) : this.child('backing');
  }

  /** The child events go to: the file (formats) or the filtered image. */
  private get primaryChild(): BlockNode | undefined {
    return this.child('file') ?? this.child('image');
  }

  /** The node a child role points at, if any. */
  child(role: ChildRole): BlockNode | undefined {
    for (const c of this.children) if (c.role === role) return c.node;
    return undefined;
  }

  /**
   * Points this node's links to `old` at `replacement`, a node that shows the
   * same content (a filter inserted above `old`, or taken away again), as
   * QEMU's bdrv_replace_node does for each parent. Returns false and changes
   * nothing when the driver cannot swap that child while open; it then keeps
   * using `old`. The graph keeps the users' bookkeeping (BlockGraph.insertFilter).
   */
  replaceChild(old: BlockNode, replacement: BlockNode): boolean {
    const links = this.children.filter((c) => c.node === old);
    if (links.length === 0 || !links.every((c) => this.canReplaceChild(c.role))) return false;
    for (const c of links) {
      c.node = replacement;
      this.childReplaced(c.role, replacement);
    }
    return true;
  }

  /** Whether the driver can be given another node for a child role while open (it re-reads nothing). */
  protected canReplaceChild(_role: ChildRole): boolean {
    return false;
  }

  /** Updates what the driver holds for a child role (called by replaceChild). */
  protected childReplaced(_role: ChildRole, _node: BlockNode): void {}

  /**
   * The children a flush of this node must reach. All of them by default; a
   * filter whose other children are not the guest's data (a backup's target,
   * a fleecing view's source) narrows it, as QEMU's copy-before-write does.
   */
  protected get flushedChildren(): readonly ChildLink[] {
    return this.children;
  }

  // ---- driver hooks ------------------------------------------------------

  protected abstract doRead(offset: number, buf: Buffer): Promise<void>;

  protected doWrite(_offset: number, _buf: Buffer, _flags: number): Promise<void> {
    return Promise.reject(new VdiskError('ENOTSUP', `node '${this.nodeName}' (${this.driverName}) does not support writes`));
  }

  /**
   * Writes zeroes efficiently, or throws ENOTSUP if this driver cannot: the
   * request path then falls back to writing zero buffers unless NO_FALLBACK.
   */
  protected doWriteZeroes(_offset: number, _length: number, _flags: number): Promise<void> {
    return Promise.reject(new VdiskError('ENOTSUP', 'no efficient write-zeroes'));
  }

  /** Discard is a hint; the default ignores it. */
  protected doDiscard(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  /** Makes this node's own state durable; children are flushed after it by the request path. */
  protected doFlush(): Promise<void> {
    return Promise.resolve();
  }

  protected doTruncate(_size: number): Promise<void> {
    return Promise.reject(new VdiskError('ENOTSUP', `node '${this.nodeName}' (${this.driverName}) cannot be resized`));
  }

  /** The default: everything is data owned by this node. */
  protected doBlockStatus(_offset: number, length: number): Promise<Extent> {
    return Promise.resolve({ length, flags: Status.DATA | Status.ALLOCATED, depth: 1 });
  }

  /** Prefetch hint; the default does nothing. */
  protected doCache(_offset: number, _length: number): Promise<void> {
    return Promise.resolve();
  }

  /** Releases what the driver holds (file descriptors, locks). Children are closed by the graph. */
  protected doClose(): Promise<void> {
    return Promise.resolve();
  }

  // ---- the request path ----------------------------------------------------

  /** Reads buf.length bytes at offset into buf. */
  async read(offset: number, buf: Buffer, _flags: number = 0): Promise<void> {
    this.checkRange('read', offset, buf.length, false, Op.Read);
    if (buf.length === 0) return;
    const start = performance.now();
    this.inFlight++;
    try {
      if (this.announcesIo) this.primaryChild?.debugEvent('read_aio');
      if (this.isAligned(offset, buf.length)) await this.readSplit(offset, buf);
      else await this.readUnaligned(offset, buf);
      this.stats.done(Op.Read, buf.length, start);
    } catch (err) {
      this.stats.fail(Op.Read);
      throw toVdiskError(err, `read at ${offset} on node '${this.nodeName}'`);
    } finally {
      this.requestDone();
    }
  }

  /** Writes buf at offset. With ReqFlags.FUA the data is durable when this settles. */
  async write(offset: number, buf: Buffer, flags: number = 0): Promise<void> {
    this.checkRange('write', offset, buf.length, true, Op.Write);
    if (buf.length === 0) return;
    if (this.detectZeroes !== 'off' && isAllZero(buf)) {
      return this.writeZeroes(offset, buf.length, (flags & ReqFlags.FUA) | (this.detectZeroes === 'unmap' ? ReqFlags.MAY_UNMAP : 0));
    }
    // From here on, as in QEMU's accounting, the time a write waits at a quiesced node counts.
    const start = performance.now();
    while (this.writeGate) await this.writeGate;
    let settled: Array<() => void> | undefined;
    this.inFlight++;
    try {
      if (this.beforeWrite.length) settled = await this.runBeforeWrite(offset, buf.length);
      if (this.announcesIo) this.primaryChild?.debugEvent('write_aio');
      // As QEMU's bdrv_aligned_pwritev: the node being written announces pwritev to itself.
      this.debugEvent('pwritev');
      if (this.limits.requestAlignment === 1) {
        await this.writeSplit(offset, buf, flags);
      } else if (this.isAligned(offset, buf.length)) {
        const release = await this.serialise(offset, offset + buf.length, false);
        try {
          await this.writeSplit(offset, buf, flags);
        } finally {
          release();
        }
      } else {
        await this.writeUnaligned(offset, buf, flags);
      }
      if (offset + buf.length > this.length) this.grow(offset + buf.length);
      this.debugEvent('pwritev_done');
      this.wrote(offset + buf.length, buf.length, start);
    } catch (err) {
      this.stats.fail(Op.Write);
      throw toVdiskError(err, `write at ${offset} on node '${this.nodeName}'`);
    } finally {
      this.markDirty(offset, buf.length);
      if (settled) for (const done of settled) done();
      this.requestDone();
    }
  }

  /**
   * Writes whole clusters compressed (qcow2), for backups and convert -c.
   * Drivers without compression refuse with ENOTSUP; a cluster that does
   * not compress is written normally by the driver.
   */
  async writeCompressed(offset: number, buf: Buffer): Promise<void> {
    this.checkRange('write', offset, buf.length, true, Op.Write);
    if (buf.length === 0) return;
    const start = performance.now();
    while (this.writeGate) await this.writeGate;
    let settled: Array<() => void> | undefined;
    this.inFlight++;
    try {
      if (this.beforeWrite.length) settled = await this.runBeforeWrite(offset, buf.length);
      await this.doWriteCompressed(offset, buf);
      if (offset + buf.length > this.length) this.grow(offset + buf.length);
      this.wrote(offset + buf.length, buf.length, start);
    } catch (err) {
      this.stats.fail(Op.Write);
      throw toVdiskError(err, `compressed write at ${offset} on node '${this.nodeName}'`);
    } finally {
      this.markDirty(offset, buf.length);
      if (settled) for (const done of settled) done();
      this.requestDone();
    }
  }

  /** Whole clusters at cluster-aligned offsets; ENOTSUP unless the driver compresses. */
  protected doWriteCompressed(_offset: number, _buf: Buffer): Promise<void> {
    return Promise.reject(new VdiskError('ENOTSUP', `Compression is not supported for this drive ${this.nodeName}`));
  }

  /** The cluster size compressed writes need, or 0 when the node does not compress. */
  get compressionClusterSize(): number {
    return 0;
  }

  /** Makes a range read as zeroes; MAY_UNMAP allows deallocation, NO_FALLBACK refuses slow paths. */
  async writeZeroes(offset: number, length: number, flags: number = 0): Promise<void> {
    this.checkRange('write-zeroes', offset, length, true, Op.Write);
    if (length === 0) return;
    if (!this.discardEnabled) flags &= ~ReqFlags.MAY_UNMAP;
    // A write of zeroes is a write to QEMU's accounting (virtio-blk and scsi count it so).
    const start = performance.now();
    while (this.writeGate) await this.writeGate;
    let settled: Array<() => void> | undefined;
    this.inFlight++;
    try {
      if (this.beforeWrite.length) settled = await this.runBeforeWrite(offset, length);
      this.debugEvent('pwritev_zero');
      const a = this.limits.requestAlignment;
      const head = offset % a;
      const tail = (offset + length) % a;
      if (head === 0 && tail === 0) {
        await this.zeroAligned(offset, length, flags);
        if (offset + length > this.length) this.grow(offset + length);
      } else {
        if (flags & ReqFlags.NO_FALLBACK) {
          throw new VdiskError('ENOTSUP', 'unaligned write-zeroes cannot be fast');
        }
        // Unaligned edges are written as zero buffers; the aligned middle goes to the driver.
        const bodyStart = head === 0 ? offset : offset - head + a;
        const bodyEnd = offset + length - tail;
        if (bodyStart >= bodyEnd) {
          await this.writeUnaligned(offset, zeroes(length), flags);
        } else {
          if (head) await this.writeUnaligned(offset, zeroes(bodyStart - offset), flags);
          await this.zeroAligned(bodyStart, bodyEnd - bodyStart, flags);
          if (tail) await this.writeUnaligned(bodyEnd, zeroes(tail), flags);
        }
      }
      this.wrote(offset + length, length, start);
    } catch (err) {
      this.stats.fail(Op.Write);
      throw toVdiskError(err, `write-zeroes at ${offset} on node '${this.nodeName}'`);
    } finally {
      this.markDirty(offset, length);
      if (settled) for (const done of settled) done();
      this.requestDone();
    }
  }

  /** Tells the node a range is no longer needed; reads of it afterwards are unspecified. */
  async discard(offset: number, length: number): Promise<void> {
    this.checkRange('discard', offset, length, true, Op.Unmap);
    if (length === 0) return;
    const t0 = performance.now();
    if (!this.discardEnabled) {
      // Asked and answered (discard=ignore drops it, as QEMU): it counts as done.
      this.stats.done(Op.Unmap, length, t0);
      return;
    }
    while (this.writeGate) await this.writeGate;
    let settled: Array<() => void> | undefined;
    this.inFlight++;
    try {
      if (this.beforeWrite.length) settled = await this.runBeforeWrite(offset, length);
      // Only the aligned part can be discarded; the edges keep their data (discard is a hint).
      const a = this.limits.requestAlignment;
      const start = Math.ceil(offset / a) * a;
      const end = Math.floor((offset + length) / a) * a;
      if (end > start) await this.doDiscard(start, end - start);
      this.stats.done(Op.Unmap, length, t0);
    } catch (err) {
      this.stats.fail(Op.Unmap);
      throw toVdiskError(err, `discard at ${offset} on node '${this.nodeName}'`);
    } finally {
      this.markDirty(offset, length);
      if (settled) for (const done of settled) done();
      this.requestDone();
    }
  }

  /** Makes every completed write durable, on this node and every node below it. */
  async flush(): Promise<void> {
    if (this.closed) {
      this.stats.invalid[Op.Flush]++;
      throw new VdiskError('ESHUTDOWN', `node '${this.nodeName}' is closed`);
    }
    const start = performance.now();
    this.inFlight++;
    const gen = this.writeGen;
    try {
      // As QEMU's bdrv_co_flush: flush_to_os always, flush_to_disk only if written since the last flush.
      const primary = this.primaryChild;
      if (primary) {
        primary.debugEvent('flush_to_os');
        if (!this.cacheMode.noFlush && gen !== this.flushedGen) primary.debugEvent('flush_to_disk');
      }
      await this.doFlush();
      this.flushedGen = gen;
      const kids = this.flushedChildren;
      if (kids.length === 1) await kids[0].node.flush();
      else if (kids.length > 1) await Promise.all(kids.map((c) => c.node.flush()));
      this.stats.done(Op.Flush, 0, start);
    } catch (err) {
      this.stats.fail(Op.Flush);
      throw toVdiskError(err, `flush on node '${this.nodeName}'`);
    } finally {
      this.requestDone();
    }
  }

  /** Changes the length. Growing reads back zeroes in the new part. */
  async truncate(size: number): Promise<void> {
    if (!Number.isSafeInteger(size) || size < 0) throw invalid(`invalid size ${size}`);
    if (this.closed) throw new VdiskError('ESHUTDOWN', `node '${this.nodeName}' is closed`);
    if (this.readOnly) throw new VdiskError('EROFS', `node '${this.nodeName}' is read-only`);
    if (size % this.limits.requestAlignment !== 0) {
      throw invalid(`size ${size} is not a multiple of the request alignment ${this.limits.requestAlignment}`);
    }
    await this.drain();
    if (this.closed) throw new VdiskError('ESHUTDOWN', `node '${this.nodeName}' is closed`);
    await this.doTruncate(size);
    // Bitmaps follow the size: a grown part is clean, a cut part is forgotten.
    for (const b of this.dirtyBitmaps) b.resize(this.length);
    if (this.dirtyBitmaps.some((b) => b.persistent)) await this.bitmapDriver?.persistentChanged?.('resized');
  }

  /** Runs the write hooks in order; returns what they want called when the request has settled. */
  private async runBeforeWrite(offset: number, length: number): Promise<Array<() => void>> {
    const settled: Array<() => void> = [];
    try {
      for (const hook of [...this.beforeWrite]) {
        const done = await hook(offset, length);
        if (done) settled.push(done);
      }
    } catch (err) {
      // The hooks that ran are told the request is over; the one that threw cleaned up itself.
      for (const done of settled) done();
      throw err;
    }
    return settled;
  }

  /** Records a change to [offset, offset + length) in every enabled dirty bitmap. */
  private markDirty(offset: number, length: number): void {
    this.writeGen++;
    for (const b of this.dirtyBitmaps) if (b.enabled) b.mark(offset, length);
  }

  /** A write past the end made the node longer (growable nodes): bitmaps grow with it. */
  private grow(length: number): void {
    this.length = length;
    for (const b of this.dirtyBitmaps) b.resize(length);
  }

  /** Block status of the extent that starts at offset (at most length bytes, at least 1). */
  async blockStatus(offset: number, length: number): Promise<Extent> {
    this.checkRange('block-status', offset, length, false);
    if (length === 0) throw invalid('block status needs a non-zero length');
    // Past the end of a growable node nothing is stored: it reads as zeroes.
    if (offset >= this.length) return { length, flags: Status.ZERO, depth: 0 };
    this.inFlight++;
    try {
      const a = this.limits.requestAlignment;
      const start = offset - (offset % a);
      const end = Math.min(this.length, Math.ceil((offset + length) / a) * a);
      const ext = await this.doBlockStatus(start, end - start);
      // Report from offset on, never more than asked or less than one byte.
      let len = Math.min(ext.length - (offset - start), length);
      if (!(len > 0)) len = Math.min(length, a - (offset - start));
      if (start === offset && len === ext.length) return ext;
      return { ...ext, length: len, hostOffset: ext.hostOffset === undefined ? undefined : ext.hostOffset + (offset - start) };
    } catch (err) {
      throw toVdiskError(err, `block status at ${offset} on node '${this.nodeName}'`);
    } finally {
      this.requestDone();
    }
  }

  /** Asks the node to prefetch a range; never fails the caller for lack of support. */
  async cache(offset: number, length: number): Promise<void> {
    this.checkRange('cache', offset, length, false);
    if (length === 0) return;
    this.inFlight++;
    try {
      await this.doCache(offset, length);
    } catch (err) {
      throw toVdiskError(err, `cache at ${offset} on node '${this.nodeName}'`);
    } finally {
      this.requestDone();
    }
  }

  /**
   * Holds new writes, write-zeroes and discards at the door and waits for
   * the requests in progress: a transaction takes its point in time with the
   * nodes it names quiet, so no guest write lands between two of its actions
   * (QEMU drains every node for a transaction). Reads go on. Nested calls
   * count; the returned function ends this one.
   */
  async quiesce(): Promise<() => void> {
    if (this.quiesceCount++ === 0) this.writeGate = new Promise((r) => (this.openGate = r));
    let ended = false;
    const end = (): void => {
      if (ended) return;
      ended = true;
      if (--this.quiesceCount === 0) {
        this.writeGate = undefined;
        this.openGate?.();
      }
    };
    try {
      await this.drain();
    } catch (err) {
      end();
      throw err;
    }
    return end;
  }

  /** Resolves when no request is in progress on this node. */
  drain(): Promise<void> {
    if (this.inFlight === 0) return Promise.resolve();
    return new Promise((resolve) => this.drainWaiters.push(resolve));
  }

  /** Waits for requests in progress, then releases the driver's resources. Idempotent. */
  close(): Promise<void> {
    this.closing ??= (async () => {
      await this.drain();
      this.closed = true;
      await this.doClose();
    })();
    return this.closing;
  }

  // ---- helpers for the request path ---------------------------------------

  private checkRange(op: string, offset: number, length: number, isWrite: boolean, acct?: Op): void {
    if (
      !Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0 ||
      (offset + length > this.length && !(this.growable && offset + length <= MAX_OFFSET)) ||
      this.closed || (isWrite && this.readOnly)
    ) {
      // Refused before it started: QEMU's invalid_*_operations.
      if (acct !== undefined) this.stats.invalid[acct]++;
      this.rangeError(op, offset, length, isWrite);
    }
  }

  /** Throws the error checkRange found (kept out of checkRange so the common path stays small). */
  private rangeError(op: string, offset: number, length: number, isWrite: boolean): void {
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
      throw invalid(`${op} on node '${this.nodeName}': offset ${offset} and length ${length} must be non-negative integers below 2^53`);
    }
    if (offset + length > this.length && !(this.growable && offset + length <= MAX_OFFSET)) {
      throw invalid(`${op} on node '${this.nodeName}' past the end: offset ${offset} + length ${length} > size ${this.length}`);
    }
    if (this.closed) throw new VdiskError('ESHUTDOWN', `node '${this.nodeName}' is closed`);
    if (isWrite && this.readOnly) throw new VdiskError('EROFS', `node '${this.nodeName}' is read-only`);
  }

  /** Accounts a successful write-like request ending at `end`. */
  private wrote(end: number, length: number, start: number): void {
    if (end > this.stats.wrHighestOffset) this.stats.wrHighestOffset = end;
    this.stats.done(Op.Write, length, start);
  }

  private isAligned(offset: number, length: number): boolean {
    const a = this.limits.requestAlignment;
    return a === 1 || (offset % a === 0 && length % a === 0);
  }

  private requestDone(): void {
    if (--this.inFlight === 0 && this.drainWaiters.length) {
      const waiters = this.drainWaiters;
      this.drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  private async readSplit(offset: number, buf: Buffer): Promise<void> {
    const max = this.limits.maxTransfer;
    if (buf.length <= max) return this.doRead(offset, buf);
    for (let done = 0; done < buf.length; done += max) {
      await this.doRead(offset + done, buf.subarray(done, Math.min(buf.length, done + max)));
    }
  }

  private async writeSplit(offset: number, buf: Buffer, flags: number): Promise<void> {
    const max = this.limits.maxTransfer;
    const driverFlags = this.nativeFua ? flags : flags & ~ReqFlags.FUA;
    if (buf.length <= max) {
      await this.doWrite(offset, buf, driverFlags);
    } else {
      for (let done = 0; done < buf.length; done += max) {
        await this.doWrite(offset + done, buf.subarray(done, Math.min(buf.length, done + max)), driverFlags);
      }
    }
    if (flags & ReqFlags.FUA && !this.nativeFua) await this.flushNoCount();
  }

  private async zeroAligned(offset: number, length: number, flags: number): Promise<void> {
    const release = this.limits.requestAlignment > 1 ? await this.serialise(offset, offset + length, false) : undefined;
    try {
      await this.zeroAlignedLocked(offset, length, flags);
    } finally {
      release?.();
    }
  }

  private async zeroAlignedLocked(offset: number, length: number, flags: number): Promise<void> {
    const driverFlags = this.nativeFua ? flags : flags & ~ReqFlags.FUA;
    try {
      await this.doWriteZeroes(offset, length, driverFlags);
    } catch (err) {
      if (!(err instanceof VdiskError) || err.errno !== 'ENOTSUP' || flags & ReqFlags.NO_FALLBACK) throw err;
      // No efficient way: write zero buffers, at most 1 MiB at a time.
      const step = Math.max(this.limits.requestAlignment, Math.min(ZERO_BUFFER.length, this.limits.maxTransfer));
      for (let done = 0; done < length; done += step) {
        const n = Math.min(step, length - done);
        await this.doWrite(offset + done, n <= ZERO_BUFFER.length ? ZERO_BUFFER.subarray(0, n) : Buffer.alloc(n), driverFlags);
      }
    }
    if (flags & ReqFlags.FUA && !this.nativeFua) await this.flushNoCount();
  }

  private async flushNoCount(): Promise<void> {
    await this.doFlush();
    for (const c of this.flushedChildren) await c.node.flush();
  }

  /**
   * Reads an unaligned range through an aligned bounce buffer. The driver
   * sees whole aligned blocks even for the partial block at the end of a
   * node whose size is not aligned (it reads that block short and zero-fills,
   * as a file opened with O_DIRECT must); what lies wholly past the end of a
   * growable node is zeroes without asking the driver.
   */
  private async readUnaligned(offset: number, buf: Buffer): Promise<void> {
    const a = this.limits.requestAlignment;
    const start = offset - (offset % a);
    const end = alignUp(offset + buf.length, a);
    const bounce = Buffer.alloc(end - start);
    const stored = Math.min(end, alignUp(this.length, a)) - start;
    if (stored > 0) await this.readSplit(start, bounce.subarray(0, stored));
    bounce.copy(buf, 0, offset - start, offset - start + buf.length);
  }

  /**
   * Writes an unaligned range by read-modify-write of the aligned blocks it
   * touches. It is serialised against every overlapping write, or two writes
   * into different halves of one block would undo each other.
   */
  private async writeUnaligned(offset: number, buf: Buffer, flags: number): Promise<void> {
    const a = this.limits.requestAlignment;
    const start = offset - (offset % a);
    const end = Math.ceil((offset + buf.length) / a) * a;
    if (end > this.length) {
      throw invalid(`unaligned write at ${offset} on node '${this.nodeName}' reaches into its partial last block`);
    }
    const release = await this.serialise(start, end, true);
    try {
      const bounce = Buffer.alloc(end - start);
      const headPartial = offset % a !== 0;
      const tailPartial = (offset + buf.length) % a !== 0;
      if (headPartial) {
        this.debugEvent('pwritev_rmw_head');
        await this.readSplit(start, bounce.subarray(0, a));
        this.debugEvent('pwritev_rmw_after_head');
      }
      // One block holding both edges was read already as the head.
      if (tailPartial && !(headPartial && end - a === start)) {
        this.debugEvent('pwritev_rmw_tail');
        await this.readSplit(end - a, bounce.subarray(bounce.length - a));
        this.debugEvent('pwritev_rmw_after_tail');
      }
      buf.copy(bounce, offset - start);
      await this.writeSplit(start, bounce, flags);
    } finally {
      release();
    }
  }

  /**
   * Waits until no conflicting write overlaps [start, end), then registers
   * this one. A read-modify-write (serialising) conflicts with every write;
   * a plain write conflicts only with read-modify-writes. Used only on nodes
   * whose requestAlignment is above 1.
   */
  private async serialise(start: number, end: number, serialising: boolean): Promise<() => void> {
    for (;;) {
      const busy = this.tracked.find((r) => r.start < end && start < r.end && (serialising || r.serialising));
      if (!busy) break;
      await busy.done;
    }
    let release!: () => void;
    const entry = { start, end, serialising, done: new Promise<void>((r) => (release = r)) };
    this.tracked.push(entry);
    return () => {
      this.tracked.splice(this.tracked.indexOf(entry), 1);
      release();
    };
  }
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

function isAllZero(buf: Buffer): boolean {
  for (let done = 0; done < buf.length; done += ZERO_BUFFER.length) {
    const n = Math.min(ZERO_BUFFER.length, buf.length - done);
    if (!buf.subarray(done, done + n).equals(ZERO_BUFFER.subarray(0, n))) return false;
  }
  return true;
}

function zeroes(length: number): Buffer {
  return length <= ZERO_BUFFER.length ? ZERO_BUFFER.subarray(0, length) : Buffer.alloc(length);
}
