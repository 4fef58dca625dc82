/**
 * The Prometheus text exposition (format 0.0.4) of vdisk's counters: per
 * node and per export, latency histograms, and the process. Built on each
 * scrape from the IoStats the request path keeps (src/metrics/stats.ts).
 */
import type { Daemon } from '../daemon.js';
import { VERSION } from '../version.js';
import { IoStats, LATENCY_BUCKETS_S, OP_NAMES, Op } from './stats.js';

const START_S = Date.now() / 1000 - process.uptime();

function esc(v: string): string {
  return v.replace(/\\/g, '\\\\').replace(/"/g, '\\"').replace(/\n/g, '\\n');
}

function labels(l: Record<string, string>): string {
  const parts = Object.entries(l).map(([k, v]) => `${k}="${esc(v)}"`);
  return parts.length ? `{${parts.join(',')}}` : '';
}

class Writer {
  private readonly lines: string[] = [];
  family(name: string, type: 'counter' | 'gauge' | 'histogram', help: string): void {
    this.lines.push(`# HELP ${name} ${help}`, `# TYPE ${name} ${type}`);
  }
  sample(name: string, l: Record<string, string>, value: number): void {
    this.lines.push(`${name}${labels(l)} ${Number.isFinite(value) ? value : 0}`);
  }
  text(): string {
    return this.lines.join('\n') + '\n';
  }
}

/** Ops with bytes (flush moves none). */
const BYTE_OPS = [Op.Read, Op.Write, Op.Unmap];
const ALL_OPS = [Op.Read, Op.Write, Op.Flush, Op.Unmap];

interface Subject {
  labels: Record<string, string>;
  stats: IoStats;
}

function counters(w: Writer, prefix: string, what: string, subjects: Subject[]): void {
  w.family(`${prefix}_bytes_total`, 'counter', `Bytes of successful requests to the ${what}, by operation (read, write including write-zeroes, unmap).`);
  for (const s of subjects) for (const op of BYTE_OPS) w.sample(`${prefix}_bytes_total`, { ...s.labels, op: OP_NAMES[op] }, s.stats.bytes[op]);
  w.family(`${prefix}_operations_total`, 'counter', `Successful requests to the ${what}, by operation.`);
  for (const s of subjects) for (const op of ALL_OPS) w.sample(`${prefix}_operations_total`, { ...s.labels, op: OP_NAMES[op] }, s.stats.ops[op]);
  w.family(`${prefix}_failed_operations_total`, 'counter', `Requests to the ${what} that failed with an I/O error, by operation.`);
  for (const s of subjects) for (const op of ALL_OPS) w.sample(`${prefix}_failed_operations_total`, { ...s.labels, op: OP_NAMES[op] }, s.stats.failed[op]);
  w.family(`${prefix}_invalid_operations_total`, 'counter', `Requests to the ${what} refused before they started (out of range, read-only, closed), by operation.`);
  for (const s of subjects) for (const op of ALL_OPS) w.sample(`${prefix}_invalid_operations_total`, { ...s.labels, op: OP_NAMES[op] }, s.stats.invalid[op]);
}

function histogram(w: Writer, name: string, what: string, subjects: Subject[]): void {
  w.family(name, 'histogram', `Latency of successful requests to the ${what} in seconds, by operation.`);
  for (const s of subjects) {
    for (const op of ALL_OPS) {
      const l = { ...s.labels, op: OP_NAMES[op] };
      const cum = s.stats.cumulative(op);
      LATENCY_BUCKETS_S.forEach((b, i) => w.sample(`${name}_bucket`, { ...l, le: String(b) }, cum[i]));
      w.sample(`${name}_bucket`, { ...l, le: '+Inf' }, cum[cum.length - 1]);
      w.sample(`${name}_sum`, l, s.stats.totalMs[op] / 1000);
      w.sample(`${name}_count`, l, cum[cum.length - 1]);
    }
  }
}

/** The whole exposition. */
export function prometheusText(daemon: Daemon): string {
  const w = new Writer();
  w.family('vdisk_build_info', 'gauge', 'Always 1; the labels say which vdisk this is.');
  w.sample('vdisk_build_info', { version: VERSION, nodejs: process.version }, 1);

  const nodes: Subject[] = daemon.graph
    .list()
    .reverse()
    .map((n) => ({ labels: { node: n.nodeName, driver: n.driverName }, stats: n.stats }));
  counters(w, 'vdisk_node', 'node (from every user: exports, parent nodes, jobs)', nodes);
  histogram(w, 'vdisk_node_request_duration_seconds', 'node', nodes);
  w.family('vdisk_node_size_bytes', 'gauge', 'Size of the node.');
  for (const n of daemon.graph.list().reverse()) w.sample('vdisk_node_size_bytes', { node: n.nodeName, driver: n.driverName }, n.size);
  w.family('vdisk_node_write_highest_offset_bytes', 'gauge', 'End of the furthest write to the node since it was opened (QEMU wr_highest_offset).');
  for (const s of nodes) w.sample('vdisk_node_write_highest_offset_bytes', s.labels, s.stats.wrHighestOffset);

  // An export's own counters: its clients' requests as they sent them (the NBD connection or the
  // FUSE session counts them), one series per export whatever node serves it (a backup's filter).
  const exports = daemon.exports.list();
  const exps: Subject[] = exports.map((e) => ({ labels: { export: e.id, type: e.type }, stats: e.stats }));
  counters(w, 'vdisk_export', 'export (requests as its clients sent them)', exps);
  histogram(w, 'vdisk_export_request_duration_seconds', 'export (requests as its clients sent them)', exps);
  w.family('vdisk_export_clients', 'gauge', 'Clients connected to the export (NBD connections; a FUSE mount counts as one).');
  for (const e of exports) w.sample('vdisk_export_clients', { export: e.id, type: e.type }, e.handle.clientCount());
  w.family('vdisk_export_writable', 'gauge', '1 if the export is writable.');
  for (const e of exports) w.sample('vdisk_export_writable', { export: e.id, type: e.type }, e.writable ? 1 : 0);

  const mem = process.memoryUsage();
  w.family('process_resident_memory_bytes', 'gauge', 'Resident set size in bytes.');
  w.sample('process_resident_memory_bytes', {}, mem.rss);
  w.family('process_start_time_seconds', 'gauge', 'Start time of the process since the Unix epoch in seconds.');
  w.sample('process_start_time_seconds', {}, Math.round(START_S * 1000) / 1000);
  const cpu = process.cpuUsage();
  w.family('process_cpu_seconds_total', 'counter', 'User and system CPU time spent in seconds.');
  w.sample('process_cpu_seconds_total', {}, (cpu.user + cpu.system) / 1e6);
  w.family('vdisk_uptime_seconds', 'gauge', 'Seconds since the daemon started.');
  w.sample('vdisk_uptime_seconds', {}, process.uptime());
  w.family('nodejs_heap_used_bytes', 'gauge', 'V8 heap in use in bytes.');
  w.sample('nodejs_heap_used_bytes', {}, mem.heapUsed);
  w.family('nodejs_external_memory_bytes', 'gauge', 'Memory outside the V8 heap (Buffers) in bytes.');
  w.sample('nodejs_external_memory_bytes', {}, mem.external + mem.arrayBuffers);
  return w.text();
}
