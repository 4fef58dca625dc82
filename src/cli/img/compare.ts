/**
 * `vdisk img compare`: are two images' contents the same, as qemu-img compare.
 *
 *   vdisk img compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILENAME1 FILENAME2
 *
 * Exit 0: identical; 1: different ("Content mismatch at offset N!", N the
 * first differing 512-byte sector); 2: an error. Images of different sizes
 * are identical if the longer one reads as zeroes past the shorter's end,
 * unless -s (strict), which also requires the same allocation state.
 */
import type { BlockNode, Extent } from '../../block/node.js';
import { Status } from '../../block/node.js';
import { VdiskError } from '../../errors.js';
import { parseImgArgs } from './args.js';
import { type OpenedImage, Progress, openImage } from './image.js';

export const COMPARE_USAGE = `Usage: vdisk img compare [-f FMT] [-F FMT] [-p] [-q] [-s] [-U] FILENAME1 FILENAME2
`;

const CHUNK = 2 * 1024 * 1024;
const SECTOR = 512;

export async function compareCommand(argv: string[]): Promise<number> {
  let quiet = false;
  try {
    const { flags, positionals } = parseImgArgs(
      argv,
      { f: 'value', F: 'value', p: 'bool', q: 'bool', s: 'bool', U: 'bool', 'force-share': 'bool', T: 'value' },
      COMPARE_USAGE,
    );
    quiet = Boolean(flags.q);
    if (positionals.length !== 2) throw new VdiskError('EINVAL', `Expecting two image file names\n${COMPARE_USAGE}`);
    const forceShare = Boolean(flags.U || flags['force-share']);
    const images: OpenedImage[] = [];
    try {
      images.push(await openImage(positionals[0], { format: flags.f as string | undefined, readOnly: true, forceShare }));
      images.push(await openImage(positionals[1], { format: flags.F as string | undefined, readOnly: true, forceShare }));
      const progress = new Progress(Boolean(flags.p) && !quiet);
      const result = await compareNodes(images[0].node, images[1].node, Boolean(flags.s), progress);
      progress.finish();
      if (!quiet) process.stdout.write(result.lines.join(''));
      return result.same ? 0 : 1;
    } finally {
      for (const img of images) await img.close();
    }
  } catch (err) {
    // Every error is exit status 2, so scripts can tell "different" from "could not compare".
    if (!quiet || !(err instanceof VdiskError)) process.stderr.write(`vdisk: ${(err as Error).message}\n`);
    return 2;
  }
}

export interface CompareResult {
  same: boolean;
  /** What qemu-img prints, line by line. */
  lines: string[];
  /** The first differing offset, if any. */
  mismatchAt?: number;
}

export async function compareNodes(a: BlockNode, b: BlockNode, strict: boolean, progress?: Progress): Promise<CompareResult> {
  const sizeA = a.size;
  const sizeB = b.size;
  if (strict && sizeA !== sizeB) return { same: false, lines: ['Strict mode: Image size mismatch!\n'] };
  const common = Math.min(sizeA, sizeB);
  const total = Math.max(sizeA, sizeB);
  const bufA = Buffer.alloc(CHUNK);
  const bufB = Buffer.alloc(CHUNK);
  for (let off = 0; off < common; ) {
    const [sa, sb] = await Promise.all([a.blockStatus(off, common - off), b.blockStatus(off, common - off)]);
    let chunk = Math.min(sa.length, sb.length);
    if (strict && statusKey(sa) !== statusKey(sb)) {
      return { same: false, lines: [`Strict mode: Offset ${off} block status mismatch!\n`], mismatchAt: off };
    }
    if (!(sa.flags & Status.ZERO && sb.flags & Status.ZERO)) {
      chunk = Math.min(chunk, CHUNK);
      const x = bufA.subarray(0, chunk);
      const y = bufB.subarray(0, chunk);
      await Promise.all([a.read(off, x), b.read(off, y)]);
      const diff = firstDifference(x, y);
      if (diff >= 0) {
        const at = off + diff - (diff % SECTOR);
        return { same: false, lines: [`Content mismatch at offset ${at}!\n`], mismatchAt: at };
      }
    }
    off += chunk;
    progress?.update(off, total);
  }
  const lines: string[] = [];
  if (sizeA !== sizeB) {
    lines.push('Warning: Image size mismatch!\n');
    const longer = sizeA > sizeB ? a : b;
    for (let off = common; off < total; ) {
      const st = await longer.blockStatus(off, total - off);
      let chunk = st.length;
      if (!(st.flags & Status.ZERO)) {
        chunk = Math.min(chunk, CHUNK);
        const x = bufA.subarray(0, chunk);
        await longer.read(off, x);
        const nz = firstNonZero(x);
        if (nz >= 0) {
          const at = off + nz - (nz % SECTOR);
          lines.push(`Content mismatch at offset ${at}!\n`);
          return { same: false, lines, mismatchAt: at };
        }
      }
      off += chunk;
      progress?.update(off, total);
    }
  }
  lines.push('Images are identical.\n');
  return { same: true, lines };
}

/** What strict mode compares: data, zero and whether any layer allocates the range. */
function statusKey(e: Extent): number {
  return (e.flags & (Status.DATA | Status.ZERO)) | (e.depth !== 0 ? 8 : 0);
}

/** Index of the first differing byte, or -1. */
export function firstDifference(x: Buffer, y: Buffer): number {
  if (x.equals(y)) return -1;
  // Narrow down in sectors first: Buffer.compare on slices is far faster than a byte loop.
  for (let s = 0; s < x.length; s += SECTOR) {
    const e = Math.min(x.length, s + SECTOR);
    if (!x.subarray(s, e).equals(y.subarray(s, e))) {
      for (let i = s; i < e; i++) if (x[i] !== y[i]) return i;
    }
  }
  return -1;
}

const ZEROES = Buffer.alloc(CHUNK);

function firstNonZero(x: Buffer): number {
  return firstDifference(x, ZEROES.subarray(0, x.length));
}
