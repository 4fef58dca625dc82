/**
 * The layout of a backup in a bucket, and its manifest (docs/design/s3-backup.md):
 *
 *   PREFIX/chunks/SHA256          one chunk's bytes, named by their SHA-256 (content-addressed)
 *   PREFIX/manifests/ID.json      one backup: the image size, the chunk size and every chunk
 *                                 that is not all zeroes, with its checksum and object key
 *   PREFIX/latest.json            the newest complete backup ({ manifest, sha256 }): the parent
 *                                 an incremental takes when none is named
 *
 * Every manifest lists the whole image, not just what its backup uploaded: an
 * incremental copies its parent's entries for the chunks its bitmap says are
 * unchanged. So a restore reads one manifest, and deleting an old backup's
 * manifest never breaks a newer one; the chain (parent, with the parent
 * manifest's SHA-256) is kept for audit and for the next incremental.
 */
import { VdiskError } from '../../errors.js';

export const MANIFEST_FORMAT = 'vdisk-s3-backup';
export const MANIFEST_VERSION = 1;
export const DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024;
export const MIN_CHUNK_SIZE = 64 * 1024;
export const MAX_CHUNK_SIZE = 64 * 1024 * 1024;

export interface ChunkEntry {
  offset: number;
  /** chunkSize, or less for the image's last chunk. */
  length: number;
  /** Hex SHA-256 of the chunk's bytes (and the last part of its key). */
  sha256: string;
  key: string;
  /** The id of the backup that read these bytes from the disk (this one, or an ancestor). */
  origin: string;
}

export interface Manifest {
  format: typeof MANIFEST_FORMAT;
  version: typeof MANIFEST_VERSION;
  id: string;
  /** The point in time: when the job fixed it (ISO 8601). */
  created: string;
  /** When the backup was complete. */
  completed: string;
  node: string;
  sync: 'full' | 'incremental';
  /** The dirty bitmap that chose an incremental's chunks, or that a full backup cleared. */
  bitmap: string | null;
  parent: { key: string; sha256: string; id: string } | null;
  size: number;
  chunkSize: number;
  checksum: 'sha256';
  /** Every chunk that is not all zeroes, by offset; a chunk not listed reads as zeroes. */
  chunks: ChunkEntry[];
  stats: { dataChunks: number; uploadedChunks: number; uploadedBytes: number; readChunks: number };
}

export interface LatestPointer {
  manifest: string;
  sha256: string;
}

/** '' or a prefix ending in '/': keys are prefix + 'chunks/...'. */
export function normalisePrefix(prefix: string | undefined): string {
  if (!prefix) return '';
  const p = prefix.replace(/^\/+/, '');
  return p === '' || p.endsWith('/') ? p : `${p}/`;
}

export const chunkKey = (prefix: string, sha256: string): string => `${prefix}chunks/${sha256}`;
export const manifestKey = (prefix: string, id: string): string => `${prefix}manifests/${id}.json`;
export const latestKey = (prefix: string): string => `${prefix}latest.json`;

/** A backup id: sortable by time, and says what kind of backup it is. */
export function backupId(when: Date, sync: 'full' | 'incremental'): string {
  return `${when.toISOString().replace(/[-:.]/g, '')}-${sync === 'full' ? 'full' : 'inc'}`;
}

export function checkChunkSize(n: number): void {
  if (!Number.isInteger(n) || n < MIN_CHUNK_SIZE || n > MAX_CHUNK_SIZE || (n & (n - 1)) !== 0) {
    throw new VdiskError('EINVAL', `chunk-size must be a power of two from ${MIN_CHUNK_SIZE} to ${MAX_CHUNK_SIZE}`);
  }
}

/**
 * Parses and checks a manifest read from `where`: a restore trusts its
 * offsets and lengths to place data, so anything out of shape is refused
 * here, with the field at fault, before a byte is written.
 */
export function parseManifest(text: Buffer | string, where: string): Manifest {
  let m: Manifest;
  try {
    m = JSON.parse(text.toString()) as Manifest;
  } catch (err) {
    throw new VdiskError('EINVAL', `${where} is not JSON: ${(err as Error).message}`);
  }
  const bad = (what: string): never => {
    throw new VdiskError('EINVAL', `${where} is not a valid vdisk S3 backup manifest: ${what}`);
  };
  if (!m || typeof m !== 'object') bad('not an object');
  if (m.format !== MANIFEST_FORMAT) bad(`format is ${JSON.stringify(m.format)}, not '${MANIFEST_FORMAT}'`);
  if (m.version !== MANIFEST_VERSION) bad(`version ${JSON.stringify(m.version)} is not supported (this vdisk reads version ${MANIFEST_VERSION})`);
  if (typeof m.id !== 'string' || m.id === '') bad('no id');
  if (!Number.isSafeInteger(m.size) || m.size < 0) bad('size');
  if (!Number.isSafeInteger(m.chunkSize)) bad('chunkSize');
  try {
    checkChunkSize(m.chunkSize);
  } catch {
    bad(`chunkSize ${m.chunkSize}`);
  }
  if (m.checksum !== 'sha256') bad(`checksum ${JSON.stringify(m.checksum)}`);
  if (!Array.isArray(m.chunks)) bad('no chunks list');
  let next = 0;
  for (const [i, c] of m.chunks.entries()) {
    if (!c || typeof c !== 'object') bad(`chunks[${i}] is not an object`);
    if (!Number.isSafeInteger(c.offset) || c.offset % m.chunkSize !== 0 || c.offset < next) bad(`chunks[${i}].offset ${c.offset} is not a chunk boundary after the previous chunk`);
    if (c.length !== Math.min(m.chunkSize, m.size - c.offset) || c.length <= 0) bad(`chunks[${i}].length ${c.length} does not match the chunk at ${c.offset}`);
    if (typeof c.sha256 !== 'string' || !/^[0-9a-f]{64}$/.test(c.sha256)) bad(`chunks[${i}].sha256`);
    if (typeof c.key !== 'string' || c.key === '') bad(`chunks[${i}].key`);
    next = c.offset + c.length;
  }
  return m;
}
