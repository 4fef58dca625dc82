/**
 * A bitmap over a very large range that costs memory only where bits are
 * set, and finds the next set or clear bit fast: the storage under dirty
 * bitmaps (QEMU's HBitmap plays this role).
 *
 * Bits live in chunks of 32 Kibit (4 KiB); a chunk is allocated when its
 * first bit is set and freed when its last bit is cleared. A summary level
 * has one bit per chunk ("has a set bit"), so a search skips empty chunks 32
 * at a time, and each chunk keeps its population count, so count() is O(1).
 * A 16 TiB disk at 64 KiB granularity is 2^28 bits: 8192 chunks, 1 KiB of
 * summary; fully dirty it costs 32 MiB, as much as a flat bitmap.
 *
 * The serialisation (bytes()) is the flat bitmap in little-endian 64-bit
 * words, padded to a whole word: the layout QEMU hashes for
 * x-debug-block-dirty-bitmap-sha256.
 */

const CHUNK_BITS = 1 << 15;
const WORDS_PER_CHUNK = CHUNK_BITS / 32;

function popcount(x: number): number {
  x -= (x >>> 1) & 0x55555555;
  x = (x & 0x33333333) + ((x >>> 2) & 0x33333333);
  return (((x + (x >>> 4)) & 0x0f0f0f0f) * 0x01010101) >>> 24;
}

/** Index of the lowest set bit of a non-zero 32-bit word. */
function lowestBit(x: number): number {
  return 31 - Math.clz32(x & -x);
}

/** A word with bits [k, 32) set (0 <= k < 32). */
function aboveOrAt(k: number): number {
  return ~((1 << k) - 1);
}

/** A word with bits [from, to) set (0 <= from < to <= 32). */
function mask(from: number, to: number): number {
  const high = to === 32 ? 0xffffffff : (1 << to) - 1;
  return (high & ~((1 << from) - 1)) >>> 0;
}

export class SparseBitmap {
  private chunks: Array<Uint32Array | undefined> = [];
  private counts: Int32Array = new Int32Array(0);
  /** Bit c set: chunk c has at least one bit set. */
  private summary: Uint32Array = new Uint32Array(0);
  private total = 0;
  private nbits = 0;

  constructor(bits: number) {
    this.resize(bits);
  }

  get size(): number {
    return this.nbits;
  }

  /** Number of set bits. */
  count(): number {
    return this.total;
  }

  /** Memory held by chunks, in bytes (for the benchmark and for query output). */
  memoryBytes(): number {
    let chunks = 0;
    for (const c of this.chunks) if (c) chunks++;
    return chunks * WORDS_PER_CHUNK * 4 + this.counts.byteLength + this.summary.byteLength;
  }

  /** Grows or shrinks; bits past a new end are dropped, new bits are clear. */
  resize(bits: number): void {
    if (!Number.isSafeInteger(bits) || bits < 0) throw new RangeError(`bad bitmap size ${bits}`);
    if (bits < this.nbits) this.reset(bits, this.nbits - bits);
    const nchunks = Math.ceil(bits / CHUNK_BITS);
    this.chunks.length = nchunks;
    const counts = new Int32Array(nchunks);
    counts.set(this.counts.subarray(0, Math.min(nchunks, this.counts.length)));
    this.counts = counts;
    const summary = new Uint32Array(Math.ceil(nchunks / 32));
    summary.set(this.summary.subarray(0, Math.min(summary.length, this.summary.length)));
    this.summary = summary;
    this.nbits = bits;
  }

  get(bit: number): boolean {
    const c = this.chunks[Math.floor(bit / CHUNK_BITS)];
    if (!c) return false;
    const i = bit % CHUNK_BITS;
    return (c[i >>> 5] & (1 << (i & 31))) !== 0;
  }

  /** Sets bits [start, start + n). */
  set(start: number, n: number): void {
    this.update(start, n, true);
  }

  /** Clears bits [start, start + n). */
  reset(start: number, n: number): void {
    this.update(start, n, false);
  }

