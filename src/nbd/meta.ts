/**
 * Meta contexts: the block-status views an export publishes, how a client's
 * NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT queries select them,
 * and the extents each view reports for a BLOCK_STATUS request. Matching
 * and ids follow QEMU's nbd/server.c, so a client that works against
 * qemu-storage-daemon sees the same answers here. No socket I/O: the
 * connection sends what these functions compute.
 */
import type { DirtyBitmap } from '../block/dirty-bitmap.js';
import { type BlockNode, Status } from '../block/node.js';
import * as P from './protocol.js';
import type { NbdExport } from './server.js';

/**
 * Context ids are fixed per context, as QEMU assigns them, rather than
 * numbered in the order a client asked: an id then means the same context on
 * every connection to an export, and a client that compares ids with
 * qemu-storage-daemon's sees no difference. LIST replies carry id 0 (QEMU).
 */
export const META_ID_BASE_ALLOCATION = 0;
export const META_ID_ALLOCATION_DEPTH = 1;
/** A qemu:dirty-bitmap context's id is this plus the bitmap's index in the export's list. */
export const META_ID_DIRTY_BITMAP = 2;

/**
 * Most extents in one block-status chunk. QEMU allows 2^17 (1 MiB of
 * extents); vdisk stops at 4096 (32 KiB) so one request cannot hold the
 * event loop for long or queue a megabyte per context. A client asks again
 * from where the reply ended, and since a reply only ends early where the
 * flags change, the map it assembles is the same.
 */
export const MAX_EXTENTS = 4096;

/** A dirty bitmap published by an export, with its context name worked out once. */
export interface ExportedBitmap {
  bitmap: DirtyBitmap;
  /** qemu:dirty-bitmap:NAME */
  context: string;
}

/** What one SET (or LIST) query list selected on one export. */
export interface MetaSelection {
  /** The export named in the option: the selection counts only if the client then uses this same export. */
  exp: NbdExport;
  baseAllocation: boolean;
  allocationDepth: boolean;
  /** Indexed like exp.bitmaps. */
  bitmaps: boolean[];
  /** How many contexts are selected. */
  count: number;
}

/**
 * Applies a client's queries to an export, as QEMU does: exact names select;
 * for LIST only, an empty query list means everything and `base:`, `qemu:`
 * and `qemu:dirty-bitmap:` act as wildcards; names the export does not
 * publish (another namespace, an unknown leaf, a bitmap not exported) are
 * skipped without an error.
 */
export function selectContexts(exp: NbdExport, queries: readonly string[], list: boolean): MetaSelection {
  const sel: MetaSelection = { exp, baseAllocation: false, allocationDepth: false, bitmaps: exp.bitmaps.map(() => false), count: 0 };
  if (list && queries.length === 0) {
    sel.baseAllocation = true;
    sel.allocationDepth = exp.allocationDepth;
    sel.bitmaps.fill(true);
  } else {
    for (const q of queries) matchQuery(sel, q, list);
  }
  sel.count = (sel.baseAllocation ? 1 : 0) + (sel.allocationDepth ? 1 : 0) + sel.bitmaps.filter(Boolean).length;
  return sel;
}

function matchQuery(sel: MetaSelection, query: string, list: boolean): void {
  const exp = sel.exp;
  if (query.startsWith('base:')) {
    const leaf = query.slice(5);
    if (leaf === 'allocation' || (list && leaf === '')) sel.baseAllocation = true;
    return;
  }
  if (!query.startsWith('qemu:')) return;
  const leaf = query.slice(5);
  if (leaf === '') {
    if (list) {
      sel.allocationDepth = exp.allocationDepth;
      sel.bitmaps.fill(true);
    }
    return;
  }
  if (leaf === 'allocation-depth') {
    if (exp.allocationDepth) sel.allocationDepth = true;
    return;
  }
  if (!leaf.startsWith('dirty-bitmap:')) return;
  const name = leaf.slice('dirty-bitmap:'.length);
  if (name === '') {
    if (list) sel.bitmaps.fill(true);
    return;
  }
  // The first bitmap of that name (an export may list one bitmap twice; QEMU answers the first).
  const i = exp.bitmaps.findIndex((b) => b.context === query);
  if (i >= 0) sel.bitmaps[i] = true;
}

