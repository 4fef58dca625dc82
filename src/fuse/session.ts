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
 * What each request means, every check on it and every reply's bytes are
 * FuseCore's (core.ts, no I/O); this class reads /dev/fuse, runs the node
 * operations the core asks for and writes the replies.
 *
 * Nothing here touches the mount through the file system: mount and umount
 * run on the thread pool, everything else is /dev/fuse traffic. A process
 * touching its own FUSE mount synchronously would wait on itself.
 */
import { type IoStats, Op as AcctOp } from '../metrics/stats.js';
import fs from 'node:fs';
import path from 'node:path';
import { VdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import { type BlockNode, ReqFlags, Status } from '../block/node.js';
import { native, Op } from '../native.js';
import { FuseCore, type FuseOp } from './core.js';
import { MAX_IO, OUT_HEADER_SIZE, REQUEST_BUFFER_SIZE, S_IFDIR, S_IFREG, SEEK_DATA, SEEK_HOLE } from './protocol.js';

const EAGAIN = 11;
const EINTR = 4;
const ENOENT = 2;
const ENODEV = 19;
const EPERM = 1;
const EINVAL = 22;

const MS_NOSUID = 2;
const MS_NODEV = 4;
const MNT_DETACH = 2;

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
  /** The export's request counters (reads, writes, flushes, zeroing as the kernel asked them). */
  stats?: IoStats;
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
  /** Requests being served by the node. */
  private inFlight = 0;
  private idle: (() => void) | undefined;
  private closing = false;
  private gone = false;
  private initSeen = false;
  private initDone!: () => void;
  private readonly initialised = new Promise<void>((r) => (this.initDone = r));
  private readonly uid = process.getuid?.() ?? 0;
  private readonly gid = process.getgid?.() ?? 0;
  private growLock: Promise<void> = Promise.resolve();
  /** The protocol (parsing, checks, replies, the file's attributes); this class does the I/O. */
  private readonly core: FuseCore;

  constructor(readonly options: FuseSessionOptions) {
    this.core = new FuseCore({
      id: options.id,
      directory: options.directory,
      writable: options.writable,
      growable: options.growable,
      uid: this.uid,
      gid: this.gid,
      size: () => options.node.size,
    });
  }

  /** File handles open in the kernel (OPEN minus RELEASE). */
  get openHandles(): number {
    return this.core.openHandles;
  }

  get clients(): number {
    return this.core.openHandles;
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
    this.core.closing = true;
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
    const a = this.core.handle(buf, n);
    if (a.type === 'op') return this.serve(a.op);
    if (a.type === 'reply') this.send(a.data);
    if (this.core.initialised && !this.initSeen) {
      this.initSeen = true;
      this.initDone();
    }
    this.giveBack(buf);
  }

  /** Runs one node operation the core asked for and sends the reply it makes of the outcome. */
  private serve(op: FuseOp): void {
    this.inFlight++;
    const start = performance.now();
    this.run(op).then(
      (lseekResult) => {
        this.account(op, start, true);
        this.send(this.core.done(op, lseekResult));
      },
      (err) => {
        if (!(err instanceof VdiskError)) logEvent('error', 'fuse-request-failed', { id: this.options.id, error: (err as Error)?.message });
        this.account(op, start, false);
        this.send(this.core.fail(op, err));
      },
    ).finally(() => {
      this.giveBack(op.buf);
      if (--this.inFlight === 0 && this.idle) {
        this.idle();
        this.idle = undefined;
      }
    });
  }

  /** The export's counters: reads, writes, flushes and zeroing (fallocate) as the kernel asked them. */
  private account(op: FuseOp, start: number, ok: boolean): void {
    const stats = this.options.stats;
    if (!stats) return;
    let kind: AcctOp;
    let bytes = 0;
    if (op.kind === 'read') [kind, bytes] = [AcctOp.Read, op.length];
    else if (op.kind === 'write') [kind, bytes] = [AcctOp.Write, op.data.length];
    else if (op.kind === 'flush') kind = AcctOp.Flush;
    else if (op.kind === 'fallocate' && op.zero !== undefined) [kind, bytes] = [op.zero.flags & ReqFlags.MAY_UNMAP ? AcctOp.Unmap : AcctOp.Write, op.zero.length];
    else return;
    if (ok) stats.done(kind, bytes, start);
    else stats.fail(kind);
  }

  private async run(op: FuseOp): Promise<number | undefined> {
    const node = this.options.node;
    switch (op.kind) {
      case 'read':
        if (op.length > 0) await node.read(op.offset, op.buf.subarray(OUT_HEADER_SIZE, OUT_HEADER_SIZE + op.length));
        return;
      case 'write':
        if (op.growTo !== undefined) await this.grow(op.growTo);
        if (op.data.length > 0) await node.write(op.offset, op.data, this.options.writethrough ? ReqFlags.FUA : 0);
        return;
      case 'flush':
        await node.flush();
        return;
      case 'setattr':
        if (op.truncate !== undefined) await node.truncate(op.truncate);
        return;
      case 'fallocate':
        if (op.growTo !== undefined) await this.grow(op.growTo);
        if (op.zero !== undefined) await node.writeZeroes(op.zero.offset, op.zero.length, op.zero.flags);
        return;
      case 'lseek':
        return this.lseek(op.offset, op.whence);
    }
  }

  // ---- replies ---------------------------------------------------------------

  private send(reply: Buffer): void {
    if (this.fd < 0) return;
    const rc = native.writeFd(this.fd, reply, 0, reply.length);
    // ENOENT: the request was interrupted and the kernel has forgotten it; ENODEV: the session ended.
    if (rc < 0 && -rc !== ENOENT && -rc !== ENODEV) {
      logEvent('error', 'fuse-reply-failed', { id: this.options.id, errno: -rc });
    }
  }

  private replyError(lo: number, hi: number, errno: number): void {
    const b = Buffer.alloc(OUT_HEADER_SIZE);
    b.writeUInt32LE(OUT_HEADER_SIZE, 0);
    b.writeInt32LE(-errno, 4);
    b.writeUInt32LE(lo, 8);
    b.writeUInt32LE(hi, 12);
    this.send(b);
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

  /** lseek SEEK_DATA / SEEK_HOLE from block status: ranges that read as zeroes are holes. */
  private async lseek(offset: number, whence: number): Promise<number> {
    const node = this.options.node;
    const size = node.size;
    let pos = offset;
    while (pos < size) {
      const ext = await node.blockStatus(pos, size - pos);
      const hole = (ext.flags & Status.ZERO) !== 0;
      if (hole === (whence === SEEK_HOLE)) return pos;
      pos += ext.length;
    }
    if (whence === SEEK_DATA) throw new VdiskError('ENXIO', 'no data after the offset');
    return size; // the implicit hole at the end
  }
}

/** The absolute mountpoint with its parent directories resolved (never touches the mountpoint itself). */
export async function resolveMountpoint(mountpoint: string): Promise<string> {
  const abs = path.resolve(mountpoint);
  const dir = await fs.promises.realpath(path.dirname(abs));
  return path.join(dir, path.basename(abs));
}
