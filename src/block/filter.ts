/**
 * The filter base: a node that shows its filtered child's content and, by
 * default, hands every request to that child unchanged. A filter (blkdebug,
 * blkverify, copy-before-write, snapshot-access) overrides only the hooks
 * whose behaviour it changes, so an operation added to the node contract
 * later reaches the child through every filter without touching each one
 * (NBD_CMD_CACHE once stopped at blkdebug because it had no doCache).
 *
 * Requests reach the child through its public methods, so the child checks,
 * counts and announces them itself (blkdebug rules see the same events as
 * if the filter were not there), and a flush reaches the child by the
 * request path after this node's own (empty) doFlush.
 */
import { BlockNode, type ChildRole, type Extent, type FormatInfo, type NodeOptions } from './node.js';

export abstract class FilterNode extends BlockNode {
  override readonly filteredRole: ChildRole;
  /** The child whose content this node shows; kept current by childReplaced. */
  protected filtered: BlockNode;

  /**
   * Links `filtered` as the first child under `role`, takes its size and
   * limits, and is read-only when it is. Other children (blkverify's test,
   * a backup's target) are pushed by the subclass after this.
   */
  constructor(options: NodeOptions, role: ChildRole, filtered: BlockNode) {
    super({ nodeName: options.nodeName, readOnly: options.readOnly || filtered.readOnly });
    this.filteredRole = role;
    this.filtered = filtered;
    this.children.push({ role, node: filtered });
    this.length = filtered.size;
    this.limits = { ...filtered.limits };
    // A filter stores nothing itself: FUA goes down with the write and the child honours it.
    this.nativeFua = true;
  }

  override get filename(): string {
    return this.filtered.filename;
  }

  /**
   * The child's cluster size and dirty flag, as QEMU's bdrv_get_info looks
   * through a filter; format-specific data is the format's own and a filter
   * does not show it (bdrv_get_specific_info does not look through).
   */
  override formatInfo(): FormatInfo | undefined {
    const info = this.filtered.formatInfo();
    return info && { clusterSize: info.clusterSize, vmStateOffset: info.vmStateOffset, dirty: info.dirty };
  }

  override get compressionClusterSize(): number {
    return this.filtered.compressionClusterSize;
  }

  /** The filtered child can be swapped while open: the filter re-reads nothing from it. */
  protected override canReplaceChild(role: ChildRole): boolean {
    return role === this.filteredRole;
  }

  protected override childReplaced(role: ChildRole, node: BlockNode): void {
    if (role === this.filteredRole) this.filtered = node;
  }

  protected override doRead(offset: number, buf: Buffer): Promise<void> {
    return this.filtered.read(offset, buf);
  }

  protected override doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    return this.filtered.write(offset, buf, flags);
  }

  protected override doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.filtered.writeZeroes(offset, length, flags);
  }

  protected override doDiscard(offset: number, length: number): Promise<void> {
    return this.filtered.discard(offset, length);
  }

  protected override doWriteCompressed(offset: number, buf: Buffer): Promise<void> {
    return this.filtered.writeCompressed(offset, buf);
  }

  /** The child's extent as it is: its depth and `from` already say where the data lives. */
  protected override doBlockStatus(offset: number, length: number): Promise<Extent> {
    return this.filtered.blockStatus(offset, length);
  }

  protected override doCache(offset: number, length: number): Promise<void> {
    return this.filtered.cache(offset, length);
  }

  /** Resizes the child; the filter's length is whatever the child ends up with. */
  protected override async doTruncate(size: number): Promise<void> {
    await this.filtered.truncate(size);
    this.length = this.filtered.size;
  }
}
