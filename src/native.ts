/**
 * Typed access to native/vdisk_native.c (built by node-gyp into build/Release).
 * Every function returns a negative errno on failure instead of throwing.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import path from 'node:path';

export interface VdiskNative {
  /** Reads only if every byte is in the page cache; -EAGAIN otherwise. */
  preadNowait(fd: number, buf: Buffer, bufOffset: number, length: number, position: number): number;
  preadSync(fd: number, buf: Buffer, bufOffset: number, length: number, position: number): number;
  pwriteSync(fd: number, buf: Buffer, bufOffset: number, length: number, position: number): number;
  /** lseek with SEEK_DATA / SEEK_HOLE (or any whence) on the calling thread. */
  seekSync(fd: number, offset: number, whence: number): number;
  /** setsockopt SO_SNDBUF / SO_RCVBUF (0 = leave as is). */
  setSocketBuffers(fd: number, sendBytes: number, receiveBytes: number): number;
  /** type 0 unlock, 1 shared, 2 exclusive; never waits. */
  ofdLock(fd: number, start: number, length: number, type: 0 | 1 | 2): number;
  /** 1 if a lock of this type would conflict with another open file description. */
  ofdTest(fd: number, start: number, length: number, type: 1 | 2): number;
  /** [size, logical block size, physical block size] or -errno. */
  blockDeviceInfo(fd: number): [number, number, number] | number;
  alignedBuffer(size: number, alignment: number): Buffer;
  /** Runs one operation on the libuv thread pool; resolves to a result >= 0 or -errno. */
  submit(op: number, fd: number, buf: Buffer | null, bufOffset: number, length: number, position: number, flags: number): Promise<number>;
  /** One read(2) (FUSE: one whole request). */
  readFd(fd: number, buf: Buffer, bufOffset: number, length: number): number;
  /** One write(2) (FUSE: one whole reply). */
  writeFd(fd: number, buf: Buffer, bufOffset: number, length: number): number;
  /** fcntl(F_DUPFD_CLOEXEC): a second descriptor for the same open socket or file. */
  dupFd(fd: number): number;
  /** umount2 on the calling thread: only for a mount whose /dev/fuse descriptor is already closed. */
  umountSync(target: string, flags: number): number;
  /** Calls callback(status) on the event loop whenever fd is readable. */
  watchFd(fd: number, callback: (status: number) => void): object;
  unwatchFd(handle: object): void;
  /** One sd_notify datagram to a unix socket path or '@abstract' name. */
  sdNotify(socketPath: string, message: string): number;
}

export const Op = {
  PREAD: 1,
  PWRITE: 2,
  FDATASYNC: 3,
  FSYNC: 4,
  FALLOCATE: 5,
  SEEK: 6,
  BLKDISCARD: 7,
  BLKZEROOUT: 8,
  /** buf: "source\0target\0fstype\0data\0", flags: mount flags. */
  MOUNT: 9,
  /** buf: "target\0", flags: umount2 flags. */
  UMOUNT: 10,
} as const;

/** pwrite flag for Op.PWRITE: RWF_DSYNC. */
export const PWRITE_DSYNC = 1;
export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

export const EAGAIN = -11;
export const ENXIO = -6;
export const EOPNOTSUPP = -95;
export const EINVAL = -22;

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(import.meta.url);

function load(): VdiskNative {
  // dist/native.js and src/native.ts both sit one level below the package root.
  const file = path.join(here, '..', 'build', 'Release', 'vdisk_native.node');
  try {
    return require(file) as VdiskNative;
  } catch (err) {
    throw new Error(`vdisk's native addon is missing (${file}); build it with 'npm run build': ${(err as Error).message}`);
  }
}

export const native: VdiskNative = load();
