/**
 * The point-in-time view of a backup's source (QEMU's snapshot-access
 * driver), put in the backing link of a fleecing target.
 *
 * Fleecing is a backup with sync=none into an overlay whose backing file is
 * the source: the overlay is exported and read by backup software while the
 * guest keeps writing. Copy-before-write saves old clusters into the overlay,
 * but a reader of a cluster not yet saved goes through the backing link to
 * the source, and a guest write landing in between would hand it new data.
 * So while the job runs the overlay's backing is this view instead of the
 * source: it reads through the job's BlockCopy, which holds the clusters it
 * reads from the source until the read is done (a guest write to them waits),
 * and takes saved clusters from the target. Once the job has ended or given
 * up its point in time, clusters that were never saved fail to read (EACCES,
 * as QEMU's snapshot-access) rather than showing data newer than the snapshot.
 *
 * Its one child is the source (role file); the target is its parent, read
 * back for clusters it already holds, which never leads back here.
 */
import { FilterNode } from '../block/filter.js';
import type { BlockNode, ChildLink, ChildRole, Extent } from '../block/node.js';
import type { BlockCopy } from './block-copy.js';

/** A filter in QEMU's sense: lookups and depths look through it to the source. */
export class SnapshotAccessNode extends FilterNode {
  readonly driverName = 'snapshot-access';

  constructor(
    nodeName: string,
    readonly source: BlockNode,
    readonly copy: BlockCopy,
    /** The backup job, for messages. */
    readonly jobId: string,
  ) {
    super({ nodeName, readOnly: true }, 'file', source);
    // snapshotRead takes any byte range: it splits it by cluster runs and each child aligns for itself.
    this.limits.requestAlignment = 1;
  }

  /** The view belongs to one job's BlockCopy and source: it is never pointed at another node. */
  protected override canReplaceChild(_role: ChildRole): boolean {
    return false;
  }

  /** Read-only and holding nothing of its own: a flush of the overlay stops here. */
  protected override get flushedChildren(): readonly ChildLink[] {
    return [];
  }

  /** The point in time, not the source as it is now. */
  protected override doRead(offset: number, buf: Buffer): Promise<void> {
    return this.copy.snapshotRead(offset, buf);
  }

  protected override doBlockStatus(offset: number, length: number): Promise<Extent> {
    return this.copy.snapshotBlockStatus(offset, length);
  }
}
