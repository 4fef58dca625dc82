/**
 * `vdisk img bitmap`: change the persistent dirty bitmaps of a qcow2 image,
 * as qemu-img 7.2's bitmap command does.
 *
 *   vdisk img bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
 *       [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJECTDEF]
 *       [--image-opts | -f FMT] FILENAME BITMAP
 *
 * The operations run in the order given, each through the same functions
 * as the QMP commands (src/block/bitmap-ops.ts), and stop at the first that
 * fails; whatever ran before stays done, because the image is closed (and
 * its bitmaps stored) either way, as qemu-img's is. --add makes a persistent
 * bitmap that records (a later --disable in the same call stops it), with
 * the node's default granularity unless -g says otherwise. --merge ORs
 * SOURCE into BITMAP; SOURCE is in the image itself or, with -b, in
 * SOURCE_FILE (opened read-only).
 *
 * The image is opened writable without its backing file and closed cleanly:
 * the qcow2 driver stores the bitmaps at close, which is where the changes
 * reach the disk (docs/design/qcow2.md). Every message is qemu-img's.
 */
import { addBitmap, clearBitmap, mergeBitmaps, removeBitmap, setBitmapEnabled } from '../../block/bitmap-ops.js';
import { BlockGraph } from '../../block/graph.js';
import { VdiskError } from '../../errors.js';
import { strtosz } from '../../io/parse.js';
import { parseOptionArg } from '../../qapi/keyval.js';
import { parseImgArgs } from './args.js';
import { IMAGE_FORMATS, type OpenedImage, openImage } from './image.js';

export const BITMAP_USAGE = `Usage: vdisk img bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)... [-b SOURCE_FILE [-F SOURCE_FMT]] [-g GRANULARITY] [--object OBJECTDEF] [--image-opts | -f FMT] FILENAME BITMAP

Operations, applied in the order given (at least one):
  --add             create BITMAP, persistent and recording (-g GRANULARITY: bytes per bit,
                    k/M/G suffixes; default the image's cluster size within 4k..64k)
  --remove          delete BITMAP
  --clear           reset every bit of BITMAP
  --enable          make BITMAP record writes
  --disable         stop BITMAP recording writes
  --merge SOURCE    OR bitmap SOURCE into BITMAP; SOURCE is in FILENAME, or with
                    -b SOURCE_FILE [-F SOURCE_FMT] in that image
Exit status 0 when every operation succeeded, 1 otherwise.
`;

const ACTIONS = ['add', 'remove', 'clear', 'enable', 'disable', 'merge'] as const;
type ActionName = (typeof ACTIONS)[number];

/** Object types QEMU 7.2 knows; qemu-img creates only a few of them (vdisk: secret). */
const QOM_TYPES = new Set([
  'authz-list', 'authz-listfile', 'authz-pam', 'authz-simple', 'can-bus', 'can-host-socketcan', 'colo-compare', 'cryptodev-backend',
  'cryptodev-backend-builtin', 'cryptodev-vhost-user', 'dbus-vmstate', 'filter-buffer', 'filter-dump', 'filter-mirror', 'filter-redirector',
  'filter-replay', 'filter-rewriter', 'input-barrier', 'input-linux', 'iothread', 'main-loop', 'memory-backend-epc', 'memory-backend-file',
  'memory-backend-memfd', 'memory-backend-ram', 'pef-guest', 'pr-manager-helper', 'qtest', 'rng-builtin', 'rng-egd', 'rng-random',
  'secret', 'secret_keyring', 'sev-guest', 's390-pv-guest', 'throttle-group', 'tls-creds-anon', 'tls-creds-psk', 'tls-creds-x509',
  'tls-cipher-suites', 'x-remote-object', 'x-vfio-user-server',
]);

