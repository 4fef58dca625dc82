/**
 * `vdisk img info`: what an image is, in qemu-img's words and JSON fields.
 *
 *   vdisk img info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILENAME
 *
 * The image is opened read-only without its backing file (info must work on
 * an image whose backing file is missing); --backing-chain then opens each
 * backing file by the name and format its overlay records.
 */
import { formatSpecificText, imageInfo as nodeImageInfo } from '../../block/info.js';
import { VdiskError } from '../../errors.js';
import { parseImgArgs } from './args.js';
import { humanSize, openImage, qemuJson } from './image.js';

export const INFO_USAGE = `Usage: vdisk img info [-f FMT] [--output=human|json] [--backing-chain] [-U] FILENAME
`;

/** ImageInfo as qemu-img 7.2 prints it (member order included). */
export interface ImageInfo {
  'backing-filename-format'?: string;
  'virtual-size': number;
  filename: string;
  'cluster-size'?: number;
  format: string;
  'actual-size'?: number;
  'format-specific'?: { type: string; data: Record<string, unknown> };
  'full-backing-filename'?: string;
  'backing-filename'?: string;
  'dirty-flag': boolean;
  /** vdisk: a raw image's persistent bitmaps (its sidecar). */
  'x-bitmaps'?: Array<Record<string, unknown>>;
}

export async function infoCommand(argv: string[]): Promise<number> {
  const { flags, positionals } = parseImgArgs(
    argv,
    { f: 'value', output: 'value', 'backing-chain': 'bool', U: 'bool', 'force-share': 'bool', 'image-opts': 'bool' },
    INFO_USAGE,
  );
  if (positionals.length !== 1) throw new VdiskError('EINVAL', `Expecting one image file name\n${INFO_USAGE}`);
  const output = outputFormat(flags.output as string | undefined);
  const forceShare = Boolean(flags.U || flags['force-share']);
  const chain: ImageInfo[] = [];
  let filename: string | undefined = positionals[0];
  let format = flags.f as string | undefined;
  const seen = new Set<string>();
  while (filename !== undefined) {
    if (seen.has(filename)) throw new VdiskError('EINVAL', `Backing file '${filename}' creates an infinite loop.`);
    seen.add(filename);
    const info = await imageInfo(filename, format, forceShare);
    chain.push(info);
    if (!flags['backing-chain']) break;
    filename = info['full-backing-filename'];
    format = info['backing-filename-format'];
  }
  if (output === 'json') {
    const doc = flags['backing-chain'] ? chain : chain[0];
    process.stdout.write(qemuJson(doc) + '\n');
  } else {
    process.stdout.write(chain.map(humanInfo).join('\n'));
  }
  return 0;
}

export function outputFormat(value: string | undefined): 'human' | 'json' {
  if (value === undefined || value === 'human') return 'human';
  if (value === 'json') return 'json';
  throw new VdiskError('EINVAL', "--output must be used with human or json as argument.");
}

export async function imageInfo(filename: string, format: string | undefined, forceShare: boolean): Promise<ImageInfo> {
  const img = await openImage(filename, { format, readOnly: true, forceShare, noBacking: true });
  try {
    return nodeImageInfo(img.node, filename) as ImageInfo;
  } finally {
    await img.close();
  }
}

function humanInfo(i: ImageInfo): string {
  const lines = [
    `image: ${i.filename}`,
    `file format: ${i.format}`,
    `virtual size: ${humanSize(i['virtual-size'])} (${i['virtual-size']} bytes)`,
    // A node with no host file below it (an NBD export) has no size on disk to tell.
    `disk size: ${i['actual-size'] === undefined ? 'unavailable' : humanSize(i['actual-size'])}`,
  ];
  if (i['cluster-size'] !== undefined) lines.push(`cluster_size: ${i['cluster-size']}`);
  if (i['backing-filename'] !== undefined) {
    const full = i['full-backing-filename'];
    lines.push(`backing file: ${i['backing-filename']}${full !== undefined && full !== i['backing-filename'] ? ` (actual path: ${full})` : ''}`);
    if (i['backing-filename-format'] !== undefined) lines.push(`backing file format: ${i['backing-filename-format']}`);
  }
  const fs = i['format-specific'];
  let text = lines.join('\n') + '\n';
  if (fs) text += `Format specific information:\n${formatSpecificText(fs.data)}`;
  // vdisk's own: a raw image's persistent bitmaps, kept in a sidecar file qemu-img does not know.
  const own = i['x-bitmaps'];
  if (own) text += `Persistent bitmaps (vdisk sidecar ${i.filename}.vdisk-bitmaps):\n${formatSpecificText(own as unknown as Record<string, unknown>)}`;
  return text;
}
