/**
 * The FUSE protocol of a one-file export without /dev/fuse: a kernel
 * request buffer in, an action out. FuseSession (session.ts) reads requests
 * from /dev/fuse, hands each to handle(), writes the replies it gets back
 * and runs the node operations it is asked for, handing their outcome to
 * done()/fail() for the reply bytes.
 *
 * Every check a request can fail (unknown inode, read-only, past the end,
 * bad fallocate mode, chown, a short request) is made here, before any node
 * operation is handed out, so the fuzz tests (test/fuzz/fuse-core.test.ts)
 * can show that a read-only export never gets a write and a non-growable one
 * is never written past its end, whatever the bytes.
 *
 * Replies reuse the request's buffer (a READ's data is read straight into it
 * after the reply header), as the session did before the core existed.
 */
import { VdiskError, errnoNumber } from '../errors.js';
import { logEvent } from '../log.js';
import { ReqFlags } from '../block/node.js';
import {
  ATTR_OUT_SIZE,
  ENTRY_OUT_SIZE,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  FOPEN_DIRECT_IO,
  FOPEN_PARALLEL_DIRECT_WRITES,
  FUSE_KERNEL_MINOR_VERSION,
  FUSE_KERNEL_VERSION,
  Fattr,
  IN_HEADER_SIZE,
  INIT_OUT_COMPAT_SIZE,
  INIT_OUT_SIZE,
  InitFlag,
  MAX_IO,
  OPEN_OUT_SIZE,
  OUT_HEADER_SIZE,
  Opcode,
  DT_DIR,
  DT_REG,
  S_IFDIR,
  S_IFREG,
  SEEK_DATA,
  SEEK_HOLE,
  STATFS_OUT_SIZE,
  WRITE_IN_SIZE,
  type Attr,
  putAttr,
  putU64,
  u64,
} from './protocol.js';

export const ENOENT = 2;
export const EIO = 5;
export const ENXIO = 6;
export const EACCES = 13;
export const EPERM = 1;
export const EISDIR = 21;
export const ENOTDIR = 20;
export const ENOSYS = 38;
export const EINVAL = 22;
export const ENOSPC = 28;
export const EOPNOTSUPP = 95;
export const EPROTO = 71;

/** The root inode; in a directory mount the file is inode 2. */
export const ROOT = 1;
export const FILE_IN_DIR = 2;
/** Attribute and entry validity the kernel may cache, in seconds (libfuse's default). */
const ATTR_VALID_S = 1;
const O_ACCMODE = 3;
const O_RDONLY = 0;

/** Bytes after the in-header each opcode reads (a shorter request is refused, never parsed from stale bytes). */
const BODY_SIZE: Record<number, number> = {
  [Opcode.INIT]: 16,
  [Opcode.SETATTR]: 88,
  [Opcode.OPEN]: 8,
  [Opcode.READ]: 40,
  [Opcode.WRITE]: WRITE_IN_SIZE,
  [Opcode.READDIR]: 40,
  [Opcode.FALLOCATE]: 32,
  [Opcode.LSEEK]: 24,
};

export interface FuseCoreOptions {
  /** The export's id: the file's name in a directory mount. */
  id: string;
  directory: boolean;
  writable: boolean;
  growable: boolean;
  uid: number;
  gid: number;
  /** The node's size now. */
  size(): number;
}

/** A node operation for the host to run; its reply comes from done() or fail(). */
export type FuseOp =
  /** Read `length` bytes at offset into reply.subarray(OUT_HEADER_SIZE). */
  | { kind: 'read'; buf: Buffer; lo: number; hi: number; offset: number; length: number }
  /** Grow the node to growTo first if set, then write data at offset (data may be empty). */
  | { kind: 'write'; buf: Buffer; lo: number; hi: number; offset: number; data: Buffer; growTo?: number }
  | { kind: 'flush'; buf: Buffer; lo: number; hi: number }
  /** SETATTR: truncate to `truncate` if set, then the core applies the rest in done(). */
  | { kind: 'setattr'; buf: Buffer; lo: number; hi: number; nodeid: number; truncate?: number }
  /**
   * fallocate: grow to growTo if set; then write zeroes over `zero` if set
   * (flags: ReqFlags.MAY_UNMAP for a punched hole).
   */
  | { kind: 'fallocate'; buf: Buffer; lo: number; hi: number; growTo?: number; zero?: { offset: number; length: number; flags: number } }
  /** Find the first data (or hole) at or after offset; done() takes the position, or fail(ENXIO). */
  | { kind: 'lseek'; buf: Buffer; lo: number; hi: number; offset: number; whence: number };

