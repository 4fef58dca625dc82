/**
 * `vdisk img create`: a new raw or qcow2 image, with qemu-img's syntax.
 *
 *   vdisk img create [-q] [-f FMT] [-b BACKING -F BACKING_FMT] [-u] [-o OPTIONS] FILENAME [SIZE]
 *
 * The size may be left out when there is a backing file: the new image then
 * has the backing file's size (opening it, unless -u).
 */
import { type ImageFileSpec, createImageFile } from '../../block/create.js';
import { isRbdName, resolveBackingName } from '../../block/image-name.js';
import { VdiskError } from '../../errors.js';
import { parseSize } from '../../qapi/schema.js';
import { checkFormat, openImage, parseImageSize } from './image.js';
import { type Flags, parseImgArgs } from './args.js';

export const CREATE_USAGE = `Usage: vdisk img create [-q] [-f FMT] [-b BACKING -F BACKING_FMT] [-u] [-o OPTIONS] FILENAME [SIZE]

  -f FMT        raw (default) or qcow2
  -b BACKING    backing file (qcow2); -F its format (required with -b)
  -u            do not open the backing file (SIZE is then required)
  -o OPTIONS    comma list: cluster_size, compat (0.10|1.1|v2|v3), lazy_refcounts,
                refcount_bits, preallocation (raw: off|falloc|full), backing_file,
                backing_fmt, size
  SIZE          bytes, or with a suffix k, M, G, T, P, E
`;

/** Creation options after -o, -b, -F and SIZE are merged; the last two are only checked (vdisk supports one value of each). */
export interface CreateSpec extends ImageFileSpec {
  extendedL2?: boolean;
  compressionType?: string;
}

const OPTION_KEYS: Record<string, string[]> = {
  raw: ['size', 'preallocation'],
  qcow2: ['size', 'compat', 'backing_file', 'backing_fmt', 'cluster_size', 'preallocation', 'lazy_refcounts', 'refcount_bits', 'compression_type', 'extended_l2', 'encryption', 'data_file', 'data_file_raw'],
};

export async function createCommand(argv: string[]): Promise<number> {
  const { flags, positionals } = parseImgArgs(argv, { f: 'value', b: 'value', F: 'value', o: 'multi', u: 'bool', q: 'bool' }, CREATE_USAGE);
  if (positionals.length < 1 || positionals.length > 2) throw new VdiskError('EINVAL', `Expecting image file name\n${CREATE_USAGE}`);
  const spec = buildSpec((flags.f as string | undefined) ?? 'raw', flags, positionals[0], positionals[1]);
  await createImage(spec, { openBacking: !flags.u });
  if (!flags.q) process.stdout.write(`Formatting '${spec.filename}', ${describe(spec)}\n`);
  return 0;
}

/** The creation spec of convert's target: -o, -B and -F as create's -o, -b and -F; the sources' total size unless -o says. */
export function createCommandSpec(flags: Flags, format: string, filename: string, size: number): CreateSpec {
  const spec = buildSpec(format, { o: flags.o, b: flags.B, F: flags.F }, filename, undefined);
  spec.size ??= size;
  return spec;
}

function buildSpec(format: string, flags: Flags, filename: string, sizeText: string | undefined): CreateSpec {
  checkFormat(format);
  const spec: CreateSpec = { format, filename };
  const options = parseOptions((flags.o as string[] | undefined) ?? [], format, filename);
  const at = (msg: string) => new VdiskError('EINVAL', `${filename}: ${msg}`);
  for (const [key, value] of options) {
    switch (key) {
      case 'size':
        spec.size = parseImageSize(value);
        break;
      case 'cluster_size': {
        const n = parseSize(value);
        if (n === undefined) throw at(`Parameter 'cluster_size' expects a size`);
        spec.clusterSize = n;
        break;
      }
      case 'compat':
        if (value === '0.10' || value === 'v2') spec.compat = '0.10';
        else if (value === '1.1' || value === 'v3') spec.compat = '1.1';
        else throw at(`Invalid parameter '${value}'`);
        break;
      case 'lazy_refcounts':
        spec.lazyRefcounts = onOff(value, key, filename);
        break;
      case 'extended_l2':
        spec.extendedL2 = onOff(value, key, filename);
        break;
      case 'refcount_bits': {
        const n = Number(value);
        if (!/^\d+$/.test(value)) throw at(`Parameter 'refcount_bits' expects a number`);
        spec.refcountBits = n;
        break;
      }
      case 'preallocation':
        if (!['off', 'metadata', 'falloc', 'full'].includes(value)) throw at(`Parameter 'preallocation' does not accept value '${value}'`);
        spec.preallocation = value as CreateSpec['preallocation'];
        break;
      case 'backing_file':
        spec.backingFile = value;
        break;
      case 'backing_fmt':
        spec.backingFormat = value;
        break;
      case 'compression_type':
        spec.compressionType = value;
        break;
      case 'encryption':
        if (onOff(value, key, filename)) throw at('Encrypted images are not supported by vdisk');
        break;
      case 'data_file':
      case 'data_file_raw':
        throw at('External data files are not supported by vdisk');
    }
  }
  if (flags.b !== undefined) spec.backingFile = flags.b as string;
  if (flags.F !== undefined) spec.backingFormat = flags.F as string;
  if (sizeText !== undefined) spec.size = parseImageSize(sizeText);
  if (spec.backingFile !== undefined && format !== 'qcow2') throw at(`Backing file not supported for file format '${format}'`);
  if (spec.backingFile !== undefined && spec.backingFormat === undefined) throw at('Backing file specified without backing format');
  if (spec.backingFormat !== undefined) checkFormat(spec.backingFormat);
  if (spec.extendedL2) throw at('Extended L2 entries are not supported by vdisk');
  if (spec.compressionType !== undefined && spec.compressionType !== 'zlib') throw at(`Compression type '${spec.compressionType}' is not supported (only zlib)`);
  if (format === 'qcow2' && (spec.preallocation === 'falloc' || spec.preallocation === 'full' || spec.preallocation === 'metadata')) {
    throw at(`preallocation=${spec.preallocation} is not supported for qcow2 by vdisk (use preallocation=off)`);
  }
  if (format === 'raw' && spec.preallocation === 'metadata') throw at("Unsupported preallocation mode 'metadata'");
  return spec;
}

