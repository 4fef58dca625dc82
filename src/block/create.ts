/**
 * Image creation, written once for every front end:
 *
 * - `vdisk img create` and convert's target (src/cli/img/create.ts parses
 *   qemu-img's -f/-o/-b/-F, opens the backing file for its size, prints the
 *   "Formatting" line) and drive-backup's new target (src/backup) call
 *   createImageFile: an image at a path, on an NBD export or a new RBD image
 *   (rbd:pool/image);
 * - the blockdev-create job (src/jobs/create.ts takes QAPI options) calls
 *   createHostFile for driver=file, createRbdImage for driver=rbd and
 *   formatNode for qcow2 and raw.
 *
 * Both lay qcow2 out with createQcow2 and preallocate with preallocate(), so
 * the two paths differ only where QEMU's do: qemu-img creates the file and
 * its format in one step, blockdev-create in two jobs on two nodes.
 */
import fs from 'node:fs';
import { VdiskError } from '../errors.js';
import { Op, native } from '../native.js';
import { FileNode } from './drivers/file.js';
import { NbdClientNode } from './drivers/nbd.js';
import { RbdNode, type RbdOptions, isRbdName, parseRbdFilename, rbdConnect, rbdImageSpec } from './drivers/rbd.js';
import { isFailure, rbdAddon, rbdError } from './drivers/rbd-native.js';
import type { ObjectRegistry } from '../objects/registry.js';
import { type Qcow2CreateOptions, checkCreateOptions, createQcow2 } from './drivers/qcow2/create.js';
import { isNbdUri } from './image-name.js';
import type { BlockNode } from './node.js';

/** PreallocMode (qapi/block-core.json). */
export type Preallocation = 'off' | 'metadata' | 'falloc' | 'full';

/** An image to create at a path or an NBD URI, in qemu-img create's terms. */
export interface ImageFileSpec {
  format: string;
  filename: string;
  /** Required by createImageFile; a front end may fill it from the backing file first. */
  size?: number;
  clusterSize?: number;
  compat?: '0.10' | '1.1';
  lazyRefcounts?: boolean;
  refcountBits?: number;
  preallocation?: Preallocation;
  backingFile?: string;
  backingFormat?: string;
}

/**
 * Creates the image: a host file (made or emptied) or an existing NBD
 * export, as raw (sized, optionally preallocated) or qcow2 (laid out).
 * Errors are qemu-img's, prefixed with the file name.
 */
export async function createImageFile(spec: ImageFileSpec): Promise<void> {
  const at = (msg: string) => new VdiskError('EINVAL', `${spec.filename}: ${msg}`);
  if (spec.size === undefined) throw at('Image creation needs a size parameter');
  const qcow2Options: Qcow2CreateOptions = {
    size: spec.size,
    clusterSize: spec.clusterSize,
    version: spec.compat === '0.10' ? 2 : 3,
    refcountBits: spec.refcountBits,
    lazyRefcounts: spec.lazyRefcounts,
    backingFile: spec.backingFile,
    backingFormat: spec.backingFormat,
  };
  // Refuse bad options before the file exists, so a refused create leaves nothing behind.
  if (spec.format === 'qcow2') {
    try {
      checkCreateOptions(qcow2Options);
    } catch (err) {
      throw at((err as Error).message);
    }
  }

  if (isNbdUri(spec.filename)) return createOnNbd(spec.filename, spec.format, spec.size, qcow2Options, at);
  if (isRbdName(spec.filename)) return createOnRbd(spec, qcow2Options, at);
  let fd: number;
  try {
    // No O_TRUNC: the file is emptied only once FileNode has its lock, so an image in use is left alone.
    fd = fs.openSync(spec.filename, fs.constants.O_RDWR | fs.constants.O_CREAT, 0o644);
  } catch (err) {
    throw at(`Could not create '${spec.filename}': ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'No such file or directory' : (err as Error).message}`);
  }
  fs.closeSync(fd);
  const file = await FileNode.open({ nodeName: 'create', filename: spec.filename });
  try {
    if (spec.format === 'raw') {
      await file.truncate(0);
      await file.truncate(spec.size);
      if (spec.preallocation === 'falloc' || spec.preallocation === 'full') await preallocateFile(spec.filename, spec.size, spec.preallocation);
    } else {
      await createQcow2(file, qcow2Options);
    }
    await file.flush();
  } catch (err) {
    throw err instanceof VdiskError && !err.message.startsWith(spec.filename) ? at(err.message) : err;
  } finally {
    await file.close();
  }
}

/**
 * Creating on an NBD export, as QEMU's generic create for a protocol that
 * cannot make files: the export must already be big enough (it cannot
 * grow); raw needs nothing more, qcow2 is laid out inside the export.
 */