export type FuseAction =
  | { type: 'reply'; data: Buffer }
  /** Requests that take no reply (FORGET, INTERRUPT), or one too short to answer. */
  | { type: 'none' }
  | { type: 'op'; op: FuseOp };

export class FuseCore {
  /** File handles open in the kernel (OPEN minus RELEASE). */
  openHandles = 0;
  /** Set once INIT is answered. */
  initialised = false;
  /** No new opens (the export is going away). */
  closing = false;
  private mode: number;
  private dirMode = S_IFDIR | 0o755;
  private atimeMs: number;
  private mtimeMs: number;
  private ctimeMs: number;
  private readonly fileIno: number;
  private readonly fileName: Buffer;
  /** Replies that do not reuse the request's buffer are built here. */
  private readonly scratch = Buffer.alloc(4096);

  constructor(private readonly o: FuseCoreOptions) {
    // QEMU's modes: readable by the owner, writable by the owner if the export is; chmod changes it.
    this.mode = S_IFREG | 0o400 | (o.writable ? 0o200 : 0);
    this.atimeMs = this.mtimeMs = this.ctimeMs = Date.now();
    this.fileIno = o.directory ? FILE_IN_DIR : ROOT;
    this.fileName = Buffer.from(o.id);
  }

  /**
   * One request (buf holds n bytes of it). The action's reply bytes are
   * valid until the next call (they may live in a scratch buffer).
   */
  handle(buf: Buffer, n: number): FuseAction {
    // Too short to say which request it is: there is no one to answer.
    if (n < IN_HEADER_SIZE) return { type: 'none' };
    const opcode = buf.readUInt32LE(4);
    const lo = buf.readUInt32LE(8);
    const hi = buf.readUInt32LE(12);
    const nodeid = buf.readUInt32LE(16);
    if (n < IN_HEADER_SIZE + (BODY_SIZE[opcode] ?? 0)) return this.error(lo, hi, EINVAL);
    switch (opcode) {
      case Opcode.READ:
        return this.read(buf, lo, hi);
      case Opcode.WRITE:
        return this.write(buf, n, lo, hi);
      case Opcode.INIT:
        return this.init(buf, lo, hi);
      case Opcode.GETATTR:
        if (!this.known(nodeid)) return this.error(lo, hi, ENOENT);
        return this.replyIn(this.scratch, lo, hi, this.putAttrOut(this.scratch, nodeid));
      case Opcode.SETATTR:
        return this.setattr(buf, lo, hi, nodeid);
      case Opcode.LOOKUP:
        return this.lookup(buf, n, lo, hi, nodeid);
      case Opcode.FORGET:
      case Opcode.BATCH_FORGET:
      case Opcode.INTERRUPT:
        return { type: 'none' }; // no reply; interrupted requests simply finish
      case Opcode.OPEN:
        return this.open(buf, lo, hi, nodeid);
      case Opcode.RELEASE:
        if (nodeid === this.fileIno) this.openHandles = Math.max(0, this.openHandles - 1);
        return this.error(lo, hi, 0);
      case Opcode.FLUSH:
      case Opcode.FSYNC:
        // Both are durable, as QEMU's export: close() and fsync() leave the data on disk.
        if (!this.o.writable) return this.error(lo, hi, 0);
        return { type: 'op', op: { kind: 'flush', buf, lo, hi } };
      case Opcode.FALLOCATE:
        return this.fallocate(buf, lo, hi);
      case Opcode.LSEEK:
        return this.lseek(buf, lo, hi);
      case Opcode.STATFS:
        return this.statfs(lo, hi);
      case Opcode.OPENDIR:
        if (!this.o.directory || nodeid !== ROOT) return this.error(lo, hi, ENOTDIR);
        return this.replyOpen(lo, hi, 0);
      case Opcode.READDIR:
        return this.readdir(buf, lo, hi);
      case Opcode.RELEASEDIR:
      case Opcode.FSYNCDIR:
      case Opcode.DESTROY:
        return this.error(lo, hi, 0);
      default:
        return this.error(lo, hi, ENOSYS);
    }
  }

