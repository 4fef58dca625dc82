/**
 * The target node of an S3 backup: a write-only block node whose "disk" is a
 * bucket. The backup job (BackupJob, unchanged) copies into it as into any
 * target, so the S3 backup gets the same point in time (copy-before-write),
 * bitmap handling, speed limit and job verbs as drive-backup.
 *
 * Its cluster size is the chunk size, so block copy hands it whole chunks: a
 * copy of one chunk arrives as writes (data) and write-zeroes (zero extents
 * of the source's block status) that together cover it, in order from its
 * start. When a chunk is covered it is hashed and stored as the object
 * chunks/SHA256, unless it is all zeroes (then it is left out of the
 * manifest: zero and unallocated ranges cost no object and no request) or
 * the bucket already holds that content (the parent manifest lists it, or
 * this backup uploaded it). The write that completes a chunk returns only
 * once the object is stored, so an S3 failure fails that write and the job
 * reports it.
 *
 * Chunks the job does not copy (an incremental's clean chunks) keep the
 * parent manifest's entries, given at construction.
 */
import crypto from 'node:crypto';
import { BlockNode } from '../../block/node.js';
import { VdiskError } from '../../errors.js';
import type { S3Client } from './client.js';
import { type ChunkEntry, chunkKey } from './manifest.js';

interface Assembly {
  /** Allocated on the first data write; absent while only zeroes arrived. */
  buf: Buffer | undefined;
  covered: number;
}

export class S3ChunkTarget extends BlockNode {
  readonly driverName = 'x-s3-chunks';
  /** Chunks that are not all zeroes: chunk index -> entry. */
  readonly entries = new Map<number, ChunkEntry>();
  readonly uploadStats = { uploadedChunks: 0, uploadedBytes: 0, readChunks: 0 };
  private readonly assembling = new Map<number, Assembly>();
  /** Contents the bucket holds under this prefix, as far as this backup knows (no PUT needed). */
  private readonly known = new Set<string>();

  constructor(
    private readonly client: S3Client,
    private readonly prefix: string,
    size: number,
    readonly chunkSize: number,
    private readonly backupId: string,
    parentChunks: ChunkEntry[],
  ) {
    super({ nodeName: '' });
    this.length = size;
    for (const c of parentChunks) {
      this.entries.set(c.offset / chunkSize, c);
      this.known.add(c.sha256);
    }
  }

  /** BackupJob takes its job cluster from this: block copy then works in whole chunks. */
  get clusterBytes(): number {
    return this.chunkSize;
  }

  override get filename(): string {
    return `${this.client.location}/${this.prefix}`;
  }

  protected doRead(): Promise<void> {
    return Promise.reject(new VdiskError('ENOTSUP', 'an S3 backup target cannot be read back through the block layer'));
  }

  protected override async doWrite(offset: number, buf: Buffer): Promise<void> {
    await this.cover(offset, buf.length, buf);
  }

  protected override async doWriteZeroes(offset: number, length: number): Promise<void> {
    await this.cover(offset, length, undefined);
  }

  protected override async doDiscard(offset: number, length: number): Promise<void> {
    await this.cover(offset, length, undefined);
  }

  /** Nothing is buffered between requests: a chunk's object is stored by the write that completes it. */
  protected override doFlush(): Promise<void> {
    return Promise.resolve();
  }

  /** Adds [offset, offset+length) (data, or zeroes when data is undefined) to the chunks it falls in. */
  private async cover(offset: number, length: number, data: Buffer | undefined): Promise<void> {
    const cs = this.chunkSize;
    for (let at = offset; at < offset + length; ) {
      const index = Math.floor(at / cs);
      const start = index * cs;
      const chunkLength = Math.min(cs, this.size - start);
      const end = Math.min(offset + length, start + chunkLength);
      const piece = data?.subarray(at - offset, end - offset);
      // A copy walks its chunk from the start: a piece at the start begins the chunk afresh, so a
      // copy retried after a failure (on-target-error=ignore/stop) does not add to the first one's bytes.
      if (at === start) this.assembling.delete(index);
      if (at === start && end === start + chunkLength) {
        // The whole chunk in one request (the usual case for data): no copy into an assembly buffer.
        await this.store(index, start, piece);
      } else {
        let a = this.assembling.get(index);
        if (!a) this.assembling.set(index, (a = { buf: undefined, covered: 0 }));
        if (piece && !isZero(piece)) {
          a.buf ??= Buffer.alloc(chunkLength);
          piece.copy(a.buf, at - start);
        }
        a.covered += end - at;
        if (a.covered >= chunkLength) {
          this.assembling.delete(index);
          await this.store(index, start, a.buf);
        }
      }
      at = end;
    }
  }

  /** Records chunk `index` (bytes, or undefined for all zeroes) and stores its object if the bucket lacks it. */
  private async store(index: number, start: number, bytes: Buffer | undefined): Promise<void> {
    this.uploadStats.readChunks++;
    if (!bytes || isZero(bytes)) {
      this.entries.delete(index);
      return;
    }
    const sha256 = crypto.createHash('sha256').update(bytes).digest('hex');
    const key = chunkKey(this.prefix, sha256);
    if (!this.known.has(sha256)) {
      await this.client.putObject(key, bytes);
      this.known.add(sha256);
      this.uploadStats.uploadedChunks++;
      this.uploadStats.uploadedBytes += bytes.length;
    }
    const previous = this.entries.get(index);
    // Unchanged content keeps its origin: the entry says which backup first read these bytes.
    const origin = previous && previous.sha256 === sha256 ? previous.origin : this.backupId;
    this.entries.set(index, { offset: start, length: bytes.length, sha256, key, origin });
  }
}

/** Compared against in slices: a memcmp per MiB, and a data chunk usually differs in the first bytes. */
const ZEROES = Buffer.alloc(1024 * 1024);

function isZero(buf: Buffer): boolean {
  for (let at = 0; at < buf.length; at += ZEROES.length) {
    const part = buf.subarray(at, Math.min(buf.length, at + ZEROES.length));
    if (!part.equals(ZEROES.subarray(0, part.length))) return false;
  }
  return true;
}
