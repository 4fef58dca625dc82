/**
 * The backup block job (QEMU's block/backup.c).
 *
 * At creation (a transaction's prepare) the point in time is fixed: the
 * copy-before-write filter starts guarding the source, the block-copy bitmap
 * says what to copy (everything for full/top, the user bitmap's bits for
 * bitmap/incremental, nothing for none), and a bitmap the job uses gets a
 * successor that records every write from then on. Running copies what is
 * left; finalize decides the bitmap's fate (docs/design/backup.md):
 *
 *   bitmap-mode   success     failure or cancel
 *   on-success    abdicate    reclaim
 *   always        abdicate    abdicate, then add back what was not copied
 *   never         reclaim     reclaim
 */
import type { DirtyBitmap } from '../block/dirty-bitmap.js';
import { persistChange } from '../block/bitmap-ops.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode, NodeUser } from '../block/node.js';
import { logEvent } from '../log.js';
import { type BlockdevOnError, BlockJob } from '../jobs/block-job.js';
import { BlockCopy, CopyError } from './block-copy.js';
import { CopyBeforeWriteNode } from './cbw.js';
import { SnapshotAccessNode } from './snapshot-access.js';
import { VdiskError } from '../errors.js';

export type SyncMode = 'full' | 'top' | 'none' | 'incremental' | 'bitmap';
export type BitmapMode = 'on-success' | 'always' | 'never';

export interface BackupOptions {
  id: string;
  graph: BlockGraph;
  source: BlockNode;
  target: BlockNode;
  sync: SyncMode;
  bitmap?: DirtyBitmap;
  bitmapMode?: BitmapMode;
  speed?: number;
  onSourceError: BlockdevOnError;
  onTargetError: BlockdevOnError;
  autoFinalize?: boolean;
  autoDismiss?: boolean;
  filterNodeName?: string;
  /** The job opened the target (drive-backup) and closes it at the end. */
  ownsTarget: boolean;
  /** Write compressed clusters (qcow2 targets). */
  compress?: boolean;
  /** Most bytes copy-before-write may save into the target (x-scratch-limit); 0 or absent: no limit. */
  scratchLimit?: number;
}

/** Background copies at once (QEMU: up to 64 block-copy tasks; fewer are enough on 2 cores). */
const WORKERS = 8;
/** Bytes copied between two flushes of the target while the copy goes on (BackupJob.flushBehind). */
const FLUSH_BEHIND = 32 * 1024 * 1024;

export class BackupJob extends BlockJob implements NodeUser {
  readonly type = 'backup';
  private readonly o: BackupOptions;
  private readonly copy: BlockCopy;
  private readonly cbw: CopyBeforeWriteNode;
  /** The user bitmap's successor while the job runs. */
  private successor: DirtyBitmap | undefined;
  /** The point-in-time view put in a fleecing target's backing link, if any. */
  private view: SnapshotAccessNode | undefined;

  constructor(o: BackupOptions) {
    super({ id: o.id, autoFinalize: o.autoFinalize, autoDismiss: o.autoDismiss, speed: o.speed });
    this.o = o;
    // The job's cluster: at least 64 KiB, at least the target's cluster size.
    const targetCluster = (o.target as { clusterBytes?: number }).clusterBytes ?? 0;
    this.copy = new BlockCopy(o.source, o.target, Math.max(65536, targetCluster));
    this.cbw = new CopyBeforeWriteNode(o.filterNodeName ?? '', o.source, o.target, this.copy);
  }

  get userDescription(): string {
    return `backup job '${this.id}'`;
  }

