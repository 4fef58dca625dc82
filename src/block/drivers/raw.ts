/**
 * The `raw` format driver: the bytes of its `file` child, optionally a window
 * of them (offset, size), as QEMU's raw-format.c. With neither option it only
 * passes requests through, and its block status is the child's.
 *
 * Over a regular host file (no window), it keeps persistent dirty bitmaps in
 * a sidecar file beside the image (src/block/bitmap-sidecar.ts), crash-safe
 * by default: QEMU has no persistent bitmaps for raw images at all.
 */
import { VdiskError } from '../../errors.js';
import { logEvent } from '../../log.js';
import { BitmapSidecar, type ImageIdentity } from '../bitmap-sidecar.js';
import { PersistentBitmaps } from '../persistent-bitmaps.js';
import { BlockNode, type ChildRole, type Extent, type FormatInfo } from '../node.js';

export interface RawOptions {
  nodeName: string;
  file: BlockNode;
  offset?: number;
  size?: number;
  readOnly?: boolean;
}

export class RawNode extends BlockNode {
  readonly driverName = 'raw';
  private file: BlockNode;
  private readonly offset: number;
  /** A fixed size was given: the node does not follow its child's length. */
  private readonly hasFixedSize: boolean;
  private sidecar: BitmapSidecar | undefined;
  private persistentBitmaps: PersistentBitmaps | undefined;

  constructor(options: RawOptions) {
    super({ nodeName: options.nodeName, readOnly: options.readOnly || options.file.readOnly });
    this.announcesIo = true;
    const childSize = options.file.size;
    const offset = options.offset ?? 0;
    if (offset > childSize) {
      throw new VdiskError('EINVAL', `Offset (${offset}) cannot be greater than size of the containing file (${childSize})`);
    }
    const size = options.size ?? childSize - offset;
    if (options.size !== undefined && options.size % 512 !== 0) {
      throw new VdiskError('EINVAL', 'Specified size is not multiple of 512');
    }
    if (offset + size > childSize) {
      throw new VdiskError(
        'EINVAL',
        `The sum of offset (${offset}) and size (${size}) has to be smaller or equal to the  actual size of the containing file (${childSize})`,
      );
    }
    this.file = options.file;
    this.offset = offset;
    this.hasFixedSize = options.size !== undefined;
    this.length = size;
    this.children.push({ role: 'file', node: options.file });
    this.limits = { ...options.file.limits };
    // FUA passes through: the child honours it (natively or by its own flush).
    this.nativeFua = true;
  }

  /** Whatever the file says, format-specific data included (QEMU's raw asks its file for both). */
  override formatInfo(): FormatInfo | undefined {
    return this.file.formatInfo();
  }

  protected override canReplaceChild(): boolean {
    return true;
  }

  protected override childReplaced(_role: ChildRole, node: BlockNode): void {
    this.file = node;
  }

  protected override doRead(offset: number, buf: Buffer): Promise<void> {
    return this.file.read(this.offset + offset, buf);
  }

  protected override doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    return this.file.write(this.offset + offset, buf, flags);
  }

  protected override doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    return this.file.writeZeroes(this.offset + offset, length, flags);
  }

  protected override doDiscard(offset: number, length: number): Promise<void> {
    return this.file.discard(this.offset + offset, length);
  }

  protected override doCache(offset: number, length: number): Promise<void> {
    return this.file.cache(this.offset + offset, length);
  }

  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    return this.file.blockStatus(this.offset + offset, length);
  }

  /**
   * Loads the bitmaps of the image's sidecar and, when writable, keeps them
   * true on disk (crash-safe unless `crashSafe` is false). Raw images with a
   * window, or not on a regular file, have no persistent bitmaps.
   */
  async openPersistentBitmaps(crashSafe: boolean): Promise<void> {
    const host = this.file.hostFile;
    if (!host || this.offset !== 0 || this.hasFixedSize) return;
    const identity = (): ImageIdentity => ({ size: this.size, ...host.identity() });
    const opened = await BitmapSidecar.open(host.path, identity(), !this.readOnly);
    for (const l of opened?.loaded ?? []) {
      if (l.inconsistentReason) {
        l.bitmap.inconsistentReason = l.inconsistentReason;
        logEvent('warn', 'bitmap-inconsistent', { nodeName: this.nodeName, filename: host.path, bitmap: l.bitmap.name, reason: l.inconsistentReason, advice: 'take a full backup, then remove and re-add the bitmap' });
      }
      l.bitmap.recovered = l.recovered;
      // The sidecar records each bitmap's mode; `crashSafe` is the default for new ones.
      l.bitmap.crashSafe = l.crashSafe;
      this.dirtyBitmaps.push(l.bitmap);
    }
    this.bitmapDriver = {
      clusterSize: 0,
      crashSafeDefault: crashSafe,
      checkCanStore: () => undefined,
      removePersistent: () => undefined,
      persistentChanged: (change, bitmap, name) => this.persistentBitmaps?.changed(change, bitmap, name) ?? Promise.resolve(),
    };
    if (this.readOnly) return;
    const sidecar = opened?.sidecar ?? BitmapSidecar.create(host.path);
    this.sidecar = sidecar;
    this.persistentBitmaps = new PersistentBitmaps(this, {
      chunkBytes: sidecar.chunkBytes,
      rewrite: (list) => sidecar.rewrite(identity(), list, 'open'),
      writeChunks: (b, chunks) => sidecar.writeChunks(b, chunks),
      sync: () => sidecar.sync(),
    });
    await this.persistentBitmaps.start();
  }

  protected override async doClose(): Promise<void> {
    const sidecar = this.sidecar;
    const host = this.file.hostFile;
    if (!sidecar || !host) return;
    await this.persistentBitmaps?.close();
    this.persistentBitmaps = undefined;
    // The image is durable and its mtime final before the sidecar says it matches it.
    await this.file.flush();
    const exact = this.dirtyBitmaps.filter((b) => b.persistent && b.name !== undefined).map((b) => ({ bitmap: b, crashSafe: b.crashSafe }));
    await sidecar.rewrite({ size: this.size, ...host.identity() }, exact, 'clean');
    sidecar.close();
    this.sidecar = undefined;
  }

  protected override async doTruncate(size: number): Promise<void> {
    if (this.offset !== 0 || this.hasFixedSize) {
      throw new VdiskError('ENOTSUP', `Cannot resize node '${this.nodeName}': raw with offset or size`);
    }
    await this.file.truncate(size);
    this.length = size;
  }
}
