/**
 * Bounds on what NBD clients can make the server hold, across connections:
 * the daemon-wide budget for buffered write payloads and unsent replies.
 * Each connection keeps its own caps (connection.ts: 64 requests, 64 MiB in
 * flight, 32 MiB unsent); those alone let 64 busy clients hold 4 GiB, so
 * the budget bounds the sum. The why is in docs/design/limits.md.
 */

/** What the budget needs of a connection. */
export interface BudgetUser {
  /** Bytes this connection holds now (payloads in flight, a write being received, unsent replies). */
  readonly buffered: number;
  /** Called when the budget lets it take requests again. */
  resumeFromBudget(): void;
}

/**
 * Below this a connection counts as holding nothing. It is above the
 * socket's high-water mark (16 KiB): unsent bytes under it shrink without a
 * 'drain' event, so a connection waiting on them would never be woken.
 */
const NEARLY_EMPTY = 64 * 1024;

/** 256 MiB: 64 clients with 1 MiB requests still keep 4 each in flight. */
export const DEFAULT_BUFFER_LIMIT = 256 * 1024 * 1024;

export class BufferBudget {
  /** Bytes charged by every connection together. */
  total = 0;
  /** Connections paused by the budget, oldest first (a Set keeps insertion order). */
  private readonly waiting = new Set<BudgetUser>();

  /**
   * @param limit bytes; 0 = no daemon-wide limit (the per-connection caps still apply)
   * @param users how many connections share it now
   */
  constructor(
    readonly limit: number,
    private readonly users: () => number,
  ) {}

  /** The highest total seen, and how many times a connection had to wait (for x-query-nbd-server). */
  peak = 0;
  waits = 0;

  charge(bytes: number): void {
    this.total += bytes;
    if (this.total > this.peak) this.peak = this.total;
  }

  release(bytes: number): void {
    this.total -= bytes;
    if (this.waiting.size !== 0 && this.total < this.limit) this.scheduleWake();
  }

  /**
   * Whether a connection holding `own` bytes must stop taking requests.
   * Under the limit nobody waits. Over it, a connection that holds (nearly)
   * nothing always gets a request through (so nobody starves), and one holding less
   * than an equal share of the limit may go on into a reserve of half the
   * limit: clients that never read their replies can fill the limit, but the
   * others keep more than one request in flight. Over limit + reserve only
   * empty connections go on. So the total never passes 1.5 x limit plus, per
   * connection, one request and the under-NEARLY_EMPTY bytes it held when let through.
   */
  mustWait(own: number): boolean {
    if (this.limit === 0 || this.total < this.limit || own < NEARLY_EMPTY) return false;
    if (this.total >= this.limit * 1.5) return true;
    return own >= this.limit / Math.max(1, this.users());
  }

  wait(user: BudgetUser): void {
    if (!this.waiting.has(user)) this.waits++;
    this.waiting.add(user);
  }

  /** A connection closed: its share goes to the others, and it waits no more. */
  leave(user: BudgetUser): void {
    this.waiting.delete(user);
    if (this.waiting.size !== 0) this.scheduleWake();
  }

  get waiters(): number {
    return this.waiting.size;
  }

  private wakeScheduled = false;

  /**
   * Waking runs as a microtask, not inside release(): release is called from
   * inside a connection's own request loop, which must not be re-entered.
   */
  private scheduleWake(): void {
    if (this.wakeScheduled) return;
    this.wakeScheduled = true;
    queueMicrotask(() => {
      this.wakeScheduled = false;
      this.wake();
    });
  }

  /**
   * Resumes waiting connections oldest first while they may go on. Each takes
   * its buffered requests synchronously (charging as it goes), so the budget
   * fills again before the ones behind it run; a connection that must wait
   * again goes to the back of the line. That is the fairness: round robin.
   */
  private wake(): void {
    for (const user of [...this.waiting]) {
      if (this.mustWait(user.buffered)) continue;
      this.waiting.delete(user);
      user.resumeFromBudget();
    }
  }
}