export async function bitmapCommand(argv: string[]): Promise<number> {
  const spec = {
    add: 'bool', remove: 'bool', clear: 'bool', enable: 'bool', disable: 'bool', merge: 'multi',
    g: 'value', granularity: 'value', b: 'value', 'source-file': 'value', F: 'value', 'source-format': 'value',
    f: 'value', object: 'multi', 'image-opts': 'bool',
  } as const;
  const { positionals, sequence } = parseImgArgs(argv, spec, BITMAP_USAGE);
  const actions: Array<{ op: ActionName; source?: string }> = [];
  let granularity = 0n;
  let fmt: string | undefined;
  let srcFmt: string | undefined;
  let srcFile: string | undefined;
  let imageOpts = false;
  // Options take effect as getopt hands them over: a bad -g or --object stops at once.
  for (const { name, value } of sequence) {
    if ((ACTIONS as readonly string[]).includes(name)) {
      actions.push(name === 'merge' ? { op: 'merge', source: value as string } : { op: name as ActionName });
    } else if (name === 'g' || name === 'granularity') {
      granularity = parseGranularity(value as string);
    } else if (name === 'b' || name === 'source-file') {
      srcFile = value as string;
    } else if (name === 'F' || name === 'source-format') {
      srcFmt = value as string;
    } else if (name === 'f') {
      fmt = value as string;
    } else if (name === 'object') {
      checkObject(value as string);
    } else if (name === 'image-opts') {
      imageOpts = true;
    }
  }
  const has = (op: ActionName) => actions.some((a) => a.op === op);
  if (actions.length === 0) throw new VdiskError('EINVAL', 'Need at least one of --add, --remove, --clear, --enable, --disable, or --merge');
  if (granularity !== 0n && !has('add')) throw new VdiskError('EINVAL', 'granularity only supported with --add');
  if (srcFmt !== undefined && srcFile === undefined) throw new VdiskError('EINVAL', '-F only supported with -b');
  if (srcFile !== undefined && !has('merge')) throw new VdiskError('EINVAL', 'Merge bitmap source file only supported with --merge');
  if (positionals.length !== 2) throw new VdiskError('EINVAL', 'Expecting filename and bitmap name');
  const [filename, name] = positionals;
  if (imageOpts && fmt !== undefined) throw new VdiskError('EINVAL', '--image-opts and --format are mutually exclusive');

  // One graph for both images, as QEMU has one: the merge names its source by node name.
  const graph = new BlockGraph();
  try {
    const img = await open(graph, filename, { format: fmt, imageOpts, writable: true });
    const src = srcFile === undefined ? img : await open(graph, srcFile, { format: srcFmt, imageOpts: false, writable: false });
    const node = img.node.nodeName;
    for (const act of actions) {
      try {
        switch (act.op) {
          case 'add':
            // qemu-img hands the granularity over as uint32_t: only its low 32 bits count, 0 (no -g) is the default.
            await addBitmap(graph, node, name, { granularity: granularity === 0n ? undefined : Number(granularity & 0xffffffffn), persistent: true });
            break;
          case 'remove':
            await removeBitmap(graph, node, name);
            break;
          case 'clear':
            await clearBitmap(graph, node, name);
            break;
          case 'enable':
          case 'disable':
            await setBitmapEnabled(graph, node, name, act.op === 'enable');
            break;
          case 'merge':
            await mergeBitmaps(graph, node, name, [{ node: src.node.nodeName, name: act.source! }]);
            break;
        }
      } catch (err) {
        if (!(err instanceof VdiskError)) throw err;
        // qemu-img prints QEMU's hint on the next line (QMP never sends it).
        const hint = err.hint === undefined ? '' : `\n${err.hint}`;
        throw new VdiskError(err.errno, `Operation ${act.op} on bitmap ${name} failed: ${err.message}${hint}`);
      }
    }
  } finally {
    await graph.closeAll();
  }
  return 0;
}