  /**
   * Fixes the point in time: what to copy, the bitmap's successor, and the
   * filter on the source. Called at creation, before any other write can
   * slip in (a transaction prepares every action before committing any).
   */
  setUp(): void {
    const o = this.o;
    // The filter's name may be taken: fail before anything else changes.
    o.graph.insertFilter(this.cbw, o.source);
    const bits = this.copy.toCopy;
    // sync=none copies nothing in the background, but every cluster is still to be saved before a
    // guest write changes it (QEMU sets the whole copy bitmap): that is what fleecing reads.
    if (o.sync === 'full' || o.sync === 'top' || o.sync === 'none') bits.bits.set(0, bits.bits.size);
    else if ((o.sync === 'bitmap' || o.sync === 'incremental') && o.bitmap) bits.mergeFrom(o.bitmap);
    if (o.bitmap) {
      this.successor = o.bitmap.createSuccessor(o.source.size, this);
      o.source.dirtyBitmaps.unshift(this.successor);
    }
    // Progress counts whole job clusters, as QEMU's: a full backup of 64 MiB has len 64 MiB.
    this.progressTotal = bits.count;
    this.copy.onProgress = (n) => {
      this.progressCurrent = Math.min(this.progressTotal, this.progressCurrent + n);
    };
    this.copy.topOnly = o.sync === 'top';
    this.copy.compress = o.compress ?? false;
    // Copies made for guest writes are not held back by the speed limit, but they count against it (as QEMU's).
    this.copy.onGuestCopy = (n) => this.rate.charge(n);
    this.copy.onSkip = (n) => {
      this.progressTotal = Math.max(this.progressCurrent, this.progressTotal - n);
    };
    this.copy.scratchLimit = o.scratchLimit ?? 0;
    this.copy.onBreak = (err) => {
      logEvent('warn', 'backup-point-in-time-given-up', { id: this.id, error: err.message });
      // The job fails with this error; a worker asleep under the speed limit (or sync=none) wakes to say so.
      this.kick();
    };
    this.cbw.attach();
    o.source.users.add(this);
    o.target.users.add(this);
    if (o.sync === 'none' || o.sync === 'full') this.installView();
    logEvent('info', 'backup-started', { id: this.id, source: o.source.nodeName, target: o.target.filename, sync: o.sync, bytes: this.progressTotal, fleecing: this.view !== undefined });
  }

  /**
   * A target that reads through to the source (its backing chain reaches it:
   * fleecing) gets the point-in-time view in that backing link, so its
   * readers never see a guest write made after the job started. A view left
   * there by an earlier job on the same target is replaced.
   */
  private installView(): void {
    const o = this.o;
    for (let parent: BlockNode | undefined = o.target; parent; ) {
      const below: BlockNode | undefined = parent.child('backing');
      if (!below) return;
      const old = below instanceof SnapshotAccessNode && below.source === o.source ? below : undefined;
      if (below === o.source || old) {
        const view = new SnapshotAccessNode('', o.source, this.copy, this.id);
        o.graph.insertImplicit(view);
        if (!o.graph.replaceChildOf(parent, below, view)) {
          void o.graph.release(view);
          logEvent('warn', 'fleecing-view-not-installed', { id: this.id, target: parent.nodeName, why: `driver ${parent.driverName} cannot swap its backing link` });
          return;
        }
        this.view = view;
        if (old) void o.graph.release(old);
        return;
      }
      parent = below;
    }
  }

  protected async run(): Promise<void> {
    if (this.o.sync === 'none') {
      // Nothing to copy in the background: copy-before-write does the work until the job is cancelled.
      for (;;) {
        await this.pausePoint();
        if (this.copy.broken) throw this.copy.broken;
        await this.sleep(Infinity);
      }
    }
    let lastLog = Date.now();
    let next = 0;
    let failure: unknown;
    const worker = async () => {
      try {
        while (failure === undefined) {
          await this.pausePoint();
          if (this.copy.broken) throw this.copy.broken;
          if (this.behindError !== undefined) throw this.behindError;
          // The speed check, the choice of the next run and its charge are one synchronous step,
          // so eight workers cannot all slip past one check.
          const wait = this.rate.delay(0);
          if (wait > 0) {
            await this.sleep(wait);
            continue;
          }
          const started = this.copy.startNext(next);
          if (!started) return;
          next = started.end;
          this.rate.charge(started.bytes);
          try {
            await started.done;
          } catch (err) {
            const op = err instanceof CopyError ? err.operation : 'read';
            await this.handleIoError(err instanceof CopyError ? err.inner : err, op, op === 'read' ? this.o.onSourceError : this.o.onTargetError);
            // Retry: what is still to copy in that run is picked up again.
            next = 0;
          }
          this.flushBehind();
          if (Date.now() - lastLog > 5000) {
            lastLog = Date.now();
            logEvent('info', 'backup-progress', { id: this.id, offset: this.progressCurrent, len: this.progressTotal });
          }
        }
      } catch (err) {
        failure ??= err;
      }
    };
    // Until nothing is left: clusters a guest write was copying, or a failed run left, come round again.
    while (failure === undefined && this.copy.remaining > 0) {
      next = 0;
      await Promise.all(Array.from({ length: WORKERS }, worker));
      await this.copy.drain();
    }
    if (failure !== undefined) throw failure;
    if (this.copy.broken) throw this.copy.broken;
    // A completed backup is on disk: the target is flushed before BLOCK_JOB_COMPLETED (QEMU emits
    // the event first and flushes when the job is freed; a crash in between loses the backup).
    await this.behind;
    if (this.behindError !== undefined) throw this.behindError;
    await this.o.target.flush();
    // Everything is copied: progress ends at its total, as QEMU reports it (offset == len).
    this.progressCurrent = this.progressTotal;
  }

