/**
 * One FUSE mount serving one block node as a plain raw file, by speaking the
 * kernel's FUSE protocol on /dev/fuse directly (no libfuse): the descriptor is
 * opened non-blocking, mount(2) gets it as fd=N, and a uv_poll watcher on the
 * event loop reads whole requests (one per read(2)) into 1 MiB buffers and
 * answers each with one write(2). Node requests run concurrently; replies go
 * out as they complete, in any order, as the protocol allows.
 *
 * The file is opened direct_io (as QEMU's export does): no page cache in the
 * kernel above the node, so what the file shows is what the node holds, even
 * while NBD clients or block jobs write to the same node.
 *
 * Nothing here touches the mount through the file system: mount and umount
 * run on the thread pool, everything else is /dev/fuse traffic. A process
 * touching its own FUSE mount synchronously would wait on itself.
 */
import fs from 'node:fs';
import path from 'node:path';
import { VdiskError, errnoNumber } from '../errors.js';
import { logEvent } from '../log.js';
import { type BlockNode, ReqFlags, Status } from '../block/node.js';
import { native, Op } from '../native.js';
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
  REQUEST_BUFFER_SIZE,
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

const EAGAIN = 11;
const EINTR = 4;
const ENOENT = 2;
const ENODEV = 19;
const EACCES = 13;
const EPERM = 1;
const EISDIR = 21;
const ENOTDIR = 20;
const ENOSYS = 38;
const ENXIO = 6;
const EINVAL = 22;
const ENOSPC = 28;
const EOPNOTSUPP = 95;
const EPROTO = 71;

const MS_NOSUID = 2;
const MS_NODEV = 4;
const MNT_DETACH = 2;

/** The root inode; in a directory mount the file is inode 2. */
const ROOT = 1;
const FILE_IN_DIR = 2;
/** Attribute and entry validity the kernel may cache, in seconds (libfuse's default). */
const ATTR_VALID_S = 1;
/** Spare request buffers kept for reuse. */
const SPARE_BUFFERS = 16;

export interface FuseSessionOptions {
  id: string;
  node: BlockNode;
  /** Absolute path, parent directories resolved. */
  mountpoint: string;
  /** The mountpoint is a directory: show one file named after the export in it. */
  directory: boolean;
  writable: boolean;
  growable: boolean;
  writethrough: boolean;
  allowOther: boolean;
  /** Called when the kernel ends the session by itself (an external umount). */
  onLost: () => void;
}

/** Sessions mounted by this process, for the exit hook and double-mount checks. */
const live = new Set<FuseSession>();
let exitHookInstalled = false;

function installExitHook(): void {
  if (exitHookInstalled) return;
  exitHookInstalled = true;
  // A process that exits without shutting down (a second signal, a fatal error) leaves no mount
  // behind: closing /dev/fuse aborts the connection first, so the detach cannot wait on anything.
  process.on('exit', () => {
    for (const s of live) s.abortNow();
  });
}

export function mountedHere(mountpoint: string): boolean {
  for (const s of live) if (s.options.mountpoint === mountpoint) return true;
  return false;
}

export class FuseSession {
  private fd = -1;
  private watch: object | undefined;
  private readonly spare: Buffer[] = [];
  private readonly scratch = Buffer.alloc(4096);
  /** Requests being served by the node. */
  private inFlight = 0;
  private idle: (() => void) | undefined;
  /** File handles open in the kernel (OPEN minus RELEASE). */
  openHandles = 0;
  private closing = false;
  private gone = false;
  private initDone!: () => void;
  private readonly initialised = new Promise<void>((r) => (this.initDone = r));
  private readonly uid = process.getuid?.() ?? 0;
  private readonly gid = process.getgid?.() ?? 0;
  private mode: number;
  private dirMode = S_IFDIR | 0o755;
  private atimeMs: number;
  private mtimeMs: number;
  private ctimeMs: number;
  private growLock: Promise<void> = Promise.resolve();
  private readonly fileIno: number;
  private readonly fileName: Buffer;

