/**
 * Dirty bitmap operations with QEMU's checks, in QEMU's order, with its
 * texts (block/monitor/bitmap-qmp-cmds.c and block/dirty-bitmap.c): the QMP
 * bitmap commands, the transaction actions and `vdisk img bitmap` are thin
 * callers of these, so the three cannot drift apart.
 *
 * Nodes are named as QEMU's functions take them (a node name in a graph):
 * `vdisk img bitmap` opens its images into one graph and passes their node
 * names, exactly as qemu-img calls the QMP functions with bs->node_name.
 *
 * Persistence is the driver's business: a node that can keep bitmaps in its
 * image offers BlockNode.bitmapDriver (qcow2 does); everything else keeps
 * them in memory only, and a persistent bitmap there is refused.
 */
import { VdiskError } from '../errors.js';
import { DirtyBitmap, MAX_GRANULARITY, MAX_NAME_BYTES, MIN_GRANULARITY } from './dirty-bitmap.js';
import type { BlockGraph } from './graph.js';
import type { BlockNode } from './node.js';

export interface BitmapRef {
  node: BlockNode;
  bitmap: DirtyBitmap;
}

/** A merge source: a bitmap on the target's node, or one on any node. */
export type MergeSource = string | { node: string; name: string };

export interface NewBitmapOptions {
  /** Bytes per bit; undefined: the node's default. */
  granularity?: number;
  persistent?: boolean;
  disabled?: boolean;
  /** x-crash-safe (vdisk): bits durable before their writes; undefined: the node's default (on). Persistent bitmaps only. */
  crashSafe?: boolean;
}

/**
 * Tells the node's image that a persistent bitmap changed, so its copy on
 * disk stays true (crash-safe bitmaps need that at once; see
 * src/block/persistent-bitmaps.ts). Nothing for bitmaps kept in memory.
 */
export async function persistChange(node: BlockNode, change: 'added' | 'removed' | 'flags' | 'content', bitmap: DirtyBitmap, name = bitmap.name): Promise<void> {
  if (!bitmap.persistent) return;
  await node.bitmapDriver?.persistentChanged?.(change, bitmap, name);
}

function findNode(graph: BlockGraph, nodeName: string): BlockNode {
  const node = graph.get(nodeName);
  if (!node) throw new VdiskError('ENOENT', `Cannot find device='${nodeName}' nor node-name='${nodeName}'`);
  return node;
}

/** A bitmap on a node by name (QEMU's bdrv_find_dirty_bitmap, with the commands' text). */
export function findBitmap(node: BlockNode, name: string): DirtyBitmap {
  const bitmap = node.dirtyBitmaps.find((b) => b.name === name);
  if (!bitmap) throw new VdiskError('ENOENT', `Dirty bitmap '${name}' not found`);
  return bitmap;
}

/** The node, then the bitmap on it (QEMU's block_dirty_bitmap_lookup). */
export function lookupBitmap(graph: BlockGraph, nodeName: string, name: string): BitmapRef {
  const node = graph.get(nodeName);
  // QEMU's block_dirty_bitmap_lookup has its own text (block-dirty-bitmap-add goes through bdrv_lookup_bs's).
  if (!node) throw new VdiskError('ENOENT', `Node '${nodeName}' not found`);
  return { node, bitmap: findBitmap(node, name) };
}

/** QEMU's default: the image's cluster size clamped to [4 KiB, 64 KiB]; 64 KiB without clusters. */
export function defaultGranularity(node: BlockNode): number {
  const cluster = node.bitmapDriver?.clusterSize ?? 0;
  if (!cluster) return 65536;
  return Math.min(65536, Math.max(4096, cluster));
}

/**
 * A new bitmap for a node, checked as block_dirty_bitmap_add checks it and
 * in its order; not attached yet, so a transaction can hold it back.
 */
export function createBitmap(graph: BlockGraph, nodeName: string, name: string, options: NewBitmapOptions = {}): BitmapRef {
  if (name === '') throw new VdiskError('EINVAL', 'Bitmap name cannot be empty');
  const node = findNode(graph, nodeName);
  let granularity = options.granularity;
  if (granularity === undefined) granularity = defaultGranularity(node);
  else if (granularity < MIN_GRANULARITY || granularity > MAX_GRANULARITY || !Number.isInteger(Math.log2(granularity))) {
    throw new VdiskError('EINVAL', 'Granularity must be power of 2 and at least 512');
  }
  if (options.persistent) {
    const store = node.bitmapDriver;
    if (!store) throw new VdiskError('ENOTSUP', `Can't store persistent bitmaps to ${node.nodeName}: Operation not supported`);
    // QEMU would find out at close, too late to tell the caller; refusing now keeps the bitmap from being lost.
    if (node.readOnly) throw new VdiskError('EROFS', `Can't store persistent bitmaps to ${node.nodeName}: Read-only file system`);
    store.checkCanStore(name, granularity);
  }
  if (node.dirtyBitmaps.some((b) => b.name === name)) throw new VdiskError('EEXIST', `Bitmap already exists: ${name}`);
  if (Buffer.byteLength(name) > MAX_NAME_BYTES) throw new VdiskError('EINVAL', `Bitmap name too long: ${name}`);
  if (options.crashSafe && !options.persistent) throw new VdiskError('EINVAL', `Bitmap '${name}': x-crash-safe needs a persistent bitmap`);
  const bitmap = new DirtyBitmap(name, granularity, node.size, { enabled: !options.disabled, persistent: Boolean(options.persistent) });
  if (bitmap.persistent) bitmap.crashSafe = options.crashSafe ?? node.bitmapDriver?.crashSafeDefault ?? true;
  return { node, bitmap };
}

