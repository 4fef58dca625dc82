/**
 * The `null-co` driver: a disk of a given size that stores nothing. Reads
 * return zeroes, writes are dropped. Useful to measure the layers above it.
 *
 * QEMU's read-zeroes=false leaves the read buffer untouched; vdisk's buffers
 * would then carry other requests' bytes to a client, so reads always zero.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { BlockNode, type Extent, Status } from '../node.js';

export interface NullOptions {
  nodeName: string;
  size?: number;
  latencyNs?: number;
  readOnly?: boolean;
}

export class NullNode extends BlockNode {
  readonly driverName = 'null-co';
  private readonly latencyMs: number;
  private readonly sizeGiven: boolean;

  constructor(options: NullOptions) {
    super({ nodeName: options.nodeName, readOnly: options.readOnly });
    this.length = options.size ?? 1 << 30;
    this.sizeGiven = options.size !== undefined;
    this.latencyMs = (options.latencyNs ?? 0) / 1e6;
    this.nativeFua = true;
  }

  /** QEMU names a node without a file by the options it was given: json:{"driver": "null-co", "size": N}. */
  override get filename(): string {
    return this.sizeGiven ? `json:{"driver": "null-co", "size": ${this.length}}` : 'json:{"driver": "null-co"}';
  }

  private delay(): Promise<void> | undefined {
    return this.latencyMs > 0 ? sleep(this.latencyMs) : undefined;
  }

  protected override async doRead(_offset: number, buf: Buffer): Promise<void> {
    await this.delay();
    buf.fill(0);
  }

  protected override async doWrite(): Promise<void> {
    await this.delay();
  }

  protected override async doWriteZeroes(): Promise<void> {
    await this.delay();
  }

  protected override async doBlockStatus(_offset: number, length: number): Promise<Extent> {
    return { length, flags: Status.ZERO | Status.ALLOCATED, depth: 1 };
  }

  protected override async doTruncate(size: number): Promise<void> {
    this.length = size;
  }
}
