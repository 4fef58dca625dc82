/** drive-backup, blockdev-backup, transaction, query-block-jobs and the block-job-* verbs. */
import type { Daemon } from '../../daemon.js';
import { VdiskError } from '../../errors.js';
import { BlockJob } from '../../jobs/block-job.js';
import { type Members, type Type, any, arrayOf, bool, enumOf, int, str, struct, union } from '../../qapi/schema.js';
import { type TransactionAction, runTransaction } from '../../backup/transaction.js';
import { type S3BackupArgs, startS3Backup } from '../../backup/s3/s3-backup.js';
import type { QmpCommand } from '../server.js';
import { BLOCK_DIRTY_BITMAP, BLOCK_DIRTY_BITMAP_ADD, BLOCK_DIRTY_BITMAP_MERGE } from './bitmaps.js';

const ON_ERROR = enumOf('BlockdevOnError', ['report', 'ignore', 'enospc', 'stop', 'auto']);
const BACKUP_COMMON: Members = {
  '*job-id': str,
  device: str,
  sync: enumOf('MirrorSyncMode', ['top', 'full', 'none', 'incremental', 'bitmap']),
  '*speed': int('int'),
  '*bitmap': str,
  '*bitmap-mode': enumOf('BitmapSyncMode', ['on-success', 'never', 'always']),
  '*compress': bool,
  '*on-source-error': ON_ERROR,
  '*on-target-error': ON_ERROR,
  '*auto-finalize': bool,
  '*auto-dismiss': bool,
  '*filter-node-name': str,
  '*x-perf': struct('BackupPerf', { '*use-copy-range': bool, '*max-workers': int('int'), '*max-chunk': int('int64') }),
  // vdisk: the most bytes copy-before-write may save into the target (a fleecing overlay's scratch
  // space); past it the job fails and gives up its point in time instead of failing guest writes.
  '*x-scratch-limit': int('uint64'),
};
const DRIVE_BACKUP: Type = struct('DriveBackup', { ...BACKUP_COMMON, target: str, '*format': str, '*mode': enumOf('NewImageMode', ['existing', 'absolute-paths']) });
const BLOCKDEV_BACKUP: Type = struct('BlockdevBackup', { ...BACKUP_COMMON, target: str });

/** TransactionAction: a union on 'type' whose 'data' is the matching command's arguments. */
const TRANSACTION_ACTION: Type = union('TransactionAction', { type: enumOf('TransactionActionKind', [
  'abort', 'block-dirty-bitmap-add', 'block-dirty-bitmap-remove', 'block-dirty-bitmap-clear', 'block-dirty-bitmap-enable',
  'block-dirty-bitmap-disable', 'block-dirty-bitmap-merge', 'blockdev-backup', 'blockdev-snapshot', 'blockdev-snapshot-internal-sync',
  'blockdev-snapshot-sync', 'drive-backup',
]) }, 'type', {
  abort: { data: struct('Abort', {}) },
  'block-dirty-bitmap-add': { data: BLOCK_DIRTY_BITMAP_ADD },
  'block-dirty-bitmap-remove': { data: BLOCK_DIRTY_BITMAP },
  'block-dirty-bitmap-clear': { data: BLOCK_DIRTY_BITMAP },
  'block-dirty-bitmap-enable': { data: BLOCK_DIRTY_BITMAP },
  'block-dirty-bitmap-disable': { data: BLOCK_DIRTY_BITMAP },
  'block-dirty-bitmap-merge': { data: BLOCK_DIRTY_BITMAP_MERGE },
  'blockdev-backup': { data: BLOCKDEV_BACKUP },
  'drive-backup': { data: DRIVE_BACKUP },
  'blockdev-snapshot': { data: any },
  'blockdev-snapshot-internal-sync': { data: any },
  'blockdev-snapshot-sync': { data: any },
});

/** block-job-* commands find block jobs only, with QEMU's DeviceNotActive error. */
function blockJob(daemon: Daemon, id: string): BlockJob {
  const job = daemon.jobs.get(id);
  if (!(job instanceof BlockJob)) throw new VdiskError('ENOENT', `Block job '${id}' not found`, { qmpClass: 'DeviceNotActive' });
  return job;
}

