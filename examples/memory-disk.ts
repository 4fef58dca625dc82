/**
 * Example: a disk that lives in memory, served over NBD by vdisk.
 *
 * It shows the library API: a node class of your own (any storage: memory,
 * an object store, a database blob) joins the graph and is exported like any
 * other node. Run through the test suite (test/examples.test.ts), or compile
 * and run it yourself; then, for example:
 *   qemu-io -f raw -c 'write -P 0x5a 0 1M' 'nbd+unix:///mem?socket=/tmp/mem.sock'
 */
import { BlockNode, Daemon, type Extent, Status } from 'vdisk';

const CHUNK = 64 * 1024;

/** Stores data in 64 KiB chunks; a chunk never written reads as zeroes. */
export class MemoryNode extends BlockNode {
  readonly driverName = 'memory';
  private readonly chunks = new Map<number, Buffer>();

  constructor(nodeName: string, size: number) {
    super({ nodeName });
    this.length = size;
  }

  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    for (const { index, within, n, done } of pieces(offset, buf.length)) {
      const chunk = this.chunks.get(index);
      if (chunk) chunk.copy(buf, done, within, within + n);
      else buf.fill(0, done, done + n);
    }
  }

  protected override async doWrite(offset: number, buf: Buffer): Promise<void> {
    for (const { index, within, n, done } of pieces(offset, buf.length)) {
      let chunk = this.chunks.get(index);
      if (!chunk) this.chunks.set(index, (chunk = Buffer.alloc(CHUNK)));
      buf.copy(chunk, within, done, done + n);
    }
  }

  /** Whole chunks are dropped; partial ones are zeroed in place. */
  protected override async doWriteZeroes(offset: number, length: number): Promise<void> {
    for (const { index, within, n } of pieces(offset, length)) {
      if (n === CHUNK) this.chunks.delete(index);
      else this.chunks.get(index)?.fill(0, within, within + n);
    }
  }

  protected override doDiscard(offset: number, length: number): Promise<void> {
    return this.doWriteZeroes(offset, length);
  }

  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    const index = Math.floor(offset / CHUNK);
    const has = this.chunks.has(index);
    // Extend the extent over following chunks in the same state.
    let end = (index + 1) * CHUNK;
    while (end < offset + length && this.chunks.has(end / CHUNK) === has) end += CHUNK;
    return { length: Math.min(end, offset + length) - offset, flags: has ? Status.DATA | Status.ALLOCATED : Status.ZERO | Status.ALLOCATED, depth: 1 };
  }
}

/** Splits a byte range into its pieces within 64 KiB chunks. */
function* pieces(offset: number, length: number): Generator<{ index: number; within: number; n: number; done: number }> {
  for (let done = 0; done < length; ) {
    const pos = offset + done;
    const within = pos % CHUNK;
    const n = Math.min(CHUNK - within, length - done);
    yield { index: Math.floor(pos / CHUNK), within, n, done };
    done += n;
  }
}

/** Serves a memory disk of `size` bytes as NBD export `mem` on a unix socket. */
export async function serveMemoryDisk(socketPath: string, size: number): Promise<Daemon> {
  const daemon = new Daemon();
  daemon.graph.insert(new MemoryNode('mem', size));
  await daemon.nbdServerStart({ addr: { type: 'unix', path: socketPath } });
  await daemon.blockExportAdd({ type: 'nbd', id: 'mem', 'node-name': 'mem', writable: true });
  return daemon;
}
