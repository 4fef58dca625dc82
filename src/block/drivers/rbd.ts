/**
 * The `rbd` protocol driver: an image on a Ceph cluster, through librbd (native/rbd.c), with
 * QEMU's options (BlockdevOptionsRbd).
 *
 * - I/O uses librbd's asynchronous calls, completed on the event loop; librbd splits requests
 *   across objects itself, so requests of any alignment and size go straight through.
 * - librbd's cache follows cache.direct as in QEMU: on unless direct=on. With it, writes are
 *   durable after a flush; FUA is a flush.
 * - write-zeroes without MAY_UNMAP asks librbd to keep the range allocated (thick), as QEMU
 *   does; with it, librbd may drop the objects.
 * - Block status comes from rbd_diff_iterate2 (exact extents, no fast-diff needed): data where
 *   librbd reports an extent, and elsewhere ZERO (the range reads as zeroes), both owned by this
 *   node as QEMU reports them. One diff answers a window of up to 1 GiB, cached until the next
 *   change.
 * - A writable open takes the image's exclusive lock and keeps it (librbd hands a lock taken
 *   this way to nobody): a second writer, vdisk or QEMU, fails instead of the two taking turns.
 * - `snapshot` opens that snapshot, read-only.
 */
import { VdiskError } from '../../errors.js';
import { logEvent } from '../../log.js';
import type { ObjectRegistry } from '../../objects/registry.js';
import { BlockNode, type Extent, type FormatInfo, ReqFlags, Status } from '../node.js';
import {
  RBD_FEATURE_EXCLUSIVE_LOCK,
  RBD_WRITE_ZEROES_FLAG_THICK_PROVISION,
  RbdAio,
  type RbdAddon,
  type RbdConnect,
  errnoName,
  isFailure,
  rbdAddon,
  rbdError,
} from './rbd-native.js';

/** BlockdevOptionsRbd, as checked by the driver table. */
export interface RbdOptions {
  pool: string;
  namespace?: string;
  image: string;
  conf?: string;
  snapshot?: string;
  user?: string;
  'auth-client-required'?: Array<'cephx' | 'none'>;
  'key-secret'?: string;
  server?: Array<{ host: string; port: string }>;
}

export interface RbdOpenOptions {
  nodeName: string;
  readOnly: boolean;
  /** cache.direct: librbd's cache off. */
  direct: boolean;
  objects: ObjectRegistry | undefined;
}

/** The largest range one block-status diff covers: a full-image diff of a large image is slow. */
const DIFF_WINDOW = 1024 * 1024 * 1024;
const EOPNOTSUPP = -95;
const EINVAL = -22;

/** librados settings for BlockdevOptionsRbd's connection members. */
export function rbdConnect(o: RbdOptions, direct: boolean, objects: ObjectRegistry | undefined): RbdConnect {
  const settings: Array<[string, string]> = [];
  if (o['key-secret'] !== undefined) {
    if (!objects) throw new VdiskError('ENOENT', `No secret with id '${o['key-secret']}'`);
    settings.push(['key', objects.secretBase64(o['key-secret'])]);
  }
  if (o['auth-client-required'] !== undefined) settings.push(['auth_client_required', o['auth-client-required'].join(';')]);
  if (o.server !== undefined && o.server.length > 0) {
    // mon_host: host:port;... with IPv6 addresses in brackets.
    settings.push(['mon_host', o.server.map((s) => `${s.host.includes(':') ? `[${s.host}]` : s.host}:${s.port}`).join(';')]);
  }
  settings.push(['rbd_cache', direct ? 'false' : 'true']);
  return { conf: o.conf ?? null, user: o.user ?? null, settings };
}

/** pool/[namespace/]image[@snapshot]: the image as `rbd` and QEMU's rbd: names spell it. */
export function rbdImageSpec(o: { pool: string; namespace?: string; image: string; snapshot?: string }): string {
  return `${o.pool}/${o.namespace ? `${o.namespace}/` : ''}${o.image}${o.snapshot !== undefined ? `@${o.snapshot}` : ''}`;
}

interface DiffCache {
  start: number;
  end: number;
  /** Allocated extents inside [start, end), sorted and merged: [offset, end) pairs. */
  extents: Array<[number, number]>;
}

