/**
 * The `file` protocol driver: a host file or block device.
 *
 * I/O path (measured, see docs/design/io-path.md):
 * - Reads first try preadv2(RWF_NOWAIT) on the event loop: data already in
 *   the page cache is copied at once, with no thread-pool round trip. Only a
 *   read that would block goes to the libuv pool.
 * - Buffered writes under 256 KiB go to the page cache on the event loop,
 *   which is where they land anyway. If one takes long (writeback
 *   throttling), writes move to the pool for a while so the loop keeps
 *   serving other clients. Larger writes always use the pool.
 * - FUA writes use pwritev2(RWF_DSYNC) on the pool: one durable system call.
 * - flush is fdatasync; discard punches a hole; write-zeroes punches (when
 *   allowed to unmap and discard=unmap) or uses FALLOC_FL_ZERO_RANGE;
 *   block status comes from SEEK_DATA / SEEK_HOLE, called inline as QEMU
 *   does (the file system answers from its cached extent map).
 * - cache.direct=on opens with O_DIRECT and requires aligned I/O; the request
 *   path pads unaligned requests and this driver bounces through aligned memory.
 *
 * Locking follows QEMU's file-posix scheme (open file description locks on
 * bytes 100+n for permissions held and 200+n for permissions not shared), so
 * vdisk, qemu-img and qemu-nbd refuse to write one image at the same time.
 */
import fs from 'node:fs';
import { performance } from 'node:perf_hooks';
import { VdiskError, errnoError } from '../../errors.js';
import { logEvent } from '../../log.js';
import {
  EAGAIN,
  ENXIO,
  EOPNOTSUPP,
  FALLOC_FL_KEEP_SIZE,
  FALLOC_FL_PUNCH_HOLE,
  FALLOC_FL_ZERO_RANGE,
  Op,
  PWRITE_DSYNC,
  SEEK_DATA,
  SEEK_HOLE,
  native,
} from '../../native.js';
import { BlockNode, type Extent, type FormatInfo, ReqFlags, Status } from '../node.js';

export interface FileOptions {
  nodeName: string;
  filename: string;
  readOnly?: boolean;
  /** Fall back to read-only if the file cannot be opened for writing. */
  autoReadOnly?: boolean;
  locking?: 'auto' | 'on' | 'off';
  /** Open with O_DIRECT (bypass the host page cache). */
  direct?: boolean;
  /** Ignore flush requests (cache=unsafe): fast, and not crash safe. */
  noFlush?: boolean;
  /** 'unmap' lets discard and write-zeroes deallocate. */
  discard?: 'ignore' | 'unmap';
  /** Share every permission and take none: a reader that ignores writers (qemu-img -U). */
  forceShare?: boolean;
}

/** QEMU's permission bits, in the order of their lock bytes. */
const PERM_NAMES = ['consistent read', 'write', 'write unchanged', 'resize'];
const PERM_READ = 1;
const PERM_WRITE = 2;
const PERM_WRITE_UNCHANGED = 4;
const PERM_RESIZE = 8;
const PERM_ALL = 15;
const LOCK_PERM_BASE = 100;
const LOCK_SHARED_BASE = 200;

/** A sync write slower than this sends writes to the thread pool for a while. */
const SLOW_WRITE_MS = 2;
const POOL_WRITES_FOR_MS = 1000;
/**
 * Writes this large go to the pool even when the page cache is fast: copying
 * them blocks the loop long enough that overlapping it with reading the next
 * payload from the socket wins (measured: 1M writes +5-8%).
 */
const POOL_WRITE_MIN = 256 * 1024;
/**
 * Reads this large go to the pool even when cached: copying 1 MiB takes
 * ~0.3 ms, long enough that running it on a pool thread (beside the loop, on
 * the other core) beats a NOWAIT read on the loop for bulk copies.
 */
const POOL_READ_MIN = 1024 * 1024;

export class FileNode extends BlockNode {
  readonly driverName = 'file';
  private fd = -1;
  private readonly path: string;
  private isBlockDevice = false;
  private direct: boolean;
  private noFlush: boolean;
  private unmap: boolean;
  /** Until this time (performance.now()), buffered writes go to the pool. */
  private poolWritesUntil = 0;
  /** RWF_NOWAIT failed with something other than EAGAIN once (tmpfs, some FUSE and network file systems): always use the pool. */
  private noNowait = false;

