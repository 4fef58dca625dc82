/**
 * A job's speed limit, as QEMU's ratelimit.h: time is cut into slices of
 * 100 ms, each with a quota of speed * 0.1 bytes (at least 1). Work is
 * admitted while the slice's quota lasts; the piece that exceeds it is still
 * done (a chunk is never split), and the slice is stretched by as many
 * slices as the excess needs, so the average over the job holds at any
 * speed: at 1 byte/s one 64 KiB chunk is followed by a wait of hours, not
 * by a reset after a second.
 *
 * Callers ask delay(0) before starting a chunk (0 = go now, else wait that
 * many ms and ask again) and charge(bytes) once the chunk is started; both
 * are synchronous, so concurrent workers cannot all pass the same check.
 */
const SLICE_MS = 100;

export class RateLimit {
  private sliceStart = 0;
  private sliceEnd = 0;
  private quota = 0;
  private dispatched = 0;

  constructor(bytesPerSecond = 0) {
    this.setSpeed(bytesPerSecond);
  }

  /** 0 switches the limit off. Takes effect on the next delay() call. */
  setSpeed(bytesPerSecond: number): void {
    this.quota = bytesPerSecond > 0 ? Math.max(1, (bytesPerSecond * SLICE_MS) / 1000) : 0;
  }

  get enabled(): boolean {
    return this.quota > 0;
  }

  /** Milliseconds to wait before more may be done (0: go on); counts `bytes` as done. */
  delay(bytes = 0, now = performance.now()): number {
    if (this.quota === 0) return 0;
    if (this.sliceEnd < now) {
      // The last slice (maybe stretched) is over: start afresh.
      this.sliceStart = now;
      this.sliceEnd = now + SLICE_MS;
      this.dispatched = 0;
    }
    this.dispatched += bytes;
    if (this.dispatched < this.quota) return 0;
    // Over quota: the slice lasts as many slices as the bytes dispatched in it need.
    this.sliceEnd = this.sliceStart + (this.dispatched / this.quota) * SLICE_MS;
    return this.sliceEnd - now;
  }

  /** Counts bytes of work just started (the delay it causes applies to the next chunk). */
  charge(bytes: number, now = performance.now()): void {
    this.delay(bytes, now);
  }
}
