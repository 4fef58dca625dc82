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
import { BlockNode, type ChildLink, type ChildRole, type Extent } from '../block/node.js';
import type { BlockCopy } from './block-copy.js';

export class SnapshotAccessNode extends BlockNode {
  readonly driverName = 'snapshot-access';
  // A filter in QEMU's sense (snapshot-access is one): lookups and depths look through it to the source.
  override readonly filteredRole = 'file' as const;

  constructor(
    nodeName: string,
    readonly source: BlockNode,
    readonly copy: BlockCopy,
    /** The backup job, for messages. */
    readonly jobId: string,
  ) {
    super({ nodeName, readOnly: true });
    this.length = source.size;
    this.limits = { ...source.limits, requestAlignment: 1 };
    this.children.push({ role: 'file' as ChildRole, node: source });
  }

  override get filename(): string {
    return this.source.filename;
  }

  /** Read-only and holding nothing of its own: a flush of the overlay stops here. */
  protected override get flushedChildren(): readonly ChildLink[] {
    return [];
  }

  protected override doRead(offset: number, buf: Buffer): Promise<void> {
    return this.copy.snapshotRead(offset, buf);
  }

  protected override doBlockStatus(offset: number, length: number): Promise<Extent> {
    return this.copy.snapshotBlockStatus(offset, length);
  }
}
