/**
 * qcow2 on-disk format: header, header extensions, table entries.
 * Pure encode/decode, no I/O. Follows docs/interop/qcow2.txt in qemu/qemu.
 *
 * All numbers are big-endian. 64-bit fields are split into two 32-bit
 * halves: vdisk refuses anything at or above 2^53 (no real image gets near).
 */
import { VdiskError } from '../../../errors.js';

export const QCOW_MAGIC = 0x514649fb; // "QFI\xfb"
export const HEADER_V2_LENGTH = 72;
export const HEADER_V3_LENGTH = 112; // with compression_type and padding, as QEMU writes it
export const MIN_CLUSTER_BITS = 9;
export const MAX_CLUSTER_BITS = 21;
export const MAX_BACKING_FILE_NAME = 1023;
export const MAX_L1_BYTES = 32 * 1024 * 1024;
export const MAX_REFCOUNT_TABLE_BYTES = 8 * 1024 * 1024;

// incompatible_features
export const INCOMPAT_DIRTY = 1n << 0n;
export const INCOMPAT_CORRUPT = 1n << 1n;
export const INCOMPAT_DATA_FILE = 1n << 2n;
export const INCOMPAT_COMPRESSION = 1n << 3n;
export const INCOMPAT_EXTL2 = 1n << 4n;
export const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
// compatible_features
export const COMPAT_LAZY_REFCOUNTS = 1n << 0n;
// autoclear_features
export const AUTOCLEAR_BITMAPS = 1n << 0n;
export const AUTOCLEAR_DATA_FILE_RAW = 1n << 1n;

// Header extension types.
export const EXT_END = 0;
export const EXT_BACKING_FORMAT = 0xe2792aca;
export const EXT_FEATURE_TABLE = 0x6803f857;
export const EXT_BITMAPS = 0x23852875;
export const EXT_CRYPTO = 0x0537be77;
export const EXT_DATA_FILE = 0x44415441;

// Table entry flags (in the high 32 bits of a 64-bit entry).
export const OFLAG_COPIED_HI = 0x80000000;
export const OFLAG_COMPRESSED_HI = 0x40000000;
/** The zero flag is bit 0 of the low half of a standard L2 entry. */
export const OFLAG_ZERO_LO = 1;

export interface HeaderExtension {
  type: number;
  data: Buffer;
}

export interface Qcow2Header {
  version: 2 | 3;
  backingFileOffset: number;
  backingFileSize: number;
  clusterBits: number;
  size: number;
  cryptMethod: number;
  l1Size: number;
  l1TableOffset: number;
  refcountTableOffset: number;
  refcountTableClusters: number;
  nbSnapshots: number;
  snapshotsOffset: number;
  incompatibleFeatures: bigint;
  compatibleFeatures: bigint;
  autoclearFeatures: bigint;
  refcountOrder: number;
  headerLength: number;
  compressionType: number;
  /** Extensions vdisk does not interpret, kept and written back unchanged. */
  unknownExtensions: HeaderExtension[];
  /** The bitmaps extension data, kept as is (persistent bitmaps are another module's business). */
  bitmapsExtension?: Buffer;
  backingFile?: string;
  backingFormat?: string;
  dataFile?: string;
  /** Names of feature bits, from the feature name table: "incompatible:5" -> "name". */
  featureNames: Map<string, string>;
}

/** The feature name table QEMU writes, so tools that do not know a bit can name it. */
const FEATURE_TABLE: Array<[number, number, string]> = [
  [0, 0, 'dirty bit'],
  [0, 1, 'corrupt bit'],
  [0, 2, 'external data file'],
  [0, 3, 'compression type'],
  [0, 4, 'extended L2 entries'],
  [1, 0, 'lazy refcounts'],
  [2, 0, 'bitmaps'],
  [2, 1, 'raw external data'],
];

function corrupt(message: string): VdiskError {
  return new VdiskError('EIO', `qcow2: ${message}`, { code: 'VDISK_QCOW2_CORRUPT' });
}

