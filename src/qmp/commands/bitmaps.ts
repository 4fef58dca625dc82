/**
 * Dirty bitmap commands: block-dirty-bitmap-add/remove/clear/enable/disable/
 * merge and x-debug-block-dirty-bitmap-sha256, with QEMU's checks and texts.
 * Each is also a transaction action (src/qmp/commands/transaction.ts uses the
 * prepare/commit/abort functions exported here).
 */
import { createHash } from 'node:crypto';
import { DirtyBitmap, MAX_NAME_BYTES } from '../../block/dirty-bitmap.js';
import type { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { Qcow2Node } from '../../block/drivers/qcow2/qcow2.js';
import { MAX_BITMAPS } from '../../block/drivers/qcow2/bitmaps.js';
import { VdiskError } from '../../errors.js';
import { type Type, alternate, arrayOf, bool, int, str, struct } from '../../qapi/schema.js';
import type { QmpCommand } from '../server.js';

export const BLOCK_DIRTY_BITMAP: Type = struct('BlockDirtyBitmap', { node: str, name: str });
export const BLOCK_DIRTY_BITMAP_ADD: Type = struct('BlockDirtyBitmapAdd', { node: str, name: str, '*granularity': int('uint32'), '*persistent': bool, '*disabled': bool });
export const BLOCK_DIRTY_BITMAP_MERGE: Type = struct('BlockDirtyBitmapMerge', {
  node: str,
  target: str,
  bitmaps: arrayOf(alternate('BlockDirtyBitmapOrStr', [str, BLOCK_DIRTY_BITMAP])),
});

/** The bitmap lookup of the bitmap commands (QEMU's block_dirty_bitmap_lookup). */
export function lookupBitmap(graph: BlockGraph, nodeName: string, name: string): { node: BlockNode; bitmap: DirtyBitmap } {
  const node = graph.get(nodeName);
  // QEMU's block_dirty_bitmap_lookup has its own text (not bdrv_lookup_bs's "Cannot find device=...").
  if (!node) throw new VdiskError('ENOENT', `Node '${nodeName}' not found`);
  const bitmap = node.dirtyBitmaps.find((b) => b.name === name);
  if (!bitmap) throw new VdiskError('ENOENT', `Dirty bitmap '${name}' not found`);
  return { node, bitmap };
}

/** QEMU's default: the node's cluster size clamped to [4 KiB, 64 KiB]; 64 KiB without clusters. */
export function defaultGranularity(node: BlockNode): number {
  const cluster = node instanceof Qcow2Node ? node.clusterBytes : 0;
  if (!cluster) return 65536;
  return Math.min(65536, Math.max(4096, cluster));
}

/** Creates a bitmap on a node (not yet visible to anyone if the caller holds it back). */
export function createBitmap(graph: BlockGraph, args: Record<string, unknown>): { node: BlockNode; bitmap: DirtyBitmap } {
  const nodeName = args.node as string;
  const name = args.name as string;
  const node = graph.get(nodeName);
  if (!node) throw new VdiskError('ENOENT', `Cannot find device='${nodeName}' nor node-name='${nodeName}'`);
  if (name === '') throw new VdiskError('EINVAL', 'Bitmap name cannot be empty');
  if (Buffer.byteLength(name) > MAX_NAME_BYTES) throw new VdiskError('EINVAL', `Bitmap name too long: ${name}`);
  if (node.dirtyBitmaps.some((b) => b.name === name)) throw new VdiskError('EEXIST', `Bitmap already exists: ${name}`);
  if (args.persistent) {
    // Persistent bitmaps are stored in qcow2 (version 3) images, at a clean close.
    if (!(node instanceof Qcow2Node) || node.header.version !== 3) {
      throw new VdiskError('ENOTSUP', `Can't store persistent bitmaps to ${nodeName}: Operation not supported`);
    }
    if (node.readOnly) throw new VdiskError('EROFS', `Can't store persistent bitmaps to ${nodeName}: Read-only file system`);
    if (node.dirtyBitmaps.filter((b) => b.persistent).length >= MAX_BITMAPS) {
      throw new VdiskError('ENOSPC', `Can't store persistent bitmaps to ${nodeName}: Maximum number of persistent bitmaps is already reached`);
    }
  }
  const bitmap = new DirtyBitmap(name, (args.granularity as number | undefined) ?? defaultGranularity(node), node.size, {
    enabled: !args.disabled,
    persistent: Boolean(args.persistent),
  });
  return { node, bitmap };
}

/** Removes a bitmap from its node's list. */
export function detachBitmap(node: BlockNode, bitmap: DirtyBitmap): void {
  const i = node.dirtyBitmaps.indexOf(bitmap);
  if (i >= 0) node.dirtyBitmaps.splice(i, 1);
}

/** Merges the sources into a copy of the target; the caller swaps it in (so an error changes nothing). */
export function mergedBits(graph: BlockGraph, args: Record<string, unknown>): { target: DirtyBitmap; merged: DirtyBitmap } {
  const { node, bitmap: target } = lookupBitmap(graph, args.node as string, args.target as string);
  target.check({ busy: true, readOnly: true, inconsistent: true }, node.readOnly);
  const merged = new DirtyBitmap(undefined, target.granularity, target.size);
  merged.bits.merge(target.bits);
  for (const src of args.bitmaps as Array<string | { node: string; name: string }>) {
    const s = typeof src === 'string' ? lookupBitmap(graph, args.node as string, src).bitmap : lookupBitmap(graph, src.node, src.name).bitmap;
    // As QEMU's bdrv_merge_dirty_bitmap: a source in use (a backup's, an export's) is refused too.
    s.check({ busy: true, inconsistent: true });
    if (s.size !== target.size) {
      throw new VdiskError('EINVAL', `Bitmaps are of different sizes (destination size is ${target.size}, source size is ${s.size}) and can't be merged`);
    }
    merged.mergeFrom(s);
  }
  return { target, merged };
}

export const BITMAP_COMMANDS: QmpCommand[] = [
  {
    name: 'block-dirty-bitmap-add',
    args: BLOCK_DIRTY_BITMAP_ADD,
    run: (args, { daemon }) => {
      const { node, bitmap } = createBitmap(daemon.graph, args);
      node.dirtyBitmaps.unshift(bitmap);
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-remove',
    args: BLOCK_DIRTY_BITMAP,
    run: (args, { daemon }) => {
      const { node, bitmap } = lookupBitmap(daemon.graph, args.node as string, args.name as string);
      bitmap.check({ busy: true, readOnly: true }, node.readOnly);
      detachBitmap(node, bitmap);
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-clear',
    args: BLOCK_DIRTY_BITMAP,
    run: (args, { daemon }) => {
      const { node, bitmap } = lookupBitmap(daemon.graph, args.node as string, args.name as string);
      bitmap.check({ busy: true, readOnly: true, inconsistent: true }, node.readOnly);
      bitmap.bits.clear();
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-enable',
    args: BLOCK_DIRTY_BITMAP,
    run: (args, { daemon }) => {
      const { bitmap } = lookupBitmap(daemon.graph, args.node as string, args.name as string);
      bitmap.check({ busy: true, inconsistent: true });
      bitmap.enabled = true;
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-disable',
    args: BLOCK_DIRTY_BITMAP,
    run: (args, { daemon }) => {
      const { bitmap } = lookupBitmap(daemon.graph, args.node as string, args.name as string);
      bitmap.check({ busy: true, inconsistent: true });
      bitmap.enabled = false;
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-merge',
    args: BLOCK_DIRTY_BITMAP_MERGE,
    run: (args, { daemon }) => {
      const { target, merged } = mergedBits(daemon.graph, args);
      target.bits.merge(merged.bits);
      return {};
    },
  },
  {
    name: 'x-debug-block-dirty-bitmap-sha256',
    args: BLOCK_DIRTY_BITMAP,
    run: (args, { daemon }) => {
      const { bitmap } = lookupBitmap(daemon.graph, args.node as string, args.name as string);
      return { sha256: createHash('sha256').update(bitmap.bits.bytes()).digest('hex') };
    },
  },
];
