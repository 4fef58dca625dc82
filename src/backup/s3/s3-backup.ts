/**
 * x-backup-s3: a full or incremental backup of a node into an S3 bucket.
 *
 * The job is drive-backup's (BackupJob) with an S3ChunkTarget as its target,
 * so the point in time, the bitmap's fate (on-success: cleared when the
 * backup is complete, untouched when it fails or is cancelled), the speed
 * limit and the job verbs and events are the same code. What it adds: before
 * anything changes, the bucket is checked with the credentials (a wrong key
 * fails the command, and the bitmap is not touched), and an incremental's
 * parent manifest is read; after the copy, the manifest and latest.json are
 * stored *before* the job completes, so the bitmap is cleared only once a
 * restorable backup exists.
 */
import crypto from 'node:crypto';
import type { BlockNode } from '../../block/node.js';
import { VdiskError, toVdiskError } from '../../errors.js';
import { logEvent } from '../../log.js';
import type { TlsCreds } from '../../objects/tls-creds.js';
import { BackupJob, type BackupOptions } from '../backup-job.js';
import { type TransactionHost, setUpBackup } from '../transaction.js';
import { S3ChunkTarget } from './chunk-target.js';
import { S3Client, type S3Config, S3Error } from './client.js';
import {
  DEFAULT_CHUNK_SIZE,
  type LatestPointer,
  MANIFEST_FORMAT,
  MANIFEST_VERSION,
  type Manifest,
  backupId,
  checkChunkSize,
  latestKey,
  manifestKey,
  normalisePrefix,
  parseManifest,
} from './manifest.js';

export interface S3BackupArgs {
  'job-id'?: string;
  device: string;
  sync: 'full' | 'incremental';
  bitmap?: string;
  endpoint: string;
  bucket: string;
  prefix?: string;
  region?: string;
  'access-key': string;
  /** Id of a `secret` object holding the secret access key. */
  secret: string;
  /** Id of a tls-creds-x509 object (endpoint client) whose CA an https endpoint is checked against. */
  'tls-creds'?: string;
  'chunk-size'?: number;
  /** An incremental's parent manifest key; default: the one latest.json names. */
  parent?: string;
  speed?: number;
  /** As drive-backup's: report (default), ignore or stop; a stopped job retries the chunk when resumed. */
  'on-source-error'?: string;
  'on-target-error'?: string;
  'auto-finalize'?: boolean;
  'auto-dismiss'?: boolean;
}

/** What starting an S3 backup needs of the daemon: the graph, the job list, and secrets by id. */
export interface S3BackupHost extends TransactionHost {
  readonly objects: { secretBase64(id: string): string; tlsCreds(id: string, endpoint: 'client'): TlsCreds };
}

export interface ParentManifest {
  manifest: Manifest;
  key: string;
  sha256: string;
}

interface S3JobContext {
  client: S3Client;
  prefix: string;
  target: S3ChunkTarget;
  id: string;
  created: Date;
  sync: 'full' | 'incremental';
  node: string;
  bitmap: string | undefined;
  parent: ParentManifest | undefined;
}

export class S3BackupJob extends BackupJob {
  /** The manifest stored when the job completed (for tests and logs). */
  storedManifest: { key: string; sha256: string } | undefined;

  constructor(
    o: BackupOptions,
    private readonly s3: S3JobContext,
  ) {
    super(o);
  }

  override get userDescription(): string {
    return `S3 backup job '${this.id}'`;
  }