function unsupported(message: string): VdiskError {
  return new VdiskError('ENOTSUP', `qcow2: ${message}`, { code: 'VDISK_QCOW2_UNSUPPORTED' });
}

/** Reads a u64 as a JS number; refuses values at or above 2^53. */
export function readU64(b: Buffer, at: number, what: string): number {
  const hi = b.readUInt32BE(at);
  if (hi >= 0x200000) throw corrupt(`${what} (0x${b.readBigUInt64BE(at).toString(16)}) is too large`);
  return hi * 2 ** 32 + b.readUInt32BE(at + 4);
}

export function writeU64(b: Buffer, at: number, value: number): void {
  b.writeUInt32BE(Math.floor(value / 2 ** 32), at);
  b.writeUInt32BE(value >>> 0, at + 4);
}

export function isQcow2(first: Buffer): boolean {
  return first.length >= 4 && first.readUInt32BE(0) === QCOW_MAGIC;
}

/**
 * Parses and validates the header in the first cluster of an image.
 * `first` holds at least the first min(file size, 2 MiB) bytes.
 */
export function parseHeader(first: Buffer, fileSize: number): Qcow2Header {
  if (first.length < HEADER_V2_LENGTH) throw corrupt(`the file is too short for a qcow2 header (${first.length} bytes)`);
  if (first.readUInt32BE(0) !== QCOW_MAGIC) throw corrupt('bad magic: not a qcow2 image');
  const version = first.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw unsupported(`unsupported qcow2 version ${version}`);
  const clusterBits = first.readUInt32BE(20);
  if (clusterBits < MIN_CLUSTER_BITS || clusterBits > MAX_CLUSTER_BITS) {
    throw unsupported(`cluster size 2^${clusterBits} is not supported (512 B to 2 MiB)`);
  }
  const clusterSize = 2 ** clusterBits;
  const h: Qcow2Header = {
    version,
    backingFileOffset: readU64(first, 8, 'backing file offset'),
    backingFileSize: first.readUInt32BE(16),
    clusterBits,
    size: readU64(first, 24, 'virtual size'),
    cryptMethod: first.readUInt32BE(32),
    l1Size: first.readUInt32BE(36),
    l1TableOffset: readU64(first, 40, 'L1 table offset'),
    refcountTableOffset: readU64(first, 48, 'refcount table offset'),
    refcountTableClusters: first.readUInt32BE(56),
    nbSnapshots: first.readUInt32BE(60),
    snapshotsOffset: readU64(first, 64, 'snapshot table offset'),
    incompatibleFeatures: 0n,
    compatibleFeatures: 0n,
    autoclearFeatures: 0n,
    refcountOrder: 4,
    headerLength: HEADER_V2_LENGTH,
    compressionType: 0,
    unknownExtensions: [],
    featureNames: new Map(),
  };
  if (version === 3) {
    if (first.length < 104) throw corrupt('the file is too short for a version 3 header');
    h.incompatibleFeatures = first.readBigUInt64BE(72);
    h.compatibleFeatures = first.readBigUInt64BE(80);
    h.autoclearFeatures = first.readBigUInt64BE(88);
    h.refcountOrder = first.readUInt32BE(96);
    h.headerLength = first.readUInt32BE(100);
    if (h.headerLength < 104 || h.headerLength % 8 !== 0 || h.headerLength > clusterSize) {
      throw corrupt(`invalid header length ${h.headerLength}`);
    }
    if (h.headerLength > 104) h.compressionType = first[104];
  }
  if (h.refcountOrder > 6) throw corrupt(`refcount order ${h.refcountOrder} is above 6`);
  if (h.cryptMethod !== 0) throw unsupported('encrypted images are not supported');

  // Extensions start after the header and end with type 0 (or at the end of the cluster).
  let pos = h.headerLength;
  const limit = Math.min(clusterSize, first.length);
  while (pos + 8 <= limit) {
    const type = first.readUInt32BE(pos);
    const length = first.readUInt32BE(pos + 4);
    if (type === EXT_END) break;
    if (pos + 8 + length > limit) throw corrupt(`header extension 0x${type.toString(16)} at ${pos} runs past the first cluster`);
    const data = Buffer.from(first.subarray(pos + 8, pos + 8 + length));
    switch (type) {
      case EXT_BACKING_FORMAT:
        h.backingFormat = data.toString('utf8');
        break;
      case EXT_FEATURE_TABLE:
        for (let i = 0; i + 48 <= data.length; i += 48) {
          const kind = ['incompatible', 'compatible', 'autoclear'][data[i]] ?? `type${data[i]}`;
          h.featureNames.set(`${kind}:${data[i + 1]}`, data.toString('utf8', i + 2, i + 48).replace(/\0+$/, ''));
        }
        break;
      case EXT_BITMAPS:
        h.bitmapsExtension = data;
        break;
      case EXT_DATA_FILE:
        h.dataFile = data.toString('utf8');
        break;
      case EXT_CRYPTO:
        throw unsupported('encrypted images are not supported');
      default:
        h.unknownExtensions.push({ type, data });
    }
    pos += 8 + Math.ceil(length / 8) * 8;
  }

  const unknown = h.incompatibleFeatures & ~INCOMPAT_KNOWN;
  if (unknown) {
    const names = [];
    for (let bit = 0; bit < 64; bit++) {
      if (unknown & (1n << BigInt(bit))) names.push(h.featureNames.get(`incompatible:${bit}`) ?? `bit ${bit}`);
    }
    throw unsupported(`the image uses unknown incompatible features: ${names.join(', ')}`);
  }
  if (h.incompatibleFeatures & INCOMPAT_DATA_FILE) throw unsupported('images with an external data file are not supported');
  if (h.incompatibleFeatures & INCOMPAT_EXTL2) throw unsupported('images with extended L2 entries are not supported');
  if (h.incompatibleFeatures & INCOMPAT_COMPRESSION && h.compressionType !== 0) {
    throw unsupported(`compression type ${h.compressionType === 1 ? 'zstd' : h.compressionType} is not supported (only zlib)`);
  }

  if (h.backingFileOffset !== 0) {
    if (h.backingFileSize > MAX_BACKING_FILE_NAME) throw corrupt(`backing file name of ${h.backingFileSize} bytes is too long`);
    if (h.backingFileOffset + h.backingFileSize > Math.min(clusterSize, first.length)) {
      throw corrupt(`backing file name at ${h.backingFileOffset} is outside the first cluster`);
    }
    h.backingFile = first.toString('utf8', h.backingFileOffset, h.backingFileOffset + h.backingFileSize);
  }
  checkTable('L1 table', h.l1TableOffset, h.l1Size * 8, clusterSize, fileSize, MAX_L1_BYTES);
  checkTable('refcount table', h.refcountTableOffset, h.refcountTableClusters * clusterSize, clusterSize, fileSize, MAX_REFCOUNT_TABLE_BYTES);
  if (h.refcountTableClusters === 0) throw corrupt('the image has no refcount table');
  if (h.nbSnapshots > 0) checkTable('snapshot table', h.snapshotsOffset, 0, clusterSize, fileSize, Infinity);
  // The L1 table must be able to map the whole disk.
  const l2Entries = clusterSize / 8;
  const needed = Math.ceil(h.size / clusterSize / l2Entries);
  if (h.l1Size < needed) throw corrupt(`the L1 table has ${h.l1Size} entries, ${needed} are needed for ${h.size} bytes`);
  return h;
}

