/**
 * qcow2 refcounts: the refcount table, refcount blocks (cached), and the
 * allocation of host clusters.
 *
 * Crash safety rests on one rule: on disk, a cluster's refcount is never
 * lower than the number of references to it. So between flushes refcount
 * blocks only ever receive increments (written whenever convenient; at
 * worst they leak), and decrements are queued (`release`) and applied by
 * the driver only after the metadata that stopped referencing the clusters
 * is durable. A released cluster is not reused before then either, so data
 * still in flight to it cannot land in someone else's cluster.
 */
import { VdiskError } from '../../../errors.js';
import type { BlockNode } from '../../node.js';
import { readU64, writeU64 } from './format.js';

export interface RefcountLayout {
  clusterBits: number;
  refcountOrder: number;
  tableOffset: number;
  tableClusters: number;
}

interface CachedBlock {
  offset: number;
  buf: Buffer;
  dirty: boolean;
  /** The block's writes, one at a time (see writeBlock). */
  writing?: Promise<void>;
}

/** Refcount blocks kept in memory at most (each is one cluster). */
const MAX_CACHED_BYTES = 8 * 1024 * 1024;

export class Refcounts {
  readonly clusterSize: number;
  readonly bits: number;
  /** Refcount entries per block. */
  readonly perBlock: number;
  private readonly maxValue: number;
  table: Buffer;
  layout: RefcountLayout;
  private tableDirty = false;
  /**
   * The table as last written to disk by writeBack (with every block it names written before it): the
   * only table the header may point at. `layout` may be newer (a growth not written back yet).
   */
  diskLayout: RefcountLayout;
  /** Tables replaced by growth, freed only once the header on disk no longer points at them. */
  private retired: Array<{ offset: number; clusters: number }> = [];
  private readonly blocks = new Map<number, CachedBlock>();
  private readonly loading = new Map<number, Promise<CachedBlock | undefined>>();
  private cachedBytes = 0;
  /** No cluster below this index is free (a search hint). */
  private freeHint = 0;
  /** Serialises allocations: find-and-mark must not interleave. */
  private allocLock: Promise<unknown> = Promise.resolve();
  /** Clusters whose refcount must drop, once the driver says the references are gone for good. */
  private pending: Array<{ cluster: number; count: number; epoch: number }> = [];
  /** Clusters in `pending`, with how many entries each has there. */
  private pendingClusters = new Map<number, number>();
  /** Serialises growth of the refcount table. */
  private growLock: Promise<unknown> = Promise.resolve();
  /**
   * During a repair: the clusters something references, whatever their
   * refcount says, and one past the last of them. Nothing new goes there.
   */
  reserved: { has(cluster: number): boolean; end: number } | undefined;
  /** Table clusters and refcount blocks, for the metadata overlap check. */
  readonly metadataClusters = new Set<number>();

  constructor(
    private readonly file: BlockNode,
    layout: RefcountLayout,
    table: Buffer,
  ) {
    this.layout = { ...layout };
    this.diskLayout = { ...layout };
    this.clusterSize = 2 ** layout.clusterBits;
    this.bits = 2 ** layout.refcountOrder;
    this.perBlock = (this.clusterSize * 8) / this.bits;
    this.maxValue = this.bits >= 53 ? Number.MAX_SAFE_INTEGER : 2 ** this.bits - 1;
    this.table = table;
    this.noteTableClusters();
  }

  static async load(file: BlockNode, layout: RefcountLayout): Promise<Refcounts> {
    const cs = 2 ** layout.clusterBits;
    const table = Buffer.alloc(layout.tableClusters * cs);
    await file.read(layout.tableOffset, table);
    const r = new Refcounts(file, layout, table);
    for (let i = 0; i < r.tableEntries; i++) {
      const off = r.blockOffset(i);
      if (off === 0) continue;
      if (off % cs !== 0) throw corrupt(`refcount block offset ${off} (refcount table entry ${i}) is not cluster aligned`);
      if (off + cs > file.size) throw corrupt(`refcount block offset ${off} (refcount table entry ${i}) is past the end of the image (${file.size})`);
      r.metadataClusters.add(off / cs);
    }
    return r;
  }

  private noteTableClusters(): void {
    const first = this.layout.tableOffset / this.clusterSize;
    for (let i = 0; i < this.layout.tableClusters; i++) this.metadataClusters.add(first + i);
  }

