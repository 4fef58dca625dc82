/**
 * Formats a node as a new qcow2 image, laid out as qemu-img lays it out:
 * cluster 0 the header, then the refcount table, the refcount blocks that
 * describe the metadata, and the L1 table. The file ends where the L1 table
 * ends (files may end inside a cluster; reads past the end are zeroes).
 */
import { VdiskError } from '../../../errors.js';
import type { BlockNode } from '../../node.js';
import { MAX_L1_BYTES, newHeader, serializeHeader, writeU64 } from './format.js';

export interface Qcow2CreateOptions {
  size: number;
  clusterSize?: number;
  version?: 2 | 3;
  refcountBits?: number;
  lazyRefcounts?: boolean;
  backingFile?: string;
  backingFormat?: string;
  /**
   * The file cannot be shrunk (an NBD export): keep its size, as QEMU's
   * non-exact truncate does. Only clusters the refcounts mark are ever read,
   * so old bytes past the metadata do no harm.
   */
  keepFileSize?: boolean;
}

/** Checks creation options with qemu-img's messages; returns cluster bits and refcount order. */
export function checkCreateOptions(o: Qcow2CreateOptions): { clusterBits: number; refcountOrder: number; version: 2 | 3 } {
  const clusterSize = o.clusterSize ?? 65536;
  const clusterBits = Math.log2(clusterSize);
  if (!Number.isInteger(clusterBits) || clusterBits < 9 || clusterBits > 21) {
    throw new VdiskError('EINVAL', 'Cluster size must be a power of two between 512 and 2048k');
  }
  if (o.size % 512 !== 0) throw new VdiskError('EINVAL', 'Image size must be a multiple of 512 bytes');
  const version = o.version ?? 3;
  const bits = o.refcountBits ?? 16;
  const refcountOrder = Math.log2(bits);
  if (!Number.isInteger(refcountOrder) || refcountOrder < 0 || refcountOrder > 6) {
    throw new VdiskError('EINVAL', 'Refcount width must be a power of two and may not exceed 64 bits');
  }
  if (version === 2 && bits !== 16) throw new VdiskError('EINVAL', 'Different refcount widths than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)');
  if (version === 2 && o.lazyRefcounts) {
    throw new VdiskError('EINVAL', 'Lazy refcounts only supported with compatibility level 1.1 and above (use version=v3 or greater)');
  }
  if (o.backingFormat && !o.backingFile) throw new VdiskError('EINVAL', 'Backing format cannot be used without backing file');
  return { clusterBits, refcountOrder, version };
}

export async function createQcow2(file: BlockNode, o: Qcow2CreateOptions): Promise<void> {
  const { clusterBits, refcountOrder, version } = checkCreateOptions(o);
  const cs = 2 ** clusterBits;
  const l2Entries = cs / 8;
  const l1Size = Math.ceil(o.size / cs / l2Entries);
  if (l1Size * 8 > MAX_L1_BYTES) throw new VdiskError('EINVAL', `Image size is too large for this cluster size (the L1 table would exceed ${MAX_L1_BYTES} bytes)`);
  const perBlock = (cs * 8) / 2 ** refcountOrder;
  const l1Clusters = Math.ceil((l1Size * 8) / cs);
  // Find table and block counts that describe everything including themselves.
  let tableClusters = 1;
  let blocks = 1;
  for (;;) {
    const used = 1 + tableClusters + blocks + l1Clusters;
    const needBlocks = Math.ceil(used / perBlock);
    const needTable = Math.ceil((needBlocks * 8) / cs);
    if (needBlocks === blocks && needTable === tableClusters) break;
    blocks = needBlocks;
    tableClusters = needTable;
  }
  const tableOffset = cs;
  const blocksOffset = tableOffset + tableClusters * cs;
  const l1Offset = blocksOffset + blocks * cs;
  const used = 1 + tableClusters + blocks + l1Clusters;

  const h = newHeader({ size: o.size, clusterBits, version, refcountOrder, lazyRefcounts: o.lazyRefcounts ?? false, backingFile: o.backingFile, backingFormat: o.backingFormat });
  h.l1Size = l1Size;
  h.l1TableOffset = l1Offset;
  h.refcountTableOffset = tableOffset;
  h.refcountTableClusters = tableClusters;

  const table = Buffer.alloc(tableClusters * cs);
  for (let b = 0; b < blocks; b++) writeU64(table, b * 8, blocksOffset + b * cs);
  const refBlocks = Buffer.alloc(blocks * cs);
  const bits = 2 ** refcountOrder;
  for (let c = 0; c < used; c++) setRefcount(refBlocks, c, 1, bits);

  if (!o.keepFileSize) await file.truncate(0);
  await file.write(0, serializeHeader(h));
  await file.write(tableOffset, table);
  await file.write(blocksOffset, refBlocks);
  if (l1Size > 0) await file.write(l1Offset, Buffer.alloc(l1Size * 8));
  await file.flush();
}

function setRefcount(blocks: Buffer, cluster: number, value: number, bits: number): void {
  if (bits === 16) blocks.writeUInt16BE(value, cluster * 2);
  else if (bits === 8) blocks[cluster] = value;
  else if (bits === 32) blocks.writeUInt32BE(value, cluster * 4);
  else if (bits === 64) writeU64(blocks, cluster * 8, value);
  else {
    const perByte = 8 / bits;
    blocks[Math.floor(cluster / perByte)] |= value << ((cluster % perByte) * bits);
  }
}
