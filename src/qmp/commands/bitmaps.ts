/**
 * Dirty bitmap commands: block-dirty-bitmap-add/remove/clear/enable/disable/
 * merge and x-debug-block-dirty-bitmap-sha256. The checks, their order and
 * texts are QEMU's and live in src/block/bitmap-ops.ts (shared with the
 * transaction actions in src/backup/transaction.ts and `vdisk img bitmap`);
 * this module is the QMP schema and the argument plumbing.
 */
import { createHash } from 'node:crypto';
import { type MergeSource, type NewBitmapOptions, addBitmap, clearBitmap, lookupBitmap, mergeBitmaps, removeBitmap, setBitmapEnabled } from '../../block/bitmap-ops.js';
import { BLOCK_DIRTY_BITMAP } from '../../qapi/block.js';
import { type Type, alternate, arrayOf, bool, int, str, struct } from '../../qapi/schema.js';
import type { QmpCommand } from '../server.js';

export { BLOCK_DIRTY_BITMAP };
export const BLOCK_DIRTY_BITMAP_ADD: Type = struct('BlockDirtyBitmapAdd', {
  node: str,
  name: str,
  '*granularity': int('uint32'),
  '*persistent': bool,
  '*disabled': bool,
  // vdisk: false keeps a persistent bitmap in QEMU's mode (in use while open, inconsistent after a crash).
  '*x-crash-safe': bool,
});
export const BLOCK_DIRTY_BITMAP_MERGE: Type = struct('BlockDirtyBitmapMerge', {
  node: str,
  target: str,
  bitmaps: arrayOf(alternate('BlockDirtyBitmapOrStr', [str, BLOCK_DIRTY_BITMAP])),
});

export const BITMAP_COMMANDS: QmpCommand[] = [
  {
    name: 'block-dirty-bitmap-add',
    args: BLOCK_DIRTY_BITMAP_ADD,
    run: async (args, { daemon }) => {
      await addBitmap(daemon.graph, args.node as string, args.name as string, newBitmapOptions(args));
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-remove',
    args: BLOCK_DIRTY_BITMAP,
    run: async (args, { daemon }) => {
      await removeBitmap(daemon.graph, args.node as string, args.name as string);
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-clear',
    args: BLOCK_DIRTY_BITMAP,
    run: async (args, { daemon }) => {
      await clearBitmap(daemon.graph, args.node as string, args.name as string);
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-enable',
    args: BLOCK_DIRTY_BITMAP,
    run: async (args, { daemon }) => {
      await setBitmapEnabled(daemon.graph, args.node as string, args.name as string, true);
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-disable',
    args: BLOCK_DIRTY_BITMAP,
    run: async (args, { daemon }) => {
      await setBitmapEnabled(daemon.graph, args.node as string, args.name as string, false);
      return {};
    },
  },
  {
    name: 'block-dirty-bitmap-merge',
    args: BLOCK_DIRTY_BITMAP_MERGE,
    run: async (args, { daemon }) => {
      await mergeBitmaps(daemon.graph, args.node as string, args.target as string, args.bitmaps as MergeSource[]);
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

/** BlockDirtyBitmapAdd's optional members, checked by the schema. */
function newBitmapOptions(args: Record<string, unknown>): NewBitmapOptions {
  return {
    granularity: args.granularity as number | undefined,
    persistent: args.persistent as boolean | undefined,
    disabled: args.disabled as boolean | undefined,
    crashSafe: args['x-crash-safe'] as boolean | undefined,
  };
}