  /** An operation succeeded: its reply. */
  done(op: FuseOp, lseekResult?: number): Buffer {
    const b = op.buf;
    switch (op.kind) {
      case 'read':
        return this.replyBytes(b, op.lo, op.hi, op.length);
      case 'write':
        this.mtimeMs = this.ctimeMs = Date.now();
        b.writeUInt32LE(op.data.length, OUT_HEADER_SIZE);
        b.writeUInt32LE(0, OUT_HEADER_SIZE + 4);
        return this.replyBytes(b, op.lo, op.hi, 8);
      case 'flush':
        return this.replyBytes(b, op.lo, op.hi, 0);
      case 'setattr':
        return this.replyBytes(b, op.lo, op.hi, this.applySetattr(op));
      case 'fallocate':
        // Growing leaves the times alone (as before the core); an allocation inside the file touches them.
        if (op.growTo === undefined) this.mtimeMs = this.ctimeMs = Date.now();
        return this.replyBytes(b, op.lo, op.hi, 0);
      case 'lseek':
        putU64(b, OUT_HEADER_SIZE, lseekResult ?? 0);
        return this.replyBytes(b, op.lo, op.hi, 8);
    }
  }

  /** An operation failed with err (a VdiskError's errno, else EIO): its reply. */
  fail(op: FuseOp, err: unknown): Buffer {
    return this.errorBytes(op.lo, op.hi, errnoOf(err));
  }

  // ---- replies --------------------------------------------------------------

  private header(buf: Buffer, len: number, error: number, lo: number, hi: number): void {
    buf.writeUInt32LE(len, 0);
    buf.writeInt32LE(-error, 4);
    buf.writeUInt32LE(lo, 8);
    buf.writeUInt32LE(hi, 12);
  }

  private replyBytes(buf: Buffer, lo: number, hi: number, bodyLen: number): Buffer {
    this.header(buf, OUT_HEADER_SIZE + bodyLen, 0, lo, hi);
    return buf.subarray(0, OUT_HEADER_SIZE + bodyLen);
  }

  private replyIn(buf: Buffer, lo: number, hi: number, bodyLen: number): FuseAction {
    return { type: 'reply', data: this.replyBytes(buf, lo, hi, bodyLen) };
  }

  private errorBytes(lo: number, hi: number, errno: number): Buffer {
    const b = Buffer.allocUnsafe(OUT_HEADER_SIZE);
    this.header(b, OUT_HEADER_SIZE, errno, lo, hi);
    return b;
  }

  /** An error reply (errno 0: an empty success). */
  private error(lo: number, hi: number, errno: number): FuseAction {
    return { type: 'reply', data: this.errorBytes(lo, hi, errno) };
  }

  private known(nodeid: number): boolean {
    return nodeid === ROOT || (this.o.directory && nodeid === FILE_IN_DIR);
  }

  private attr(ino: number): Attr {
    const { uid, gid } = this.o;
    if (ino === ROOT && this.o.directory) {
      return { ino, size: 0, mode: this.dirMode, nlink: 2, uid, gid, atimeMs: this.atimeMs, mtimeMs: this.ctimeMs, ctimeMs: this.ctimeMs };
    }
    return { ino, size: this.o.size(), mode: this.mode, nlink: 1, uid, gid, atimeMs: this.atimeMs, mtimeMs: this.mtimeMs, ctimeMs: this.ctimeMs };
  }

  /** Writes a fuse_attr_out after the header of buf; returns its length. */
  private putAttrOut(buf: Buffer, ino: number): number {
    const o = OUT_HEADER_SIZE;
    putU64(buf, o, ATTR_VALID_S);
    buf.writeUInt32LE(0, o + 8);
    buf.writeUInt32LE(0, o + 12);
    putAttr(buf, o + 16, this.attr(ino));
    return ATTR_OUT_SIZE;
  }

  private replyOpen(lo: number, hi: number, flags: number): FuseAction {
    const b = this.scratch;
    b.fill(0, OUT_HEADER_SIZE, OUT_HEADER_SIZE + OPEN_OUT_SIZE);
    b.writeUInt32LE(flags, OUT_HEADER_SIZE + 8);
    return this.replyIn(b, lo, hi, OPEN_OUT_SIZE);
  }

