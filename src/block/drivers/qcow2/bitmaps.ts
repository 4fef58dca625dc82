/**
 * Persistent dirty bitmaps in a qcow2 image (docs/interop/qcow2.txt,
 * "Bitmaps extension"; QEMU's block/qcow2-bitmap.c).
 *
 * On disk: the header extension names a bitmap directory; each directory
 * entry names a bitmap table; each table entry names a cluster of bitmap
 * data (0: all zeroes; 0 with bit 0 set: all ones). Data bits are in the
 * order QEMU serialises them: bit i of the bitmap is bit i % 8 of byte i / 8.
 *
 * Life cycle, as QEMU: at open the bitmaps are loaded onto the node; when the
 * image is opened writable they are marked in use on disk (a crash leaves
 * them "in use", which a later open reports as inconsistent); at a clean
 * close every persistent bitmap is stored afresh and the old clusters freed.
 */
import { DirtyBitmap, MAX_NAME_BYTES } from '../../dirty-bitmap.js';
import type { SparseBitmap } from '../../sparse-bitmap.js';
import { ReqFlags } from '../../node.js';
import { VdiskError } from '../../../errors.js';
import { readU64, writeU64 } from './format.js';
import type { Qcow2Node } from './qcow2.js';

export const BITMAP_IN_USE = 1;
export const BITMAP_AUTO = 2;
const TYPE_DIRTY_TRACKING = 1;
const ENTRY_OFFSET_MASK = 0x00fffffffffffe00n;
export const MAX_BITMAPS = 65535;
/** QEMU's QCOW2_MAX_BITMAP_DIRECTORY_SIZE. */
const MAX_DIRECTORY_BYTES = 1024 * MAX_BITMAPS;
/** QEMU's BME_MAX_PHYS_SIZE and BME_MAX_TABLE_SIZE: how large one bitmap may get. */
const MAX_BITMAP_BYTES = 0x20000000;
const MAX_TABLE_ENTRIES = 0x8000000;
const MIN_GRANULARITY_BITS = 9;
const MAX_GRANULARITY_BITS = 31;

/** One entry of the bitmap directory as it is on disk (what qemu-img info lists). */
export interface StoredBitmap {
  name: string;
  granularity: number;
  /** BITMAP_IN_USE | BITMAP_AUTO as on disk. */
  flags: number;
}

interface DirEntry {
  tableOffset: number;
  tableSize: number;
  flags: number;
  granularityBits: number;
  name: string;
}

/** Parses the extension and directory; undefined when there is none. */
async function readDirectory(node: Qcow2Node): Promise<{ entries: DirEntry[]; dirOffset: number; dirSize: number } | undefined> {
  const ext = node.header.bitmapsExtension;
  if (!ext || ext.length < 24) return undefined;
  const count = ext.readUInt32BE(0);
  const dirSize = readU64(ext, 8, 'bitmap directory size');
  const dirOffset = readU64(ext, 16, 'bitmap directory offset');
  if (count > MAX_BITMAPS || dirSize > 64 * 1024 * 1024 || dirOffset % node.clusterBytes !== 0 || dirOffset + dirSize > node.file.size) {
    throw new VdiskError('EIO', `qcow2: the bitmap directory at ${dirOffset} (${dirSize} bytes, ${count} bitmaps) is invalid`);
  }
  const dir = Buffer.alloc(dirSize);
  await node.file.read(dirOffset, dir);
  const entries: DirEntry[] = [];
  let p = 0;
  for (let i = 0; i < count; i++) {
    if (p + 24 > dir.length) throw new VdiskError('EIO', 'qcow2: the bitmap directory is truncated');
    const nameSize = dir.readUInt16BE(p + 18);
    const extra = dir.readUInt32BE(p + 20);
    const nameAt = p + 24 + extra;
    if (nameAt + nameSize > dir.length) throw new VdiskError('EIO', 'qcow2: a bitmap directory entry runs past the directory');
    entries.push({
      tableOffset: readU64(dir, p, 'bitmap table offset'),
      tableSize: dir.readUInt32BE(p + 8),
      flags: dir.readUInt32BE(p + 12),
      granularityBits: dir[p + 17],
      name: dir.toString('utf8', nameAt, nameAt + nameSize),
    });
    if (dir[p + 16] !== TYPE_DIRTY_TRACKING) throw new VdiskError('EIO', `qcow2: bitmap '${entries[i].name}' has an unknown type ${dir[p + 16]}`);
    p += Math.ceil((24 + extra + nameSize) / 8) * 8;
  }
  return { entries, dirOffset, dirSize };
}

