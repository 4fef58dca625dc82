/**
 * Transactions (qapi/transaction.json): several actions, all or none.
 *
 * Every action is prepared in list order; the first that fails makes every
 * prepared one undo itself (in reverse), and the error is returned. When all
 * prepared, all commit (in reverse order, as QEMU): backup jobs start only
 * now, so bitmap changes made at prepare time pair exactly with the jobs'
 * point in time. With completion-mode grouped, the backup jobs share one job
 * transaction: one failure cancels the others and every bitmap is restored.
 *
 * drive-backup and blockdev-backup on their own are one-action transactions.
 */
import fs from 'node:fs';
import path from 'node:path';
import {
  type BitmapRef,
  type MergeSource,
  attachAndStore,
  checkClearable,
  checkRemovable,
  checkTogglable,
  createBitmap,
  dropBitmap,
  persistChange,
  lookupBitmap,
  mergedBits,
} from '../block/bitmap-ops.js';
import type { DirtyBitmap } from '../block/dirty-bitmap.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { isProtocolName, probeImageFormat, protocolBlockdev } from '../block/image-name.js';
import { createImageFile } from '../block/create.js';
import { VdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import { type JobManager, JobTxn } from '../jobs/job.js';
import type { BlockdevOnError } from '../jobs/block-job.js';
import { SparseBitmap } from '../block/sparse-bitmap.js';
import { BackupJob, type BackupOptions, type BitmapMode, type SyncMode } from './backup-job.js';

export interface Action {
  prepare(): Promise<void>;
  /** Cannot fail (QEMU's rule): what it must still write to disk is logged if it fails. */
  commit(): Promise<void> | void;
  abort(): Promise<void> | void;
}

export interface TransactionAction {
  type: string;
  data: Record<string, unknown>;
}

/**
 * What a transaction needs of the daemon that runs it: the graph its actions
 * name nodes in and the job list its backup jobs join. The Daemon satisfies
 * it; naming only this keeps the backup layer from importing the daemon.
 */
export interface TransactionHost {
  readonly graph: BlockGraph;
  readonly jobs: Pick<JobManager, 'add'>;
}

const JOB_ACTIONS = new Set(['drive-backup', 'blockdev-backup']);

export async function runTransaction(host: TransactionHost, actions: TransactionAction[], completionMode: 'individual' | 'grouped'): Promise<void> {
  if (completionMode === 'grouped') {
    const odd = actions.find((a) => !JOB_ACTIONS.has(a.type));
    if (odd) throw new VdiskError('EINVAL', `Action '${odd.type}' does not support transaction property completion-mode = grouped`);
  }
  const txn = completionMode === 'grouped' ? new JobTxn() : undefined;
  // One point in time for every action: the nodes they name take no write until all have
  // prepared and committed (QEMU drains all I/O for a transaction). Preparing a drive-backup
  // creates and opens its target, so without this a guest write could land between two actions.
  const releases: Array<() => void> = [];
  try {
    for (const node of namedNodes(host, actions)) releases.push(await node.quiesce());
    const prepared: Action[] = [];
    try {
      for (const a of actions) {
        const action = makeAction(host, a, txn);
        await action.prepare();
        prepared.push(action);
      }
    } catch (err) {
      for (const action of prepared.reverse()) await action.abort();
      throw err;
    }
    for (const action of [...prepared].reverse()) await action.commit();
  } finally {
    for (const release of releases) release();
  }
}

/** The existing nodes a transaction's actions name (sources, bitmap nodes, merge sources). */
function namedNodes(host: TransactionHost, actions: TransactionAction[]): BlockNode[] {
  const names = new Set<string>();
  for (const a of actions) {
    const d = a.data ?? {};
    for (const key of ['device', 'node']) if (typeof d[key] === 'string') names.add(d[key] as string);
    if (Array.isArray(d.bitmaps)) for (const b of d.bitmaps) if (b && typeof b === 'object' && typeof (b as { node?: unknown }).node === 'string') names.add((b as { node: string }).node);
  }
  return [...names].map((n) => host.graph.get(n)).filter((n): n is BlockNode => n !== undefined);
}

function makeAction(host: TransactionHost, a: TransactionAction, txn: JobTxn | undefined): Action {
  const g = host.graph;
  const d = a.data;
  switch (a.type) {
    case 'abort':
      return {
        prepare: () => Promise.reject(new VdiskError('ECANCELED', 'Transaction aborted using Abort action')),
        commit: () => undefined,
        abort: () => undefined,
      };
    case 'block-dirty-bitmap-add': {
      let made: BitmapRef | undefined;
      return {
        prepare: async () => {
          const ref = createBitmap(g, d.node as string, d.name as string, {
            granularity: d.granularity as number | undefined,
            persistent: d.persistent as boolean | undefined,
            disabled: d.disabled as boolean | undefined,
            crashSafe: d['x-crash-safe'] as boolean | undefined,
          });
          await attachAndStore(ref);
          made = ref;
        },
        commit: () => undefined,
        abort: async () => {
          if (made) await dropBitmap(made);
        },
      };
    }
    case 'block-dirty-bitmap-remove': {
      let found: BitmapRef | undefined;
      const holder = { userDescription: `transaction removing bitmap '${String(d.name)}'` };
      return {
        prepare: async () => {
          found = lookupBitmap(g, d.node as string, d.name as string);
          checkRemovable(found);
          // Busy until the transaction ends, so nothing else starts using it.
          found.bitmap.claim(holder);
        },
        commit: async () => {
          found!.bitmap.release(holder);
          await dropBitmap(found!).catch((err) => logCommitFailure('block-dirty-bitmap-remove', err));
        },
        abort: () => found?.bitmap.release(holder),
      };
    }
    case 'block-dirty-bitmap-clear': {
      let bitmap: DirtyBitmap | undefined;
      let saved: SparseBitmap | undefined;
      let clearedOn: BlockNode | undefined;
      return {
        prepare: async () => {
          const f = lookupBitmap(g, d.node as string, d.name as string);
          checkClearable(f);
          bitmap = f.bitmap;
          saved = bitmap.bits.clone();
          bitmap.bits.clear();
          clearedOn = f.node;
        },
        // On disk the old bits may stay until then: a superset is never wrong.
        commit: () => persistChange(clearedOn!, 'content', bitmap!).catch((err) => logCommitFailure('block-dirty-bitmap-clear', err)),
        abort: () => {
          if (bitmap && saved) restore(bitmap, saved);
        },
      };
    }
    case 'block-dirty-bitmap-enable':
    case 'block-dirty-bitmap-disable': {
      let bitmap: DirtyBitmap | undefined;
      let was = false;
      let toggledOn: BlockNode | undefined;
      return {
        prepare: async () => {
          const f = lookupBitmap(g, d.node as string, d.name as string);
          bitmap = f.bitmap;
          checkTogglable(bitmap);
          was = bitmap.enabled;
          bitmap.enabled = a.type === 'block-dirty-bitmap-enable';
          toggledOn = f.node;
        },
        commit: () => persistChange(toggledOn!, 'flags', bitmap!).catch((err) => logCommitFailure(a.type, err)),
        abort: () => {
          if (bitmap) bitmap.enabled = was;
        },
      };
    }
    case 'block-dirty-bitmap-merge': {
      let target: DirtyBitmap | undefined;
      let saved: SparseBitmap | undefined;
      let mergedOn: BlockNode | undefined;
      return {
        prepare: async () => {
          const m = mergedBits(g, d.node as string, d.target as string, d.bitmaps as MergeSource[]);
          target = m.target;
          saved = target.bits.clone();
          target.bits.merge(m.merged.bits);
          mergedOn = g.get(d.node as string);
        },
        // Before the transaction returns: the merged bits must survive a crash from then on.
        commit: () => persistChange(mergedOn!, 'content', target!).catch((err) => logCommitFailure('block-dirty-bitmap-merge', err)),
        abort: () => {
          if (target && saved) restore(target, saved);
        },
      };
    }
    case 'drive-backup':
    case 'blockdev-backup': {
      let job: BackupJob | undefined;
      return {
        prepare: async () => {
          job = await prepareBackup(host, a.type, d);
          if (txn) txn.add(job);
        },
        commit: () => job!.start(),
        abort: async () => {
          // A job that never started goes created -> aborting -> concluded -> null, and undoes its set-up.
          if (job) {
            job.cancelForTxn();
            await job.settled();
          }
        },
      };
    }
    default:
      throw new VdiskError('EINVAL', `transaction action '${a.type}' is not supported`);
  }
}

/** A commit cannot fail; what it could not write to disk is said in the log. */
function logCommitFailure(action: string, err: unknown): void {
  logEvent('error', 'transaction-commit-store-failed', { action, error: (err as Error).message });
}

function restore(bitmap: DirtyBitmap, saved: SparseBitmap): void {
  bitmap.bits.clear();
  bitmap.bits.merge(saved);
}

/**
 * Checks a drive-backup / blockdev-backup in QEMU's order (so the same side
 * effects happen before the same errors: drive-backup creates its target
 * first), creates the job (status created) and fixes its point in time.
 */
async function prepareBackup(host: TransactionHost, kind: string, d: Record<string, unknown>): Promise<BackupJob> {
  const g = host.graph;
  const device = d.device as string;
  const source = g.get(device);
  if (!source) throw new VdiskError('ENOENT', `Cannot find device='${device}' nor node-name='${device}'`);
  let target: BlockNode;
  let ownsTarget = false;
  if (kind === 'drive-backup') {
    target = await openDriveBackupTarget(g, source, d);
    ownsTarget = true;
  } else {
    const t = g.get(d.target as string);
    if (!t) throw new VdiskError('ENOENT', `Cannot find device='${d.target}' nor node-name='${d.target}'`);
    target = t;
  }
  try {
    return setUpBackup(host, source, target, ownsTarget, d);
  } catch (err) {
    if (ownsTarget) await g.release(target);
    throw err;
  }
}

/**
 * Checks a backup's arguments (drive-backup's, by their QAPI names) and creates
 * its job with the point in time fixed. `makeJob` builds the job from the
 * checked options: x-backup-s3 passes a BackupJob subclass that also writes
 * the manifest.
 */
export function setUpBackup(
  host: TransactionHost,
  source: BlockNode,
  target: BlockNode,
  ownsTarget: boolean,
  d: Record<string, unknown>,
  makeJob: (o: BackupOptions) => BackupJob = (o) => new BackupJob(o),
): BackupJob {
  let sync = d.sync as SyncMode;
  let bitmapMode = d['bitmap-mode'] as BitmapMode | undefined;
  const bitmapName = d.bitmap as string | undefined;
  if ((sync === 'bitmap' || sync === 'incremental') && bitmapName === undefined) {
    throw new VdiskError('EINVAL', `must provide a valid bitmap name for '${sync}' sync mode`);
  }
  if (sync === 'incremental') {
    if (bitmapMode !== undefined && bitmapMode !== 'on-success') {
      throw new VdiskError('EINVAL', "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'");
    }
    sync = 'bitmap';
    bitmapMode = 'on-success';
  }
  let bitmap: DirtyBitmap | undefined;
  if (bitmapName !== undefined) {
    bitmap = source.dirtyBitmaps.find((b) => b.name === bitmapName);
    if (!bitmap) throw new VdiskError('ENOENT', `Bitmap '${bitmapName}' could not be found`);
    if (bitmapMode === undefined) throw new VdiskError('EINVAL', 'Bitmap sync mode must be given when providing a bitmap');
    bitmap.check({ busy: true, inconsistent: true });
    if (sync === 'none') throw new VdiskError('EINVAL', "sync mode 'none' does not produce meaningful bitmap outputs");
    if (bitmapMode === 'never' && sync !== 'bitmap') {
      throw new VdiskError('EINVAL', `Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '${sync}'`);
    }
  }
  if (bitmapName === undefined && bitmapMode !== undefined) throw new VdiskError('EINVAL', 'Cannot specify bitmap sync mode without a bitmap');
  if (source === target) throw new VdiskError('EINVAL', 'Source and target cannot be the same');
  if (d.compress && target.compressionClusterSize === 0) throw new VdiskError('ENOTSUP', `Compression is not supported for this drive ${target.nodeName}`);
  if (target.readOnly) throw new VdiskError('EROFS', `target '${target.nodeName}' is read-only`);
  if (source.size !== target.size) throw new VdiskError('EINVAL', 'Source and target image have different sizes');
  const job = makeJob({
    id: (d['job-id'] as string | undefined) ?? (d.device as string),
    graph: host.graph,
    source,
    target,
    sync,
    bitmap,
    bitmapMode,
    speed: d.speed as number | undefined,
    onSourceError: ((d['on-source-error'] as BlockdevOnError | undefined) ?? 'report'),
    onTargetError: ((d['on-target-error'] as BlockdevOnError | undefined) ?? 'report'),
    autoFinalize: d['auto-finalize'] as boolean | undefined,
    autoDismiss: d['auto-dismiss'] as boolean | undefined,
    filterNodeName: d['filter-node-name'] as string | undefined,
    ownsTarget,
    compress: Boolean(d.compress),
    scratchLimit: d['x-scratch-limit'] as number | undefined,
  });
  if ((d.speed as number | undefined) !== undefined && (d.speed as number) < 0) throw new VdiskError('EINVAL', "Parameter 'speed' expects a non-negative value");
  host.jobs.add(job, false);
  try {
    job.setUp();
  } catch (err) {
    // Never started: it goes (created -> aborting -> concluded -> null) and undoes what it set up.
    job.cancelForTxn();
    throw err;
  }
  return job;
}

/** drive-backup's target: created now unless mode=existing, then opened (discard and detect-zeroes unmap). */
async function openDriveBackupTarget(g: BlockGraph, source: BlockNode, d: Record<string, unknown>): Promise<BlockNode> {
  const filename = d.target as string;
  const mode = (d.mode as string | undefined) ?? 'absolute-paths';
  let format = d.format as string | undefined;
  if (mode !== 'existing') {
    format ??= source.driverName === 'qcow2' ? 'qcow2' : 'raw';
    // sync=top keeps the source's backing file under the copy; sync=none reads through to the source.
    let backingFile: string | undefined;
    let backingFormat: string | undefined;
    const sourceBacking = source.child('backing');
    if (d.sync === 'top' && sourceBacking) {
      backingFile = sourceBacking.filename;
      backingFormat = sourceBacking.driverName;
    } else if (d.sync === 'none') {
      backingFile = source.filename;
      backingFormat = source.driverName;
    }
    if (backingFile !== undefined && format !== 'qcow2') backingFile = undefined;
    await createImageFile({ format, filename, size: source.size, backingFile, backingFormat });
  } else {
    // An existing target may be an NBD export (nbd://, nbd+unix://) or an RBD image (rbd:...), as QEMU's drive-backup allows.
    if (!isProtocolName(filename) && !fs.existsSync(filename)) throw new VdiskError('ENOENT', `Could not open '${filename}': No such file or directory`);
    format ??= await probeImageFormat(filename);
  }
  if (format !== 'raw' && format !== 'qcow2') throw new VdiskError('EINVAL', `Unknown driver '${format}'`);
  const options: Record<string, unknown> = {
    driver: format,
    discard: 'unmap',
    'detect-zeroes': 'unmap',
    file: isProtocolName(filename) ? protocolBlockdev(filename) : { driver: 'file', filename: path.resolve(filename) },
  };
  // sync=none and sync=top targets, new or existing, get the source (none) or the source's backing
  // node (top) as their backing, as QEMU's drive-backup does (it opens them with no backing, then
  // sets it): opening the backing file again would collide with its lock, and a fleecing target
  // must read through to the very node the job guards.
  if (format === 'qcow2') {
    if (d.sync === 'none') options.backing = source.nodeName;
    else if (d.sync === 'top' && source.child('backing')) options.backing = source.child('backing')!.nodeName;
  }
  return g.addImplicit(options);
}
