/**
 * The copy-before-write filter (QEMU's block/copy-before-write.c) for the
 * life of a backup job.
 *
 * It is a node in the graph (driver copy-before-write, children file =
 * the source and target), listed by query-named-block-nodes with the
 * block-copy bitmap, as QEMU shows it. Its work is done by a hook on the
 * source node (BlockNode.beforeWrite): every write, write-zeroes and discard
 * that reaches the source — from an export, a parent, qemu-io — first has
 * the old data of the clusters it covers copied to the target. If that copy
 * fails, the guest write fails (QEMU's on-cbw-error=break-guest-write): the
 * backup must never silently lose its point in time.
 */
import { BlockNode, type Extent } from '../block/node.js';
import type { BlockCopy } from './block-copy.js';

export class CopyBeforeWriteNode extends BlockNode {
  readonly driverName = 'copy-before-write';
  override readonly filteredRole = 'file' as const;
  private readonly hook: (offset: number, length: number) => Promise<void>;

  constructor(
    nodeName: string,
    readonly source: BlockNode,
    readonly target: BlockNode,
    private readonly copy: BlockCopy,
  ) {
    super({ nodeName, readOnly: source.readOnly });
    this.length = source.size;
    this.limits = { ...source.limits };
    this.children.push({ role: 'file', node: source }, { role: 'target', node: target });
    this.dirtyBitmaps.push(copy.toCopy);
    this.hook = (offset, length) => this.copy.copyRange(offset, length);
  }

  override get filename(): string {
    return this.source.filename;
  }

  /** Starts intercepting the source's writes. */
  attach(): void {
    this.source.beforeWrite.push(this.hook);
  }

  /** Stops intercepting (the job is over). */
  detach(): void {
    const i = this.source.beforeWrite.indexOf(this.hook);
    if (i >= 0) this.source.beforeWrite.splice(i, 1);
  }

  // Requests to the filter itself go to the source (which runs the hook for writes).
  protected override doRead(offset: number, buf: Buffer): Promise<void> {
    return this.source.read(offset, buf);
  }

  protected override doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    return this.source.write(offset, buf, flags);
  }

  protected override doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.source.writeZeroes(offset, length, flags);
  }

  protected override doDiscard(offset: number, length: number): Promise<void> {
    return this.source.discard(offset, length);
  }

  protected override doBlockStatus(offset: number, length: number): Promise<Extent> {
    return this.source.blockStatus(offset, length);
  }
}