/** Bytes of a directory entry with this name (QEMU's calc_dir_entry_size, no extra data). */
function entryBytes(name: string): number {
  return Math.ceil((24 + Buffer.byteLength(name)) / 8) * 8;
}

/**
 * Whether a new persistent bitmap fits the image, with QEMU's texts
 * (qcow2_co_can_store_new_dirty_bitmap): checked when the bitmap is created,
 * so a close never finds a bitmap it cannot store.
 */
export function checkCanStore(node: Qcow2Node, name: string, granularity: number): void {
  const fail = (why: string, errno: 'EINVAL' | 'ENOSPC' = 'EINVAL') =>
    new VdiskError(errno, `Can't make bitmap '${name}' persistent in '${node.nodeName}': ${why}`);
  // Without autoclear bits a writer unaware of bitmaps could not tell us it changed the image.
  if (node.header.version < 3) throw fail('Cannot store dirty bitmaps in qcow2 v2 files');
  const bits = Math.log2(granularity);
  if (bits > MAX_GRANULARITY_BITS) throw fail(`Granularity exceeds maximum (${2 ** MAX_GRANULARITY_BITS} bytes)`);
  if (bits < MIN_GRANULARITY_BITS) throw fail(`Granularity is under minimum (${2 ** MIN_GRANULARITY_BITS} bytes)`);
  const bytes = Math.ceil(Math.ceil(node.size / granularity) / 8);
  if (bytes > MAX_BITMAP_BYTES || bytes > MAX_TABLE_ENTRIES * node.clusterBytes) {
    throw fail('Too much space will be occupied by the bitmap. Use larger granularity');
  }
  if (Buffer.byteLength(name) > MAX_NAME_BYTES) throw fail(`Name length exceeds maximum (${MAX_NAME_BYTES} characters)`);
  let count = 1;
  let dirBytes = entryBytes(name);
  for (const b of node.dirtyBitmaps) {
    if (!b.persistent || b.name === undefined) continue;
    count++;
    dirBytes += entryBytes(b.name);
  }
  if (count > MAX_BITMAPS) throw fail('Maximum number of persistent bitmaps is already reached', 'ENOSPC');
  if (dirBytes > MAX_DIRECTORY_BYTES) throw fail('Not enough space in the bitmap directory', 'ENOSPC');
}

/**
 * Loads every bitmap of the image (content, granularity, auto = enabled, in
 * use = inconsistent), in directory order, with the directory itself.
 */
export async function loadBitmaps(node: Qcow2Node): Promise<{ bitmaps: DirtyBitmap[]; directory: StoredBitmap[] }> {
  const dir = await readDirectory(node);
  if (!dir) return { bitmaps: [], directory: [] };
  const cs = node.clusterBytes;
  const out: DirtyBitmap[] = [];
  for (const e of dir.entries) {
    const b = new DirtyBitmap(e.name, 2 ** e.granularityBits, node.size, { enabled: (e.flags & BITMAP_AUTO) !== 0, persistent: true });
    if (e.flags & BITMAP_IN_USE) {
      // Left in use by a writer that did not close the image: its content cannot be trusted.
      b.inconsistent = true;
      out.push(b);
      continue;
    }
    const table = Buffer.alloc(e.tableSize * 8);
    if (e.tableSize) await node.file.read(e.tableOffset, table);
    const bitsPerCluster = cs * 8;
    const data = Buffer.alloc(cs);
    for (let i = 0; i < e.tableSize; i++) {
      const entry = table.readBigUInt64BE(i * 8);
      const offset = Number(entry & ENTRY_OFFSET_MASK);
      const first = i * bitsPerCluster;
      const n = Math.min(bitsPerCluster, b.bits.size - first);
      if (n <= 0) break;
      if (offset === 0) {
        if (entry & 1n) b.bits.set(first, n);
        continue;
      }
      await node.file.read(offset, data);
      b.bits.setFromBytes(data, first, n);
    }
    out.push(b);
  }
  const directory = dir.entries.map((e) => ({ name: e.name, granularity: 2 ** e.granularityBits, flags: e.flags }));
  return { bitmaps: out, directory };
}