  get tableEntries(): number {
    return this.table.length / 8;
  }

  private blockOffset(index: number): number {
    return readU64(this.table, index * 8, `refcount table entry ${index}`) - (this.table.readUInt32BE(index * 8 + 4) & 0x1ff);
  }

  // ---- reading and writing single refcounts ---------------------------------

  /** The refcount of a host cluster. */
  async get(cluster: number): Promise<number> {
    const block = await this.block(Math.floor(cluster / this.perBlock), false);
    return block ? this.readEntry(block.buf, cluster % this.perBlock) : 0;
  }

  private readEntry(buf: Buffer, i: number): number {
    switch (this.bits) {
      case 16:
        return buf.readUInt16BE(i * 2);
      case 8:
        return buf[i];
      case 32:
        return buf.readUInt32BE(i * 4);
      case 64: {
        const hi = buf.readUInt32BE(i * 8);
        return hi >= 0x200000 ? Number.MAX_SAFE_INTEGER : hi * 2 ** 32 + buf.readUInt32BE(i * 8 + 4);
      }
      default: {
        // 1, 2 or 4 bits: bit 0 is the least significant bit of the byte.
        const perByte = 8 / this.bits;
        return (buf[Math.floor(i / perByte)] >> ((i % perByte) * this.bits)) & ((1 << this.bits) - 1);
      }
    }
  }

  private writeEntry(buf: Buffer, i: number, value: number): void {
    switch (this.bits) {
      case 16:
        return void buf.writeUInt16BE(value, i * 2);
      case 8:
        buf[i] = value;
        return;
      case 32:
        return void buf.writeUInt32BE(value, i * 4);
      case 64:
        return writeU64(buf, i * 8, value);
      default: {
        const perByte = 8 / this.bits;
        const shift = (i % perByte) * this.bits;
        const mask = ((1 << this.bits) - 1) << shift;
        const at = Math.floor(i / perByte);
        buf[at] = (buf[at] & ~mask) | (value << shift);
      }
    }
  }

  /** Adds delta to a cluster's refcount in the cached block (creating the block if needed). */
  private async change(cluster: number, delta: number): Promise<void> {
    const index = Math.floor(cluster / this.perBlock);
    let block = (await this.block(index, true))!;
    // Between the lookup and here the block may have been evicted (and reloaded): change the cached one,
    // or put this one back, or the change is lost with a block nobody writes any more.
    const cached = this.blocks.get(index);
    if (cached) block = cached;
    else {
      this.blocks.set(index, block);
      this.cachedBytes += this.clusterSize;
    }
    const i = cluster % this.perBlock;
    const value = this.readEntry(block.buf, i) + delta;
    if (value < 0) throw corrupt(`refcount of cluster ${cluster} would drop below zero`);
    if (value > this.maxValue) throw new VdiskError('EIO', `qcow2: refcount of cluster ${cluster} would overflow ${this.bits} bits`);
    this.writeEntry(block.buf, i, value);
    block.dirty = true;
    if (value === 0 && cluster < this.freeHint) this.freeHint = cluster;
  }

  // ---- the block cache ------------------------------------------------------

  /** The cached refcount block for a table index; with create, makes one if there is none. */
  private async block(index: number, create: boolean): Promise<CachedBlock | undefined> {
    const cached = this.blocks.get(index);
    if (cached) {
      // Refresh its place in the LRU order.
      this.blocks.delete(index);
      this.blocks.set(index, cached);
      return cached;
    }
    let p = this.loading.get(index);
    if (!p) {
      p = this.loadBlock(index).finally(() => this.loading.delete(index));
      this.loading.set(index, p);
    }
    const b = await p;
    if (b || !create) return b;
    return this.createBlock(index);
  }

  private async loadBlock(index: number): Promise<CachedBlock | undefined> {
    if (index >= this.tableEntries) return undefined;
    const offset = this.blockOffset(index);
    if (offset === 0) return undefined;
    const buf = Buffer.alloc(this.clusterSize);
    this.file.debugEvent('refblock_load');
    await this.file.read(offset, buf);
    const existing = this.blocks.get(index);
    if (existing) return existing;
    const b = { offset, buf, dirty: false };
    await this.insert(index, b);
    return b;
  }