  clear(): void {
    this.chunks = new Array(this.chunks.length);
    this.counts.fill(0);
    this.summary.fill(0);
    this.total = 0;
  }

  private update(start: number, n: number, value: boolean): void {
    const end = Math.min(start + n, this.nbits);
    let bit = Math.max(0, start);
    while (bit < end) {
      const ci = Math.floor(bit / CHUNK_BITS);
      const chunkEnd = Math.min(end, (ci + 1) * CHUNK_BITS);
      let chunk = this.chunks[ci];
      if (!chunk) {
        if (!value) {
          bit = chunkEnd;
          continue;
        }
        chunk = this.chunks[ci] = new Uint32Array(WORDS_PER_CHUNK);
      }
      let delta = 0;
      let i = bit - ci * CHUNK_BITS;
      const iEnd = chunkEnd - ci * CHUNK_BITS;
      while (i < iEnd) {
        const w = i >>> 5;
        const from = i & 31;
        const to = Math.min(32, from + (iEnd - i));
        const m = from === 0 && to === 32 ? 0xffffffff : mask(from, to);
        const old = chunk[w];
        if (value) {
          delta += popcount(m & ~old);
          chunk[w] = (old | m) >>> 0;
        } else {
          delta -= popcount(m & old);
          chunk[w] = (old & ~m) >>> 0;
        }
        i += to - from;
      }
      this.counts[ci] += delta;
      this.total += delta;
      if (this.counts[ci] === 0) {
        this.chunks[ci] = undefined;
        this.summary[ci >>> 5] &= ~(1 << (ci & 31));
      } else {
        this.summary[ci >>> 5] |= 1 << (ci & 31);
      }
      bit = chunkEnd;
    }
  }

  /** The first set bit at or after `from`, or -1. */
  nextSet(from: number): number {
    if (from >= this.nbits || this.total === 0) return -1;
    let ci = Math.floor(Math.max(0, from) / CHUNK_BITS);
    let i = Math.max(0, from) - ci * CHUNK_BITS;
    for (;;) {
      const chunk = this.chunks[ci];
      if (chunk) {
        let w = i >>> 5;
        let word = chunk[w] & aboveOrAt(i & 31);
        for (;;) {
          if (word !== 0) {
            const bit = ci * CHUNK_BITS + w * 32 + lowestBit(word);
            return bit < this.nbits ? bit : -1;
          }
          if (++w >= WORDS_PER_CHUNK) break;
          word = chunk[w];
        }
      }
      ci = this.nextNonEmptyChunk(ci + 1);
      if (ci < 0) return -1;
      i = 0;
    }
  }

  /** The first clear bit at or after `from`, or -1 if every bit from there on is set. */
  nextClear(from: number): number {
    let bit = Math.max(0, from);
    while (bit < this.nbits) {
      const ci = Math.floor(bit / CHUNK_BITS);
      const chunk = this.chunks[ci];
      if (!chunk) return bit;
      let i = bit - ci * CHUNK_BITS;
      while (i < CHUNK_BITS) {
        const w = i >>> 5;
        const word = ~chunk[w] & aboveOrAt(i & 31);
        if (word !== 0) {
          const found = ci * CHUNK_BITS + w * 32 + lowestBit(word);
          return found < this.nbits ? found : -1;
        }
        i = (w + 1) * 32;
      }
      bit = (ci + 1) * CHUNK_BITS;
    }
    return -1;
  }

  private nextNonEmptyChunk(from: number): number {
    const nchunks = this.chunks.length;
    let c = from;
    while (c < nchunks) {
      const w = c >>> 5;
      const masked = this.summary[w] & aboveOrAt(c & 31);
      if (masked !== 0) {
        const found = w * 32 + lowestBit(masked);
        return found < nchunks ? found : -1;
      }
      c = (w + 1) * 32;
    }
    return -1;
  }

