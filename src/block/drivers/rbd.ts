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
  /** vdisk's: take the exclusive lock from a holder that still has it, fencing that holder (see takeLock). */
  'x-break-lock'?: boolean;
  /**
   * QEMU's: librados settings from an rbd: file name's extra `key=value` pairs, as a JSON array
   * of alternating names and values (QEMU's rbd driver takes the same hidden option).
   */
  'keyvalue-pairs'?: string;
  /** vdisk's: seconds to wait for the monitors before the open fails (librados waits 300 by default). */
  'x-connect-timeout'?: number;
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
const EROFS = -30;
const EBUSY = -16;
/**
 * How long an open waits for the monitors. librados's own default (client_mount_timeout) is
 * 300 s, which makes a wrong monitor address look like a hung blockdev-add; 30 s is still
 * ample for a monitor election.
 */
export const DEFAULT_CONNECT_TIMEOUT_S = 30;

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
  const timeout = o['x-connect-timeout'] ?? DEFAULT_CONNECT_TIMEOUT_S;
  if (!Number.isInteger(timeout) || timeout < 1) throw new VdiskError('EINVAL', "Parameter 'x-connect-timeout' expects a whole number of seconds, at least 1");
  // client_mount_timeout bounds rados_connect (finding a monitor and authenticating);
  // rados_mon_op_timeout bounds the monitor commands that follow (a lock break's blocklist).
  // OSD requests keep librados's default (no timeout), as QEMU has them: I/O waits out recovery.
  settings.push(['client_mount_timeout', String(timeout)], ['rados_mon_op_timeout', String(timeout)]);
  if (o['keyvalue-pairs'] !== undefined) settings.push(...keyValuePairs(o['keyvalue-pairs']));
  return { conf: o.conf ?? null, user: o.user ?? null, settings };
}