/** The selected contexts in the order QEMU replies with them (and answers BLOCK_STATUS in). */
export function selectedContexts(sel: MetaSelection): Array<{ id: number; name: string }> {
  const out: Array<{ id: number; name: string }> = [];
  if (sel.baseAllocation) out.push({ id: META_ID_BASE_ALLOCATION, name: P.BASE_ALLOCATION });
  if (sel.allocationDepth) out.push({ id: META_ID_ALLOCATION_DEPTH, name: P.QEMU_ALLOCATION_DEPTH });
  sel.exp.bitmaps.forEach((b, i) => {
    if (sel.bitmaps[i]) out.push({ id: META_ID_DIRTY_BITMAP + i, name: b.context });
  });
  return out;
}

/**
 * Appends an extent, merged into the last one when the flags are equal.
 * Returns false when it does not fit (max extents already there and
 * different flags): the list is then complete and must not grow further, or
 * a later extent could merge across the one that was dropped.
 */
export function addExtent(lengths: number[], flags: number[], max: number, length: number, f: number): boolean {
  if (length === 0) return true;
  const last = lengths.length - 1;
  // Request lengths are 32-bit, so a merged extent never overflows its 32-bit field.
  if (last >= 0 && flags[last] === f) {
    lengths[last] += length;
    return true;
  }
  if (lengths.length >= max) return false;
  lengths.push(length);
  flags.push(f);
  return true;
}

/** base:allocation flags for a block-status extent. */
export function allocationFlags(status: number): number {
  return (status & Status.DATA ? 0 : P.NBD_STATE_HOLE) | (status & Status.ZERO ? P.NBD_STATE_ZERO : 0);
}

/**
 * QEMU's allocation depth counts every node of the chain of filters and
 * backing files, filters included, but a filter reports its child's own
 * status: data stored in a node under a run of filters is at the depth of
 * the first filter of that run, data further down is one deeper per filter
 * passed. Extent.depth counts only the nodes that store data. Returns, for
 * each Extent.depth, QEMU's depth (index 0 unused), or undefined when the
 * chain has no filter and both count alike (the usual case, no allocation).
 */
export function chainDepths(node: BlockNode): number[] | undefined {
  let n: BlockNode | undefined = node;
  while (n && n.filteredRole === undefined) n = n.filterOrBacking;
  if (!n) return undefined;
  const out: number[] = [0];
  let position = 0;
  let runStart = 0;
  for (n = node; n; n = n.filterOrBacking) {
    position++;
    if (n.filteredRole !== undefined) {
      if (runStart === 0) runStart = position;
      continue;
    }
    out.push(runStart || position);
    runStart = 0;
  }
  return out;
}

/**
 * Walks block status over [offset, offset + length) once and fills the
 * base:allocation list, the qemu:allocation-depth list, or both (pass
 * undefined arrays for a context not wanted). One walk serves both because
 * each extent the node reports is uniform in data, zero and depth. The walk
 * stops when every wanted list is complete.
 */
export async function statusExtents(
  node: BlockNode,
  offset: number,
  length: number,
  max: number,
  baseLengths: number[] | undefined,
  baseFlags: number[] | undefined,
  depthLengths: number[] | undefined,
  depthFlags: number[] | undefined,
): Promise<void> {
  let baseOpen = baseLengths !== undefined;
  let depthOpen = depthLengths !== undefined;
  const depths = depthOpen ? chainDepths(node) : undefined;
  const end = offset + length;
  let pos = offset;
  while (pos < end && (baseOpen || depthOpen)) {
    const ext = await node.blockStatus(pos, end - pos);
    if (baseOpen) baseOpen = addExtent(baseLengths!, baseFlags!, max, ext.length, allocationFlags(ext.flags));
    // The value is the depth itself: 0 unallocated anywhere, 1 this node, 2 its backing file, ...
    if (depthOpen) depthOpen = addExtent(depthLengths!, depthFlags!, max, ext.length, depths?.[ext.depth] ?? ext.depth);
    pos += ext.length;
  }
}

/**
 * A dirty bitmap's extents over [offset, offset + length): dirty granules
 * clipped to the request (a granule larger than the request still reports
 * only the bytes asked for), clean elsewhere. Past the bitmap's own end
 * (an export over a node larger than the one holding the bitmap) nothing
 * is dirty, as QEMU reports it.
 */
export function dirtyExtents(bitmap: DirtyBitmap, offset: number, length: number, max: number, lengths: number[], flags: number[]): void {
  const end = offset + length;
  const covered = Math.min(end, bitmap.size);
  let pos = offset;
  while (pos < covered) {
    const area = bitmap.nextDirtyArea(pos, covered);
    if (!area) break;
    if (!addExtent(lengths, flags, max, area.offset - pos, 0)) return;
    if (!addExtent(lengths, flags, max, area.length, P.NBD_STATE_DIRTY)) return;
    pos = area.offset + area.length;
  }
  addExtent(lengths, flags, max, end - pos, 0);
}
