/**
 * `vdisk img convert`: copies one or more images (concatenated) into a new
 * raw or qcow2 image, as qemu-img convert does.
 *
 *   vdisk img convert [-p] [-q] [-n] [-f FMT] [-O FMT] [-B BACKING -F BACKING_FMT] [-o OPTIONS]
 *                     [-S SPARSE_SIZE] [-m N] [-W] [-t CACHE] [-T CACHE] [-U] SOURCE... TARGET
 *
 * What is copied: the source's block status drives it. Ranges that read as
 * zeroes are not written to a fresh target without a backing file (it reads
 * zeroes already); data is read and, with SPARSE_SIZE (default 4k; 0 turns
 * it off), blocks that are all zero are skipped the same way, so the target
 * stays sparse. With -B the target gets that backing file and ranges the
 * source does not allocate in its own top layer are left unallocated, so they
 * show the backing file's data, as qemu-img assumes the same base.
 *
 * Speed: N (default 8) requests run at once, each up to 2 MiB, like
 * qemu-img's coroutines. The target's cache mode (-t) is qemu-img's default
 * 'unsafe' (nothing is flushed); -t writeback flushes once at the end.
 */
import type { BlockNode } from '../../block/node.js';
import { ReqFlags, Status } from '../../block/node.js';
import { VdiskError } from '../../errors.js';
import { logEvent } from '../../log.js';
import { parseSize } from '../../qapi/schema.js';
import { type Flags, parseImgArgs } from './args.js';
import { createCommandSpec, createImage } from './create.js';
import { type OpenedImage, Progress, cacheMode, checkFormat, openImage } from './image.js';

export const CONVERT_USAGE = `Usage: vdisk img convert [-p] [-q] [-n] [-f FMT] [-O FMT] [-B BACKING -F BACKING_FMT] [-o OPTIONS]
                         [-S SPARSE_SIZE] [-m N] [-W] [-t CACHE] [-T CACHE] [-U] SOURCE... TARGET
`;

const CHUNK = 2 * 1024 * 1024;
const PROGRESS_LOG_MS = 5000;