const DEVICE = struct('BlockJobDevice', { device: str });
const ID = struct('BlockJobId', { id: str });

/** vdisk's backup to an S3 bucket (docs/design/s3-backup.md): a block job like drive-backup's. */
const X_BACKUP_S3: Type = struct('x-backup-s3', {
  '*job-id': str,
  device: str,
  sync: enumOf('S3BackupSyncMode', ['full', 'incremental']),
  '*bitmap': str,
  endpoint: str,
  bucket: str,
  '*prefix': str,
  '*region': str,
  'access-key': str,
  // The id of a `secret` object holding the secret access key (never the key itself in a command log).
  secret: str,
  // A tls-creds-x509 object (endpoint client): an https endpoint's certificate is checked against its CA.
  '*tls-creds': str,
  '*chunk-size': int('uint64'),
  '*parent': str,
  '*speed': int('int'),
  '*on-source-error': ON_ERROR,
  '*on-target-error': ON_ERROR,
  '*auto-finalize': bool,
  '*auto-dismiss': bool,
});

export const BACKUP_COMMANDS: QmpCommand[] = [
  {
    name: 'x-backup-s3',
    args: X_BACKUP_S3,
    run: async (args, { daemon }) => {
      await startS3Backup(daemon, args as unknown as S3BackupArgs);
      return {};
    },
  },
  {
    name: 'drive-backup',
    args: DRIVE_BACKUP,
    run: async (args, { daemon }) => {
      await runTransaction(daemon, [{ type: 'drive-backup', data: args }], 'individual');
      return {};
    },
  },
  {
    name: 'blockdev-backup',
    args: BLOCKDEV_BACKUP,
    run: async (args, { daemon }) => {
      await runTransaction(daemon, [{ type: 'blockdev-backup', data: args }], 'individual');
      return {};
    },
  },
  {
    name: 'transaction',
    args: struct('transaction', {
      actions: arrayOf(TRANSACTION_ACTION),
      '*properties': struct('TransactionProperties', { '*completion-mode': enumOf('ActionCompletionMode', ['individual', 'grouped']) }),
    }),
    run: async (args, { daemon }) => {
      const props = (args.properties ?? {}) as { 'completion-mode'?: 'individual' | 'grouped' };
      await runTransaction(daemon, args.actions as TransactionAction[], props['completion-mode'] ?? 'individual');
      return {};
    },
  },
  {
    name: 'query-block-jobs',
    args: struct('query-block-jobs', {}),
    run: (_a, { daemon }) => daemon.jobs.list().filter((j): j is BlockJob => j instanceof BlockJob).map((j) => j.blockJobInfo()),
  },
  {
    name: 'block-job-set-speed',
    args: struct('block-job-set-speed', { device: str, speed: int('int') }),
    run: (a, { daemon }) => (blockJob(daemon, a.device as string).setSpeed(a.speed as number), {}),
  },
  {
    name: 'block-job-cancel',
    args: struct('block-job-cancel', { device: str, '*force': bool }),
    run: (a, { daemon }) => {
      const job = blockJob(daemon, a.device as string);
      if (job.isPaused && !a.force) throw new VdiskError('EBUSY', `The block job for device '${a.device}' is currently paused`);
      job.cancel();
      return {};
    },
  },
  {
    name: 'block-job-pause',
    args: DEVICE,
    run: (a, { daemon }) => {
      const job = blockJob(daemon, a.device as string);
      if (job.isPaused) throw new VdiskError('EBUSY', 'Job is already paused');
      job.pause();
      return {};
    },
  },
  { name: 'block-job-resume', args: DEVICE, run: (a, { daemon }) => (blockJob(daemon, a.device as string).resume(), {}) },
  { name: 'block-job-complete', args: DEVICE, run: (a, { daemon }) => (blockJob(daemon, a.device as string).checkVerb('complete'), {}) },
  {
    name: 'block-job-finalize',
    args: ID,
    run: async (a, { daemon }) => {
      await blockJob(daemon, a.id as string).finalize();
      return {};
    },
  },
  { name: 'block-job-dismiss', args: ID, run: (a, { daemon }) => (blockJob(daemon, a.id as string).dismiss(), {}) },
];
