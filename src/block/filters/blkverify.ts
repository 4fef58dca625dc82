/**
 * blkverify: every request goes to two children, the image under test and a
 * raw reference that holds the same content, and every read compares them,
 * so corruption is caught the first time it is read (QEMU's
 * block/blkverify.c; docs/blkverify.txt in the seeds).
 *
 * On a mismatch (content, or one child failing where the other did not) the
 * report says the operation, offset, length and first differing byte in
 * QEMU's words, plus both buffers' SHA-256 and the last requests that
 * touched the range, as a log line and a BLKVERIFY_MISMATCH event. Then, by
 * the node's mismatch-action: 'abort' exits the process as QEMU does (the
 * default of `vdisk io`), 'eio' fails the request (the daemon's default: one
 * bad read must not kill every other export), 'log' returns the reference's
 * data and goes on.
 */
import { createHash } from 'node:crypto';
import { VdiskError, errnoNumber, toVdiskError } from '../../errors.js';
import { logEvent } from '../../log.js';
import { FilterNode } from '../filter.js';
import type { BlockNode, ChildRole, Extent } from '../node.js';

export type MismatchAction = 'abort' | 'eio' | 'log';

/** Requests kept for the trail of a mismatch report. */
const TRAIL = 256;

interface TrailEntry {
  op: string;
  offset: number;
  length: number;
  at: string;
}

export interface BlkverifyOptions {
  nodeName: string;
  test: BlockNode;
  raw: BlockNode;
  readOnly?: boolean;
  mismatchAction: MismatchAction;
  /** Where mismatch events go (the daemon's event stream); may be absent. */
  onMismatch?: (data: Record<string, unknown>) => void;
}

/**
 * The reference (raw) is the filtered child, as in QEMU. Every request that
 * reads or changes content goes to both children, so those hooks are
 * blkverify's own; the filter base keeps the links, swaps the reference
 * when asked and answers formatInfo from it (QEMU's get_info does the same).
 */
export class BlkverifyNode extends FilterNode {
  readonly driverName = 'blkverify';
  private test: BlockNode;
  readonly mismatchAction: MismatchAction;
  private readonly onMismatch: (data: Record<string, unknown>) => void;
  private readonly trail: TrailEntry[] = [];
  /** Mismatches seen (query and tests). */
  mismatches = 0;

  constructor(o: BlkverifyOptions) {
    super({ nodeName: o.nodeName, readOnly: o.readOnly || o.test.readOnly }, 'raw', o.raw);
    this.test = o.test;
    this.mismatchAction = o.mismatchAction;
    this.onMismatch = o.onMismatch ?? (() => undefined);
    // The reference is the primary child, as in QEMU; the length is the test image's.
    this.children.push({ role: 'test', node: o.test });
    this.length = o.test.size;
    // A FUA write goes to both children without FUA, then both are flushed (QEMU's blkverify
    // does not take FUA either, so the block layer flushes after the write).
    this.nativeFua = false;
    this.limits = {
      requestAlignment: Math.max(o.test.limits.requestAlignment, o.raw.limits.requestAlignment),
      maxTransfer: Math.min(o.test.limits.maxTransfer, o.raw.limits.maxTransfer),
      preferredSize: Math.max(o.test.limits.preferredSize, o.raw.limits.preferredSize),
    };
  }

  /** The reference, the filter base's filtered child. */
  private get raw(): BlockNode {
    return this.filtered;
  }

  override get filename(): string {
    return `blkverify:${this.raw.filename}:${this.test.filename}`;
  }

  /** Both children can be swapped while open, the test image too. */
  protected override canReplaceChild(): boolean {
    return true;
  }

  protected override childReplaced(role: ChildRole, node: BlockNode): void {
    if (role === 'test') this.test = node;
    else super.childReplaced(role, node);
  }

  /** Compressed writes are the test image's; the reference keeps plain data (its content is what counts). */
  override get compressionClusterSize(): number {
    return this.test.compressionClusterSize;
  }

  private remember(op: string, offset: number, length: number): void {
    this.trail.push({ op, offset, length, at: new Date().toISOString() });
    if (this.trail.length > TRAIL) this.trail.shift();
  }

  /** Runs an operation on both children and returns both outcomes (never throws). */
  private async both(fn: (n: BlockNode) => Promise<void>): Promise<[VdiskError | undefined, VdiskError | undefined]> {
    const settle = (n: BlockNode) => fn(n).then(() => undefined, (err: unknown) => toVdiskError(err, `blkverify child '${n.nodeName}'`));
    const [t, r] = await Promise.all([settle(this.test), settle(this.raw)]);
    return [t, r];
  }