export async function convertCommand(argv: string[]): Promise<number> {
  const { flags, positionals } = parseImgArgs(
    argv,
    {
      f: 'value', O: 'value', B: 'value', F: 'value', o: 'multi', S: 'value', m: 'value', t: 'value', T: 'value',
      p: 'bool', q: 'bool', n: 'bool', W: 'bool', c: 'bool', U: 'bool', 'force-share': 'bool', 'target-is-zero': 'bool',
    },
    CONVERT_USAGE,
  );
  if (positionals.length < 2) throw new VdiskError('EINVAL', `Expecting image file name(s) and a target\n${CONVERT_USAGE}`);
  const targetName = positionals[positionals.length - 1];
  const sourceNames = positionals.slice(0, -1);
  const outFormat = (flags.O as string | undefined) ?? 'raw';
  checkFormat(outFormat);
  const sparse = sparseSize(flags);
  const parallel = flags.m === undefined ? 8 : Number(flags.m);
  if (!Number.isInteger(parallel) || parallel < 1 || parallel > 16) throw new VdiskError('EINVAL', 'Invalid number of coroutines. Allowed number of coroutines is between 1 and 16');
  if (flags.B !== undefined && flags.n) throw new VdiskError('EINVAL', '-B makes no sense when -n is given');
  if (flags.B !== undefined && flags.F === undefined) throw new VdiskError('EINVAL', 'Use of backing file requires explicit backing format');
  if (flags['target-is-zero'] && !flags.n) throw new VdiskError('EINVAL', '--target-is-zero requires use of -n flag');
  const forceShare = Boolean(flags.U || flags['force-share']);

  const sources: OpenedImage[] = [];
  let target: OpenedImage | undefined;
  try {
    for (const name of sourceNames) {
      sources.push(await openImage(name, { format: flags.f as string | undefined, readOnly: true, forceShare, direct: cacheMode(flags.T as string | undefined, 'writeback').direct }));
    }
    const total = sources.reduce((n, s) => n + s.node.size, 0);
    if (!flags.n) {
      const spec = createCommandSpec(flags as Flags, outFormat, targetName, total);
      try {
        await createImage(spec, { openBacking: true });
      } catch (err) {
        // qemu-img's words for a target it could not make: "TARGET: error while converting FMT: why".
        const message = (err as Error).message;
        const why = message.startsWith(`${targetName}: `) ? message.slice(targetName.length + 2) : message;
        throw new VdiskError((err as VdiskError).errno ?? 'EIO', `${targetName}: error while converting ${outFormat}: ${why}`);
      }
    }
    // qemu-img's default target cache mode is 'unsafe': no flush at all (a convert that dies is run again).
    target = await openImage(targetName, { format: outFormat, unmap: true, ...cacheMode(flags.t as string | undefined, 'unsafe') });
    if (flags.n && target.node.size < total) throw new VdiskError('EINVAL', 'output file is smaller than input file');
    // A target we just made (without a backing file) reads as zeroes: zero ranges need no writing.
    const targetIsZero = (!flags.n && flags.B === undefined) || Boolean(flags['target-is-zero']);
    const progress = new Progress(Boolean(flags.p) && !flags.q);
    if (flags.c && target.node.compressionClusterSize === 0) throw new VdiskError('ENOTSUP', `Compression not supported for format '${outFormat}'`);
    const copier = new Copier(target.node, { sparse, parallel, targetIsZero, topOnly: flags.B !== undefined, total, progress, compress: Boolean(flags.c) });
    let base = 0;
    for (const s of sources) {
      await copier.copy(s.node, base);
      base += s.node.size;
    }
    await target.node.flush();
    progress.finish();
    logEvent('info', 'img-convert-done', { target: targetName, bytes: total, written: copier.written });
    return 0;
  } finally {
    if (target) await target.close();
    for (const s of sources) await s.close();
  }
}

function sparseSize(flags: Flags): number {
  if (flags.S === undefined) return 4096;
  const n = parseSize(flags.S as string);
  if (n === undefined || n % 512 !== 0) {
    throw new VdiskError('EINVAL', 'Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16M');
  }
  return n;
}

interface CopyOptions {
  sparse: number;
  parallel: number;
  targetIsZero: boolean;
  /** -B: copy only what the source's own top layer allocates. */
  topOnly: boolean;
  total: number;
  progress: Progress;
  /** -c: whole target clusters, written compressed. */
  compress?: boolean;
}

/** Copies sources into the target with a fixed number of requests in flight. */
export class Copier {
  written = 0;
  private done = 0;
  private lastLog = Date.now();

  constructor(
    private readonly target: BlockNode,
    private readonly o: CopyOptions,
  ) {}

  async copy(source: BlockNode, base: number): Promise<void> {
    let next = 0;
    const size = source.size;
    let failed: unknown;
    // Extents are handed out in order, one block-status call each, under a chain so no two
    // workers take the same one; writes then reach the target roughly in order, so a qcow2
    // target allocates its clusters in guest order.
    let chain: Promise<unknown> = Promise.resolve();
    const take = (): Promise<{ off: number; length: number; flags: number; depth: number } | undefined> => {
      const p = chain.then(async () => {
        if (next >= size || failed !== undefined) return undefined;
        const off = next;
        const st = await source.blockStatus(off, Math.min(CHUNK, size - off));
        next = off + st.length;
        return { off, length: st.length, flags: st.flags, depth: st.depth };
      });
      chain = p.catch(() => undefined);
      return p;
    };
    const worker = async () => {
      // One buffer per worker for the whole copy: a fresh 2 MiB buffer per extent costs more in GC than the copy.
      const buf = Buffer.allocUnsafe(CHUNK);
      try {
        for (let e = await take(); e; e = await take()) await this.copyExtent(source, base, e.off, e.length, e.flags, e.depth, buf);
      } catch (err) {
        failed ??= err;
      }
    };
    await Promise.all(Array.from({ length: this.o.parallel }, worker));
    if (failed !== undefined) throw failed;
  }

