/**
 * What a qcow2 node reports about its image (BlockNode.formatInfo): the
 * cluster size, the dirty bit, and the format-specific member of ImageInfo
 * with QEMU 7.2's members in QEMU's order. Kept beside the driver so that
 * nothing outside it reads the header to describe the image.
 */
import type { FormatInfo } from '../../node.js';
import { BITMAP_AUTO, BITMAP_IN_USE } from './bitmaps.js';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2 } from './format.js';
import type { Qcow2Node } from './qcow2.js';

export function qcow2FormatInfo(node: Qcow2Node): FormatInfo {
  const h = node.header;
  const cs = node.clusterBytes;
  // QEMU keeps VM state after the guest data, at the first L1 entry's worth of clusters past it.
  const perL1 = cs * node.l2EntriesPerTable;
  let data: Record<string, unknown>;
  if (h.version === 3) {
    // Member order is that of QEMU's output (a QDict's hash order), bitmaps only when the image has some.
    data = {
      compat: '1.1',
      'compression-type': h.compressionType === 1 ? 'zstd' : 'zlib',
      'lazy-refcounts': (h.compatibleFeatures & COMPAT_LAZY_REFCOUNTS) !== 0n,
    };
    if (node.storedBitmaps.length) {
      data.bitmaps = node.storedBitmaps.map((e) => {
        const i = bitmapInfo(e);
        // vdisk's own members: what the bitmap is doing and why (qemu-img prints the rest).
        const live = node.dirtyBitmaps.find((b) => b.name === e.name);
        if (live) {
          const st = live.state();
          i['x-state'] = st.state;
          i['x-reason'] = st.reason;
        }
        return i;
      });
    }
    Object.assign(data, {
      'refcount-bits': 2 ** h.refcountOrder,
      corrupt: (h.incompatibleFeatures & INCOMPAT_CORRUPT) !== 0n,
      'extended-l2': (h.incompatibleFeatures & INCOMPAT_EXTL2) !== 0n,
    });
  } else {
    data = { compat: '0.10', 'compression-type': 'zlib', 'refcount-bits': 16 };
  }
  return {
    clusterSize: cs,
    vmStateOffset: Math.ceil(node.size / perL1) * perL1,
    dirty: (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n,
    specific: { type: 'qcow2', data },
  };
}

/**
 * Qcow2BitmapInfo of a directory entry: what the image says, not the live
 * bitmap (QEMU's qcow2_get_bitmap_info_list reads the directory, so a bitmap
 * of an image open writable shows in-use, and one added since is not there).
 * Raw images' sidecar bitmaps are shown the same way (x-bitmaps).
 */
export function bitmapInfo(e: { name: string; granularity: number; flags: number }): Record<string, unknown> {
  const flags: string[] = [];
  if (e.flags & BITMAP_IN_USE) flags.push('in-use');
  if (e.flags & BITMAP_AUTO) flags.push('auto');
  return { flags, name: e.name, granularity: e.granularity };
}