  private async insert(index: number, b: CachedBlock): Promise<void> {
    this.blocks.set(index, b);
    this.cachedBytes += this.clusterSize;
    // Evict the least recently used blocks; writing a dirty one first is always safe (increments only).
    for (const [i, old] of this.blocks) {
      if (this.cachedBytes <= MAX_CACHED_BYTES) break;
      if (i === index) continue;
      if (old.dirty) await this.writeBlock(old);
      // A change made while the write was in flight marked it dirty again: it stays cached.
      if (!old.dirty && this.blocks.get(i) === old) {
        this.blocks.delete(i);
        this.cachedBytes -= this.clusterSize;
      }
    }
  }

  /**
   * Makes a refcount block for table index `index`. The block describes
   * itself: it is placed at the first cluster of the range it covers, which
   * is free (no block means every refcount there is 0), as QEMU does.
   *
   * Not during a repair, though: there a range without a block may well be
   * in use (its block was lost, the references were not), and the block
   * went over a data cluster (seen: a lost block rebuilt over guest data).
   * A cluster in use goes to a free cluster no one references instead.
   */
  private async createBlock(index: number): Promise<CachedBlock> {
    if (index >= this.tableEntries) await this.growTable(index + 1);
    const existing = this.blocks.get(index) ?? (await this.block(index, false));
    if (existing) return existing;
    const cluster = index * this.perBlock;
    if (!this.reserved?.has(cluster)) return this.newBlock(index, cluster, true);
    const { start, hint } = await this.findFree(1);
    this.freeHint = hint === start ? start + 1 : hint;
    const inRange = Math.floor(start / this.perBlock) === index;
    const b = await this.newBlock(index, start, inRange);
    if (!inRange) await this.change(start, 1);
    return b;
  }

  /** Registers a new, empty refcount block for `index` stored at `cluster`. */
  private async newBlock(index: number, cluster: number, countsItself: boolean): Promise<CachedBlock> {
    this.file.debugEvent('refblock_alloc');
    const b: CachedBlock = { offset: cluster * this.clusterSize, buf: Buffer.alloc(this.clusterSize), dirty: true };
    if (countsItself) this.writeEntry(b.buf, cluster % this.perBlock, 1);
    writeU64(this.table, index * 8, b.offset);
    this.tableDirty = true;
    this.metadataClusters.add(cluster);
    await this.insert(index, b);
    if (this.freeHint === cluster) this.freeHint = cluster + 1;
    return b;
  }

  /** Grows the refcount table to at least `entries` entries (one growth at a time). */
  private growTable(entries: number): Promise<void> {
    const run = this.growLock.then(() => (entries > this.tableEntries ? this.growTableLocked(entries) : undefined));
    this.growLock = run.catch(() => undefined);
    return run;
  }

  /**
   * The new table goes after everything allocated, followed by the refcount
   * blocks that the range [table, blocks) needs and does not have: a region
   * that describes itself. The old table is released (freed after a flush).
   */
  private async growTableLocked(entries: number): Promise<void> {
    this.file.debugEvent('reftable_grow');
    const cs = this.clusterSize;
    const oldClusters = this.layout.tableClusters;
    const oldOffset = this.layout.tableOffset;
    const start = Math.max(await this.endOfAllocated(), this.reserved?.end ?? 0);
    let tableClusters = Math.max(Math.ceil((entries * 8) / cs), Math.ceil(oldClusters * 1.5), oldClusters + 1);
    let missing: number[] = [];
    // Find how many new blocks the region needs; the region grows with them, so iterate until stable.
    for (;;) {
      const end = start + tableClusters + missing.length;
      const need: number[] = [];
      for (let index = Math.floor(start / this.perBlock); index <= Math.floor((end - 1) / this.perBlock); index++) {
        if (!(index < this.tableEntries && this.blockOffset(index) !== 0)) need.push(index);
      }
      const maxIndex = Math.max(entries - 1, ...need);
      if ((maxIndex + 1) * 8 > tableClusters * cs) {
        tableClusters = Math.ceil(((maxIndex + 1) * 8) / cs);
        continue;
      }
      if (need.length === missing.length) {
        missing = need;
        break;
      }
      missing = need;
    }
    if (tableClusters * cs > 8 * 1024 * 1024) throw new VdiskError('ENOSPC', 'qcow2: the refcount table would exceed 8 MiB');
    const table = Buffer.alloc(tableClusters * cs);
    this.table.copy(table);
    this.table = table;
    this.layout.tableOffset = start * cs;
    this.layout.tableClusters = tableClusters;
    this.tableDirty = true;
    this.noteTableClusters();
    for (const [k, index] of missing.entries()) await this.newBlock(index, start + tableClusters + k, false);
    for (let c = start; c < start + tableClusters + missing.length; c++) await this.change(c, 1);
    // The old table stays allocated (and counted as metadata) while the header on disk may point at it.
    this.retired.push({ offset: oldOffset, clusters: oldClusters });
  }