/** keyvalue-pairs' JSON ["name", "value", ...] as settings, applied after vdisk's own (so they win, as in QEMU). */
function keyValuePairs(json: string): Array<[string, string]> {
  let list: unknown;
  try {
    list = JSON.parse(json);
  } catch {
    list = undefined;
  }
  if (!Array.isArray(list) || list.length % 2 !== 0 || !list.every((x) => typeof x === 'string')) {
    throw new VdiskError('EINVAL', "Parameter 'keyvalue-pairs' expects a JSON list of alternating names and values");
  }
  const out: Array<[string, string]> = [];
  for (let i = 0; i < list.length; i += 2) out.push([list[i] as string, list[i + 1] as string]);
  return out;
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
  /** The image's size in librbd (node.length follows it, and a growing write's end after it). */
  private imageSize = 0;
  /** Grows run one after another, so a smaller grow finishing late never shrinks the image. */
  private growing: Promise<void> = Promise.resolve();

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
      if (r.stage === 'rados_connect' && r.errno === -110) {
        // The bound in force: an rbd: name's own client_mount_timeout pair comes last and wins.
        const timeout = connect.settings.filter(([k]) => k === 'client_mount_timeout').pop()![1];
        throw new VdiskError(
          'EIO',
          `Could not open RBD image '${spec}' (rados_connect): ETIMEDOUT: no monitor answered within ${timeout} s (x-connect-timeout); check the monitor addresses (conf, server)`,
          { code: 'VDISK_RBD_CONNECT_TIMEOUT' },
        );
      }
      const err = rbdError(r.errno, `Could not open RBD image '${spec}' (${r.stage})`);
      if (r.errno === -2 && r.stage.startsWith('rbd_open')) {
        throw new VdiskError('ENOENT', `${err.message}: no such ${o.snapshot !== undefined ? 'image or snapshot' : 'image'}`);
      }
      throw err;
    }
    const node = new RbdNode(options.nodeName, readOnly, spec, addon);
    node.handle = r.handle;
    node.length = r.size;
    node.imageSize = r.size;
    // As QEMU's rbd driver: a write past the end grows the image, so a format (qcow2) laid out
    // on a new, empty RBD image can allocate as it does on a file. Exports keep their own size.
    node.growable = !readOnly;
    node.objectSize = r.objectSize;
    node.limits.preferredSize = Math.min(r.objectSize, 4 * 1024 * 1024);
    node.cacheMode = { direct: options.direct, noFlush: false };
    if (!readOnly) {
      try {
        await node.takeLock(r.features, o['x-break-lock'] ?? false);
      } catch (err) {
        await node.releaseHandle();
        throw err;
      }
    }
    return node;
  }

  /**
   * Takes the exclusive lock for good, or fails naming the image and who holds it.
   *
   * A holder that died (kill -9, a lost host) keeps its lock until the OSD drops its watch
   * (osd_client_watch_timeout, 30 s by default). librbd's acquire asks the holder to let go
   * and, while the watch lasts, waits for an answer; once the watch is gone it breaks the lock
   * itself, blocklisting the dead client. So an open after a writer died takes over on its
   * own, taking up to that timeout. breakLock (x-break-lock=on) does it at once,
   * for a holder known to be gone: librbd blocklists the holder before breaking, so even a
   * holder that is alive after all can write no more (it is fenced, not raced).
   */
  private async takeLock(features: number, breakLock: boolean): Promise<void> {
    if (!(features & RBD_FEATURE_EXCLUSIVE_LOCK)) {
      // Nothing to take: such an image has no lock; two writers can only be kept apart by hand.
      logEvent('warn', 'rbd-no-exclusive-lock', { node: this.nodeName, image: this.spec });
      return;
    }
    if (breakLock) {
      // Broken before the acquire: an acquire against a dead holder would wait for its watch
      // to expire first (librbd asks the holder to release and waits for the answer).
      const broken = await this.addon.lockBreak(this.handle!);
      if (isFailure(broken)) throw rbdError(broken.errno, `Could not break the exclusive lock on RBD image '${this.spec}' (${broken.stage})`);
      if (broken.length > 0) logEvent('warn', 'rbd-lock-broken', { node: this.nodeName, image: this.spec, holders: broken });
    }
    const r = await this.addon.lockAcquire(this.handle!);
    if (!isFailure(r)) return;
    const owners = await this.addon.lockOwners(this.handle!);
    const held = !isFailure(owners) && owners.length > 0 ? ` (held by ${owners.join(', ')})` : '';
    throw new VdiskError(
      r.errno === EROFS || r.errno === EBUSY || held ? 'EBUSY' : rbdError(r.errno, '').errno,
      `Failed to get the exclusive lock on RBD image '${this.spec}'${held}: ${errnoName(r.errno)}; is another process writing the image? ` +
        `(a holder that died is taken over once its watch expires, about 30 s; x-break-lock=on breaks the lock at once, fencing the holder)`,
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

  /** Resizes the image to at least `end` before a write that reaches past it. */
  private growTo(end: number): Promise<void> {
    if (end <= this.imageSize) return Promise.resolve();
    const grown = this.growing.then(async () => {
      if (end <= this.imageSize) return;
      const r = await this.addon.resize(this.handle!, end);
      if (isFailure(r)) throw rbdError(r.errno, `Could not grow RBD image '${this.spec}' to ${end}`);
      this.imageSize = r;
    });
    // The chain goes on after a failed grow; the failure is the write's that asked for it.
    this.growing = grown.catch(() => undefined);
    return grown;
  }

  protected override doWrite(offset: number, buf: Buffer): Promise<void> {
    return this.change(async () => {
      await this.growTo(offset + buf.length);
      await this.aio(RbdAio.WRITE, buf, offset, buf.length, 0, `write at ${offset}`);
    });
  }

  protected override doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.change(async () => {
      await this.growTo(offset + length);
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
      this.imageSize = r;
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

/** Whether an image name is QEMU's rbd: pseudo-protocol. */
export function isRbdName(name: string): boolean {
  return name.startsWith('rbd:');
}

/**
 * Splits at the first unescaped `delim`: [token, rest] (rest undefined when there is none).
 * A backslash escapes the next character, as in QEMU's qemu_rbd_next_tok; the token keeps its
 * backslashes until unescape(), so a later split of it still sees them.
 */
function nextToken(text: string, delim: string): [string, string | undefined] {
  for (let i = 0; i < text.length; i++) {
    if (text[i] === '\\' && i + 1 < text.length) {
      i++;
      continue;
    }
    if (text[i] === delim) return [text.slice(0, i), text.slice(i + 1)];
  }
  return [text, undefined];
}

function unescape(text: string): string {
  return text.replace(/\\(.)/g, '$1');
}

/**
 * QEMU's rbd: file name as BlockdevOptionsRbd:
 * rbd:pool[/namespace]/image[@snapshot][:opt=value[:opt=value...]], with `conf=` (a ceph.conf),
 * `id=` (the client id: user) and any other pair a librados setting (QEMU's keyvalue-pairs).
 * `\` escapes `/`, `@`, `:` and itself inside names and values.
 */
export function parseRbdFilename(name: string): RbdOptions {
  if (!isRbdName(name)) throw new VdiskError('EINVAL', `'${name}' is not an rbd: file name`);
  const bad = (why: string) => new VdiskError('EINVAL', `Invalid rbd file name '${name}': ${why}`);
  const [poolText, afterPool] = nextToken(name.slice('rbd:'.length), '/');
  if (afterPool === undefined || poolText === '') throw bad('Pool name is required');
  const [imageText, optionsText] = nextToken(afterPool, ':');
  const [first, afterNamespace] = nextToken(imageText, '/');
  const namespace = afterNamespace !== undefined ? unescape(first) : undefined;
  const [image, snapshot] = nextToken(afterNamespace ?? first, '@');
  if (image === '') throw bad('Image name is required');
  const o: RbdOptions = { pool: unescape(poolText), image: unescape(image) };
  if (namespace !== undefined) o.namespace = namespace;
  if (snapshot !== undefined) o.snapshot = unescape(snapshot);
  const pairs: string[] = [];
  let rest = optionsText;
  while (rest !== undefined && rest !== '') {
    const [item, next] = nextToken(rest, ':');
    rest = next;
    const [key, value] = nextToken(item, '=');
    if (value === undefined) throw bad(`conf option '${unescape(key)}' has no value`);
    const k = unescape(key);
    const v = unescape(value);
    if (k === 'conf') o.conf = v;
    else if (k === 'id') o.user = v;
    else pairs.push(k, v);
  }
  if (pairs.length > 0) o['keyvalue-pairs'] = JSON.stringify(pairs);
  return o;
}
