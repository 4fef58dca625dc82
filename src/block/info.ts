/**
 * What a node is, in QEMU's words: ImageInfo (qemu-img info, and the "image"
 * member of query-named-block-nodes) and BlockDeviceInfo (one entry of
 * query-named-block-nodes). Member names and order follow QEMU 7.2's output.
 */
import fs from 'node:fs';
import { BITMAP_AUTO, BITMAP_IN_USE } from './drivers/qcow2/bitmaps.js';
import { COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPAT_EXTL2 } from './drivers/qcow2/format.js';
import { Qcow2Node } from './drivers/qcow2/qcow2.js';
import type { BlockNode } from './node.js';

/** Drivers whose QEMU counterpart implements bdrv_get_info (so ImageInfo has dirty-flag). */
const DRIVERS_WITH_INFO = new Set(['file', 'raw', 'qcow2']);

export interface ImageInfo {
  'backing-image'?: ImageInfo;
  'backing-filename-format'?: string;
  'virtual-size': number;
  filename: string;
  'cluster-size'?: number;
  format: string;
  'actual-size'?: number;
  'format-specific'?: { type: string; data: Record<string, unknown> };
  'full-backing-filename'?: string;
  'backing-filename'?: string;
  'dirty-flag'?: boolean;
  /** vdisk: persistent bitmaps of a raw image (its sidecar), which QEMU does not have. */
  'x-bitmaps'?: Array<Record<string, unknown>>;
}

/** Bytes a file takes on disk (st_blocks), qemu-img's "disk size" / actual-size. */
export function allocatedBytes(filename: string): number | undefined {
  try {
    return fs.statSync(filename).blocks * 512;
  } catch {
    return undefined;
  }
}

/** QEMU's path_combine: a relative name is taken relative to the directory of the image that names it. */
export function pathCombine(base: string, name: string): string {
  if (name.startsWith('/')) return name;
  const slash = base.lastIndexOf('/');
  return slash < 0 ? name : base.slice(0, slash + 1) + name;
}

/**
 * ImageInfo of a node. `filename` is how the image was named (qemu-img uses
 * the name given on its command line); `backing` adds the nested
 * backing-image (query-named-block-nodes without flat).
 */
export function imageInfo(node: BlockNode, filename: string = node.filename, backing = false): ImageInfo {
  // A node on no host file (null-co) takes no space, as QEMU reports it.
  const hostFile = node.child('file') ?? (node.driverName === 'file' ? node : undefined);
  const actual = hostFile ? allocatedBytes(hostFile.filename) : 0;
  if (!(node instanceof Qcow2Node)) {
    const i: Partial<ImageInfo> = { 'virtual-size': node.size, filename, format: node.driverName };
    if (actual !== undefined) i['actual-size'] = actual;
    // Only drivers with QEMU's get_info report a dirty flag; raw asks its file, and nbd has none.
    if (DRIVERS_WITH_INFO.has(node.driverName) && (node.driverName !== 'raw' || DRIVERS_WITH_INFO.has(node.child('file')?.driverName ?? ''))) i['dirty-flag'] = false;
    const persistent = node.dirtyBitmaps.filter((b) => b.persistent && b.name !== undefined);
    if (persistent.length) {
      i['x-bitmaps'] = persistent.map((b) => ({
        ...bitmapInfo({ name: b.name!, granularity: b.granularity, flags: (b.inconsistent ? BITMAP_IN_USE : 0) | (b.enabled ? BITMAP_AUTO : 0) }),
        'x-state': b.state().state,
        'x-reason': b.state().reason,
      }));
    }
    return i as ImageInfo;
  }
  const h = node.header;
  const info: Partial<ImageInfo> = {};
  const backingNode = node.child('backing');
  if (backing && backingNode) info['backing-image'] = imageInfo(backingNode, backingNode.filename, true);
  if (h.backingFile !== undefined && h.backingFormat !== undefined) info['backing-filename-format'] = h.backingFormat;
  info['virtual-size'] = node.size;
  info.filename = filename;
  info['cluster-size'] = node.clusterBytes;
  info.format = 'qcow2';
  if (actual !== undefined) info['actual-size'] = actual;
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
  info['format-specific'] = { type: 'qcow2', data };
  if (h.backingFile !== undefined) {
    info['full-backing-filename'] = h.backingFile.startsWith('json:') ? h.backingFile : pathCombine(filename, h.backingFile);
    info['backing-filename'] = h.backingFile;
  }
  info['dirty-flag'] = (h.incompatibleFeatures & INCOMPAT_DIRTY) !== 0n;
  return info as ImageInfo;
}

/**
 * Qcow2BitmapInfo of a directory entry: what the image says, not the live
 * bitmap (QEMU's qcow2_get_bitmap_info_list reads the directory, so a bitmap
 * of an image open writable shows in-use, and one added since is not there).
 */
function bitmapInfo(e: { name: string; granularity: number; flags: number }): Record<string, unknown> {
  const flags: string[] = [];
  if (e.flags & BITMAP_IN_USE) flags.push('in-use');
  if (e.flags & BITMAP_AUTO) flags.push('auto');
  return { flags, name: e.name, granularity: e.granularity };
}

/**
 * Format-specific information as qemu-img info and qemu-io's info print it
 * (QEMU's bdrv_image_info_specific_dump): one "key: value" line per member,
 * dashes in keys shown as spaces, nested objects and lists indented by four
 * more spaces, list items as "[i]:".
 */
export function formatSpecificText(data: Record<string, unknown>, indent = 1): string {
  const entries = Array.isArray(data) ? data.map((v, i): [string, unknown] => [`[${i}]`, v]) : Object.entries(data).map(([k, v]): [string, unknown] => [k.replace(/-/g, ' '), v]);
  let out = '';
  for (const [label, v] of entries) {
    const pad = ' '.repeat(indent * 4);
    if (typeof v === 'object' && v !== null) out += `${pad}${label}:\n${formatSpecificText(v as Record<string, unknown>, indent + 1)}`;
    else out += `${pad}${label}: ${String(v)}\n`;
  }
  return out;
}

/** One entry of query-named-block-nodes. */
export function blockDeviceInfo(node: BlockNode, flat: boolean): Record<string, unknown> {
  let depth = 0;
  for (let n = node.child('backing'); n; n = n.child('backing')) depth++;
  const backing = node.child('backing');
  const info: Record<string, unknown> = {
    file: node.filename,
    'node-name': node.nodeName,
    ro: node.readOnly,
    drv: node.driverName,
  };
  if (backing) info.backing_file = backing.filename;
  Object.assign(info, {
    backing_file_depth: depth,
    encrypted: false,
    detect_zeroes: node.detectZeroes,
    bps: 0,
    bps_rd: 0,
    bps_wr: 0,
    iops: 0,
    iops_rd: 0,
    iops_wr: 0,
    image: imageInfo(node, node.filename, !flat),
    cache: { writeback: true, direct: node.cacheMode.direct, 'no-flush': node.cacheMode.noFlush },
    write_threshold: 0,
  });
  // Present only when the node has bitmaps (anonymous successors included), newest first.
  if (node.dirtyBitmaps.length) info['dirty-bitmaps'] = node.dirtyBitmaps.map((b) => b.info());
  return info;
}
