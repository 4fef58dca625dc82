/**
 * The `raw` format driver: the bytes of its `file` child, optionally a window
 * of them (offset, size), as QEMU's raw-format.c. With neither option it only
 * passes requests through, and its block status is the child's.
 */
import { VdiskError } from '../../errors.js';
import { BlockNode, type ChildRole, type Extent } from '../node.js';

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

  protected override async doTruncate(size: number): Promise<void> {
    if (this.offset !== 0 || this.hasFixedSize) {
      throw new VdiskError('ENOTSUP', `Cannot resize node '${this.nodeName}': raw with offset or size`);
    }
    await this.file.truncate(size);
    this.length = size;
  }
}