  // ---- operations -------------------------------------------------------------

  private init(buf: Buffer, lo: number, hi: number): FuseAction {
    const major = buf.readUInt32LE(IN_HEADER_SIZE);
    const minor = buf.readUInt32LE(IN_HEADER_SIZE + 4);
    const maxReadahead = buf.readUInt32LE(IN_HEADER_SIZE + 8);
    const offered = buf.readUInt32LE(IN_HEADER_SIZE + 12);
    const b = this.scratch;
    if (major < FUSE_KERNEL_VERSION) return this.error(lo, hi, EPROTO);
    if (major > FUSE_KERNEL_VERSION) {
      // The kernel will send INIT again with our major version.
      b.fill(0, OUT_HEADER_SIZE, OUT_HEADER_SIZE + 8);
      b.writeUInt32LE(FUSE_KERNEL_VERSION, OUT_HEADER_SIZE);
      return this.replyIn(b, lo, hi, 8);
    }
    const want = InitFlag.ASYNC_READ | InitFlag.BIG_WRITES | InitFlag.ASYNC_DIO | InitFlag.MAX_PAGES;
    const o = OUT_HEADER_SIZE;
    b.fill(0, o, o + INIT_OUT_SIZE);
    b.writeUInt32LE(FUSE_KERNEL_VERSION, o);
    b.writeUInt32LE(FUSE_KERNEL_MINOR_VERSION, o + 4);
    b.writeUInt32LE(maxReadahead, o + 8);
    b.writeUInt32LE(offered & want, o + 12);
    b.writeUInt16LE(64, o + 16); // max_background
    b.writeUInt16LE(48, o + 18); // congestion_threshold
    b.writeUInt32LE(MAX_IO, o + 20); // max_write
    b.writeUInt32LE(1, o + 24); // time_gran (ns)
    b.writeUInt16LE(MAX_IO / 4096, o + 28); // max_pages
    logEvent('debug', 'fuse-init', { id: this.o.id, kernel: `${major}.${minor}`, flags: (offered & want).toString(16) });
    this.initialised = true;
    return this.replyIn(b, lo, hi, minor < 23 ? INIT_OUT_COMPAT_SIZE : INIT_OUT_SIZE);
  }

  private lookup(buf: Buffer, n: number, lo: number, hi: number, parent: number): FuseAction {
    if (!this.o.directory || parent !== ROOT) return this.error(lo, hi, ENOENT);
    let end = buf.indexOf(0, IN_HEADER_SIZE);
    if (end < 0 || end > n) end = n;
    const name = buf.subarray(IN_HEADER_SIZE, end);
    if (!name.equals(this.fileName)) return this.error(lo, hi, ENOENT);
    const b = this.scratch;
    const o = OUT_HEADER_SIZE;
    putU64(b, o, FILE_IN_DIR);
    putU64(b, o + 8, 0); // generation
    putU64(b, o + 16, ATTR_VALID_S); // entry_valid
    putU64(b, o + 24, ATTR_VALID_S); // attr_valid
    b.writeUInt32LE(0, o + 32);
    b.writeUInt32LE(0, o + 36);
    putAttr(b, o + 40, this.attr(FILE_IN_DIR));
    return this.replyIn(b, lo, hi, ENTRY_OUT_SIZE);
  }

  private readdir(buf: Buffer, lo: number, hi: number): FuseAction {
    const offset = u64(buf, IN_HEADER_SIZE + 8);
    const size = buf.readUInt32LE(IN_HEADER_SIZE + 16);
    const entries: Array<[number, string | Buffer, number]> = [
      [ROOT, '.', DT_DIR],
      [ROOT, '..', DT_DIR],
      [FILE_IN_DIR, this.fileName, DT_REG],
    ];
    const b = this.scratch;
    let pos = OUT_HEADER_SIZE;
    for (let i = offset; i < entries.length; i++) {
      const [ino, name, type] = entries[i];
      const nameBuf = typeof name === 'string' ? Buffer.from(name) : name;
      const recLen = (24 + nameBuf.length + 7) & ~7;
      if (pos - OUT_HEADER_SIZE + recLen > size || pos + recLen > b.length) break;
      b.fill(0, pos, pos + recLen);
      putU64(b, pos, ino);
      putU64(b, pos + 8, i + 1); // offset of the next entry
      b.writeUInt32LE(nameBuf.length, pos + 16);
      b.writeUInt32LE(type, pos + 20);
      nameBuf.copy(b, pos + 24);
      pos += recLen;
    }
    return this.replyIn(b, lo, hi, pos - OUT_HEADER_SIZE);
  }