/** Every cluster the stored bitmaps use (directory, tables, data), to free them before storing anew. */
async function clustersInUse(node: Qcow2Node): Promise<number[]> {
  const dir = await readDirectory(node);
  if (!dir) return [];
  const cs = node.clusterBytes;
  const clusters: number[] = [];
  for (let c = dir.dirOffset / cs; c < Math.ceil((dir.dirOffset + dir.dirSize) / cs); c++) clusters.push(c);
  for (const e of dir.entries) {
    if (!e.tableSize || e.tableOffset === 0) continue;
    for (let c = e.tableOffset / cs; c < Math.ceil((e.tableOffset + e.tableSize * 8) / cs); c++) clusters.push(c);
    const table = Buffer.alloc(e.tableSize * 8);
    await node.file.read(e.tableOffset, table);
    for (let i = 0; i < e.tableSize; i++) {
      const offset = Number(table.readBigUInt64BE(i * 8) & ENTRY_OFFSET_MASK);
      if (offset) clusters.push(offset / cs);
    }
  }
  return clusters;
}

/**
 * Stores the persistent bitmaps at a clean close: new data clusters, tables
 * and directory, entries in the order given. Returns the new header
 * extension (undefined for none), the directory written, and the clusters
 * of the old bitmaps, which the caller frees after the header names the new
 * directory (a crash in between leaks them, never more).
 */
export async function storeBitmaps(
  node: Qcow2Node,
  bitmaps: DirtyBitmap[],
  options: StoreOptions = {},
): Promise<{ ext: Buffer | undefined; directory: StoredBitmap[]; old: number[]; layout: Map<string, BitmapLayout> }> {
  const cs = node.clusterBytes;
  // The old clusters are freed by the caller only once the header names the new directory.
  const old = await clustersInUse(node);
  const layout = new Map<string, BitmapLayout>();
  if (bitmaps.length === 0) return { ext: undefined, directory: [], old, layout };
  const entries: Buffer[] = [];
  const directory: StoredBitmap[] = [];
  for (const b of bitmaps) {
    const bitsPerCluster = cs * 8;
    const tableSize = Math.ceil(b.bits.size / bitsPerCluster);
    const table = Buffer.alloc(Math.max(8, tableSize * 8));
    const inUse = b.inconsistent || (options.inUse?.(b) ?? false);
    const hosts: number[] = new Array(tableSize).fill(0);
    if (!inUse) {
      const bits = options.content?.(b) ?? b.bits;
      for (let i = 0; i < tableSize; i++) {
        const chunk = bits.bytesOf(i * bitsPerCluster, Math.min(bitsPerCluster, b.bits.size - i * bitsPerCluster));
        if (chunk.every((x) => x === 0)) continue;
        const data = Buffer.alloc(cs);
        chunk.copy(data);
        const host = (await node.refcounts.allocate(1)) * cs;
        await node.file.write(host, data);
        writeU64(table, i * 8, host);
        hosts[i] = host;
      }
    }
    let tableOffset = 0;
    if (tableSize) {
      const clusters = Math.ceil((tableSize * 8) / cs);
      tableOffset = (await node.refcounts.allocate(clusters)) * cs;
      await node.file.write(tableOffset, table.subarray(0, tableSize * 8));
    }
    layout.set(b.name ?? '', { tableOffset, hosts });
    const name = Buffer.from(b.name ?? '');
    const entry = Buffer.alloc(Math.ceil((24 + name.length) / 8) * 8);
    writeU64(entry, 0, tableOffset);
    entry.writeUInt32BE(tableSize, 8);
    const flags = (b.enabled || b.recording ? BITMAP_AUTO : 0) | (inUse ? BITMAP_IN_USE : 0);
    directory.push({ name: b.name ?? '', granularity: b.granularity, flags });
    entry.writeUInt32BE(flags, 12);
    entry[16] = TYPE_DIRTY_TRACKING;
    entry[17] = Math.log2(b.granularity);
    entry.writeUInt16BE(name.length, 18);
    entry.writeUInt32BE(0, 20);
    name.copy(entry, 24);
    entries.push(entry);
  }
  const dir = Buffer.concat(entries);
  const dirOffset = (await node.refcounts.allocate(Math.ceil(dir.length / cs))) * cs;
  await node.file.write(dirOffset, dir);
  const ext = Buffer.alloc(24);
  ext.writeUInt32BE(bitmaps.length, 0);
  writeU64(ext, 8, dir.length);
  writeU64(ext, 16, dirOffset);
  return { ext, directory, old, layout };
}