  protected override async run(): Promise<void> {
    await super.run();
    const s = this.s3;
    const chunks = [...s.target.entries.values()].sort((a, b) => a.offset - b.offset);
    const manifest: Manifest = {
      format: MANIFEST_FORMAT,
      version: MANIFEST_VERSION,
      id: s.id,
      created: s.created.toISOString(),
      completed: new Date().toISOString(),
      node: s.node,
      sync: s.sync,
      bitmap: s.bitmap ?? null,
      parent: s.parent ? { key: s.parent.key, sha256: s.parent.sha256, id: s.parent.manifest.id } : null,
      size: s.target.size,
      chunkSize: s.target.chunkSize,
      checksum: 'sha256',
      chunks,
      stats: { dataChunks: chunks.length, ...s.target.uploadStats },
    };
    const text = Buffer.from(JSON.stringify(manifest, null, 1) + '\n');
    const sha256 = crypto.createHash('sha256').update(text).digest('hex');
    const key = manifestKey(s.prefix, s.id);
    // The manifest first: latest.json must never name a manifest that is not there.
    await s.client.putObject(key, text, 'application/json');
    const latest: LatestPointer = { manifest: key, sha256 };
    await s.client.putObject(latestKey(s.prefix), Buffer.from(JSON.stringify(latest) + '\n'), 'application/json');
    this.storedManifest = { key, sha256 };
    logEvent('info', 's3-backup-stored', { id: this.id, manifest: key, chunks: chunks.length, uploadedChunks: s.target.uploadStats.uploadedChunks, uploadedBytes: s.target.uploadStats.uploadedBytes });
  }

  /** An S3 failure says what the endpoint answered; "Permission denied" alone would not say which key is wrong. */
  protected override errorText(err: unknown): string {
    const e = toVdiskError(err, this.userDescription);
    if (e instanceof S3Error || e.code === 'VDISK_S3') return e.message;
    return super.errorText(err);
  }

  protected override async clean(): Promise<void> {
    try {
      await super.clean();
    } finally {
      this.s3.client.close();
    }
  }
}

/** The secret access key: the `secret` object's bytes, as text. */
function secretKey(host: S3BackupHost, id: string): string {
  return Buffer.from(host.objects.secretBase64(id), 'base64').toString('utf8');
}

/**
 * Reads the manifest `key`, or the one latest.json names (then its bytes
 * must have the SHA-256 latest.json recorded for them), and checks its shape.
 */
export async function loadManifest(client: S3Client, prefix: string, key: string | undefined): Promise<ParentManifest> {
  let expected: string | undefined;
  if (key === undefined) {
    let pointer: LatestPointer;
    try {
      pointer = JSON.parse((await client.getObject(latestKey(prefix))).toString('utf8')) as LatestPointer;
    } catch (err) {
      if (err instanceof S3Error && err.status === 404) {
        throw new VdiskError('ENOENT', `no backup under ${client.location}/${prefix} (${latestKey(prefix)} is missing): take a full backup first`);
      }
      throw err;
    }
    key = pointer.manifest;
    expected = pointer.sha256;
  }
  let bytes: Buffer;
  try {
    bytes = await client.getObject(key);
  } catch (err) {
    if (err instanceof S3Error && err.status === 404) throw new VdiskError('ENOENT', `manifest ${key} is not in ${client.location}`);
    throw err;
  }
  const sha256 = crypto.createHash('sha256').update(bytes).digest('hex');
  if (expected !== undefined && expected !== sha256) {
    throw new VdiskError('EIO', `manifest ${key} has SHA-256 ${sha256}, but ${latestKey(prefix)} recorded ${expected}: it was changed or damaged`);
  }
  return { manifest: parseManifest(bytes, `manifest ${key}`), key, sha256 };
}