async function createOnNbd(uri: string, format: string, size: number, qcow2Options: Qcow2CreateOptions, at: (msg: string) => VdiskError): Promise<void> {
  let node: NbdClientNode;
  try {
    node = await NbdClientNode.fromUri(uri, { nodeName: 'create' });
  } catch (err) {
    throw at(`Could not open '${uri}': ${(err as Error).message}`);
  }
  try {
    if (size > node.size) throw at('Cannot grow NBD nodes');
    if (format === 'qcow2') await createQcow2(node, { ...qcow2Options, keepFileSize: true });
    await node.flush();
  } catch (err) {
    throw err instanceof VdiskError && !err.message.startsWith(uri) ? at(err.message) : err;
  } finally {
    await node.close();
  }
}

/**
 * qemu-img create on rbd:pool/image: a new RBD image (an existing one is an error, as in QEMU).
 * raw gets the whole size and -o cluster_size sets the object size (QEMU's rbd create option);
 * qcow2 starts from an empty image the layout grows, as QEMU's protocol create with size 0.
 */
async function createOnRbd(spec: ImageFileSpec, qcow2Options: Qcow2CreateOptions, at: (msg: string) => VdiskError): Promise<void> {
  const location = parseRbdFilename(spec.filename);
  if (location.snapshot !== undefined) throw at("Can't use snapshot name for image creation");
  const raw = spec.format === 'raw';
  if (raw && spec.preallocation !== undefined && spec.preallocation !== 'off') throw at(`preallocation=${spec.preallocation} is not supported for RBD images by vdisk`);
  try {
    await createRbdImage(location, raw ? spec.size! : 0, raw ? spec.clusterSize : undefined, undefined);
  } catch (err) {
    throw at((err as Error).message);
  }
  if (raw) return;
  const node = await RbdNode.open(location, { nodeName: 'create', readOnly: false, direct: false, objects: undefined });
  try {
    await createQcow2(node, qcow2Options);
    await node.flush();
  } catch (err) {
    throw err instanceof VdiskError && !err.message.startsWith(spec.filename) ? at(err.message) : err;
  } finally {
    await node.close();
  }
}

/**
 * blockdev-create driver=rbd (and img create on rbd:): a new image of `size` bytes. The
 * cluster size is the object size (librbd's order); left out, librbd's default (4 MiB).
 */
export async function createRbdImage(location: RbdOptions, size: number, clusterSize: number | undefined, objects: ObjectRegistry | undefined): Promise<void> {
  let order = 0;
  if (clusterSize !== undefined) {
    order = Math.log2(clusterSize);
    // QEMU's words; librbd takes objects of 4 KiB to 32 MiB.
    if (!Number.isInteger(order)) throw new VdiskError('EINVAL', 'obj size needs to be power of 2');
    if (order < 12) throw new VdiskError('EINVAL', 'obj size too small');
    if (order > 25) throw new VdiskError('EINVAL', 'obj size too big (at most 32 MiB)');
  }
  const r = await rbdAddon().create(rbdConnect(location, false, objects), location.pool, location.namespace ?? null, location.image, size, order);
  if (isFailure(r)) {
    if (r.errno === -17) throw new VdiskError('EEXIST', `error rbd create: RBD image '${rbdImageSpec(location)}' already exists`);
    throw rbdError(r.errno, `error rbd create (${r.stage}) of '${rbdImageSpec(location)}'`);
  }
}

/** blockdev-create driver=file: creates (or empties) a host file of a size; falloc/full also reserve its blocks. */
export async function createHostFile(filename: string, size: number, preallocation: Preallocation): Promise<void> {
  let fd: number;
  try {
    fd = fs.openSync(filename, fs.constants.O_RDWR | fs.constants.O_CREAT | fs.constants.O_TRUNC, 0o644);
  } catch (err) {
    throw new VdiskError('EIO', `Could not create '${filename}': ${(err as Error).message}`);
  }
  try {
    fs.ftruncateSync(fd, size);
    if (preallocation === 'falloc' || preallocation === 'full') await preallocate(fd, size, preallocation);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * blockdev-create driver=qcow2 or raw: formats an existing node. qcow2 is
 * laid out on it; raw (vdisk's addition, QEMU has no raw create) only gets
 * the size.
 */
export async function formatNode(node: BlockNode, format: 'qcow2' | 'raw', options: Qcow2CreateOptions): Promise<void> {
  if (format === 'qcow2') {
    await createQcow2(node, options);
    return;
  }
  await node.truncate(options.size);
  await node.flush();
}

async function preallocateFile(filename: string, size: number, mode: 'falloc' | 'full'): Promise<void> {
  const fd = fs.openSync(filename, 'r+');
  try {
    await preallocate(fd, size, mode);
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

/**
 * falloc: reserve the blocks (fallocate), or write zeroes on a file system
 * without fallocate; full: write zeroes, so the space is really there.
 */
async function preallocate(fd: number, size: number, mode: 'falloc' | 'full'): Promise<void> {
  if (mode === 'falloc' && (await native.submit(Op.FALLOCATE, fd, null, 0, size, 0, 0)) === 0) return;
  const zeroes = Buffer.alloc(Math.min(size, 4 * 1024 * 1024));
  for (let off = 0; off < size; off += zeroes.length) fs.writeSync(fd, zeroes, 0, Math.min(zeroes.length, size - off), off);
}
