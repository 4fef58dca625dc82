/**
 * blockdev-create's job (type 'create'): formats an image in the background
 * and concludes; QEMU gives it auto-dismiss off, so the client dismisses it.
 *
 * Drivers: file (a new host file of a size, optionally preallocated), rbd
 * (a new RBD image of a size and object size), qcow2
 * (formats an existing node, usually a file node), and raw (vdisk's
 * addition: sizes a node for use as a raw image; QEMU has nothing to do
 * there and lacks the branch). The work itself is src/block/create.ts,
 * which `vdisk img create` shares; this file is the QAPI side.
 */
import { type Preallocation, createHostFile, createRbdImage, formatNode } from '../block/create.js';
import { RBD_OPTIONS_MEMBERS } from '../block/drivers/index.js';
import type { RbdOptions } from '../block/drivers/rbd.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode } from '../block/node.js';
import { VdiskError } from '../errors.js';
import { type Type, any, bool, enumOf, int, str, struct, union } from '../qapi/schema.js';
import { Job } from './job.js';

/** BlockdevCreateOptions: a flat union on driver. */
export const BLOCKDEV_CREATE_OPTIONS: Type = union('BlockdevCreateOptions', { driver: enumOf('BlockdevDriver', ['file', 'qcow2', 'raw', 'rbd']) }, 'driver', {
  file: {
    filename: str,
    size: int('size'),
    '*preallocation': enumOf('PreallocMode', ['off', 'metadata', 'falloc', 'full']),
    '*nocow': bool,
    '*extent-size-hint': int('size'),
  },
  qcow2: {
    file: any,
    '*data-file': any,
    '*data-file-raw': bool,
    '*extended-l2': bool,
    size: int('size'),
    '*version': enumOf('BlockdevQcow2Version', ['v2', 'v3']),
    '*backing-file': str,
    '*backing-fmt': str,
    '*encrypt': any,
    '*cluster-size': int('size'),
    '*preallocation': enumOf('PreallocMode', ['off', 'metadata', 'falloc', 'full']),
    '*lazy-refcounts': bool,
    '*refcount-bits': int('int'),
    '*compression-type': enumOf('Qcow2CompressionType', ['zlib', 'zstd']),
  },
  raw: { file: any, size: int('size') },
  // BlockdevCreateOptionsRbd: location is BlockdevOptionsRbd (the rbd driver's own members), cluster-size the object size.
  rbd: { location: struct('BlockdevOptionsRbd', RBD_OPTIONS_MEMBERS), size: int('size'), '*cluster-size': int('size'), '*encrypt': any },
});

export class CreateJob extends Job {
  readonly type = 'create';

  constructor(
    id: string,
    private readonly graph: BlockGraph,
    private readonly options: Record<string, unknown>,
  ) {
    super({ id, autoDismiss: false });
    this.progressTotal = 1;
    // Refuse what can be refused before the job exists (QEMU checks these at submit, too).
    const o = options;
    if (o.driver === 'qcow2') {
      if (o['data-file'] !== undefined || o['data-file-raw']) throw new VdiskError('ENOTSUP', 'External data files are not supported by vdisk');
      if (o.encrypt !== undefined) throw new VdiskError('ENOTSUP', 'Encrypted images are not supported by vdisk');
      if (o['extended-l2']) throw new VdiskError('ENOTSUP', 'Extended L2 entries are not supported by vdisk');
      if (o['compression-type'] === 'zstd') throw new VdiskError('ENOTSUP', 'Compression type zstd is not supported by vdisk');
      if (o.preallocation !== undefined && o.preallocation !== 'off') throw new VdiskError('ENOTSUP', `preallocation=${o.preallocation} is not supported for qcow2 by vdisk`);
    }
    if (o.driver === 'file' && o.preallocation === 'metadata') throw new VdiskError('EINVAL', "Unsupported preallocation mode 'metadata'");
    if (o.driver === 'rbd') {
      // librbd's LUKS encryption is formatted by rbd_encryption_format, which vdisk does not do:
      // refused before the image exists rather than made unencrypted.
      if (o.encrypt !== undefined) throw new VdiskError('ENOTSUP', 'Encrypted RBD images are not supported by vdisk (create without encrypt)');
      // The schema checked location's members; a snapshot cannot be created, only opened.
      if ((o.location as RbdOptions).snapshot !== undefined) throw new VdiskError('EINVAL', "Can't use snapshot name for image creation");
    }
    if (o.driver !== 'file' && o.driver !== 'rbd' && typeof o.file !== 'string') throw new VdiskError('EINVAL', "Parameter 'file' expects the node-name of an existing node");
  }

  protected async run(): Promise<void> {
    const o = this.options;
    if (o.driver === 'file') {
      await createHostFile(o.filename as string, o.size as number, (o.preallocation as Preallocation | undefined) ?? 'off');
    } else if (o.driver === 'rbd') {
      await createRbdImage(o.location as RbdOptions, o.size as number, o['cluster-size'] as number | undefined, this.graph.objects);
    } else {
      await formatNode(this.node(o.file as string), o.driver as 'qcow2' | 'raw', {
        size: o.size as number,
        clusterSize: o['cluster-size'] as number | undefined,
        version: o.version === 'v2' ? 2 : 3,
        refcountBits: o['refcount-bits'] as number | undefined,
        lazyRefcounts: o['lazy-refcounts'] as boolean | undefined,
        backingFile: o['backing-file'] as string | undefined,
        backingFormat: o['backing-fmt'] as string | undefined,
      });
    }
    this.progressCurrent = 1;
  }

  private node(name: string): BlockNode {
    const node = this.graph.find(name);
    if (node.readOnly) throw new VdiskError('EROFS', `node '${name}' is read-only`);
    return node;
  }
}