  private constructor(options: FileOptions) {
    super({ nodeName: options.nodeName, readOnly: options.readOnly });
    this.path = options.filename;
    this.direct = options.direct ?? false;
    this.noFlush = options.noFlush ?? false;
    this.unmap = options.discard === 'unmap';
    // RWF_DSYNC makes a FUA write durable in one system call.
    this.nativeFua = true;
  }

  static async open(options: FileOptions): Promise<FileNode> {
    const node = new FileNode(options);
    await node.openFile(options);
    return node;
  }

  override get filename(): string {
    return this.path;
  }

  /** A host file has no clusters and no dirty state, but answers (QEMU's file-posix has get_info). */
  override formatInfo(): FormatInfo {
    return { clusterSize: 0, vmStateOffset: 0, dirty: false };
  }

  override get hostFile(): { path: string; identity(): { dev: bigint; ino: bigint; mtimeNs: bigint } } | undefined {
    if (this.isBlockDevice || this.fd < 0) return undefined;
    return {
      path: this.path,
      identity: () => {
        const st = fs.fstatSync(this.fd, { bigint: true });
        return { dev: st.dev, ino: st.ino, mtimeNs: st.mtimeNs };
      },
    };
  }

  private async openFile(options: FileOptions): Promise<void> {
    const { O_RDONLY, O_RDWR, O_DIRECT } = fs.constants;
    const flags = (this.direct ? O_DIRECT : 0);
    try {
      this.fd = await openFd(this.path, (this.readOnly ? O_RDONLY : O_RDWR) | flags);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      if (!this.readOnly && options.autoReadOnly && (code === 'EACCES' || code === 'EROFS' || code === 'EPERM')) {
        this.readOnly = true;
        this.fd = await openFd(this.path, O_RDONLY | flags).catch((e) => {
          throw openError(this.path, e);
        });
      } else {
        throw openError(this.path, err);
      }
    }
    try {
      const st = fs.fstatSync(this.fd);
      if (st.isBlockDevice()) {
        const info = native.blockDeviceInfo(this.fd);
        if (typeof info === 'number') throw errnoError(info, `Could not get the size of '${this.path}'`);
        this.isBlockDevice = true;
        this.length = info[0];
        if (this.direct) this.limits.requestAlignment = info[1];
      } else if (st.isFile()) {
        this.length = st.size;
        // A format driver above may allocate past the end of its file, as in QEMU.
        this.growable = !this.readOnly;
        // QEMU probes the smallest alignment O_DIRECT accepts; 4096 works wherever O_DIRECT does.
        if (this.direct) this.limits.requestAlignment = 4096;
      } else {
        throw new VdiskError('EINVAL', `'${this.path}' is not a regular file or block device`);
      }
      if (!Number.isSafeInteger(this.length)) throw new VdiskError('EFBIG', `'${this.path}' is too large`);
      if (options.locking !== 'off') this.lock(options);
    } catch (err) {
      fs.closeSync(this.fd);
      this.fd = -1;
      throw err;
    }
  }

