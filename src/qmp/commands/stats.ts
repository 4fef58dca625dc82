/**
 * query-blockstats: QEMU 7.2's BlockStats, from the per-node accounting in
 * src/block/node.ts (src/metrics/stats.ts).
 *
 * QEMU accounts on BlockBackends (devices), and qemu-storage-daemon's exports
 * make nameless BlockBackends that query-blockstats skips, so without
 * query-nodes qsd answers [] and so does vdisk. With query-nodes=true QEMU
 * lists every named node but fills only wr_highest_offset (nodes keep no
 * other counters); vdisk counts per node, so there the numbers are real.
 */
import type { BlockNode } from '../../block/node.js';
import { IoStats, Op, msToNs } from '../../metrics/stats.js';
import { type Type, arrayOf, bool, enumOf, int, str, struct, union } from '../../qapi/schema.js';
import type { QmpCommand } from '../server.js';

const i64 = int('int');
const TIMED_STATS = struct('BlockDeviceTimedStats', {
  interval_length: i64, min_rd_latency_ns: i64, max_rd_latency_ns: i64, avg_rd_latency_ns: i64,
  min_wr_latency_ns: i64, max_wr_latency_ns: i64, avg_wr_latency_ns: i64,
  min_flush_latency_ns: i64, max_flush_latency_ns: i64, avg_flush_latency_ns: i64,
  avg_rd_queue_depth: { kind: 'number' }, avg_wr_queue_depth: { kind: 'number' },
});
const LATENCY_HISTOGRAM = struct('BlockLatencyHistogramInfo', { boundaries: arrayOf(i64), bins: arrayOf(i64) });

/** BlockDeviceStats, for query-qmp-schema (the reply below is built in this order). */
export const BLOCK_DEVICE_STATS: Type = struct('BlockDeviceStats', {
  rd_bytes: i64, wr_bytes: i64, unmap_bytes: i64,
  rd_operations: i64, wr_operations: i64, flush_operations: i64, unmap_operations: i64,
  rd_total_time_ns: i64, wr_total_time_ns: i64, flush_total_time_ns: i64, unmap_total_time_ns: i64,
  wr_highest_offset: i64, rd_merged: i64, wr_merged: i64, unmap_merged: i64,
  '*idle_time_ns': i64,
  failed_rd_operations: i64, failed_wr_operations: i64, failed_flush_operations: i64, failed_unmap_operations: i64,
  invalid_rd_operations: i64, invalid_wr_operations: i64, invalid_flush_operations: i64, invalid_unmap_operations: i64,
  account_invalid: bool, account_failed: bool,
  timed_stats: arrayOf(TIMED_STATS),
  '*rd_latency_histogram': LATENCY_HISTOGRAM, '*wr_latency_histogram': LATENCY_HISTOGRAM, '*flush_latency_histogram': LATENCY_HISTOGRAM,
});
const STATS_SPECIFIC: Type = union('BlockStatsSpecific', { driver: enumOf('BlockdevDriver', ['file']) }, 'driver', {
  file: { 'discard-nb-ok': i64, 'discard-nb-failed': i64, 'discard-bytes-ok': i64 },
});
/** BlockStats: recursive (parent, backing), so built in two steps. */
export const BLOCK_STATS: Type = struct('BlockStats', {});
Object.assign((BLOCK_STATS as { members: Record<string, Type> }).members, {
  '*device': str, '*qdev': str, '*node-name': str, stats: BLOCK_DEVICE_STATS, '*driver-specific': STATS_SPECIFIC, '*parent': BLOCK_STATS, '*backing': BLOCK_STATS,
});

