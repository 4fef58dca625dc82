/**
 * The kernel's FUSE protocol (include/uapi/linux/fuse.h), the parts a one-file
 * block export needs: opcodes, flags and the layout of the structures vdisk
 * reads and writes. vdisk speaks protocol 7.31 (max_pages, lseek, fallocate,
 * parallel direct writes are all older), which every kernel since 5.4 accepts.
 */

export const FUSE_KERNEL_VERSION = 7;
export const FUSE_KERNEL_MINOR_VERSION = 31;

export const Opcode = {
  LOOKUP: 1,
  FORGET: 2,
  GETATTR: 3,
  SETATTR: 4,
  OPEN: 14,
  READ: 15,
  WRITE: 16,
  STATFS: 17,
  RELEASE: 18,
  FSYNC: 20,
  FLUSH: 25,
  INIT: 26,
  OPENDIR: 27,
  READDIR: 28,
  RELEASEDIR: 29,
  FSYNCDIR: 30,
  INTERRUPT: 36,
  DESTROY: 38,
  BATCH_FORGET: 42,
  FALLOCATE: 43,
  LSEEK: 46,
} as const;

/** INIT flags vdisk asks for (each only if the kernel offers it). */
export const InitFlag = {
  ASYNC_READ: 1 << 0,
  BIG_WRITES: 1 << 5,
  ASYNC_DIO: 1 << 15,
  MAX_PAGES: 1 << 22,
} as const;

/** OPEN reply flags. */
export const FOPEN_DIRECT_IO = 1 << 0;
export const FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6;

/** SETATTR valid bits. */
export const Fattr = {
  MODE: 1 << 0,
  UID: 1 << 1,
  GID: 1 << 2,
  SIZE: 1 << 3,
  ATIME: 1 << 4,
  MTIME: 1 << 5,
  ATIME_NOW: 1 << 7,
  MTIME_NOW: 1 << 8,
  CTIME: 1 << 10,
} as const;

export const FALLOC_FL_KEEP_SIZE = 0x01;
export const FALLOC_FL_PUNCH_HOLE = 0x02;
export const FALLOC_FL_ZERO_RANGE = 0x10;
export const SEEK_DATA = 3;
export const SEEK_HOLE = 4;

export const S_IFREG = 0o100000;
export const S_IFDIR = 0o040000;
export const DT_REG = 8;
export const DT_DIR = 4;

/** struct fuse_in_header. */
export const IN_HEADER_SIZE = 40;
/** struct fuse_out_header. */
export const OUT_HEADER_SIZE = 16;
/** struct fuse_write_in (the data follows it). */
export const WRITE_IN_SIZE = 40;
/** struct fuse_attr. */
export const ATTR_SIZE = 88;
/** struct fuse_attr_out: attr_valid, attr_valid_nsec, dummy, attr. */
export const ATTR_OUT_SIZE = 16 + ATTR_SIZE;
/** struct fuse_entry_out: nodeid, generation, entry_valid, attr_valid, two nsec, attr. */
export const ENTRY_OUT_SIZE = 40 + ATTR_SIZE;
/** struct fuse_init_out (7.23 and later). */
export const INIT_OUT_SIZE = 64;
/** struct fuse_init_out before 7.23. */
export const INIT_OUT_COMPAT_SIZE = 24;
/** struct fuse_open_out. */
export const OPEN_OUT_SIZE = 16;
/** struct fuse_statfs_out (struct fuse_kstatfs). */
export const STATFS_OUT_SIZE = 80;

/** Largest READ / WRITE payload vdisk negotiates (max_pages 256). */
export const MAX_IO = 1024 * 1024;
/** Every read of /dev/fuse must offer room for the largest request. */
export const REQUEST_BUFFER_SIZE = MAX_IO + 4096;

export function u64(buf: Buffer, off: number): number {
  return buf.readUInt32LE(off) + buf.readUInt32LE(off + 4) * 0x100000000;
}

export function putU64(buf: Buffer, off: number, v: number): void {
  buf.writeUInt32LE(v % 0x100000000 >>> 0, off);
  buf.writeUInt32LE(Math.floor(v / 0x100000000) >>> 0, off + 4);
}

export interface Attr {
  ino: number;
  size: number;
  mode: number;
  nlink: number;
  uid: number;
  gid: number;
  /** Times in milliseconds since the epoch. */
  atimeMs: number;
  mtimeMs: number;
  ctimeMs: number;
}

/** Writes a struct fuse_attr at off. */
export function putAttr(buf: Buffer, off: number, a: Attr): void {
  putU64(buf, off, a.ino);
  putU64(buf, off + 8, a.size);
  putU64(buf, off + 16, Math.ceil(a.size / 512));
  const times = [a.atimeMs, a.mtimeMs, a.ctimeMs];
  for (let i = 0; i < 3; i++) {
    putU64(buf, off + 24 + i * 8, Math.floor(times[i] / 1000));
    buf.writeUInt32LE(Math.floor((times[i] % 1000) * 1e6), off + 48 + i * 4);
  }
  buf.writeUInt32LE(a.mode, off + 60);
  buf.writeUInt32LE(a.nlink, off + 64);
  buf.writeUInt32LE(a.uid, off + 68);
  buf.writeUInt32LE(a.gid, off + 72);
  buf.writeUInt32LE(0, off + 76); // rdev
  buf.writeUInt32LE(4096, off + 80); // blksize
  buf.writeUInt32LE(0, off + 84); // flags
}