  /**
   * Releases the tables replaced by growth, except the one the header on disk points at. The driver
   * calls it once that header is durable.
   */
  releaseRetired(headerTableOffset: number): void {
    const cs = this.clusterSize;
    this.retired = this.retired.filter((r) => {
      if (r.offset === headerTableOffset) return true;
      for (let i = 0; i < r.clusters; i++) {
        this.metadataClusters.delete(r.offset / cs + i);
        this.release(r.offset / cs + i, 1, -1);
      }
      return false;
    });
  }

  get hasRetired(): boolean {
    return this.retired.length > 0;
  }

  /** One past the highest cluster with a non-zero refcount. */
  private async endOfAllocated(): Promise<number> {
    for (let index = this.tableEntries - 1; index >= 0; index--) {
      const b = await this.block(index, false);
      if (!b) continue;
      for (let i = this.perBlock - 1; i >= 0; i--) {
        if (this.readEntry(b.buf, i) !== 0) return index * this.perBlock + i + 1;
      }
    }
    return 0;
  }

  // ---- allocation -------------------------------------------------------------

  /**
   * Allocates `count` contiguous free host clusters, sets their refcounts to
   * 1 and returns the first cluster index.
   */
  allocate(count: number): Promise<number> {
    const run = this.allocLock.then(() => this.allocateLocked(count));
    this.allocLock = run.catch(() => undefined);
    return run;
  }

  private async allocateLocked(count: number): Promise<number> {
    // The run's ranges may lack refcount blocks. Those blocks are put in front of the run, in the same
    // free region: [start, start + blocks) holds the new blocks, [start + blocks, ... + count) the run.
    // (Placing each block at the start of the range it covers, as createBlock does, can never make room
    // for a run of perBlock clusters or more: every fresh range loses its first cluster to its block,
    // and the search looped, growing the refcount table until it hit its limit.)
    let reserve = 0;
    for (;;) {
      const { start, hint } = await this.findFree(count + reserve);
      const need: number[] = [];
      for (let index = Math.floor(start / this.perBlock); index <= Math.floor((start + reserve + count - 1) / this.perBlock); index++) {
        if (!(await this.block(index, false))) need.push(index);
      }
      if (need.length > 0 && need[need.length - 1] >= this.tableEntries) {
        // The table grows first; it takes clusters (after everything allocated), so search again.
        await this.growTable(need[need.length - 1] + 1);
        continue;
      }
      if (need.length > reserve) {
        reserve = need.length;
        continue;
      }
      // need.length <= reserve: the blocks and the run fit in [start, start + reserve + count), all free.
      // Nothing else allocates meanwhile (this runs under the allocation lock), so it is still free.
      for (const [k, index] of need.entries()) await this.newBlock(index, start + k, false);
      const runStart = start + need.length;
      for (let k = start; k < runStart + count; k++) await this.change(k, 1);
      this.freeHint = hint === start ? runStart + count : hint;
      return runStart;
    }
  }

  /**
   * The first run of `count` free clusters at or after the hint, and where the
   * hint may move once the run is taken (the caller moves it: a search that
   * is retried must not skip the free clusters it found).
   */
  private async findFree(count: number): Promise<{ start: number; hint: number }> {
    let runStart = this.freeHint;
    let found = 0;
    let firstFree = -1;
    for (let c = this.freeHint; found < count; ) {
      const index = Math.floor(c / this.perBlock);
      const b = await this.block(index, false);
      const blockEnd = (index + 1) * this.perBlock;
      // Scan this block's range without awaiting.
      for (; c < blockEnd && found < count; c++) {
        const used =
          (b !== undefined && this.readEntry(b.buf, c % this.perBlock) !== 0) ||
          this.metadataClusters.has(c) ||
          this.pendingClusters.has(c) ||
          this.reserved?.has(c) === true;
        if (used) {
          found = 0;
          runStart = c + 1;
        } else {
          if (firstFree < 0) firstFree = c;
          found++;
        }
      }
    }
    return { start: runStart, hint: firstFree };
  }