/** BlockDeviceStats of one IoStats, QEMU's field names and units. */
export function blockDeviceStats(s: IoStats): Record<string, unknown> {
  const out: Record<string, unknown> = {
    rd_bytes: s.bytes[Op.Read], wr_bytes: s.bytes[Op.Write], unmap_bytes: s.bytes[Op.Unmap],
    rd_operations: s.ops[Op.Read], wr_operations: s.ops[Op.Write], flush_operations: s.ops[Op.Flush], unmap_operations: s.ops[Op.Unmap],
    rd_total_time_ns: msToNs(s.totalMs[Op.Read]), wr_total_time_ns: msToNs(s.totalMs[Op.Write]),
    flush_total_time_ns: msToNs(s.totalMs[Op.Flush]), unmap_total_time_ns: msToNs(s.totalMs[Op.Unmap]),
    wr_highest_offset: s.wrHighestOffset,
    // vdisk never merges requests (each NBD/FUSE request reaches the node as it came).
    rd_merged: 0, wr_merged: 0, unmap_merged: 0,
  };
  if (s.lastAccessMs > 0) out.idle_time_ns = msToNs(performance.now() - s.lastAccessMs);
  Object.assign(out, {
    failed_rd_operations: s.failed[Op.Read], failed_wr_operations: s.failed[Op.Write],
    failed_flush_operations: s.failed[Op.Flush], failed_unmap_operations: s.failed[Op.Unmap],
    invalid_rd_operations: s.invalid[Op.Read], invalid_wr_operations: s.invalid[Op.Write],
    invalid_flush_operations: s.invalid[Op.Flush], invalid_unmap_operations: s.invalid[Op.Unmap],
    // Both are always counted (QEMU's defaults for a device; its nodes report false and count nothing).
    account_invalid: true, account_failed: true,
    // QEMU fills these only for intervals set with a device's stats-intervals, which qsd's nameless
    // exports cannot have; latency distributions are the --metrics histograms instead.
    timed_stats: [],
  });
  return out;
}

/**
 * The child whose statistics QEMU nests as 'parent' (bdrv_primary_child, or
 * the first data child): a format's file, a filter's filtered child.
 */
function primaryChild(node: BlockNode): BlockNode | undefined {
  if (node.filteredRole !== undefined) return node.child(node.filteredRole);
  return node.child('file') ?? node.children.find((c) => c.role !== 'backing')?.node;
}

/** BlockStats of a node at node level (bdrv_query_bds_stats with blk_level false: no 'backing'). */
export function nodeBlockStats(node: BlockNode, depth = 0): Record<string, unknown> {
  const out: Record<string, unknown> = { 'node-name': node.nodeName, stats: blockDeviceStats(node.stats) };
  if (node.driverName === 'file') {
    const s = node.stats;
    out['driver-specific'] = { driver: 'file', 'discard-nb-ok': s.ops[Op.Unmap], 'discard-nb-failed': s.failed[Op.Unmap], 'discard-bytes-ok': s.bytes[Op.Unmap] };
  }
  const parent = primaryChild(node);
  // Graphs are acyclic; the depth bound only keeps a bug from becoming a stack overflow.
  if (parent && depth < 64) out.parent = nodeBlockStats(parent, depth + 1);
  return out;
}

/**
 * The nodes in the order QEMU lists them: a node joins QEMU's list when its
 * driver has opened, which is after its file child and before its backing
 * file (opened last). vdisk adds a node once all its children are open, so
 * the order is rebuilt from the graph, starting from the oldest nodes.
 */
export function qemuNodeOrder(oldestFirst: BlockNode[], isMonitorOwned: (name: string) => boolean): BlockNode[] {
  const out: BlockNode[] = [];
  const seen = new Set<BlockNode>();
  const visit = (n: BlockNode): void => {
    if (seen.has(n)) return;
    seen.add(n);
    for (const c of n.children) if (c.role !== 'backing') visit(c.node);
    out.push(n);
    const backing = n.child('backing');
    if (backing) visit(backing);
  };
  // Nodes made by blockdev-add first, each pulling in the implicit ones it opened.
  for (const n of oldestFirst) if (isMonitorOwned(n.nodeName)) visit(n);
  for (const n of oldestFirst) visit(n);
  return out;
}

export const STATS_COMMANDS: QmpCommand[] = [
  {
    name: 'query-blockstats',
    args: struct('query-blockstats', { '*query-nodes': bool }),
    run: (args, { daemon }) => {
      if (!args['query-nodes']) return [];
      return qemuNodeOrder(daemon.graph.list().reverse(), (n) => daemon.graph.isMonitorOwned(n)).map((n) => nodeBlockStats(n));
    },
  },
];