/** Starts an S3 backup job (running when this resolves), or fails with nothing changed. */
export async function startS3Backup(host: S3BackupHost, a: S3BackupArgs): Promise<S3BackupJob> {
  const source: BlockNode | undefined = host.graph.get(a.device);
  if (!source) throw new VdiskError('ENOENT', `Cannot find device='${a.device}' nor node-name='${a.device}'`);
  if (a.sync === 'incremental' && a.bitmap === undefined) throw new VdiskError('EINVAL', "must provide a valid bitmap name for 'incremental' sync mode");
  if (a.sync === 'full' && a.parent !== undefined) throw new VdiskError('EINVAL', "'parent' is only for sync=incremental");
  if (a['chunk-size'] !== undefined) checkChunkSize(a['chunk-size']);
  if (a.bitmap !== undefined) {
    const b = source.dirtyBitmaps.find((x) => x.name === a.bitmap);
    if (!b) throw new VdiskError('ENOENT', `Bitmap '${a.bitmap}' could not be found`);
    b.check({ busy: true, inconsistent: true });
  }
  const prefix = normalisePrefix(a.prefix);
  let secureContext: S3Config['secureContext'];
  if (a['tls-creds'] !== undefined) {
    const creds = host.objects.tlsCreds(a['tls-creds'], 'client');
    if (creds.qomType !== 'tls-creds-x509') throw new VdiskError('EINVAL', `'${a['tls-creds']}' is ${creds.qomType}: an https endpoint needs tls-creds-x509 (its CA)`);
    if (!a.endpoint.startsWith('https:')) throw new VdiskError('EINVAL', `'tls-creds' is for https endpoints, and ${a.endpoint} is not one`);
    secureContext = creds.clientOptions(undefined).secureContext;
  }
  const client = new S3Client({ endpoint: a.endpoint, bucket: a.bucket, region: a.region, credentials: { accessKey: a['access-key'], secretKey: secretKey(host, a.secret) }, secureContext });
  try {
    // Credentials and bucket first: a wrong key must fail here, before the bitmap is touched.
    await client.checkBucket();
    let parent: ParentManifest | undefined;
    let chunkSize = a['chunk-size'] ?? DEFAULT_CHUNK_SIZE;
    if (a.sync === 'incremental') {
      parent = await loadManifest(client, prefix, a.parent);
      const p = parent.manifest;
      if (p.bitmap !== a.bitmap) {
        throw new VdiskError('EINVAL', `parent backup ${p.id} was taken with bitmap ${p.bitmap === null ? '(none)' : `'${p.bitmap}'`}, not '${a.bitmap}': its changes since then are not what '${a.bitmap}' recorded`);
      }
      if (p.size !== source.size) throw new VdiskError('EINVAL', `'${a.device}' is ${source.size} bytes, parent backup ${p.id} ${p.size}: take a full backup after a resize`);
      if (a['chunk-size'] !== undefined && a['chunk-size'] !== p.chunkSize) throw new VdiskError('EINVAL', `chunk-size ${a['chunk-size']} differs from parent backup ${p.id}'s ${p.chunkSize}`);
      chunkSize = p.chunkSize;
    }
    const created = new Date();
    const id = backupId(created, a.sync);
    const target = new S3ChunkTarget(client, prefix, source.size, chunkSize, id, parent?.manifest.chunks ?? []);
    const context: S3JobContext = { client, prefix, target, id, created, sync: a.sync, node: source.nodeName, bitmap: a.bitmap, parent };
    // In the graph for the job's lifetime: the copy-before-write filter's children must be (the job releases it).
    host.graph.insertImplicit(target);
    let made = false;
    // One instant: no write reaches the node between fixing the copy bitmap and starting the job.
    const release = await source.quiesce();
    try {
      const job = setUpBackup(
        host,
        source,
        target,
        true,
        {
          'job-id': a['job-id'] ?? a.device,
          device: a.device,
          sync: a.sync,
          bitmap: a.bitmap,
          // A full backup with a bitmap clears it on success: it starts the chain the next incremental continues.
          'bitmap-mode': a.bitmap !== undefined && a.sync === 'full' ? 'on-success' : undefined,
          speed: a.speed,
          'on-source-error': a['on-source-error'],
          'on-target-error': a['on-target-error'],
          'auto-finalize': a['auto-finalize'],
          'auto-dismiss': a['auto-dismiss'],
        },
        (o) => {
          made = true;
          return new S3BackupJob(o, context);
        },
      ) as S3BackupJob;
      job.start();
      logEvent('info', 's3-backup-started', { id: job.id, node: source.nodeName, sync: a.sync, bitmap: a.bitmap, location: `${client.location}/${prefix}`, backup: id, parent: parent?.key });
      return job;
    } catch (err) {
      // A job once made releases the target when it goes; refused before that, it is ours to release.
      if (!made) await host.graph.release(target);
      throw err;
    } finally {
      release();
    }
  } catch (err) {
    client.close();
    throw err;
  }
}