  /** Adds a reference to an existing cluster (a compressed cluster's host cluster, copying tables). */
  async addReference(cluster: number): Promise<void> {
    await this.change(cluster, 1);
  }

  /**
   * Queues a refcount decrement, applied by applyReleases once nothing
   * written before `epoch` ended can still be in flight. epoch -1: at the next apply.
   */
  release(cluster: number, count = 1, epoch = -1): void {
    this.file.debugEvent('cluster_free');
    this.pending.push({ cluster, count, epoch });
    this.pendingClusters.set(cluster, (this.pendingClusters.get(cluster) ?? 0) + 1);
  }

  /** Applies queued decrements whose epoch is below `safeEpoch`; returns the clusters that became free. */
  async applyReleases(safeEpoch: number): Promise<number[]> {
    const ready = this.pending.filter((p) => p.epoch < safeEpoch);
    this.pending = this.pending.filter((p) => p.epoch >= safeEpoch);
    const freed: number[] = [];
    for (const p of ready) {
      const n = this.pendingClusters.get(p.cluster)! - 1;
      if (n === 0) this.pendingClusters.delete(p.cluster);
      else this.pendingClusters.set(p.cluster, n);
      await this.change(p.cluster, -p.count);
      if ((await this.get(p.cluster)) === 0) freed.push(p.cluster);
    }
    return freed;
  }

  get hasPendingReleases(): boolean {
    return this.pending.length > 0;
  }

  // ---- writing back --------------------------------------------------------------

  get dirty(): boolean {
    if (this.tableDirty) return true;
    for (const b of this.blocks.values()) if (b.dirty) return true;
    return false;
  }

  /**
   * Writes a block's current content, after any write of it still in flight. Writes of one block
   * never overlap, so an older copy cannot land after a newer one (which would lose increments on
   * disk, and in memory too once the block is evicted and read back). The newest content is always
   * safe to write: increments any time, decrements are only made once the metadata that dropped the
   * references is durable.
   */
  private writeBlock(b: CachedBlock): Promise<void> {
    const run = (b.writing ?? Promise.resolve()).then(async () => {
      if (!b.dirty) return;
      b.dirty = false;
      try {
        // A copy: changes made while the write is in flight must not tear an entry.
        this.file.debugEvent('refblock_update');
        await this.file.write(b.offset, Buffer.from(b.buf));
      } catch (err) {
        b.dirty = true;
        throw err;
      }
    });
    b.writing = run.catch(() => undefined);
    return run;
  }

  /**
   * Writes dirty refcount blocks and the table. The caller syncs and updates the header if the
   * diskLayout changed. The table is copied together with the list of blocks to write, so it names
   * no block this write-back does not write (blocks made meanwhile wait for the next one), and new
   * blocks are made durable before the table that names them.
   */
  async writeBack(): Promise<void> {
    const all = [...this.blocks.values()];
    const blocks = all.filter((b) => b.dirty);
    const table = this.tableDirty ? { layout: { ...this.layout }, buf: Buffer.from(this.table) } : undefined;
    this.tableDirty = false;
    try {
      for (const b of blocks) await this.writeBlock(b);
      if (table) {
        // Blocks being written by an eviction right now are named by the table too.
        await Promise.all(all.map((b) => b.writing));
        await this.file.flush();
        await this.file.write(table.layout.tableOffset, table.buf);
        this.diskLayout = table.layout;
      }
    } catch (err) {
      if (table) this.tableDirty = true;
      throw err;
    }
  }

  /** Sets a cluster's refcount to an exact value (repair). */
  async set(cluster: number, value: number): Promise<void> {
    const current = await this.get(cluster);
    if (current !== value) await this.change(cluster, value - current);
  }

  /** The largest cluster index the table can describe with its current blocks. */
  get coveredClusters(): number {
    return this.tableEntries * this.perBlock;
  }
}

function corrupt(message: string): VdiskError {
  return new VdiskError('EIO', `qcow2: ${message}`, { code: 'VDISK_QCOW2_CORRUPT' });
}