  private returnMismatch(op: string, offset: number, length: number, t: VdiskError | undefined, r: VdiskError | undefined): void {
    const code = (e: VdiskError | undefined) => (e ? -errnoNumber(e.errno) : 0);
    this.report(`blkverify: ${op} offset=${offset} bytes=${length} return value mismatch ${code(t)} != ${code(r)}`, {
      operation: op,
      offset,
      bytes: length,
      'test-error': t?.message,
      'raw-error': r?.message,
    });
  }

  /** Reports a mismatch and applies the node's action (abort exits; eio throws; log returns). */
  private report(line: string, data: Record<string, unknown>): void {
    this.mismatches++;
    const offset = data.offset as number;
    const bytes = data.bytes as number;
    const recent = this.trail.filter((e) => e.offset < offset + bytes && offset < e.offset + e.length).slice(-16);
    const full = { 'node-name': this.nodeName, action: this.mismatchAction, ...data, recent };
    this.onMismatch(full);
    if (this.mismatchAction === 'abort') {
      // As QEMU: the line on stderr and the process ends, so nothing reads the bad data. The
      // details follow on one more line, for whoever debugs it.
      const details = Object.entries(data)
        .filter(([k, v]) => v !== undefined && !['operation', 'offset', 'bytes'].includes(k))
        .map(([k, v]) => `${k}=${v}`);
      const trail = recent.map((e) => `${e.op}@${e.offset}+${e.length}`).join(' ');
      process.stderr.write(`${line}\nblkverify: ${details.join(' ')}${trail ? ` recent: ${trail}` : ''}\n`);
      process.exit(1);
    }
    logEvent('error', 'blkverify-mismatch', { line, ...full });
    if (this.mismatchAction === 'eio') throw new VdiskError('EIO', line);
  }

  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    this.remember('read', offset, buf.length);
    const rawBuf = Buffer.allocUnsafe(buf.length);
    const [t, r] = await this.both((n) => n.read(offset, n === this.test ? buf : rawBuf));
    if (t || r) {
      if (!t || !r) this.returnMismatch('read', offset, buf.length, t, r);
      if (t && r) throw t;
      if (t) {
        // 'log': go on with the reference's data.
        rawBuf.copy(buf);
        return;
      }
      return;
    }
    if (buf.equals(rawBuf)) return;
    let i = 0;
    while (buf[i] === rawBuf[i]) i++;
    const sha = (b: Buffer) => createHash('sha256').update(b).digest('hex');
    this.report(`blkverify: read offset=${offset} bytes=${buf.length} contents mismatch at offset ${offset + i}`, {
      operation: 'read',
      offset,
      bytes: buf.length,
      'mismatch-offset': offset + i,
      sector: Math.floor((offset + i) / 512),
      'test-sha256': sha(buf),
      'raw-sha256': sha(rawBuf),
    });
    rawBuf.copy(buf);
  }

  private async mirrored(op: string, offset: number, length: number, fn: (n: BlockNode) => Promise<void>): Promise<void> {
    this.remember(op, offset, length);
    const [t, r] = await this.both(fn);
    if ((t === undefined) !== (r === undefined)) this.returnMismatch(op, offset, length, t, r);
    if (t && r) throw t;
  }

  protected override doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    return this.mirrored('write', offset, buf.length, (n) => n.write(offset, buf, flags));
  }

  /** Write-zeroes reaches both children (QEMU falls back to zero buffers; the result is the same). */
  protected override doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.mirrored('write-zeroes', offset, length, (n) => n.writeZeroes(offset, length, flags));
  }

  /**
   * Discard reaches both; what a discarded range reads as is up to each
   * driver (zeroes, or a backing file's data), so the reference is then
   * given the test image's content for it, and later reads stay comparable.
   */
  protected override async doDiscard(offset: number, length: number): Promise<void> {
    await this.mirrored('discard', offset, length, (n) => n.discard(offset, length));
    const chunk = 1024 * 1024;
    const buf = Buffer.allocUnsafe(Math.min(chunk, length));
    for (let at = offset; at < offset + length; at += chunk) {
      const n = Math.min(chunk, offset + length - at);
      const piece = buf.subarray(0, n);
      await this.test.read(at, piece);
      await this.raw.write(at, piece);
    }
  }

  protected override doWriteCompressed(offset: number, buf: Buffer): Promise<void> {
    return this.mirrored('write', offset, buf.length, (n) => (n === this.test ? n.writeCompressed(offset, buf) : n.write(offset, buf)));
  }

  /** Block status is the test image's: that is the image under test, the reference only checks it. */
  protected override doBlockStatus(offset: number, length: number): Promise<Extent> {
    return this.test.blockStatus(offset, length);
  }

  /** A prefetch hint for both children: every read goes to both. */
  protected override async doCache(offset: number, length: number): Promise<void> {
    await Promise.all([this.test.cache(offset, length), this.raw.cache(offset, length)]);
  }

  protected override async doTruncate(size: number): Promise<void> {
    await this.test.truncate(size);
    await this.raw.truncate(size);
    this.length = this.test.size;
  }
}