  private open(buf: Buffer, lo: number, hi: number, nodeid: number): FuseAction {
    if (nodeid !== this.fileIno) return this.error(lo, hi, this.known(nodeid) ? EISDIR : ENOENT);
    const flags = buf.readUInt32LE(IN_HEADER_SIZE);
    if ((flags & O_ACCMODE) !== O_RDONLY && !this.o.writable) return this.error(lo, hi, EACCES);
    if (this.closing) return this.error(lo, hi, 19 /* ENODEV */);
    this.openHandles++;
    return this.replyOpen(lo, hi, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES);
  }

  private statfs(lo: number, hi: number): FuseAction {
    const b = this.scratch;
    const o = OUT_HEADER_SIZE;
    b.fill(0, o, o + STATFS_OUT_SIZE);
    putU64(b, o, Math.ceil(this.o.size() / 4096)); // blocks
    putU64(b, o + 24, 1); // files
    b.writeUInt32LE(4096, o + 40); // bsize
    b.writeUInt32LE(255, o + 44); // namelen
    b.writeUInt32LE(4096, o + 48); // frsize
    return this.replyIn(b, lo, hi, STATFS_OUT_SIZE);
  }

  private read(buf: Buffer, lo: number, hi: number): FuseAction {
    const offset = u64(buf, IN_HEADER_SIZE + 8);
    const size = buf.readUInt32LE(IN_HEADER_SIZE + 16);
    // Reads past the end are short, as for any file.
    const length = Math.max(0, Math.min(size, this.o.size() - offset, buf.length - OUT_HEADER_SIZE));
    return { type: 'op', op: { kind: 'read', buf, lo, hi, offset, length } };
  }

  private write(buf: Buffer, n: number, lo: number, hi: number): FuseAction {
    if (!this.o.writable) return this.error(lo, hi, EACCES);
    const offset = u64(buf, IN_HEADER_SIZE + 8);
    const size = buf.readUInt32LE(IN_HEADER_SIZE + 16);
    const start = IN_HEADER_SIZE + WRITE_IN_SIZE;
    if (start + size > n) return this.error(lo, hi, EINVAL);
    const nodeSize = this.o.size();
    let len = size;
    let growTo: number | undefined;
    if (offset + len > nodeSize) {
      if (this.o.growable) growTo = offset + len;
      else if (offset >= nodeSize) return this.error(lo, hi, ENOSPC);
      else len = nodeSize - offset;
    }
    return { type: 'op', op: { kind: 'write', buf, lo, hi, offset, data: buf.subarray(start, start + len), growTo } };
  }

  private setattr(buf: Buffer, lo: number, hi: number, nodeid: number): FuseAction {
    if (!this.known(nodeid)) return this.error(lo, hi, ENOENT);
    const o = IN_HEADER_SIZE;
    const valid = buf.readUInt32LE(o);
    const dir = nodeid === ROOT && this.o.directory;
    let truncate: number | undefined;
    if (valid & Fattr.SIZE) {
      if (dir) return this.error(lo, hi, EINVAL);
      const size = u64(buf, o + 16);
      if (size !== this.o.size()) {
        if (!this.o.writable) return this.error(lo, hi, EACCES);
        if (!this.o.growable) return this.error(lo, hi, EPERM);
        truncate = size;
      }
    }
    // One owner for the whole export, as QEMU: chown is refused rather than half-kept, and refused
    // before anything else is applied (a truncate must not happen for a request that fails).
    if (valid & (Fattr.UID | Fattr.GID)) {
      const uid = buf.readUInt32LE(o + 76);
      const gid = buf.readUInt32LE(o + 80);
      if ((valid & Fattr.UID && uid !== this.o.uid) || (valid & Fattr.GID && gid !== this.o.gid)) return this.error(lo, hi, EPERM);
    }
    return { type: 'op', op: { kind: 'setattr', buf, lo, hi, nodeid, truncate } };
  }

