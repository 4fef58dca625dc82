/**
 * QAPI types shared by more than one layer (the QMP commands and the NBD
 * export options both take BlockDirtyBitmap), so neither imports the other.
 */
import { type Type, str, struct } from './schema.js';

/** BlockDirtyBitmap: a bitmap by node and name. */
export const BLOCK_DIRTY_BITMAP: Type = struct('BlockDirtyBitmap', { node: str, name: str });
