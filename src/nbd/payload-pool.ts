/**
 * WRITE payload buffers, reused across requests and connections.
 *
 * Why: a payload that does not arrive inside one socket chunk needs a buffer
 * of its own. Allocating a fresh 1 MiB buffer per WRITE cost, on the 1M
 * write bench, page faults on every new page (the kernel zeroes each one
 * before the copy lands in it) and major garbage collections driven by the
 * external memory: together about a quarter of the daemon's CPU
 * (docs/design/io-path.md). A pooled buffer is faulted in once.
 *
 * Buffers come in power-of-two classes from MIN_POOLED up; the caller gets a
 * view of exactly the length it asked for, and gives the whole buffer back.
 * A buffer may be given back only when nothing can touch it any more: the
 * NBD core does so when the node's write resolved (not when it failed: a
 * filter may reject while a child still copies from the buffer). At most
 * MAX_IDLE_BYTES sit idle in the pool; the buffers in use are the ones the
 * buffer budget (limits.ts) already counts, so the pool adds a fixed bound,
 * not one that grows with clients.
 */

/** Smaller payloads are cheap to allocate (and usually arrive inside one chunk): not pooled. */
export const MIN_POOLED = 64 * 1024;
/** Largest class kept: NBD_MAX_PAYLOAD (32 MiB). */
const MAX_POOLED = 32 * 1024 * 1024;
/** Idle bytes kept at most, over all classes. */
export const MAX_IDLE_BYTES = 16 * 1024 * 1024;

export class PayloadPool {
  /** Idle buffers by class size. */
  private readonly free = new Map<number, Buffer[]>();
  /** Bytes sitting idle in free. */
  idleBytes = 0;

  constructor(private readonly maxIdle: number = MAX_IDLE_BYTES) {}

  /**
   * A buffer of `length` bytes: `data` is what to fill, `backing` what to
   * give back later (undefined when the length is not pooled).
   */
  take(length: number): { data: Buffer; backing: Buffer | undefined } {
    if (length < MIN_POOLED || length > MAX_POOLED) return { data: Buffer.allocUnsafe(length), backing: undefined };
    const size = classOf(length);
    const backing = this.free.get(size)?.pop();
    if (backing === undefined) {
      // allocUnsafeSlow: a buffer of its own, never a slice of Node's shared pool.
      const b = Buffer.allocUnsafeSlow(size);
      return { data: b.subarray(0, length), backing: b };
    }
    this.idleBytes -= size;
    return { data: backing.subarray(0, length), backing };
  }

  /** Gives back a buffer take() returned as backing; it is dropped when the pool is full. */
  give(backing: Buffer): void {
    const size = backing.length;
    if (this.idleBytes + size > this.maxIdle) return;
    let list = this.free.get(size);
    if (list === undefined) this.free.set(size, (list = []));
    list.push(backing);
    this.idleBytes += size;
  }
}

/** The smallest power of two >= length (length >= 1). */
function classOf(length: number): number {
  return 2 ** Math.ceil(Math.log2(length));
}

/** The daemon's pool: every NBD connection draws from it. */
export const payloadPool = new PayloadPool();