  private async copyExtent(source: BlockNode, base: number, off: number, length: number, flags: number, depth: number, scratch: Buffer): Promise<void> {
    const dst = base + off;
    if (this.o.topOnly && depth !== 1) {
      // Not allocated in the source's top layer: the target's backing file provides it.
    } else if (flags & Status.ZERO) {
      if (!this.o.targetIsZero) await this.target.writeZeroes(dst, length, ReqFlags.MAY_UNMAP);
    } else if (this.o.compress) {
      await this.writeCompressed(source, dst, off, length, scratch);
    } else {
      const buf = scratch.subarray(0, length);
      await source.read(off, buf);
      await this.writeSparse(dst, buf);
    }
    this.done += length;
    this.o.progress.update(this.done, this.o.total);
    if (Date.now() - this.lastLog > PROGRESS_LOG_MS) {
      this.lastLog = Date.now();
      logEvent('info', 'img-convert-progress', { done: this.done, total: this.o.total, percent: Math.floor((this.done * 100) / Math.max(1, this.o.total)) });
    }
  }

  /**
   * -c: the target's clusters covering the extent are read whole from the
   * source (an extent may start or end inside one) and written compressed;
   * clusters of zeroes are left out (or zero-written).
   */
  private async writeCompressed(source: BlockNode, dst: number, off: number, length: number, scratch: Buffer): Promise<void> {
    const cs = this.target.compressionClusterSize;
    const start = dst - (dst % cs);
    const end = Math.min(Math.ceil((dst + length) / cs) * cs, this.target.size);
    for (let at = start; at < end; at += cs) {
      const n = Math.min(cs, end - at);
      const buf = scratch.subarray(0, n);
      // A target offset maps to source offset at - (dst - off); the source ends where the target does.
      const srcAt = at - (dst - off);
      buf.fill(0);
      const readFrom = Math.max(srcAt, 0);
      const readTo = Math.min(srcAt + n, source.size);
      if (readTo > readFrom) await source.read(readFrom, buf.subarray(readFrom - srcAt, readTo - srcAt));
      if (isZero(buf, 0, n)) {
        if (!this.o.targetIsZero) await this.target.writeZeroes(at, n, ReqFlags.MAY_UNMAP);
      } else {
        await this.target.writeCompressed(at, Buffer.from(buf));
      }
      this.written += n;
    }
  }

  /** Writes buf at dst, leaving out (or zero-writing) runs of all-zero sparse-size blocks. */
  private async writeSparse(dst: number, buf: Buffer): Promise<void> {
    const step = this.o.sparse;
    if (step === 0) {
      await this.target.write(dst, buf);
      this.written += buf.length;
      return;
    }
    let runStart = 0;
    let runZero = isZero(buf, 0, Math.min(step, buf.length));
    const flushRun = async (end: number) => {
      if (end <= runStart) return;
      if (!runZero) {
        await this.target.write(dst + runStart, buf.subarray(runStart, end));
        this.written += end - runStart;
      } else if (!this.o.targetIsZero) {
        await this.target.writeZeroes(dst + runStart, end - runStart, ReqFlags.MAY_UNMAP);
      }
    };
    for (let at = step; at < buf.length; at += step) {
      const zero = isZero(buf, at, Math.min(at + step, buf.length));
      if (zero === runZero) continue;
      await flushRun(at);
      runStart = at;
      runZero = zero;
    }
    await flushRun(buf.length);
  }
}

const ZERO_BLOCK = Buffer.alloc(16 * 1024 * 1024);

function isZero(buf: Buffer, start: number, end: number): boolean {
  // Check the first 16 bytes byte by byte (random data fails here at once), then compare the rest.
  const quick = Math.min(end, start + 16);
  for (let i = start; i < quick; i++) if (buf[i] !== 0) return false;
  return buf.subarray(quick, end).equals(ZERO_BLOCK.subarray(0, end - quick));
}
