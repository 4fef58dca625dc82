/**
 * Incoming bytes of one connection, as a list of chunks (ws's Receiver idea):
 * fixed-size fields are taken as views into a chunk when they lie inside one,
 * and copied only when they span two. Payloads are copied once, straight into
 * the buffer the node will write from.
 */
export class ByteQueue {
  private chunks: Buffer[] = [];
  /** Read position inside chunks[0]. */
  private head = 0;
  length = 0;

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.length += chunk.length;
  }

  /** Takes n bytes (n <= length): a view when contiguous, else a copy. */
  take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    if (first.length - this.head >= n) {
      const view = first.subarray(this.head, this.head + n);
      this.advance(n);
      return view;
    }
    const out = Buffer.allocUnsafe(n);
    this.copyInto(out, 0, n);
    return out;
  }

  /** Copies min(n, length) bytes into dest at destOffset and consumes them; returns the count. */
  copyInto(dest: Buffer, destOffset: number, n: number): number {
    let done = 0;
    while (done < n && this.length > 0) {
      const first = this.chunks[0];
      const k = Math.min(n - done, first.length - this.head);
      first.copy(dest, destOffset + done, this.head, this.head + k);
      this.advance(k);
      done += k;
    }
    return done;
  }

  /** The next n bytes (n <= length) without taking them. */
  peek(n: number): Buffer {
    const first = this.chunks[0];
    if (n === 0) return Buffer.alloc(0);
    if (first.length - this.head >= n) return first.subarray(this.head, this.head + n);
    const out = Buffer.allocUnsafe(n);
    let done = 0;
    for (let i = 0, at = this.head; done < n; i++, at = 0) {
      const c = this.chunks[i];
      const k = Math.min(n - done, c.length - at);
      c.copy(out, done, at, at + k);
      done += k;
    }
    return out;
  }

  /** Whether the next n bytes (n <= length) lie inside one chunk. */
  contiguous(n: number): boolean {
    return n === 0 || this.chunks[0].length - this.head >= n;
  }

  /** Drops up to n bytes; returns how many were dropped. */
  skip(n: number): number {
    let done = 0;
    while (done < n && this.length > 0) {
      const k = Math.min(n - done, this.chunks[0].length - this.head);
      this.advance(k);
      done += k;
    }
    return done;
  }

  private advance(n: number): void {
    this.head += n;
    this.length -= n;
    if (this.head === this.chunks[0].length) {
      this.chunks.shift();
      this.head = 0;
    }
  }
}