export class RbdNode extends BlockNode {
  readonly driverName = 'rbd';
  private handle: object | undefined;
  private objectSize = 0;
  /** Bumped when a change starts and when it ends: a diff that saw a change is not cached. */
  private changeGen = 0;
  private changesInFlight = 0;
  private diffCache: DiffCache | undefined;

  private constructor(
    nodeName: string,
    readOnly: boolean,
    private readonly spec: string,
    private readonly addon: RbdAddon,
  ) {
    super({ nodeName, readOnly });
  }

  static async open(o: RbdOptions, options: RbdOpenOptions): Promise<RbdNode> {
    const addon = rbdAddon();
    const spec = rbdImageSpec(o);
    const readOnly = options.readOnly || o.snapshot !== undefined;
    const connect = rbdConnect(o, options.direct, options.objects);
    const r = await addon.open(connect, o.pool, o.namespace ?? null, o.image, o.snapshot ?? null, readOnly);
    if (isFailure(r)) {
      const err = rbdError(r.errno, `Could not open RBD image '${spec}' (${r.stage})`);
      if (r.errno === -2 && r.stage.startsWith('rbd_open')) {
        throw new VdiskError('ENOENT', `${err.message}: no such ${o.snapshot !== undefined ? 'image or snapshot' : 'image'}`);
      }
      throw err;
    }
    const node = new RbdNode(options.nodeName, readOnly, spec, addon);
    node.handle = r.handle;
    node.length = r.size;
    node.objectSize = r.objectSize;
    node.limits.preferredSize = Math.min(r.objectSize, 4 * 1024 * 1024);
    node.cacheMode = { direct: options.direct, noFlush: false };
    if (!readOnly) {
      try {
        await node.takeLock(r.features);
      } catch (err) {
        await node.releaseHandle();
        throw err;
      }
    }
    return node;
  }

  /** Takes the exclusive lock for good, or fails naming the image and who holds it. */
  private async takeLock(features: number): Promise<void> {
    if (!(features & RBD_FEATURE_EXCLUSIVE_LOCK)) {
      // Nothing to take: such an image has no lock; two writers can only be kept apart by hand.
      logEvent('warn', 'rbd-no-exclusive-lock', { node: this.nodeName, image: this.spec });
      return;
    }
    const r = await this.addon.lockAcquire(this.handle!);
    if (!isFailure(r)) return;
    const owners = await this.addon.lockOwners(this.handle!);
    const held = !isFailure(owners) && owners.length > 0 ? ` (held by ${owners.join(', ')})` : '';
    throw new VdiskError(
      r.errno === -30 || r.errno === -16 || held ? 'EBUSY' : rbdError(r.errno, '').errno,
      `Failed to get the exclusive lock on RBD image '${this.spec}'${held}: ${errnoName(r.errno)}; is another process writing the image?`,
      { code: 'VDISK_LOCKED' },
    );
  }

  override get filename(): string {
    return `rbd:${this.spec}`;
  }

  /** QEMU's rbd get_info: the object size is the cluster size. */
  override formatInfo(): FormatInfo {
    return { clusterSize: this.objectSize, vmStateOffset: 0, dirty: false };
  }

  private async aio(op: number, buf: Buffer | null, offset: number, length: number, flags: number, what: string): Promise<number> {
    if (!this.handle) throw new VdiskError('ESHUTDOWN', `node '${this.nodeName}' is closed`);
    const r = await this.addon.aio(op, this.handle, buf, offset, length, flags);
    if (r < 0) throw rbdError(r, `${what} on RBD image '${this.spec}'`);
    return r;
  }