  /** Takes QEMU-compatible lock bytes for what this node does and refuses to share. */
  private lock(options: FileOptions): void {
    let perm: number;
    let shared: number;
    if (options.forceShare) {
      perm = 0;
      shared = PERM_ALL;
    } else if (this.readOnly) {
      perm = PERM_READ;
      shared = PERM_READ | PERM_WRITE_UNCHANGED;
    } else {
      perm = PERM_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE;
      shared = PERM_READ | PERM_WRITE_UNCHANGED;
    }
    // Lock first, then test: two processes racing both see each other.
    for (let i = 0; i < PERM_NAMES.length; i++) {
      const bit = 1 << i;
      for (const [wanted, byte] of [
        [perm & bit, LOCK_PERM_BASE + i],
        [~shared & bit, LOCK_SHARED_BASE + i],
      ]) {
        if (!wanted) continue;
        const r = native.ofdLock(this.fd, byte, 1, 1);
        if (r < 0) {
          if (options.locking === 'on') throw errnoError(r, `Failed to lock byte ${byte} of '${this.path}'`);
          logEvent('warn', 'file-locking-unavailable', { filename: this.path, errno: -r });
          return;
        }
      }
    }
    for (let i = 0; i < PERM_NAMES.length; i++) {
      const bit = 1 << i;
      if (perm & bit && native.ofdTest(this.fd, LOCK_SHARED_BASE + i, 1, 2) === 1) {
        throw new VdiskError('EBUSY', `Failed to get "${PERM_NAMES[i]}" lock on '${this.path}': is another process using the image?`, { code: 'VDISK_LOCKED' });
      }
      if (!(shared & bit) && native.ofdTest(this.fd, LOCK_PERM_BASE + i, 1, 2) === 1) {
        throw new VdiskError('EBUSY', `Failed to get shared "${PERM_NAMES[i]}" lock on '${this.path}': is another process using the image?`, { code: 'VDISK_LOCKED' });
      }
    }
  }

  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    if (this.direct) return this.readDirect(offset, buf);
    if (!this.noNowait && buf.length < POOL_READ_MIN) {
      const n = native.preadNowait(this.fd, buf, 0, buf.length, offset);
      if (n === buf.length) return;
      if (n >= 0) {
        // Past the end of the file (a growable node, or a file shrunk behind our back): zeroes.
        buf.fill(0, n);
        return;
      }
      // EAGAIN: not in the page cache. Anything else (EOPNOTSUPP on tmpfs, ...): the
      // file system has no non-blocking reads; the pool read below reports real errors.
      if (n !== EAGAIN) {
        this.noNowait = true;
        logEvent('debug', 'file-no-nowait-reads', { filename: this.path, errno: -n });
      }
    }
    const m = await native.submit(Op.PREAD, this.fd, buf, 0, buf.length, offset, 0);
    if (m < 0) throw errnoError(m, `read at ${offset} from '${this.path}'`);
    if (m < buf.length) buf.fill(0, m);
  }

  private async readDirect(offset: number, buf: Buffer): Promise<void> {
    const bounce = native.alignedBuffer(buf.length, 4096);
    const m = await native.submit(Op.PREAD, this.fd, bounce, 0, buf.length, offset, 0);
    if (m < 0) throw errnoError(m, `read at ${offset} from '${this.path}'`);
    bounce.copy(buf, 0, 0, m);
    if (m < buf.length) buf.fill(0, m);
  }

  protected override async doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    let src = buf;
    if (this.direct) {
      src = native.alignedBuffer(buf.length, 4096);
      buf.copy(src);
    } else if (!(flags & ReqFlags.FUA) && this.poolWritesUntil === 0 && buf.length < POOL_WRITE_MIN) {
      const t0 = performance.now();
      const n = native.pwriteSync(this.fd, buf, 0, buf.length, offset);
      if (n < 0) throw errnoError(n, `write at ${offset} to '${this.path}'`);
      const took = performance.now() - t0;
      if (took > SLOW_WRITE_MS) {
        this.poolWritesUntil = performance.now() + POOL_WRITES_FOR_MS;
        logEvent('debug', 'file-writes-to-pool', { filename: this.path, syncWriteMs: took });
      }
      return;
    } else if (this.poolWritesUntil !== 0 && performance.now() > this.poolWritesUntil) {
      this.poolWritesUntil = 0;
    }
    const n = await native.submit(Op.PWRITE, this.fd, src, 0, src.length, offset, flags & ReqFlags.FUA ? PWRITE_DSYNC : 0);
    if (n < 0) throw errnoError(n, `write at ${offset} to '${this.path}'`);
  }

  protected override async doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    if (offset + length > this.length && !this.isBlockDevice) {
      // A growable file: extending it makes the new part read as zeroes (a hole).
      const old = this.length;
      await this.doTruncate(offset + length);
      if (offset >= old) {
        if (flags & ReqFlags.FUA) await this.doFlush();
        return;
      }
      length = old - offset;
    }
    const mayUnmap = this.unmap && (flags & ReqFlags.MAY_UNMAP) !== 0;
    let r = EOPNOTSUPP;
    if (mayUnmap) r = await this.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    // On a block device ZERO_RANGE may fall back to writing zeroes inside the kernel: not "fast".
    if (r === EOPNOTSUPP && !(this.isBlockDevice && flags & ReqFlags.NO_FALLBACK)) {
      r = await this.fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
    }
    if (r === EOPNOTSUPP || r === -22 /* EINVAL: unaligned for this device */) {
      throw new VdiskError('ENOTSUP', `'${this.path}' cannot zero a range efficiently`);
    }
    if (r < 0) throw errnoError(r, `write-zeroes at ${offset} to '${this.path}'`);
    if (flags & ReqFlags.FUA) await this.doFlush();
  }

  protected override async doDiscard(offset: number, length: number): Promise<void> {
    if (!this.unmap) return;
    const r = this.isBlockDevice
      ? await native.submit(Op.BLKDISCARD, this.fd, null, 0, length, offset, 0)
      : await this.fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
    // Discard is advisory: a file system or device that cannot do it loses nothing.
    if (r < 0 && r !== EOPNOTSUPP && r !== -22) throw errnoError(r, `discard at ${offset} on '${this.path}'`);
  }

  private fallocate(mode: number, offset: number, length: number): Promise<number> {
    return native.submit(Op.FALLOCATE, this.fd, null, 0, length, offset, mode);
  }

  protected override async doFlush(): Promise<void> {
    if (this.noFlush) return;
    const r = await native.submit(Op.FDATASYNC, this.fd, null, 0, 0, 0, 0);
    if (r < 0) throw errnoError(r, `flush of '${this.path}'`);
  }

  protected override async doTruncate(size: number): Promise<void> {
    if (this.isBlockDevice) {
      if (size === this.length) return;
      throw new VdiskError('ENOTSUP', `Cannot resize block device '${this.path}'`);
    }
    await new Promise<void>((resolve, reject) =>
      fs.ftruncate(this.fd, size, (err) => (err ? reject(errnoFromNode(err, `truncate '${this.path}'`)) : resolve())),
    );
    this.length = size;
  }

  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    if (this.isBlockDevice) return { length, flags: Status.DATA | Status.ALLOCATED, depth: 1, hostOffset: offset };
    const data = native.seekSync(this.fd, offset, SEEK_DATA);
    if (data === ENXIO) {
      // No data from offset to the end of the file (also past a shrunk file's end).
      return { length, flags: Status.ZERO | Status.ALLOCATED, depth: 1, hostOffset: offset };
    }
    if (data < 0) return { length, flags: Status.DATA | Status.ALLOCATED, depth: 1, hostOffset: offset };
    if (data > offset) return { length: Math.min(data - offset, length), flags: Status.ZERO | Status.ALLOCATED, depth: 1, hostOffset: offset };
    const hole = native.seekSync(this.fd, offset, SEEK_HOLE);
    const end = hole > offset ? hole : offset + length;
    return { length: Math.min(end - offset, length), flags: Status.DATA | Status.ALLOCATED, depth: 1, hostOffset: offset };
  }

  protected override async doClose(): Promise<void> {
    if (this.fd >= 0) {
      const fd = this.fd;
      this.fd = -1;
      // Closing the descriptor also releases its lock bytes.
      await new Promise<void>((resolve) => fs.close(fd, () => resolve()));
    }
  }
}

