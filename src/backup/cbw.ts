/**
 * The copy-before-write filter (QEMU's block/copy-before-write.c) for the
 * life of a backup job.
 *
 * A real filter node: children file = the source and target; while the job
 * runs the graph puts it above the source (BlockGraph.insertFilter), so the
 * source's exports and parents send their requests through it, as QEMU's
 * bdrv_replace_node does. Before a write, write-zeroes or discard reaches the
 * source, the old data of the clusters it covers is copied to the target. If
 * that copy fails, the write fails (QEMU's on-cbw-error=break-guest-write):
 * a backup must never silently lose its point in time.
 *
 * Whoever still reaches the source directly (qemu-io on the node by name, a
 * parent whose driver cannot swap its child) is caught by a guard on the
 * source itself (BlockNode.beforeWrite) running the same copy; for writes
 * that came through the filter it finds nothing left to copy.
 *
 * Reads, block status and cache pass through; a flush goes to the source
 * only (the target is made durable by the job, not by every guest flush).
 */
import { VdiskError } from '../errors.js';
import { FilterNode } from '../block/filter.js';
import type { BlockNode, ChildLink, ChildRole } from '../block/node.js';
import type { BlockCopy } from './block-copy.js';

export class CopyBeforeWriteNode extends FilterNode {
  readonly driverName = 'copy-before-write';
  private readonly guard: (offset: number, length: number) => Promise<void>;

  constructor(
    nodeName: string,
    readonly source: BlockNode,
    readonly target: BlockNode,
    private readonly copy: BlockCopy,
  ) {
    // Reads, block status, cache and the source's FUA go through the filter base unchanged.
    super({ nodeName }, 'file', source);
    this.children.push({ role: 'target', node: target });
    // QEMU lists the block-copy bitmap on the filter node.
    this.dirtyBitmaps.push(copy.toCopy);
    this.guard = (offset, length) => this.copy.copyRange(offset, length);
  }

  /** Starts guarding the source against writers that do not come through the filter. */
  attach(): void {
    this.source.beforeWrite.push(this.guard);
  }

  /** Stops guarding (the job is over). */
  detach(): void {
    const i = this.source.beforeWrite.indexOf(this.guard);
    if (i >= 0) this.source.beforeWrite.splice(i, 1);
  }

  protected override get flushedChildren(): readonly ChildLink[] {
    return this.children.slice(0, 1);
  }

  /**
   * The source stays the one the job guards (its beforeWrite hook, its
   * bitmaps), so the filter is never pointed at another node while it lives.
   */
  protected override canReplaceChild(_role: ChildRole): boolean {
    return false;
  }

  // Every request that changes the source first saves the old data to the target.

  protected override async doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    await this.copy.copyRange(offset, buf.length);
    await super.doWrite(offset, buf, flags);
  }

  protected override async doWriteCompressed(offset: number, buf: Buffer): Promise<void> {
    await this.copy.copyRange(offset, buf.length);
    await super.doWriteCompressed(offset, buf);
  }

  protected override async doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    await this.copy.copyRange(offset, length);
    await super.doWriteZeroes(offset, length, flags);
  }

  protected override async doDiscard(offset: number, length: number): Promise<void> {
    await this.copy.copyRange(offset, length);
    await super.doDiscard(offset, length);
  }

  protected override doTruncate(): Promise<void> {
    // The job's bitmaps and target are sized to the source, as QEMU's backup forbids resizing.
    return Promise.reject(new VdiskError('EBUSY', `node '${this.source.nodeName}' cannot be resized while a backup job uses it`));
  }
}