export interface StoreOptions {
  /** Store this bitmap "in use" with no data (QEMU's mode while the image is open). */
  inUse?: (b: DirtyBitmap) => boolean;
  /** The content to store instead of the bitmap's bits (a crash-safe bitmap's promised content). */
  content?: (b: DirtyBitmap) => SparseBitmap | undefined;
}

/** Where a stored bitmap's data lives: its table and the data cluster of each table entry (0: none, all zeroes). */
export interface BitmapLayout {
  tableOffset: number;
  hosts: number[];
}

/** The unit crash-safe bitmaps write in place: a page of a data cluster, not the whole cluster. */
export function bitmapChunkBytes(clusterBytes: number): number {
  return Math.min(4096, clusterBytes);
}

/**
 * Writes chunks of a stored bitmap's data in place (crash-safe bitmaps), each
 * durable by itself (FUA: the file's other dirty data is not flushed with
 * it). A chunk is a page of a data cluster. A table entry without a cluster
 * gets one: allocated, written whole (the rest of it is zeroes on disk
 * already), its refcount made durable, and only then does the table entry
 * point at it, so a crash leaks a cluster at worst.
 */
export async function writeBitmapChunks(node: Qcow2Node, layout: BitmapLayout, chunks: Array<{ index: number; data: Buffer }>, makeRefcountsDurable: () => Promise<void>): Promise<void> {
  const cs = node.clusterBytes;
  const chunkBytes = bitmapChunkBytes(cs);
  const perCluster = cs / chunkBytes;
  const fresh = new Map<number, Buffer>();
  for (const c of chunks) {
    const entry = Math.floor(c.index / perCluster);
    const within = (c.index % perCluster) * chunkBytes;
    if (entry >= layout.hosts.length) throw new VdiskError('EIO', `qcow2: bitmap chunk ${c.index} is past its table (${layout.hosts.length} entries)`);
    const host = layout.hosts[entry];
    if (host === 0) {
      let whole = fresh.get(entry);
      if (!whole) fresh.set(entry, (whole = Buffer.alloc(cs)));
      c.data.copy(whole, within);
      continue;
    }
    await node.file.write(host + within, c.data, ReqFlags.FUA);
  }
  if (fresh.size === 0) return;
  const placed: Array<{ entry: number; host: number }> = [];
  for (const [entry, whole] of fresh) {
    const host = (await node.refcounts.allocate(1)) * cs;
    await node.file.write(host, whole);
    placed.push({ entry, host });
  }
  await makeRefcountsDurable();
  const e = Buffer.alloc(8);
  for (const p of placed) {
    writeU64(e, 0, p.host);
    await node.file.write(layout.tableOffset + p.entry * 8, e, ReqFlags.FUA);
    layout.hosts[p.entry] = p.host;
  }
}