function openFd(path: string, flags: number): Promise<number> {
  return new Promise((resolve, reject) => fs.open(path, flags, (err, fd) => (err ? reject(err) : resolve(fd))));
}

/** strerror() texts, so messages read as QEMU's ("Could not open 'x': Is a directory"). */
const STRERROR: Record<string, string> = {
  ENOENT: 'No such file or directory',
  EACCES: 'Permission denied',
  EPERM: 'Operation not permitted',
  EISDIR: 'Is a directory',
  ENOTDIR: 'Not a directory',
  EROFS: 'Read-only file system',
  ELOOP: 'Too many levels of symbolic links',
  ENAMETOOLONG: 'File name too long',
  EBUSY: 'Device or resource busy',
  ETXTBSY: 'Text file busy',
  ENXIO: 'No such device or address',
  EINVAL: 'Invalid argument',
};

function openError(path: string, err: unknown): VdiskError {
  const e = err as NodeJS.ErrnoException;
  const reason = STRERROR[e.code ?? ''] ?? e.message;
  return errnoFromNode(e, `Could not open '${path}': ${reason}`, true);
}

function errnoFromNode(err: NodeJS.ErrnoException, message: string, exact = false): VdiskError {
  const known = ['ENOENT', 'EACCES', 'EPERM', 'EROFS', 'EINVAL', 'ENOSPC', 'EIO', 'EBUSY', 'EFBIG'];
  const errno = known.includes(err.code ?? '') ? (err.code as 'EIO') : err.code === 'EISDIR' || err.code === 'ENOTDIR' ? 'EINVAL' : 'EIO';
  return new VdiskError(errno, exact ? message : `${message}: ${err.message}`, { cause: err });
}