  /** After the truncate (if any): mode and times; returns the attr reply's body length. */
  private applySetattr(op: Extract<FuseOp, { kind: 'setattr' }>): number {
    const buf = op.buf;
    const o = IN_HEADER_SIZE;
    const valid = buf.readUInt32LE(o);
    const dir = op.nodeid === ROOT && this.o.directory;
    const now = Date.now();
    if (valid & Fattr.SIZE) this.mtimeMs = this.ctimeMs = now;
    const timeAt = (sec: number, nsec: number) => u64(buf, sec) * 1000 + Math.floor(buf.readUInt32LE(nsec) / 1e6);
    if (valid & Fattr.MODE) {
      const perm = buf.readUInt32LE(o + 68) & 0o7777;
      if (dir) this.dirMode = S_IFDIR | perm;
      else this.mode = S_IFREG | perm;
      this.ctimeMs = now;
    }
    if (valid & Fattr.ATIME) this.atimeMs = valid & Fattr.ATIME_NOW ? now : timeAt(o + 32, o + 56);
    if (valid & Fattr.MTIME) this.mtimeMs = valid & Fattr.MTIME_NOW ? now : timeAt(o + 40, o + 60);
    if (valid & (Fattr.ATIME | Fattr.MTIME)) this.ctimeMs = now;
    return this.putAttrOut(buf, op.nodeid);
  }

  /** fallocate: punch hole and zero range become write-zeroes, a plain allocation can only grow. */
  private fallocate(buf: Buffer, lo: number, hi: number): FuseAction {
    if (!this.o.writable) return this.error(lo, hi, EACCES);
    const o = IN_HEADER_SIZE;
    const offset = u64(buf, o + 8);
    const length = u64(buf, o + 16);
    const mode = buf.readUInt32LE(o + 24);
    const size = this.o.size();
    if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) return this.error(lo, hi, EOPNOTSUPP);
    const end = offset + length;
    const keepSize = (mode & FALLOC_FL_KEEP_SIZE) !== 0;
    if (end > size && !keepSize) {
      if (!this.o.growable) return this.error(lo, hi, ENOSPC);
      if (mode & FALLOC_FL_PUNCH_HOLE) return this.error(lo, hi, EINVAL);
      // Growing reads back zeroes in the new part already.
      const zero = mode & FALLOC_FL_ZERO_RANGE && offset < size ? { offset, length: size - offset, flags: 0 } : undefined;
      return { type: 'op', op: { kind: 'fallocate', buf, lo, hi, growTo: end, zero } };
    }
    const len = Math.max(0, Math.min(end, size) - offset);
    if (len === 0) return this.error(lo, hi, 0);
    // A punched hole must read back as zeroes (fallocate(2)); discard alone is only a hint, so
    // this is write-zeroes that may unmap: a hole where the node can, zeroes where it cannot.
    let zero: { offset: number; length: number; flags: number } | undefined;
    if (mode & FALLOC_FL_PUNCH_HOLE) zero = { offset, length: len, flags: ReqFlags.MAY_UNMAP };
    else if (mode & FALLOC_FL_ZERO_RANGE) zero = { offset, length: len, flags: 0 };
    // A plain allocation inside the disk: every byte of a virtual disk is already there.
    return { type: 'op', op: { kind: 'fallocate', buf, lo, hi, zero } };
  }

  private lseek(buf: Buffer, lo: number, hi: number): FuseAction {
    const o = IN_HEADER_SIZE;
    const offset = u64(buf, o + 8);
    const whence = buf.readUInt32LE(o + 16);
    if (whence !== SEEK_DATA && whence !== SEEK_HOLE) return this.error(lo, hi, EINVAL);
    if (offset >= this.o.size()) return this.error(lo, hi, ENXIO);
    return { type: 'op', op: { kind: 'lseek', buf, lo, hi, offset, whence } };
  }
}

export function errnoOf(err: unknown): number {
  if (err instanceof VdiskError) {
    if (err.errno === 'ENOTSUP') return EOPNOTSUPP;
    if (err.errno === 'ENXIO') return ENXIO;
    if (err.errno === 'ENOSPC') return ENOSPC;
    return errnoNumber(err.errno);
  }
  return EIO;
}