function checkTable(what: string, offset: number, bytes: number, clusterSize: number, fileSize: number, max: number): void {
  if (offset % clusterSize !== 0) throw corrupt(`${what} offset ${offset} is not cluster aligned`);
  if (bytes > max) throw corrupt(`${what} of ${bytes} bytes is too large`);
  if (offset + bytes > fileSize || (offset === 0 && bytes > 0)) {
    throw corrupt(`${what} at offset ${offset} (${bytes} bytes) is outside the image file (${fileSize} bytes)`);
  }
}

/**
 * Encodes the header, its extensions and the backing file name into the
 * bytes of cluster 0 (as many as are needed, not the whole cluster).
 */
export function serializeHeader(h: Qcow2Header, withFeatureTable = true): Buffer {
  const clusterSize = 2 ** h.clusterBits;
  const headerLength = h.version === 2 ? HEADER_V2_LENGTH : Math.max(h.headerLength, HEADER_V3_LENGTH);
  const parts: Buffer[] = [];
  const base = Buffer.alloc(headerLength);
  base.writeUInt32BE(QCOW_MAGIC, 0);
  base.writeUInt32BE(h.version, 4);
  // Backing file offset and size are filled in below.
  base.writeUInt32BE(h.clusterBits, 20);
  writeU64(base, 24, h.size);
  base.writeUInt32BE(h.cryptMethod, 32);
  base.writeUInt32BE(h.l1Size, 36);
  writeU64(base, 40, h.l1TableOffset);
  writeU64(base, 48, h.refcountTableOffset);
  base.writeUInt32BE(h.refcountTableClusters, 56);
  base.writeUInt32BE(h.nbSnapshots, 60);
  writeU64(base, 64, h.snapshotsOffset);
  if (h.version === 3) {
    base.writeBigUInt64BE(h.incompatibleFeatures, 72);
    base.writeBigUInt64BE(h.compatibleFeatures, 80);
    base.writeBigUInt64BE(h.autoclearFeatures, 88);
    base.writeUInt32BE(h.refcountOrder, 96);
    base.writeUInt32BE(headerLength, 100);
    base[104] = h.compressionType;
  }
  parts.push(base);
  const ext = (type: number, data: Buffer) => {
    const e = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
    e.writeUInt32BE(type, 0);
    e.writeUInt32BE(data.length, 4);
    data.copy(e, 8);
    parts.push(e);
  };
  // QEMU's order: backing format, data file, crypto, feature table, bitmaps, unknown, end.
  if (h.backingFormat) ext(EXT_BACKING_FORMAT, Buffer.from(h.backingFormat));
  if (h.version === 3 && withFeatureTable) {
    const table = Buffer.alloc(FEATURE_TABLE.length * 48);
    FEATURE_TABLE.forEach(([type, bit, name], i) => {
      table[i * 48] = type;
      table[i * 48 + 1] = bit;
      table.write(name, i * 48 + 2, 46, 'utf8');
    });
    ext(EXT_FEATURE_TABLE, table);
  }
  if (h.bitmapsExtension) ext(EXT_BITMAPS, h.bitmapsExtension);
  for (const u of h.unknownExtensions) ext(u.type, u.data);
  parts.push(Buffer.alloc(8)); // end of extensions
  let out = Buffer.concat(parts);
  if (h.backingFile) {
    const name = Buffer.from(h.backingFile);
    if (name.length > MAX_BACKING_FILE_NAME) throw new VdiskError('EINVAL', `backing file name is longer than ${MAX_BACKING_FILE_NAME} bytes`);
    writeU64(out, 8, out.length);
    out.writeUInt32BE(name.length, 16);
    out = Buffer.concat([out, name]);
  }
  if (out.length > clusterSize) {
    // A 512-byte cluster has little room: drop the optional feature name table first.
    if (withFeatureTable && h.version === 3) return serializeHeader(h, false);
    throw new VdiskError('EINVAL', `the qcow2 header and its extensions (${out.length} bytes) do not fit in one ${clusterSize}-byte cluster`);
  }
  return out;
}