/** -g as qemu-img's cvtnum reads it: a size with an optional k/M/G/T/P/E suffix, 0..INT64_MAX. */
function parseGranularity(text: string): bigint {
  const r = strtosz(text);
  if ('error' in r) {
    if (r.error === 'ERANGE') throw new VdiskError('EINVAL', `Invalid granularity specified. Must be between 0 and ${2n ** 63n - 1n}.`);
    throw new VdiskError(
      'EINVAL',
      'Invalid granularity specified. You may use k, M, G, T, P or E suffixes for\nvdisk: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
  if (r.warning) process.stderr.write(`vdisk: warning: ${r.warning}\n`);
  return r.value;
}

/**
 * --object: qemu-img creates objects for encrypted images (secrets). vdisk
 * opens no encrypted image, so it checks a secret as QEMU does and keeps
 * nothing; other types are refused with QEMU's texts.
 */
function checkObject(text: string): void {
  const trimmed = text.trimStart();
  const opts = (trimmed.startsWith('{') ? parseOptionArg(text, '--object') : parseOptionArg(impliedType(text), '--object')) as Record<string, unknown>;
  const type = opts['qom-type'];
  if (typeof type !== 'string') throw new VdiskError('EINVAL', "Parameter 'qom-type' is missing");
  if (!QOM_TYPES.has(type)) throw new VdiskError('EINVAL', `Parameter 'qom-type' does not accept value '${type}'`);
  if (opts.id === undefined) throw new VdiskError('EINVAL', "Parameter 'id' is missing");
  if (type !== 'secret') throw new VdiskError('EINVAL', `invalid object type: ${type}`);
  if (opts.data === undefined && opts.file === undefined) throw new VdiskError('EINVAL', "Either 'file' or 'data' must be provided");
}

/** keyval's implied key: a first item without '=' is the qom-type. */
function impliedType(text: string): string {
  const first = text.split(',')[0];
  return first.includes('=') ? text : `qom-type=${text}`;
}

/**
 * Opens an image as qemu-img's img_open does for this command (no backing
 * file; the target writable), with its messages: "Could not open 'NAME': ..."
 * around the reason, the lock conflict in QEMU's words, and the warning for
 * a raw image whose format was probed.
 */
async function open(
  graph: BlockGraph,
  filename: string,
  o: { format: string | undefined; imageOpts: boolean; writable: boolean },
): Promise<OpenedImage> {
  const fail = (reason: string) => new VdiskError('EINVAL', `Could not open '${filename}': ${reason}`);
  if (o.format !== undefined && !IMAGE_FORMATS.includes(o.format)) throw fail(`Unknown driver '${o.format}'`);
  let img: OpenedImage;
  try {
    img = await openImage(filename, { format: o.format, imageOpts: o.imageOpts, readOnly: !o.writable, noBacking: true, graph, anonymous: true });
  } catch (err) {
    if (!(err instanceof VdiskError)) throw err;
    throw fail(qemuOpenReason(err));
  }
  if (o.writable && img.node.readOnly) throw fail('Block node is read-only');
  if (o.writable && o.format === undefined && !o.imageOpts && !filename.startsWith('json:') && img.format === 'raw') {
    process.stderr.write(
      `WARNING: Image format was not specified for '${filename}' and probing guessed raw.\n` +
        '         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n' +
        "         Specify the 'raw' format explicitly to remove the restrictions.\n",
    );
  }
  return img;
}

/** Why an open failed, in QEMU's words where vdisk's differ. */
function qemuOpenReason(err: VdiskError): string {
  const lock = /^Failed to get (shared )?"([^"]+)" lock on '(.*)': /.exec(err.message);
  if (err.code === 'VDISK_LOCKED' && lock) return `Failed to get ${lock[1] ?? ''}"${lock[2]}" lock\nIs another process using the image [${lock[3]}]?`;
  if (/bad magic: not a qcow2 image/.test(err.message)) return 'Image is not in qcow2 format';
  return err.message;
}