/** Makes a created bitmap live: it records from now on (newest first, as QEMU lists them). */
export function attachBitmap({ node, bitmap }: BitmapRef): void {
  node.dirtyBitmaps.unshift(bitmap);
}

/** Attaches a created bitmap and, if persistent, puts it in the image (undone if that fails). */
export async function attachAndStore(ref: BitmapRef): Promise<void> {
  attachBitmap(ref);
  try {
    await persistChange(ref.node, 'added', ref.bitmap);
  } catch (err) {
    detachBitmap(ref.node, ref.bitmap);
    throw err;
  }
}

/** block-dirty-bitmap-add. */
export async function addBitmap(graph: BlockGraph, nodeName: string, name: string, options: NewBitmapOptions = {}): Promise<BitmapRef> {
  const ref = createBitmap(graph, nodeName, name, options);
  await attachAndStore(ref);
  return ref;
}

/** Takes a bitmap off its node's list (a transaction undoing an add; no persistence involved). */
export function detachBitmap(node: BlockNode, bitmap: DirtyBitmap): void {
  const i = node.dirtyBitmaps.indexOf(bitmap);
  if (i >= 0) node.dirtyBitmaps.splice(i, 1);
}

/** What block-dirty-bitmap-remove requires: not busy, a writable node. */
export function checkRemovable({ node, bitmap }: BitmapRef): void {
  bitmap.check({ busy: true, readOnly: true }, node.readOnly);
}

/** Removes a bitmap for good: off the node, and out of the image if it was persistent. */
export async function dropBitmap({ node, bitmap }: BitmapRef): Promise<void> {
  const name = bitmap.name;
  if (bitmap.persistent && name !== undefined) node.bitmapDriver?.removePersistent(name);
  detachBitmap(node, bitmap);
  await persistChange(node, 'removed', bitmap, name);
}

/** block-dirty-bitmap-remove. */
export async function removeBitmap(graph: BlockGraph, nodeName: string, name: string): Promise<void> {
  const ref = lookupBitmap(graph, nodeName, name);
  checkRemovable(ref);
  await dropBitmap(ref);
}

/** What block-dirty-bitmap-clear requires: not busy, a writable node, consistent content. */
export function checkClearable({ node, bitmap }: BitmapRef): void {
  bitmap.check({ busy: true, readOnly: true, inconsistent: true }, node.readOnly);
}

/** block-dirty-bitmap-clear: every bit reset (a disabled bitmap too). */
export async function clearBitmap(graph: BlockGraph, nodeName: string, name: string): Promise<void> {
  const ref = lookupBitmap(graph, nodeName, name);
  checkClearable(ref);
  ref.bitmap.bits.clear();
  await persistChange(ref.node, 'content', ref.bitmap);
}

/** What block-dirty-bitmap-enable and -disable require: not busy, consistent content (a read-only node is fine). */
export function checkTogglable(bitmap: DirtyBitmap): void {
  bitmap.check({ busy: true, inconsistent: true });
}

/** block-dirty-bitmap-enable / -disable. */
export async function setBitmapEnabled(graph: BlockGraph, nodeName: string, name: string, enabled: boolean): Promise<void> {
  const { node, bitmap } = lookupBitmap(graph, nodeName, name);
  checkTogglable(bitmap);
  bitmap.enabled = enabled;
  await persistChange(node, 'flags', bitmap);
}

/**
 * block_dirty_bitmap_merge: the target's bits ORed with every source's, in
 * a copy the caller swaps in, so an error halfway changes nothing. QEMU's
 * order: the target is looked up, then for each source the source is looked
 * up and only then are the target (busy, read-only, inconsistent) and the
 * source (busy, inconsistent) checked and their sizes compared.
 * Granularities may differ.
 */
export function mergedBits(graph: BlockGraph, nodeName: string, targetName: string, sources: MergeSource[]): { target: DirtyBitmap; merged: DirtyBitmap } {
  const { node, bitmap: target } = lookupBitmap(graph, nodeName, targetName);
  const merged = new DirtyBitmap(undefined, target.granularity, target.size);
  merged.bits.merge(target.bits);
  for (const src of sources) {
    const s = typeof src === 'string' ? findBitmap(node, src) : lookupBitmap(graph, src.node, src.name).bitmap;
    target.check({ busy: true, readOnly: true, inconsistent: true }, node.readOnly);
    s.check({ busy: true, inconsistent: true });
    if (s.size !== target.size) {
      throw new VdiskError('EINVAL', `Bitmaps are of different sizes (destination size is ${target.size}, source size is ${s.size}) and can't be merged`);
    }
    merged.mergeFrom(s);
  }
  return { target, merged };
}

/** block-dirty-bitmap-merge. */
export async function mergeBitmaps(graph: BlockGraph, nodeName: string, targetName: string, sources: MergeSource[]): Promise<void> {
  const { target, merged } = mergedBits(graph, nodeName, targetName, sources);
  target.bits.merge(merged.bits);
  // Bits that came from elsewhere must be on disk too (a crash must not lose them).
  await persistChange(graph.get(nodeName)!, 'content', target);
}
