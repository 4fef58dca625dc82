/**
 * Typed access to native/rbd.c (build/Release/vdisk_rbd.node), loaded the first time an RBD
 * image is opened or created: vdisk starts and serves every other driver on a machine without
 * librbd, and an rbd node there fails with an error that says what to install.
 */
import { createRequire } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { VdiskError, errnoError } from '../../errors.js';

/** How to reach the cluster: a conf file, the client id, then name=value settings in order. */
export interface RbdConnect {
  conf: string | null;
  /** The id without "client." (null: admin). */
  user: string | null;
  /** rados_conf_set pairs: key, auth_client_required, mon_host, rbd_cache. */
  settings: Array<[string, string]>;
}

/** A blocking step that failed: the negative errno and the librados/librbd call. */
export interface RbdFailure {
  errno: number;
  stage: string;
}

export interface RbdOpened {
  handle: object;
  size: number;
  objectSize: number;
  features: number;
}

export const RbdAio = { READ: 1, WRITE: 2, FLUSH: 3, DISCARD: 4, WRITE_ZEROES: 5 } as const;
/** rbd_aio_write_zeroes flag: zero the range and keep it allocated (no unmap allowed). */
export const RBD_WRITE_ZEROES_FLAG_THICK_PROVISION = 1;
/** RBD_FEATURE_EXCLUSIVE_LOCK (rbd/features.h). */
export const RBD_FEATURE_EXCLUSIVE_LOCK = 1 << 2;

export interface RbdAddon {
  open(connect: RbdConnect, pool: string, namespace: string | null, image: string, snapshot: string | null, readOnly: boolean): Promise<RbdOpened | RbdFailure>;
  create(connect: RbdConnect, pool: string, namespace: string | null, image: string, size: number, order: number): Promise<number | RbdFailure>;
  close(handle: object): Promise<number | RbdFailure>;
  /** The new size. */
  resize(handle: object, size: number): Promise<number | RbdFailure>;
  /** Allocated extents in [offset, offset + length) as flat [offset, length, ...] pairs. */
  allocated(handle: object, offset: number, length: number): Promise<number[] | RbdFailure>;
  lockAcquire(handle: object): Promise<number | RbdFailure>;
  lockRelease(handle: object): Promise<number | RbdFailure>;
  /** The clients holding the exclusive lock ("client.4123 ..."), empty when nobody does. */
  lockOwners(handle: object): Promise<string[] | RbdFailure>;
  /** Breaks the exclusive lock, blocklisting its holders first; the holders it broke (empty: nobody held it). */
  lockBreak(handle: object): Promise<string[] | RbdFailure>;
  /** One librbd asynchronous request; resolves to a result >= 0 or -errno. */
  aio(op: number, handle: object, buf: Buffer | null, offset: number, length: number, flags: number): Promise<number>;
}

let addon: RbdAddon | undefined;

export function rbdAddon(): RbdAddon {
  if (addon) return addon;
  const here = path.dirname(fileURLToPath(import.meta.url));
  // dist/block/drivers/ and src/block/drivers/ both sit three levels below the package root.
  const file = path.join(here, '..', '..', '..', 'build', 'Release', 'vdisk_rbd.node');
  try {
    addon = createRequire(import.meta.url)(file) as RbdAddon;
  } catch (err) {
    throw new VdiskError(
      'ENOTSUP',
      `driver 'rbd' needs vdisk's RBD addon (${file}), which is built where librbd's headers are: ` +
        `install librbd-dev and librados-dev, then run 'npm run build' (${(err as Error).message})`,
    );
  }
  return addon;
}

export function isFailure(r: unknown): r is RbdFailure {
  return typeof r === 'object' && r !== null && 'errno' in r && 'stage' in r;
}

const ERRNO_NAMES = new Map<number, string>(Object.entries(os.constants.errno).map(([name, n]) => [n, name]));

/** The errno's name (ETIMEDOUT, EBLOCKLISTED shows as ESHUTDOWN): what Ceph's own tools print too. */
export function errnoName(negErrno: number): string {
  return ERRNO_NAMES.get(-negErrno) ?? `errno ${-negErrno}`;
}

/**
 * A VdiskError for a failed librados/librbd call: the class from the errno (EIO for errnos
 * vdisk's protocols have no name for), the message with the errno's own name.
 */
export function rbdError(negErrno: number, what: string): VdiskError {
  const base = errnoError(negErrno, what);
  return new VdiskError(base.errno, `${what}: ${errnoName(negErrno)} (${-negErrno})`);
}