  /** The flush of the target started while copying (flushBehind), if one is in flight. */
  private behind: Promise<void> | undefined;
  /** Bytes copied when the last one started. */
  private behindAt = 0;
  /** What such a flush failed with: the job fails with it. */
  private behindError: unknown;

  /**
   * Flushes the target while the copy goes on, one flush at a time, each
   * after FLUSH_BEHIND more bytes were copied: the device writes what was
   * copied while the next clusters are, and the flush before
   * BLOCK_JOB_COMPLETED finds little left to write. A failed flush fails
   * the job (the workers stop, and the final flush is not trusted to report
   * it again: a failed fsync's error is reported once).
   */
  private flushBehind(): void {
    if (this.behind || this.progressCurrent - this.behindAt < FLUSH_BEHIND) return;
    this.behindAt = this.progressCurrent;
    this.behind = this.o.target
      .flush()
      .catch((err) => {
        this.behindError ??= err;
      })
      .finally(() => {
        this.behind = undefined;
      });
  }

  protected override async commit(): Promise<void> {
    if (!this.successor) return;
    const named = this.o.bitmapMode === 'never' ? this.reclaim() : this.abdicate();
    await this.storeBitmap(named);
  }

  protected override async abort(): Promise<void> {
    if (!this.successor) return;
    let named: DirtyBitmap;
    if (this.o.bitmapMode === 'always') {
      named = this.abdicate();
      // What the job did not copy is still to be backed up next time.
      named.mergeFrom(this.copy.toCopy);
    } else {
      named = this.reclaim();
    }
    await this.storeBitmap(named);
  }

  /**
   * A persistent bitmap's content changed with the job's outcome: its copy on
   * disk follows (a crash-safe one drops the bits the backup took, so the
   * next cycle pays for its own writes again). Failing to write it back loses
   * nothing: the disk keeps a superset.
   */
  private async storeBitmap(named: DirtyBitmap): Promise<void> {
    await persistChange(this.o.source, 'content', named).catch((err) =>
      logEvent('warn', 'bitmap-store-after-backup-failed', { id: this.id, bitmap: named.name, error: (err as Error).message }),
    );
  }

  /** The successor replaces the bitmap (same name, same place in the node's list). */
  private abdicate(): DirtyBitmap {
    const b = this.o.bitmap!;
    const list = this.o.source.dirtyBitmaps;
    const named = b.abdicate();
    const si = list.indexOf(named);
    if (si >= 0) list.splice(si, 1);
    list[list.indexOf(b)] = named;
    this.successor = undefined;
    return named;
  }

  /** The successor's bits go back into the bitmap. */
  private reclaim(): DirtyBitmap {
    const b = this.o.bitmap!;
    const s = this.successor!;
    b.reclaim();
    const list = this.o.source.dirtyBitmaps;
    const si = list.indexOf(s);
    if (si >= 0) list.splice(si, 1);
    this.successor = undefined;
    return b;
  }

  protected override async clean(): Promise<void> {
    const o = this.o;
    this.cbw.detach();
    await this.copy.drain();
    await this.behind; // never rejects
    // Nothing is saved any more: a fleecing view left in the target's backing link now refuses
    // what was never saved instead of showing newer data.
    this.copy.giveUp(new VdiskError('EACCES', `backup job '${this.id}' has ended; this image no longer holds its point in time`));
    o.source.users.delete(this);
    o.target.users.delete(this);
    await o.graph.removeFilter(this.cbw, o.source);
    if (o.ownsTarget) await o.graph.release(o.target);
    else await o.target.flush().catch(() => undefined);
  }
}
