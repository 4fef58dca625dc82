/**
 * The one error type of vdisk.
 *
 * Every failure that can reach a client carries a POSIX errno name, so each
 * protocol maps it in one table: NBD error values (src/nbd/protocol.ts),
 * negative errno for FUSE, and a QMP error object (class + description).
 * `code` is a stable string for programs; the message names the node, the
 * offset or the option at fault, for people.
 */
export type Errno =
  | 'EIO'
  | 'EINVAL'
  | 'ENOSPC'
  | 'EPERM'
  | 'EROFS'
  | 'ENOTSUP'
  | 'ENOENT'
  | 'EEXIST'
  | 'EBUSY'
  | 'EAGAIN'
  | 'ENOMEM'
  | 'EFBIG'
  | 'EOVERFLOW'
  | 'ESHUTDOWN'
  | 'ECANCELED'
  | 'EACCES'
  | 'ENXIO';

/** QMP error classes (QapiErrorClass in QEMU). */
export type QmpErrorClass =
  | 'GenericError'
  | 'CommandNotFound'
  | 'DeviceNotActive'
  | 'DeviceNotFound';

export interface VdiskErrorOptions {
  code?: string;
  qmpClass?: QmpErrorClass;
  cause?: unknown;
  /** QEMU's error_append_hint text: printed by command-line tools after the message, never sent over QMP. */
  hint?: string;
  /** vdisk's own advice (what to do about it), appended to the QMP description after QEMU's text. */
  advice?: string;
}

export class VdiskError extends Error {
  readonly errno: Errno;
  readonly code: string;
  readonly qmpClass: QmpErrorClass;
  readonly hint: string | undefined;
  readonly advice: string | undefined;

  constructor(errno: Errno, message: string, options: VdiskErrorOptions = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'VdiskError';
    this.errno = errno;
    this.code = options.code ?? `VDISK_${errno}`;
    this.qmpClass = options.qmpClass ?? 'GenericError';
    this.hint = options.hint;
    this.advice = options.advice;
  }
}

/** Errno numbers on Linux, for the native layer's negative return values. */
const ERRNO_BY_NUMBER: Record<number, Errno> = {
  1: 'EPERM',
  2: 'ENOENT',
  5: 'EIO',
  6: 'ENXIO',
  11: 'EAGAIN',
  12: 'ENOMEM',
  13: 'EACCES',
  16: 'EBUSY',
  17: 'EEXIST',
  22: 'EINVAL',
  27: 'EFBIG',
  28: 'ENOSPC',
  30: 'EROFS',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
  125: 'ECANCELED',
};

/** Builds a VdiskError from a negative errno returned by the native layer. */
export function errnoError(negErrno: number, what: string): VdiskError {
  const name = ERRNO_BY_NUMBER[-negErrno] ?? 'EIO';
  return new VdiskError(name, `${what}: ${name} (${-negErrno})`);
}

/** Wraps anything thrown by code outside vdisk (fs, a user's node) as EIO. */
export function toVdiskError(err: unknown, what: string): VdiskError {
  if (err instanceof VdiskError) return err;
  const e = err as NodeJS.ErrnoException;
  const code = e?.code === 'EOPNOTSUPP' ? 'ENOTSUP' : e?.code;
  const name = typeof code === 'string' && isErrno(code) ? code : 'EIO';
  const message = e instanceof Error ? e.message : String(err);
  return new VdiskError(name, `${what}: ${message}`, { cause: err });
}

function isErrno(code: string): code is Errno {
  return Object.values(ERRNO_BY_NUMBER).includes(code as Errno);
}

export function invalid(message: string): VdiskError {
  return new VdiskError('EINVAL', message);
}

/** strerror() texts (glibc), for where QEMU reports an errno as text (job errors, qemu-io). */
const STRERROR: Record<Errno, string> = {
  EIO: 'Input/output error',
  EINVAL: 'Invalid argument',
  ENOSPC: 'No space left on device',
  EPERM: 'Operation not permitted',
  EROFS: 'Read-only file system',
  ENOTSUP: 'Operation not supported',
  ENOENT: 'No such file or directory',
  EEXIST: 'File exists',
  EBUSY: 'Device or resource busy',
  EAGAIN: 'Resource temporarily unavailable',
  ENOMEM: 'Cannot allocate memory',
  EFBIG: 'File too large',
  EOVERFLOW: 'Value too large for defined data type',
  ESHUTDOWN: 'Cannot send after transport endpoint shutdown',
  ECANCELED: 'Operation canceled',
  EACCES: 'Permission denied',
  ENXIO: 'No such device or address',
};

export function strerror(errno: Errno): string {
  return STRERROR[errno];
}

/** The Linux errno number of an errno name (EIO -> 5). */
export function errnoNumber(errno: Errno): number {
  for (const [n, name] of Object.entries(ERRNO_BY_NUMBER)) if (name === errno) return Number(n);
  return 5;
}
