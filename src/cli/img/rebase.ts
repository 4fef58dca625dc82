/**
 * `vdisk img rebase`: give a qcow2 image another backing file.
 *
 *   vdisk img rebase [-f FMT] [-p] [-q] [-u] [-U] -b BACKING [-F BACKING_FMT] FILENAME
 *
 * Safe mode (the default) keeps what the image reads: every range the image
 * does not allocate itself is read through the old backing chain and through
 * the new one, and where they differ the old content is written into the
 * image; only then is the header changed. -b "" removes the backing file (the
 * image then holds everything). -u (unsafe) only rewrites the header, for when
 * the file was moved or renamed.
 */
import { resolveBackingName } from '../../block/image-name.js';
import type { BlockNode } from '../../block/node.js';
import { VdiskError } from '../../errors.js';
import { parseImgArgs } from './args.js';
import { firstDifference } from './compare.js';
import { type OpenedImage, Progress, checkFormat, openImage } from './image.js';

export const REBASE_USAGE = `Usage: vdisk img rebase [-f FMT] [-p] [-q] [-u] [-U] -b BACKING [-F BACKING_FMT] FILENAME
`;

const CHUNK = 2 * 1024 * 1024;
const SECTOR = 512;

export async function rebaseCommand(argv: string[]): Promise<number> {
  const { flags, positionals } = parseImgArgs(
    argv,
    { f: 'value', b: 'value', F: 'value', p: 'bool', q: 'bool', u: 'bool', U: 'bool', 'force-share': 'bool', t: 'value', T: 'value' },
    REBASE_USAGE,
  );
  if (positionals.length !== 1) throw new VdiskError('EINVAL', `Expecting one image file name\n${REBASE_USAGE}`);
  if (flags.b === undefined) throw new VdiskError('EINVAL', 'Must specify backing file (-b) or use unsafe mode (-u)');
  const filename = positionals[0];
  const newName = (flags.b as string) === '' ? undefined : (flags.b as string);
  const newFormat = flags.F as string | undefined;
  if (newName !== undefined && newFormat === undefined) {
    throw new VdiskError('EINVAL', `Could not change the backing file to '${newName}': backing format must be specified`);
  }
  if (newFormat !== undefined) checkFormat(newFormat);
  const unsafe = Boolean(flags.u);

  const img = await openImage(filename, { format: flags.f as string | undefined, noBacking: unsafe });
  let newBacking: OpenedImage | undefined;
  try {
    const header = img.node.backingControl;
    if (!header) throw new VdiskError('ENOTSUP', `Image format '${img.format}' has no backing file to change`);
    if (!unsafe) {
      if (newName !== undefined) {
        // Relative names are relative to the image, as they will be when it is opened.
        const resolved = resolveBackingName(filename, newName);
        newBacking = await openImage(resolved, { format: newFormat, readOnly: true, forceShare: Boolean(flags.U || flags['force-share']) });
      }
      const progress = new Progress(Boolean(flags.p) && !flags.q);
      await keepContent(img.node, newBacking?.node, progress);
      progress.finish();
    }
    await header.setBackingFile(newName, newName === undefined ? undefined : newFormat);
  } finally {
    if (newBacking) await newBacking.close();
    await img.close();
  }
  return 0;
}

/** Copies into `top` every range it does not allocate where the old and new backing content differ. */
async function keepContent(top: BlockNode, newBacking: BlockNode | undefined, progress: Progress): Promise<void> {
  const size = top.size;
  const oldBuf = Buffer.alloc(CHUNK);
  const newBuf = Buffer.alloc(CHUNK);
  for (let off = 0; off < size; ) {
    const st = await top.blockStatus(off, Math.min(CHUNK, size - off));
    const n = st.length;
    if (st.depth !== 1) {
      // Not allocated in the image itself: what it reads now comes from the old chain.
      const was = oldBuf.subarray(0, n);
      const will = newBuf.subarray(0, n);
      await top.read(off, was);
      will.fill(0);
      if (newBacking && off < newBacking.size) await newBacking.read(off, will.subarray(0, Math.min(n, newBacking.size - off)));
      await writeDifferences(top, off, was, will);
    }
    off += n;
    progress.update(off, size);
  }
  await top.flush();
}

/** Writes the sectors of `was` that differ from `will`, in runs. */
async function writeDifferences(top: BlockNode, base: number, was: Buffer, will: Buffer): Promise<void> {
  let at = 0;
  while (at < was.length) {
    const d = firstDifference(was.subarray(at), will.subarray(at));
    if (d < 0) return;
    const start = at + d - (d % SECTOR);
    let end = start + SECTOR;
    // Extend the run while sectors keep differing.
    while (end < was.length && !was.subarray(end, end + SECTOR).equals(will.subarray(end, end + SECTOR))) end += SECTOR;
    end = Math.min(end, was.length);
    await top.write(base + start, was.subarray(start, end));
    at = end;
  }
}
