/**
 * `vdisk img resize`: a new virtual size, absolute or relative.
 *
 *   vdisk img resize [-f FMT] [-q] [--shrink] FILENAME [+|-]SIZE
 *
 * Shrinking needs --shrink, as in qemu-img, because it deletes whatever lies
 * past the new end.
 */
import { VdiskError } from '../../errors.js';
import { parseImgArgs } from './args.js';
import { openImage, parseImageSize } from './image.js';

export const RESIZE_USAGE = `Usage: vdisk img resize [-f FMT] [-q] [--shrink] FILENAME [+|-]SIZE
`;

export async function resizeCommand(argv: string[]): Promise<number> {
  const { flags, positionals } = parseImgArgs(argv, { f: 'value', q: 'bool', shrink: 'bool', U: 'bool', preallocation: 'value' }, RESIZE_USAGE);
  if (positionals.length !== 2) throw new VdiskError('EINVAL', `Expecting an image file name and a size\n${RESIZE_USAGE}`);
  const [filename, sizeText] = positionals;
  if (flags.preallocation !== undefined && flags.preallocation !== 'off') {
    throw new VdiskError('ENOTSUP', `Unsupported preallocation mode '${flags.preallocation}' (vdisk resizes with preallocation=off)`);
  }
  const relative = sizeText.startsWith('+') ? 1 : sizeText.startsWith('-') ? -1 : 0;
  const amount = parseImageSize(relative ? sizeText.slice(1) : sizeText);
  const img = await openImage(filename, { format: flags.f as string | undefined, noBacking: true });
  try {
    const current = img.node.size;
    const size = relative ? current + relative * amount : amount;
    if (size <= 0) throw new VdiskError('EINVAL', 'New image size must be positive');
    if (size < current && !flags.shrink) {
      throw new VdiskError(
        'EINVAL',
        "Use the --shrink option to perform a shrink operation.\nvdisk: warning: Shrinking an image will delete all data beyond the shrunken image's end. Before performing such an operation, make sure there is no important data there.",
      );
    }
    await img.node.truncate(size);
    await img.node.flush();
  } finally {
    await img.close();
  }
  if (!flags.q) process.stdout.write('Image resized.\n');
  return 0;
}
