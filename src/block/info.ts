/**
 * What a node is, in QEMU's words: ImageInfo (qemu-img info, and the "image"
 * member of query-named-block-nodes) and BlockDeviceInfo (one entry of
 * query-named-block-nodes). Member names and order follow QEMU 7.2's output.
 */
import fs from 'node:fs';
import { BITMAP_AUTO, BITMAP_IN_USE } from './drivers/qcow2/bitmaps.js';
import { bitmapInfo } from './drivers/qcow2/info.js';
import type { BlockNode } from './node.js';

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
  // What the driver knows (undefined where QEMU's bdrv_get_info fails: no cluster size, no dirty flag).
  const fi = node.formatInfo();
  // The backing file the header names (formats with one: qcow2), not the node linked as backing.
  const header = node.backingControl;
  const info: Partial<ImageInfo> = {};
  const backingNode = node.child('backing');
  if (backing && backingNode && header) info['backing-image'] = imageInfo(backingNode, backingNode.filename, true);
  if (header?.backingFile !== undefined && header.backingFormat !== undefined) info['backing-filename-format'] = header.backingFormat;
  info['virtual-size'] = node.size;
  info.filename = filename;
  if (fi?.clusterSize) info['cluster-size'] = fi.clusterSize;
  info.format = node.driverName;
  if (actual !== undefined) info['actual-size'] = actual;
  if (fi?.specific) info['format-specific'] = fi.specific;
  if (header?.backingFile !== undefined) {
    const name = header.backingFile;
    info['full-backing-filename'] = name.startsWith('json:') ? name : pathCombine(filename, name);
    info['backing-filename'] = name;
  }
  if (fi) info['dirty-flag'] = fi.dirty;
  // A raw image's sidecar bitmaps; a format that keeps bitmaps lists them in its format-specific data.
  const persistent = node.dirtyBitmaps.filter((b) => b.persistent && b.name !== undefined);
  if (persistent.length && !fi?.specific) {
    info['x-bitmaps'] = persistent.map((b) => ({
      ...bitmapInfo({ name: b.name!, granularity: b.granularity, flags: (b.inconsistent ? BITMAP_IN_USE : 0) | (b.enabled ? BITMAP_AUTO : 0) }),
      'x-state': b.state().state,
      'x-reason': b.state().reason,
    }));
  }
  return info as ImageInfo;
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
