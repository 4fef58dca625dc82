// A read-only disk of `size` bytes whose every byte is `byte`: a driver, opened by name.
import { BlockNode, Daemon, type DriverDef, int } from 'vdisk';

export class PatternNode extends BlockNode {
  readonly driverName = 'pattern';

  constructor(nodeName: string, size: number, private readonly byte: number) {
    super({ nodeName, readOnly: true });
    this.length = size;
  }

  // The request path has checked the range; block status keeps the default (all data).
  protected override async doRead(_offset: number, buf: Buffer): Promise<void> {
    buf.fill(this.byte);
  }
}

// The table row: QEMU-style option names ('*' = optional), checked before open() runs.
export const PATTERN_DRIVER: DriverDef = {
  name: 'pattern',
  members: { size: int('size'), '*byte': int('uint8') },
  async open(o, { common }) {
    return new PatternNode(common.nodeName, o.size as number, (o.byte as number | undefined) ?? 0xa5);
  },
};

export async function servePattern(socketPath: string): Promise<Daemon> {
  const daemon = new Daemon();
  daemon.graph.registerDriver(PATTERN_DRIVER);
  await daemon.blockdevAdd({ driver: 'pattern', 'node-name': 'p0', size: 4 << 20, byte: 0x5a });
  await daemon.nbdServerStart({ addr: { type: 'unix', path: socketPath } });
  await daemon.blockExportAdd({ type: 'nbd', id: 'p0', 'node-name': 'p0' });
  return daemon;
}