  /** Sets every bit that is set in `other` (same size or smaller). */
  merge(other: SparseBitmap): void {
    for (let ci = 0; ci < other.chunks.length; ci++) {
      const src = other.chunks[ci];
      if (!src) continue;
      const base = ci * CHUNK_BITS;
      for (let w = 0; w < WORDS_PER_CHUNK; w++) {
        let word = src[w];
        while (word !== 0) {
          // Set runs of bits in one call.
          const lo = lowestBit(word);
          let hi = lo;
          while (hi < 32 && word & (1 << hi)) hi++;
          this.set(base + w * 32 + lo, hi - lo);
          word = hi === 32 ? 0 : (word & ~mask(lo, hi)) >>> 0;
        }
      }
    }
  }

  /** Sets the bits given as bytes (bit i = bit i % 8 of byte i / 8) at [first, first + n). */
  setFromBytes(bytes: Buffer, first: number, n: number): void {
    let runStart = -1;
    for (let i = 0; i <= n; i++) {
      const on = i < n && (bytes[i >> 3] >> (i & 7)) & 1;
      if (on && runStart < 0) runStart = i;
      else if (!on && runStart >= 0) {
        this.set(first + runStart, i - runStart);
        runStart = -1;
      }
      // Skip whole zero bytes quickly.
      if (runStart < 0 && (i & 7) === 0 && i + 8 <= n && bytes[i >> 3] === 0) i += 7;
    }
  }

  /**
   * Bits [first, first + n) as bytes in the flat layout (bit i of the range
   * is bit i % 8 of byte i / 8); `first` must be a multiple of 8. Bits past
   * the end read as clear.
   */
  bytesOf(first: number, n: number): Buffer {
    if (first % 8) throw new RangeError('bytesOf: the first bit must be byte-aligned');
    const out = Buffer.alloc(Math.ceil(n / 8));
    const chunkBytes = CHUNK_BITS / 8;
    const startByte = first / 8;
    for (let at = 0; at < out.length; ) {
      const byte = startByte + at;
      const ci = Math.floor(byte / chunkBytes);
      const within = byte - ci * chunkBytes;
      const take = Math.min(out.length - at, chunkBytes - within);
      const c = this.chunks[ci];
      if (c) Buffer.from(c.buffer, c.byteOffset, c.byteLength).copy(out, at, within, within + take);
      at += take;
    }
    // Bits at or past the end of the bitmap are not part of it.
    const valid = this.nbits - first;
    if (valid < n) {
      for (let i = Math.max(0, valid); i < n; i++) out[i >> 3] &= ~(1 << (i & 7));
    }
    return out;
  }

  /** Makes bits [first, first + n) equal to those of `other` (first a multiple of 8). */
  copyRange(other: SparseBitmap, first: number, n: number): void {
    const end = Math.min(first + n, this.nbits);
    if (end <= first) return;
    this.reset(first, end - first);
    this.setFromBytes(other.bytesOf(first, end - first), first, end - first);
  }

  clone(): SparseBitmap {
    const b = new SparseBitmap(this.nbits);
    b.chunks = this.chunks.map((c) => (c ? new Uint32Array(c) : undefined));
    b.counts = new Int32Array(this.counts);
    b.summary = new Uint32Array(this.summary);
    b.total = this.total;
    return b;
  }

  /** The flat bitmap in little-endian 64-bit words (at least one word), as QEMU hashes it. */
  bytes(): Buffer {
    const words64 = Math.max(1, Math.ceil(this.nbits / 64));
    const out = Buffer.alloc(words64 * 8);
    for (let ci = 0; ci < this.chunks.length; ci++) {
      const c = this.chunks[ci];
      if (!c) continue;
      const at = ci * (CHUNK_BITS / 8);
      const bytes = Buffer.from(c.buffer, c.byteOffset, c.byteLength);
      // Uint32Array is little-endian on every platform Node runs on here; bit i is byte i/8, bit i%8.
      bytes.copy(out, at, 0, Math.min(bytes.length, out.length - at));
    }
    return out;
  }
}
