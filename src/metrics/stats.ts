/**
 * I/O accounting: what query-blockstats and the Prometheus endpoint report.
 *
 * One IoStats per block node (and one per export). The request path adds to
 * it with a few integer increments and two performance.now() reads per
 * request: no allocation, no map lookup, no string. Everything else (QEMU's
 * field names, Prometheus text) is computed when someone asks.
 * docs/design/metrics.md says why it is built this way and what it costs.
 */

/** The kinds of request QEMU accounts (BlockAcctType), in the order of the arrays below. */
export const Op = { Read: 0, Write: 1, Flush: 2, Unmap: 3 } as const;
export type Op = (typeof Op)[keyof typeof Op];
export const OP_NAMES = ['read', 'write', 'flush', 'unmap'] as const;
const OP_COUNT = 4;

/**
 * Upper bounds (seconds) of the latency histogram buckets: 10 µs to 10 s,
 * roughly 1-2.5-5 per decade. A page-cache read lands in the first buckets,
 * an fsync on a disk in the middle, a stalled NBD peer at the top.
 */
export const LATENCY_BUCKETS_S = [
  0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10,
];
/** The same bounds in milliseconds, the unit performance.now() counts in. */
const BUCKETS_MS = LATENCY_BUCKETS_S.map((s) => s * 1000);
const NB = BUCKETS_MS.length + 1; // the last one is +Inf

export class IoStats {
  /** Bytes of successful requests, per Op (flush has none). */
  readonly bytes = [0, 0, 0, 0];
  /** Successful requests, per Op. */
  readonly ops = [0, 0, 0, 0];
  /** Requests the node failed (an I/O error, ENOSPC, ...), per Op. */
  readonly failed = [0, 0, 0, 0];
  /** Requests refused before reaching the driver (out of range, read-only), per Op. */
  readonly invalid = [0, 0, 0, 0];
  /** Total time of successful requests in milliseconds (a double: sub-microsecond resolution), per Op. */
  readonly totalMs = [0, 0, 0, 0];
  /** Histogram of successful requests' latencies, per Op: NB counters each, non-cumulative. */
  readonly hist: Float64Array = new Float64Array(OP_COUNT * NB);
  /** The end of the furthest write (QEMU's wr_highest_offset). */
  wrHighestOffset = 0;
  /** performance.now() when the last request ended; 0: never. */
  lastAccessMs = 0;

  /** Accounts one finished request; `start` is the performance.now() it began at. */
  done(op: Op, bytes: number, start: number): void {
    const now = performance.now();
    const ms = now - start;
    this.ops[op]++;
    this.bytes[op] += bytes;
    this.totalMs[op] += ms;
    this.lastAccessMs = now;
    // A linear scan: most requests stop in the first few buckets, and there are only 19.
    let i = 0;
    while (i < NB - 1 && ms > BUCKETS_MS[i]) i++;
    this.hist[op * NB + i]++;
  }

  /** Accounts one failed request. */
  fail(op: Op): void {
    this.failed[op]++;
    this.lastAccessMs = performance.now();
  }

  /** Cumulative bucket counts of one Op (Prometheus' le buckets, +Inf last). */
  cumulative(op: Op): number[] {
    const out: number[] = [];
    let sum = 0;
    for (let i = 0; i < NB; i++) out.push((sum += this.hist[op * NB + i]));
    return out;
  }
}

/** Nanoseconds from milliseconds, as the integer QEMU's *_time_ns fields are. */
export function msToNs(ms: number): number {
  return Math.round(ms * 1e6);
}

/** The Op an NBD command is accounted as (QEMU's BlockAcctType), or -1 for those QEMU does not count (CACHE, BLOCK_STATUS, DISC). */
export const NBD_CMD_OP: readonly number[] = [Op.Read, Op.Write, -1, Op.Flush, Op.Unmap, -1, Op.Write, -1];