/** Kinds of L2 entries. */
export const enum EntryKind {
  Unallocated,
  Zero, // reads as zero; may still hold a preallocated host cluster
  Normal,
  Compressed,
}

export interface DecodedL2 {
  kind: EntryKind;
  /** Host offset of the data cluster (Normal, preallocated Zero) or of the compressed bytes. */
  offset: number;
  /** COPIED flag: refcount exactly one, writes may go in place. */
  copied: boolean;
  /** Compressed clusters: bytes to read starting at `offset`. */
  compressedLength: number;
}

/** Decodes one L2 entry (hi/lo 32-bit halves). */
export function decodeL2(hi: number, lo: number, clusterBits: number, v3: boolean): DecodedL2 {
  if (hi & OFLAG_COMPRESSED_HI) {
    // x = 62 - (cluster_bits - 8): low x bits are the host byte offset, then the extra sector count.
    const x = 62 - (clusterBits - 8);
    const value = (BigInt(hi & 0x3fffffff) << 32n) | BigInt(lo);
    const offset = Number(value & ((1n << BigInt(x)) - 1n));
    const sectors = Number(value >> BigInt(x)) + 1;
    return { kind: EntryKind.Compressed, offset, copied: false, compressedLength: sectors * 512 - (offset % 512) };
  }
  const offset = (hi & 0x00ffffff) * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
  const copied = (hi & OFLAG_COPIED_HI) !== 0;
  if (v3 && lo & OFLAG_ZERO_LO) return { kind: EntryKind.Zero, offset, copied, compressedLength: 0 };
  if (offset === 0) return { kind: EntryKind.Unallocated, offset: 0, copied: false, compressedLength: 0 };
  return { kind: EntryKind.Normal, offset, copied, compressedLength: 0 };
}