  constructor(readonly options: FuseSessionOptions) {
    // QEMU's modes: readable by the owner, writable by the owner if the export is; chmod changes it.
    this.mode = S_IFREG | 0o400 | (options.writable ? 0o200 : 0);
    this.atimeMs = this.mtimeMs = this.ctimeMs = Date.now();
    this.fileIno = options.directory ? FILE_IN_DIR : ROOT;
    this.fileName = Buffer.from(options.id);
  }

  get clients(): number {
    return this.openHandles;
  }

  /** Opens /dev/fuse, starts serving it and mounts. */
  async mount(): Promise<void> {
    const o = this.options;
    this.fd = fs.openSync('/dev/fuse', fs.constants.O_RDWR | fs.constants.O_NONBLOCK);
    live.add(this);
    installExitHook();
    const data = [
      `fd=${this.fd}`,
      `rootmode=${(o.directory ? S_IFDIR : S_IFREG).toString(8)}`,
      `user_id=${this.uid}`,
      `group_id=${this.gid}`,
      'default_permissions',
      ...(o.allowOther ? ['allow_other'] : []),
      `max_read=${MAX_IO}`,
    ].join(',');
    const spec = Buffer.from(`vdisk:${o.id}\0${o.mountpoint}\0fuse.vdisk\0${data}\0`);
    const rc = await native.submit(Op.MOUNT, -1, spec, 0, spec.length, 0, MS_NOSUID | MS_NODEV);
    if (rc < 0) {
      this.closeDevice();
      const why = -rc === EPERM ? 'permission denied (mounting needs CAP_SYS_ADMIN)' : `errno ${-rc}`;
      throw new VdiskError(-rc === EPERM ? 'EPERM' : 'EIO', `Failed to mount FUSE export '${o.id}' at '${o.mountpoint}': ${why}`);
    }
    // The kernel sent INIT during mount(2); it is answered on the loop. (Before the mount
    // /dev/fuse is not attached: reading it fails with EPERM and poll reports an error.)
    this.watch = native.watchFd(this.fd, (status) => this.readable(status));
    const timeout = new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 5000).unref());
    if ((await Promise.race([this.initialised, timeout])) === 'timeout') {
      await this.unmount();
      this.closeDevice();
      throw new VdiskError('EIO', `FUSE export '${o.id}': the kernel did not start the session`);
    }
    logEvent('info', 'fuse-mounted', { id: o.id, mountpoint: o.mountpoint, directory: o.directory });
  }

  /**
   * Unmounts (lazily: the kernel detaches the mount at once and ends the
   * session when no file is open), waits for requests in flight, closes.
   * With open files (hard deletion) closing /dev/fuse aborts them.
   */
  async shutdown(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    await this.unmount();
    if (this.inFlight > 0) await new Promise<void>((r) => (this.idle = r));
    this.closeDevice();
    logEvent('info', 'fuse-unmounted', { id: this.options.id, mountpoint: this.options.mountpoint });
  }

  private async unmount(): Promise<void> {
    const target = Buffer.from(`${this.options.mountpoint}\0`);
    const rc = await native.submit(Op.UMOUNT, -1, target, 0, target.length, 0, MNT_DETACH);
    // EINVAL: not mounted any more (someone unmounted it); that is fine.
    if (rc < 0 && -rc !== EINVAL && -rc !== ENOENT) {
      logEvent('warn', 'fuse-umount-failed', { id: this.options.id, mountpoint: this.options.mountpoint, errno: -rc });
    }
  }

  private closeDevice(): void {
    if (this.watch) native.unwatchFd(this.watch);
    this.watch = undefined;
    if (this.fd >= 0) fs.closeSync(this.fd);
    this.fd = -1;
    live.delete(this);
  }

  /** For process exit: abort the connection, detach the mount, synchronously. */
  abortNow(): void {
    const mp = this.options.mountpoint;
    this.closeDevice();
    native.umountSync(mp, MNT_DETACH);
  }

  // ---- the request loop ----------------------------------------------------

  private takeBuffer(): Buffer {
    return this.spare.pop() ?? Buffer.allocUnsafeSlow(REQUEST_BUFFER_SIZE);
  }

  private giveBack(buf: Buffer): void {
    if (this.spare.length < SPARE_BUFFERS) this.spare.push(buf);
  }

  private readable(status: number): void {
    while (this.fd >= 0) {
      const buf = this.takeBuffer();
      const n = native.readFd(this.fd, buf, 0, buf.length);
      if (n < 0) {
        this.giveBack(buf);
        const e = -n;
        if (e === EAGAIN) return;
        if (e === EINTR || e === ENOENT) continue; // ENOENT: the request was interrupted meanwhile
        if (e === ENODEV) return this.lost();
        logEvent('error', 'fuse-read-failed', { id: this.options.id, errno: e, pollStatus: status });
        return this.lost();
      }
      try {
        this.dispatch(buf, n);
      } catch (err) {
        // A bug in a handler must not stop the loop: the request gets EIO.
        logEvent('error', 'fuse-request-failed', { id: this.options.id, error: (err as Error).message });
        this.replyError(buf.readUInt32LE(8), buf.readUInt32LE(12), 5);
        this.giveBack(buf);
      }
    }
  }

  /** The kernel ended the session (umount by someone else, or an abort). */
  private lost(): void {
    if (this.watch) native.unwatchFd(this.watch);
    this.watch = undefined;
    if (this.gone || this.closing) return;
    this.gone = true;
    logEvent('warn', 'fuse-session-ended', { id: this.options.id, mountpoint: this.options.mountpoint });
    this.options.onLost();
  }

  private dispatch(buf: Buffer, n: number): void {
    const opcode = buf.readUInt32LE(4);
    const lo = buf.readUInt32LE(8);
    const hi = buf.readUInt32LE(12);
    const nodeid = buf.readUInt32LE(16);
    switch (opcode) {
      case Opcode.READ:
        return this.serve(buf, lo, hi, this.read(buf, lo, hi));
      case Opcode.WRITE:
        return this.serve(buf, lo, hi, this.write(buf, n, lo, hi));
      case Opcode.INIT:
        this.init(buf, lo, hi);
        break;
      case Opcode.GETATTR:
        if (!this.known(nodeid)) this.replyError(lo, hi, ENOENT);
        else this.replyAttr(lo, hi, nodeid);
        break;
      case Opcode.SETATTR:
        return this.serve(buf, lo, hi, this.setattr(buf, lo, hi, nodeid));
      case Opcode.LOOKUP:
        this.lookup(buf, n, lo, hi, nodeid);
        break;
      case Opcode.FORGET:
      case Opcode.BATCH_FORGET:
      case Opcode.INTERRUPT:
        break; // no reply; interrupted requests simply finish
      case Opcode.OPEN:
        this.open(buf, lo, hi, nodeid);
        break;
      case Opcode.RELEASE:
        if (nodeid === this.fileIno) this.openHandles = Math.max(0, this.openHandles - 1);
        this.replyEmpty(lo, hi);
        break;
      case Opcode.FLUSH:
      case Opcode.FSYNC:
        // Both are durable, as QEMU's export: close() and fsync() leave the data on disk.
        if (!this.options.writable) this.replyEmpty(lo, hi);
        else return this.serve(buf, lo, hi, this.options.node.flush().then(() => 0));
        break;
      case Opcode.FALLOCATE:
        return this.serve(buf, lo, hi, this.fallocate(buf));
      case Opcode.LSEEK:
        return this.serve(buf, lo, hi, this.lseek(buf, lo, hi));
      case Opcode.STATFS:
        this.statfs(lo, hi);
        break;
      case Opcode.OPENDIR:
        if (!this.options.directory || nodeid !== ROOT) this.replyError(lo, hi, ENOTDIR);
        else this.replyOpen(lo, hi, 0);
        break;
      case Opcode.READDIR:
        this.readdir(buf, lo, hi);
        break;
      case Opcode.RELEASEDIR:
      case Opcode.FSYNCDIR:
      case Opcode.DESTROY:
        this.replyEmpty(lo, hi);
        break;
      default:
        this.replyError(lo, hi, ENOSYS);
    }
    this.giveBack(buf);
  }

  /**
   * Runs one node request; the promise resolves to the reply body length
   * already written after the header in buf (0: no body), or throws.
   */
  private serve(buf: Buffer, lo: number, hi: number, p: Promise<number>): void {
    this.inFlight++;
    p.then(
      (len) => this.replyIn(buf, lo, hi, len),
      (err) => {
        if (!(err instanceof VdiskError)) logEvent('error', 'fuse-request-failed', { id: this.options.id, error: (err as Error)?.message });
        this.replyError(lo, hi, errnoOf(err));
      },
    ).finally(() => {
      this.giveBack(buf);
      if (--this.inFlight === 0 && this.idle) {
        this.idle();
        this.idle = undefined;
      }
    });
  }

  private known(nodeid: number): boolean {
    return nodeid === ROOT || (this.options.directory && nodeid === FILE_IN_DIR);
  }

  // ---- replies ---------------------------------------------------------------

  private send(buf: Buffer, len: number): void {
    if (this.fd < 0) return;
    const rc = native.writeFd(this.fd, buf, 0, len);
    // ENOENT: the request was interrupted and the kernel has forgotten it; ENODEV: the session ended.
    if (rc < 0 && -rc !== ENOENT && -rc !== ENODEV) {
      logEvent('error', 'fuse-reply-failed', { id: this.options.id, errno: -rc });
    }
  }

  private header(buf: Buffer, len: number, error: number, lo: number, hi: number): void {
    buf.writeUInt32LE(len, 0);
    buf.writeInt32LE(-error, 4);
    buf.writeUInt32LE(lo, 8);
    buf.writeUInt32LE(hi, 12);
  }

  private replyIn(buf: Buffer, lo: number, hi: number, bodyLen: number): void {
    this.header(buf, OUT_HEADER_SIZE + bodyLen, 0, lo, hi);
    this.send(buf, OUT_HEADER_SIZE + bodyLen);
  }

  private replyError(lo: number, hi: number, errno: number): void {
    this.header(this.scratch, OUT_HEADER_SIZE, errno, lo, hi);
    this.send(this.scratch, OUT_HEADER_SIZE);
  }

  private replyEmpty(lo: number, hi: number): void {
    this.replyError(lo, hi, 0);
  }

  private attr(ino: number): Attr {
    if (ino === ROOT && this.options.directory) {
      return { ino, size: 0, mode: this.dirMode, nlink: 2, uid: this.uid, gid: this.gid, atimeMs: this.atimeMs, mtimeMs: this.ctimeMs, ctimeMs: this.ctimeMs };
    }
    return { ino, size: this.options.node.size, mode: this.mode, nlink: 1, uid: this.uid, gid: this.gid, atimeMs: this.atimeMs, mtimeMs: this.mtimeMs, ctimeMs: this.ctimeMs };
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

  private replyAttr(lo: number, hi: number, ino: number): void {
    this.replyIn(this.scratch, lo, hi, this.putAttrOut(this.scratch, ino));
  }

  private replyOpen(lo: number, hi: number, flags: number): void {
    const b = this.scratch;
    b.fill(0, OUT_HEADER_SIZE, OUT_HEADER_SIZE + OPEN_OUT_SIZE);
    b.writeUInt32LE(flags, OUT_HEADER_SIZE + 8);
    this.replyIn(b, lo, hi, OPEN_OUT_SIZE);
  }

  // ---- operations ----------------------------------------------------------

  private init(buf: Buffer, lo: number, hi: number): void {
    const major = buf.readUInt32LE(IN_HEADER_SIZE);
    const minor = buf.readUInt32LE(IN_HEADER_SIZE + 4);
    const maxReadahead = buf.readUInt32LE(IN_HEADER_SIZE + 8);
    const offered = buf.readUInt32LE(IN_HEADER_SIZE + 12);
    const b = this.scratch;
    if (major < FUSE_KERNEL_VERSION) {
      this.replyError(lo, hi, EPROTO);
      return;
    }
    if (major > FUSE_KERNEL_VERSION) {
      // The kernel will send INIT again with our major version.
      b.fill(0, OUT_HEADER_SIZE, OUT_HEADER_SIZE + 8);
      b.writeUInt32LE(FUSE_KERNEL_VERSION, OUT_HEADER_SIZE);
      this.replyIn(b, lo, hi, 8);
      return;
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
    this.replyIn(b, lo, hi, minor < 23 ? INIT_OUT_COMPAT_SIZE : INIT_OUT_SIZE);
    logEvent('debug', 'fuse-init', { id: this.options.id, kernel: `${major}.${minor}`, flags: (offered & want).toString(16) });
    this.initDone();
  }

  private lookup(buf: Buffer, n: number, lo: number, hi: number, parent: number): void {
    if (!this.options.directory || parent !== ROOT) {
      this.replyError(lo, hi, ENOENT);
      return;
    }
    let end = buf.indexOf(0, IN_HEADER_SIZE);
    if (end < 0 || end > n) end = n;
    const name = buf.subarray(IN_HEADER_SIZE, end);
    if (!name.equals(this.fileName)) {
      this.replyError(lo, hi, ENOENT);
      return;
    }
    const b = this.scratch;
    const o = OUT_HEADER_SIZE;
    putU64(b, o, FILE_IN_DIR);
    putU64(b, o + 8, 0); // generation
    putU64(b, o + 16, ATTR_VALID_S); // entry_valid
    putU64(b, o + 24, ATTR_VALID_S); // attr_valid
    b.writeUInt32LE(0, o + 32);
    b.writeUInt32LE(0, o + 36);
    putAttr(b, o + 40, this.attr(FILE_IN_DIR));
    this.replyIn(b, lo, hi, ENTRY_OUT_SIZE);
  }

  private readdir(buf: Buffer, lo: number, hi: number): void {
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
    this.replyIn(b, lo, hi, pos - OUT_HEADER_SIZE);
  }

  private open(buf: Buffer, lo: number, hi: number, nodeid: number): void {
    if (nodeid !== this.fileIno) {
      this.replyError(lo, hi, this.known(nodeid) ? EISDIR : ENOENT);
      return;
    }
    const flags = buf.readUInt32LE(IN_HEADER_SIZE);
    const accmode = flags & 3;
    if (accmode !== fs.constants.O_RDONLY && !this.options.writable) {
      this.replyError(lo, hi, EACCES);
      return;
    }
    if (this.closing) {
      this.replyError(lo, hi, ENODEV);
      return;
    }
    this.openHandles++;
    this.replyOpen(lo, hi, FOPEN_DIRECT_IO | FOPEN_PARALLEL_DIRECT_WRITES);
  }

  private statfs(lo: number, hi: number): void {
    const b = this.scratch;
    const o = OUT_HEADER_SIZE;
    b.fill(0, o, o + STATFS_OUT_SIZE);
    const blocks = Math.ceil(this.options.node.size / 4096);
    putU64(b, o, blocks); // blocks
    putU64(b, o + 24, 1); // files
    b.writeUInt32LE(4096, o + 40); // bsize
    b.writeUInt32LE(255, o + 44); // namelen
    b.writeUInt32LE(4096, o + 48); // frsize
    this.replyIn(b, lo, hi, STATFS_OUT_SIZE);
  }

  private async read(buf: Buffer, _lo: number, _hi: number): Promise<number> {
    const offset = u64(buf, IN_HEADER_SIZE + 8);
    const size = buf.readUInt32LE(IN_HEADER_SIZE + 16);
    const node = this.options.node;
    // Reads past the end are short, as for any file.
    const len = Math.max(0, Math.min(size, node.size - offset, buf.length - OUT_HEADER_SIZE));
    if (len > 0) await node.read(offset, buf.subarray(OUT_HEADER_SIZE, OUT_HEADER_SIZE + len));
    return len;
  }

  private async write(buf: Buffer, n: number, _lo: number, _hi: number): Promise<number> {
    if (!this.options.writable) throw new VdiskError('EACCES', 'export is read-only');
    const offset = u64(buf, IN_HEADER_SIZE + 8);
    const size = buf.readUInt32LE(IN_HEADER_SIZE + 16);
    const start = IN_HEADER_SIZE + WRITE_IN_SIZE;
    if (start + size > n) throw new VdiskError('EINVAL', 'short WRITE request');
    const node = this.options.node;
    let len = size;
    if (offset + len > node.size) {
      if (this.options.growable) await this.grow(offset + len);
      else if (offset >= node.size) throw new VdiskError('ENOSPC', 'write past the end of a non-growable export');
      else len = node.size - offset;
    }
    if (len > 0) await node.write(offset, buf.subarray(start, start + len), this.options.writethrough ? ReqFlags.FUA : 0);
    this.mtimeMs = this.ctimeMs = Date.now();
    buf.writeUInt32LE(len, OUT_HEADER_SIZE);
    buf.writeUInt32LE(0, OUT_HEADER_SIZE + 4);
    return 8;
  }

  /** Grows the node to at least size (growable exports), one resize at a time. */
  private grow(size: number): Promise<void> {
    const node = this.options.node;
    const a = node.limits.requestAlignment;
    const target = Math.ceil(size / a) * a;
    const p = this.growLock.then(() => (node.size < target ? node.truncate(target) : undefined));
    this.growLock = p.catch(() => undefined);
    return p;
  }

  private async setattr(buf: Buffer, _lo: number, _hi: number, nodeid: number): Promise<number> {
    if (!this.known(nodeid)) throw new VdiskError('ENOENT', 'no such inode');
    const o = IN_HEADER_SIZE;
    const valid = buf.readUInt32LE(o);
    const dir = nodeid === ROOT && this.options.directory;
    if (valid & Fattr.SIZE) {
      if (dir) throw new VdiskError('EINVAL', 'a directory has no size');
      const size = u64(buf, o + 16);
      const node = this.options.node;
      if (size !== node.size) {
        if (!this.options.writable) throw new VdiskError('EACCES', 'export is read-only');
        if (!this.options.growable) throw new VdiskError('EPERM', 'export is not growable');
        await node.truncate(size);
      }
      this.mtimeMs = this.ctimeMs = Date.now();
    }
    const now = Date.now();
    const timeAt = (sec: number, nsec: number) => u64(buf, sec) * 1000 + Math.floor(buf.readUInt32LE(nsec) / 1e6);
    if (valid & Fattr.MODE) {
      const perm = buf.readUInt32LE(o + 68) & 0o7777;
      if (dir) this.dirMode = S_IFDIR | perm;
      else this.mode = S_IFREG | perm;
      this.ctimeMs = now;
    }
    if (valid & (Fattr.UID | Fattr.GID)) {
      // One owner for the whole export, as QEMU: chown is refused rather than half-kept.
      const uid = buf.readUInt32LE(o + 76);
      const gid = buf.readUInt32LE(o + 80);
      if (((valid & Fattr.UID) && uid !== this.uid) || ((valid & Fattr.GID) && gid !== this.gid)) {
        throw new VdiskError('EPERM', 'changing the owner is not supported');
      }
    }
    if (valid & Fattr.ATIME) this.atimeMs = valid & Fattr.ATIME_NOW ? now : timeAt(o + 32, o + 56);
    if (valid & Fattr.MTIME) this.mtimeMs = valid & Fattr.MTIME_NOW ? now : timeAt(o + 40, o + 60);
    if (valid & (Fattr.ATIME | Fattr.MTIME)) this.ctimeMs = now;
    return this.putAttrOut(buf, nodeid);
  }

  /** fallocate: punch hole and zero range become write-zeroes, a plain allocation can only grow. */
  private async fallocate(buf: Buffer): Promise<number> {
    if (!this.options.writable) throw new VdiskError('EACCES', 'export is read-only');
    const o = IN_HEADER_SIZE;
    const offset = u64(buf, o + 8);
    const length = u64(buf, o + 16);
    const mode = buf.readUInt32LE(o + 24);
    const node = this.options.node;
    if (mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE)) {
      throw new VdiskError('ENOTSUP', `fallocate mode 0x${mode.toString(16)}`);
    }
    const end = offset + length;
    const keepSize = (mode & FALLOC_FL_KEEP_SIZE) !== 0;
    if (end > node.size && !keepSize) {
      if (!this.options.growable) throw new VdiskError('ENOSPC', 'fallocate past the end of a non-growable export');
      if (mode & FALLOC_FL_PUNCH_HOLE) throw new VdiskError('EINVAL', 'punch hole needs keep size');
      // Growing reads back zeroes in the new part already.
      const oldSize = node.size;
      await this.grow(end);
      if ((mode & FALLOC_FL_ZERO_RANGE) && offset < oldSize) await node.writeZeroes(offset, oldSize - offset, 0);
      return 0;
    }
    const len = Math.max(0, Math.min(end, node.size) - offset);
    if (len === 0) return 0;
    // A punched hole must read back as zeroes (fallocate(2)); discard alone is only a hint, so
    // this is write-zeroes that may unmap: a hole where the node can, zeroes where it cannot.
    if (mode & FALLOC_FL_PUNCH_HOLE) await node.writeZeroes(offset, len, ReqFlags.MAY_UNMAP);
    else if (mode & FALLOC_FL_ZERO_RANGE) await node.writeZeroes(offset, len, 0);
    // A plain allocation inside the disk: every byte of a virtual disk is already there.
    this.mtimeMs = this.ctimeMs = Date.now();
    return 0;
  }

  /** lseek SEEK_DATA / SEEK_HOLE from block status: ranges that read as zeroes are holes. */
  private async lseek(buf: Buffer, _lo: number, _hi: number): Promise<number> {
    const o = IN_HEADER_SIZE;
    const offset = u64(buf, o + 8);
    const whence = buf.readUInt32LE(o + 16);
    const node = this.options.node;
    const size = node.size;
    if (whence !== SEEK_DATA && whence !== SEEK_HOLE) throw new VdiskError('EINVAL', `lseek whence ${whence}`);
    if (offset >= size) throw new VdiskError('ENXIO', 'lseek past the end');
    let pos = offset;
    let result = -1;
    while (pos < size) {
      const ext = await node.blockStatus(pos, size - pos);
      const hole = (ext.flags & Status.ZERO) !== 0;
      if (hole === (whence === SEEK_HOLE)) {
        result = pos;
        break;
      }
      pos += ext.length;
    }
    if (result < 0) {
      if (whence === SEEK_DATA) throw new VdiskError('ENXIO', 'no data after the offset');
      result = size; // the implicit hole at the end
    }
    putU64(buf, OUT_HEADER_SIZE, result);
    return 8;
  }
}

function errnoOf(err: unknown): number {
  if (err instanceof VdiskError) {
    if (err.errno === 'ENOTSUP') return EOPNOTSUPP;
    if (err.errno === 'ENXIO') return ENXIO;
    if (err.errno === 'ENOSPC') return ENOSPC;
    return errnoNumber(err.errno);
  }
  return 5;
}

/** The absolute mountpoint with its parent directories resolved (never touches the mountpoint itself). */
export async function resolveMountpoint(mountpoint: string): Promise<string> {
  const abs = path.resolve(mountpoint);
  const dir = await fs.promises.realpath(path.dirname(abs));
  return path.join(dir, path.basename(abs));
}
