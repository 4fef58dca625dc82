/**
 * Restore of an S3 backup into a block node (the image `vdisk img
 * restore-s3` creates), verified twice:
 *
 *  1. every chunk object is checked as it arrives: its length and SHA-256
 *     must be the manifest's, so a damaged, truncated, replaced or missing
 *     object is found before its bytes are written;
 *  2. after the last write and a flush, the image is read back chunk by
 *     chunk: listed chunks must hash to the manifest's SHA-256 and the others
 *     must read as zeroes. This catches what step 1 cannot: a target that
 *     lost or misplaced a write.
 *
 * Bad chunks do not stop the restore at the first: all are listed (a user
 * deciding what to do about a damaged backup wants the whole picture), then
 * it fails.
 */
import crypto from 'node:crypto';
import type { BlockNode } from '../../block/node.js';
import { VdiskError } from '../../errors.js';
import { S3Error, type S3Client } from './client.js';
import type { ChunkEntry, Manifest } from './manifest.js';

export interface RestoreProgress {
  (done: number, total: number): void;
}

/** Chunks fetched at once: enough to hide a round trip, few enough to bound memory (4 x chunk size). */
const PARALLEL = 4;
/** Problems listed in the error; the rest are counted. */
const LISTED_PROBLEMS = 10;

export interface RestoreResult {
  chunks: number;
  bytes: number;
}

/** Fills `target` (at least manifest.size bytes, reading as zeroes where nothing is written) from the manifest's chunks. */
export async function restoreManifest(client: S3Client, manifest: Manifest, target: BlockNode, progress?: RestoreProgress): Promise<RestoreResult> {
  const problems: string[] = [];
  let bytes = 0;
  let next = 0;
  let done = 0;
  const worker = async () => {
    while (next < manifest.chunks.length) {
      const c = manifest.chunks[next++];
      const data = await fetchChunk(client, c).catch((err: Error) => {
        problems.push(err.message);
        return undefined;
      });
      if (data) {
        await target.write(c.offset, data);
        bytes += data.length;
      }
      progress?.(++done, manifest.chunks.length);
    }
  };
  await Promise.all(Array.from({ length: PARALLEL }, worker));
  if (problems.length) throw restoreError(manifest, problems, 'downloaded');
  await target.flush();
  const readBack = await verifyImage(manifest, target);
  if (readBack.length) throw restoreError(manifest, readBack, 'read back from the restored image');
  return { chunks: manifest.chunks.length, bytes };
}

/** One chunk's bytes, checked against its manifest entry. */
export async function fetchChunk(client: S3Client, c: ChunkEntry): Promise<Buffer> {
  let data: Buffer;
  try {
    data = await client.getObject(c.key);
  } catch (err) {
    if (err instanceof S3Error && err.status === 404) throw new VdiskError('ENOENT', `chunk at offset ${c.offset}: object ${c.key} is missing`);
    throw new VdiskError('EIO', `chunk at offset ${c.offset}: ${(err as Error).message}`);
  }
  if (data.length !== c.length) throw new VdiskError('EIO', `chunk at offset ${c.offset}: object ${c.key} has ${data.length} bytes, the manifest says ${c.length}`);
  const sha256 = crypto.createHash('sha256').update(data).digest('hex');
  if (sha256 !== c.sha256) throw new VdiskError('EIO', `chunk at offset ${c.offset}: object ${c.key} has SHA-256 ${sha256}, the manifest says ${c.sha256} (the object is damaged or was replaced)`);
  return data;
}

/** Reads the whole image back: the problems found, as lines. */
async function verifyImage(manifest: Manifest, image: BlockNode): Promise<string[]> {
  const problems: string[] = [];
  const listed = new Map(manifest.chunks.map((c) => [c.offset, c]));
  const buf = Buffer.alloc(manifest.chunkSize);
  for (let offset = 0; offset < manifest.size; offset += manifest.chunkSize) {
    const part = buf.subarray(0, Math.min(manifest.chunkSize, manifest.size - offset));
    await image.read(offset, part);
    const c = listed.get(offset);
    if (c) {
      const sha256 = crypto.createHash('sha256').update(part).digest('hex');
      if (sha256 !== c.sha256) problems.push(`chunk at offset ${offset} reads back with SHA-256 ${sha256}, the manifest says ${c.sha256}`);
    } else if (part.some((b) => b !== 0)) {
      problems.push(`chunk at offset ${offset} should read as zeroes but holds data`);
    }
  }
  return problems;
}

function restoreError(manifest: Manifest, problems: string[], stage: string): VdiskError {
  const shown = problems.slice(0, LISTED_PROBLEMS).map((p) => `  ${p}`);
  if (problems.length > LISTED_PROBLEMS) shown.push(`  ... and ${problems.length - LISTED_PROBLEMS} more`);
  return new VdiskError('EIO', `backup ${manifest.id}: ${problems.length} chunk(s) failed verification when ${stage}:\n${shown.join('\n')}`);
}