/** Writes a standard L2 (or L1) entry: host offset, COPIED and ZERO flags. */
export function encodeEntry(b: Buffer, at: number, offset: number, copied: boolean, zero = false): void {
  const hi = Math.floor(offset / 2 ** 32);
  b.writeUInt32BE((hi | (copied ? OFLAG_COPIED_HI : 0)) >>> 0, at);
  b.writeUInt32BE(((offset >>> 0) | (zero ? OFLAG_ZERO_LO : 0)) >>> 0, at + 4);
}

/**
 * Writes a compressed cluster descriptor: the host byte offset in the low
 * x = 62 - (cluster_bits - 8) bits, then the number of 512-byte sectors the
 * data spans beyond the one holding its first byte; flag bit 62 set.
 */
export function encodeCompressedEntry(b: Buffer, at: number, offset: number, length: number, clusterBits: number): void {
  const x = 62 - (clusterBits - 8);
  const extraSectors = Math.floor((offset + length - 1) / 512) - Math.floor(offset / 512);
  const value = (1n << 62n) | (BigInt(extraSectors) << BigInt(x)) | BigInt(offset);
  b.writeBigUInt64BE(value, at);
}

/** Host offset in an L1 entry (bits 9-55). */
export function l1Offset(hi: number, lo: number): number {
  return (hi & 0x00ffffff) * 2 ** 32 + ((lo & ~0x1ff) >>> 0);
}

/** The parts of a header that are valid for a new image. */
export function newHeader(options: {
  size: number;
  clusterBits: number;
  version: 2 | 3;
  refcountOrder: number;
  lazyRefcounts: boolean;
  backingFile?: string;
  backingFormat?: string;
}): Qcow2Header {
  return {
    version: options.version,
    backingFileOffset: 0,
    backingFileSize: 0,
    clusterBits: options.clusterBits,
    size: options.size,
    cryptMethod: 0,
    l1Size: 0,
    l1TableOffset: 0,
    refcountTableOffset: 0,
    refcountTableClusters: 0,
    nbSnapshots: 0,
    snapshotsOffset: 0,
    incompatibleFeatures: 0n,
    compatibleFeatures: options.lazyRefcounts ? COMPAT_LAZY_REFCOUNTS : 0n,
    autoclearFeatures: 0n,
    refcountOrder: options.refcountOrder,
    headerLength: options.version === 3 ? HEADER_V3_LENGTH : HEADER_V2_LENGTH,
    compressionType: 0,
    unknownExtensions: [],
    backingFile: options.backingFile,
    backingFormat: options.backingFormat,
    featureNames: new Map(),
  };
}