  /** Runs a change, keeping the block-status cache from holding what it may have missed. */
  private async change<T>(fn: () => Promise<T>): Promise<T> {
    this.changeGen++;
    this.changesInFlight++;
    this.diffCache = undefined;
    try {
      return await fn();
    } finally {
      this.changesInFlight--;
      this.changeGen++;
      this.diffCache = undefined;
    }
  }

  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    const n = await this.aio(RbdAio.READ, buf, offset, buf.length, 0, `read at ${offset}`);
    // librbd reads short only past the end (an image shrunk by another client): zeroes there.
    if (n < buf.length) buf.fill(0, n);
  }

  protected override doWrite(offset: number, buf: Buffer): Promise<void> {
    return this.change(async () => {
      await this.aio(RbdAio.WRITE, buf, offset, buf.length, 0, `write at ${offset}`);
    });
  }

  protected override doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.change(async () => {
      const zeroFlags = flags & ReqFlags.MAY_UNMAP ? 0 : RBD_WRITE_ZEROES_FLAG_THICK_PROVISION;
      const r = await this.addon.aio(RbdAio.WRITE_ZEROES, this.handle!, null, offset, length, zeroFlags);
      if (r === EOPNOTSUPP || r === EINVAL) throw new VdiskError('ENOTSUP', `RBD image '${this.spec}' cannot zero a range efficiently`);
      if (r < 0) throw rbdError(r, `write-zeroes at ${offset} on RBD image '${this.spec}'`);
      if (flags & ReqFlags.FUA) await this.doFlush();
    });
  }

  protected override doDiscard(offset: number, length: number): Promise<void> {
    return this.change(async () => {
      await this.aio(RbdAio.DISCARD, null, offset, length, 0, `discard at ${offset}`);
    });
  }

  protected override async doFlush(): Promise<void> {
    if (this.readOnly) return;
    await this.aio(RbdAio.FLUSH, null, 0, 0, 0, 'flush');
  }

  protected override doTruncate(size: number): Promise<void> {
    return this.change(async () => {
      const r = await this.addon.resize(this.handle!, size);
      if (isFailure(r)) throw rbdError(r.errno, `Could not resize RBD image '${this.spec}' to ${size}`);
      this.length = r;
    });
  }

  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    const cache = this.diffCache;
    const diff = cache && cache.start <= offset && offset < cache.end ? cache : await this.diff(offset, Math.min(length, DIFF_WINDOW));
    const end = Math.min(diff.end, offset + length);
    for (const [s, e] of diff.extents) {
      if (e <= offset) continue;
      if (s <= offset) return { length: Math.min(e, end) - offset, flags: Status.DATA | Status.ALLOCATED, depth: 1, hostOffset: offset };
      // A hole up to the next extent: reads as zeroes, as QEMU's rbd driver reports it.
      return { length: Math.min(s, end) - offset, flags: Status.ZERO | Status.ALLOCATED, depth: 1, hostOffset: offset };
    }
    return { length: end - offset, flags: Status.ZERO | Status.ALLOCATED, depth: 1, hostOffset: offset };
  }

  private async diff(offset: number, length: number): Promise<DiffCache> {
    const gen = this.changeGen;
    const r = await this.addon.allocated(this.handle!, offset, length);
    if (isFailure(r)) throw rbdError(r.errno, `block status at ${offset} of RBD image '${this.spec}' (${r.stage})`);
    const extents: Array<[number, number]> = [];
    for (let i = 0; i < r.length; i += 2) {
      const s = r[i];
      const e = s + r[i + 1];
      const last = extents[extents.length - 1];
      // librbd reports per object (and per extent inside one): adjacent ones are one extent.
      if (last && last[1] >= s) last[1] = Math.max(last[1], e);
      else extents.push([s, e]);
    }
    const result = { start: offset, end: offset + length, extents };
    if (gen === this.changeGen && this.changesInFlight === 0) this.diffCache = result;
    return result;
  }

  private async releaseHandle(): Promise<void> {
    const handle = this.handle;
    if (!handle) return;
    this.handle = undefined;
    // rbd_close flushes librbd's cache and releases the exclusive lock.
    const r = await this.addon.close(handle);
    if (isFailure(r)) logEvent('warn', 'rbd-close-failed', { node: this.nodeName, image: this.spec, errno: errnoName(r.errno), stage: r.stage });
  }

  protected override async doClose(): Promise<void> {
    await this.releaseHandle();
  }
}

/** blockdev-create / img create: a new image of `size` bytes; order 0 is librbd's default object size. */
export async function createRbdImage(o: RbdOptions, size: number, clusterSize: number | undefined, objects: ObjectRegistry | undefined): Promise<void> {
  let order = 0;
  if (clusterSize !== undefined) {
    order = Math.log2(clusterSize);
    // librbd's limits: objects of 4 KiB to 32 MiB, a power of two.
    if (!Number.isInteger(order) || order < 12 || order > 25) {
      throw new VdiskError('EINVAL', 'obj size needs to be power of 2 and between 4K and 32M');
    }
  }
  const r = await rbdAddon().create(rbdConnect(o, false, objects), o.pool, o.namespace ?? null, o.image, size, order);
  if (isFailure(r)) throw rbdError(r.errno, `error rbd create (${r.stage}) of '${rbdImageSpec(o)}'`);
}