/** Splits -o lists ("a=1,b=2", repeatable; ",," is a literal comma) and checks the keys. */
function parseOptions(lists: string[], format: string, filename: string): Array<[string, string]> {
  const out: Array<[string, string]> = [];
  for (const list of lists) {
    for (const item of list.replace(/,,/g, '\0').split(',')) {
      if (item === '') continue;
      const eq = item.indexOf('=');
      const key = eq < 0 ? item : item.slice(0, eq);
      const value = (eq < 0 ? 'on' : item.slice(eq + 1)).replace(/\0/g, ',');
      if (key === 'help' || key === '?') {
        throw new VdiskError('EINVAL', `Supported options for ${format}: ${OPTION_KEYS[format].join(', ')}`);
      }
      // cluster_size on raw is the RBD protocol's own option (the object size), as qemu-img has it.
      const rbdObjectSize = key === 'cluster_size' && format === 'raw' && isRbdName(filename);
      if (!OPTION_KEYS[format].includes(key) && !rbdObjectSize) throw new VdiskError('EINVAL', `${filename}: Invalid parameter '${key}'`);
      out.push([key, value]);
    }
  }
  return out;
}

function onOff(value: string, key: string, filename: string): boolean {
  if (value === 'on' || value === 'true' || value === 'yes') return true;
  if (value === 'off' || value === 'false' || value === 'no') return false;
  throw new VdiskError('EINVAL', `${filename}: Parameter '${key}' expects 'on' or 'off'`);
}

/** The "fmt=... size=..." part of qemu-img's "Formatting" line. */
function describe(s: CreateSpec): string {
  if (s.format === 'raw') return `fmt=raw size=${s.size}${s.preallocation ? ` preallocation=${s.preallocation}` : ''}`;
  const parts = [`fmt=qcow2`, `cluster_size=${s.clusterSize ?? 65536}`, 'extended_l2=off', 'compression_type=zlib', `size=${s.size}`];
  if (s.compat) parts.push(`compat=${s.compat}`);
  if (s.backingFile !== undefined) parts.push(`backing_file=${s.backingFile}`, `backing_fmt=${s.backingFormat}`);
  parts.push(`lazy_refcounts=${s.lazyRefcounts ? 'on' : 'off'}`, `refcount_bits=${s.refcountBits ?? 16}`);
  return parts.join(' ');
}

/**
 * Creates the image file (src/block/create.ts); with openBacking, a missing
 * size is first taken from the backing file, opened as qemu-img opens it.
 * Exported for convert (-O) and the library.
 */
export async function createImage(spec: CreateSpec, options: { openBacking: boolean }): Promise<void> {
  if (spec.backingFile !== undefined && options.openBacking) {
    // The backing file is resolved relative to the new image, as it will be when the image is opened.
    const resolved = resolveBackingName(spec.filename, spec.backingFile);
    let backing;
    try {
      backing = await openImage(resolved, { format: spec.backingFormat, readOnly: true, forceShare: true });
    } catch (err) {
      throw new VdiskError('EINVAL', `${spec.filename}: ${(err as Error).message}\nCould not open backing image.`);
    }
    spec.size ??= backing.node.size;
    await backing.close();
  }
  await createImageFile(spec);
}
