/**
 * What every `vdisk img` sub-command shares: opening an image the way
 * qemu-img does (a path with its format probed or given by -f, or a
 * `json:{...}` blockdev description), sizes written the way qemu-img writes
 * them, and the -p progress line.
 */
import fs from 'node:fs';
import { BlockGraph } from '../../block/graph.js';
import type { BlockNode } from '../../block/node.js';
import { isProtocolName, probeFileFormat, probeNodeFormat, protocolBlockdev } from '../../block/image-name.js';
import { VdiskError } from '../../errors.js';
import { parseKeyval } from '../../qapi/keyval.js';
import { type InputMode, parseSize } from '../../qapi/schema.js';

/** Formats `vdisk img` can open and create. */
export const IMAGE_FORMATS = ['raw', 'qcow2'];

export interface OpenImageOptions {
  /** -f: the format; probed when absent. */
  format?: string;
  readOnly?: boolean;
  /** -U: open even if another process holds the image's lock. */
  forceShare?: boolean;
  /** Do not open the backing file named in a qcow2 header. */
  noBacking?: boolean;
  /** cache.direct=on for the image file (-t none / -T none). */
  direct?: boolean;
  /** discard=unmap, so write-zeroes may deallocate and discards reach the file. */
  unmap?: boolean;
  /** cache.no-flush=on: flushes do nothing (qemu-img's cache mode 'unsafe'). */
  noFlush?: boolean;
  /** --image-opts: `filename` is an option string (driver=qcow2,file.filename=a.qcow2,...). */
  imageOpts?: boolean;
  /** Open into this graph (images one command uses together, as QEMU's one graph) instead of a new one. */
  graph?: BlockGraph;
  /** Leave the node unnamed, so it gets an automatic #blockNNN name as qemu-img's nodes do (messages show it). */
  anonymous?: boolean;
}

/** qemu-img's -t/-T cache modes as file options: direct I/O and whether flushes reach the disk. */
export function cacheMode(mode: string | undefined, fallback: string): { direct: boolean; noFlush: boolean } {
  switch (mode ?? fallback) {
    case 'unsafe':
      return { direct: false, noFlush: true };
    case 'writeback':
    case 'writethrough':
      return { direct: false, noFlush: false };
    case 'none':
    case 'directsync':
      return { direct: true, noFlush: false };
    default:
      throw new VdiskError('EINVAL', `Invalid cache option: ${mode}`);
  }
}

export interface OpenedImage {
  graph: BlockGraph;
  node: BlockNode;
  format: string;
  /** The file node under the format node (its file name and disk usage). */
  file: BlockNode;
  close(): Promise<void>;
}

let imageCounter = 0;

/** Opens an image as qemu-img does; the caller closes it. */
export async function openImage(filename: string, options: OpenImageOptions = {}): Promise<OpenedImage> {
  const graph = options.graph ?? new BlockGraph();
  const nodeName = `img${imageCounter++}`;
  let blockdev: Record<string, unknown>;
  let mode: InputMode = 'json';
  if (options.imageOpts) {
    blockdev = imageOptsBlockdev(filename);
    blockdev['node-name'] = nodeName;
    if (options.readOnly) blockdev['read-only'] = 'on';
    mode = 'keyval';
  } else if (filename.startsWith('json:')) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(filename.slice(5));
    } catch (err) {
      throw new VdiskError('EINVAL', `Could not parse the JSON options of '${filename}': ${(err as Error).message}`);
    }
    if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
      throw new VdiskError('EINVAL', `json: options must be an object: '${filename}'`);
    }
    blockdev = { ...(parsed as Record<string, unknown>), 'node-name': nodeName };
    if (options.readOnly) blockdev['read-only'] = true;
  } else if (filename.startsWith('blkdebug:')) {
    // QEMU's shorthand blkdebug:CONFIG:IMAGE (CONFIG may be empty); the image's format is probed.
    const rest = filename.slice('blkdebug:'.length);
    const colon = rest.indexOf(':');
    if (colon < 0) throw new VdiskError('EINVAL', 'Invalid blkdebug filename: expected blkdebug:CONFIG:IMAGE');
    const config = rest.slice(0, colon);
    const image = rest.slice(colon + 1);
    if (!fs.existsSync(image)) throw new VdiskError('ENOENT', `Could not open '${image}': No such file or directory`);
    const debug: Record<string, unknown> = { driver: 'blkdebug', image: { driver: 'file', filename: image } };
    if (config) debug.config = config;
    blockdev = { driver: options.format ?? probeFileFormat(image), 'node-name': nodeName, file: debug };
    if (options.readOnly) blockdev['read-only'] = true;
  } else if (filename.startsWith('blkverify:')) {
    // QEMU's shorthand blkverify:RAW:TEST; a mismatch ends the process, as QEMU's tools do.
    const rest = filename.slice('blkverify:'.length);
    const colon = rest.indexOf(':');
    if (colon < 0) throw new VdiskError('EINVAL', 'blkverify requires raw copy and original image path');
    const rawPath = rest.slice(0, colon);
    const testPath = rest.slice(colon + 1);
    for (const p of [rawPath, testPath]) {
      if (!fs.existsSync(p)) throw new VdiskError('ENOENT', `Could not open '${p}': No such file or directory`);
    }
    const child = (path: string, driver: string) => ({ driver, file: { driver: 'file', filename: path, ...(options.forceShare ? { 'force-share': true } : {}) } });
    blockdev = { driver: 'blkverify', 'node-name': nodeName, 'mismatch-action': 'abort', raw: child(rawPath, 'raw'), test: child(testPath, probeFileFormat(testPath)) };
    if (options.readOnly) blockdev['read-only'] = true;
  } else if (isProtocolName(filename)) {
    return openProtocolImage(graph, filename, nodeName, options);
  } else {
    if (!fs.existsSync(filename)) {
      throw new VdiskError('ENOENT', `Could not open '${filename}': No such file or directory`);
    }
    const format = options.format ?? probeFileFormat(filename);
    checkFormat(format);
    const file: Record<string, unknown> = { driver: 'file', filename };
    if (options.forceShare) file['force-share'] = true;
    if (options.direct || options.noFlush) file.cache = { direct: options.direct ?? false, 'no-flush': options.noFlush ?? false };
    blockdev = { driver: format, 'node-name': nodeName, file };
    if (options.readOnly) blockdev['read-only'] = true;
    if (options.noBacking && format === 'qcow2') blockdev.backing = null;
  }
  if (options.unmap) blockdev.discard = 'unmap';
  if (options.anonymous) delete blockdev['node-name'];
  const node = options.anonymous ? await graph.addImplicit(blockdev, mode) : await graph.add(blockdev, mode);
  const file = node.child('file') ?? node;
  return {
    graph,
    node,
    format: node.driverName,
    file,
    close: () => graph.closeAll(),
  };
}

/**
 * An NBD URI or rbd: name as qemu-img opens one: the protocol node (nbd,
 * rbd), and on it the format given with -f or probed from the image's first
 * bytes (a qcow2 image served raw by a server is opened as qcow2, as
 * qemu-img does).
 */
async function openProtocolImage(graph: BlockGraph, uri: string, nodeName: string, options: OpenImageOptions): Promise<OpenedImage> {
  const readOnly = options.readOnly ?? false;
  const protoOptions: Record<string, unknown> = { ...protocolBlockdev(uri), 'read-only': readOnly };
  if (options.unmap) protoOptions.discard = 'unmap';
  // librbd's cache follows cache.direct (-t none); an NBD node has no cache to set.
  if (protoOptions.driver === 'rbd' && (options.direct || options.noFlush)) protoOptions.cache = { direct: options.direct ?? false, 'no-flush': options.noFlush ?? false };
  if (!options.anonymous) protoOptions['node-name'] = `${nodeName}-${protoOptions.driver as string}`;
  let proto: BlockNode;
  try {
    proto = options.anonymous ? await graph.addImplicit(protoOptions) : await graph.add(protoOptions);
  } catch (err) {
    const e = err as VdiskError;
    throw new VdiskError(e.errno ?? 'EIO', `Could not open '${uri}': ${e.message}`);
  }
  let node: BlockNode;
  try {
    const format = options.format ?? (await probeNodeFormat(proto));
    checkFormat(format);
    const blockdev: Record<string, unknown> = { driver: format, file: proto.nodeName, 'read-only': readOnly };
    if (!options.anonymous) blockdev['node-name'] = nodeName;
    if (options.unmap) blockdev.discard = 'unmap';
    if (options.noBacking && format === 'qcow2') blockdev.backing = null;
    node = options.anonymous ? await graph.addImplicit(blockdev) : await graph.add(blockdev);
  } catch (err) {
    await graph.delete(proto.nodeName).catch(() => undefined);
    throw err;
  }
  return { graph, node, format: node.driverName, file: proto, close: () => graph.closeAll() };
}

/**
 * --image-opts as qemu-img reads it (QemuOpts of its "source" list): a
 * first item without '=' is the file, a bare key later is "on", dotted keys
 * nest. Without a driver the format is probed from file.filename, and a
 * nested file without one is a host file, as in QEMU.
 */
function imageOptsBlockdev(text: string): Record<string, unknown> {
  const items: string[] = [];
  let cur = '';
  for (let i = 0; i < text.length; i++) {
    if (text[i] === ',' && text[i + 1] === ',') {
      cur += ',,';
      i++;
    } else if (text[i] === ',') {
      items.push(cur);
      cur = '';
    } else {
      cur += text[i];
    }
  }
  items.push(cur);
  const normalised = items
    .filter((item, i) => item !== '' || i < items.length - 1)
    .map((item, i) => (item.includes('=') ? item : i === 0 ? `file=${item}` : `${item}=on`))
    .join(',');
  const blockdev = parseKeyval(normalised, '--image-opts');
  const file = blockdev.file;
  if (typeof file === 'object' && file !== null && !Array.isArray(file)) {
    const f = file as Record<string, unknown>;
    f.driver ??= 'file';
    if (blockdev.driver === undefined && f.driver === 'file' && typeof f.filename === 'string' && fs.existsSync(f.filename)) {
      blockdev.driver = probeFileFormat(f.filename);
    }
  } else if (typeof file === 'string' && blockdev.driver === undefined) {
    // A reference to a node: the lookup fails as QEMU's does (there are no other nodes).
    blockdev.driver = 'raw';
  }
  return blockdev;
}

export function checkFormat(format: string): void {
  if (!IMAGE_FORMATS.includes(format)) throw new VdiskError('EINVAL', `Unknown file format '${format}'`);
}

/** Parses an image size as qemu-img does (suffixes k, M, G, T, P, E; B for bytes). */
export function parseImageSize(text: string): number {
  const n = /^\d/.test(text.trim()) ? parseSize(text) : undefined;
  if (n === undefined || n > Number.MAX_SAFE_INTEGER) {
    throw new VdiskError(
      'EINVAL',
      'Invalid image size specified. You may use k, M, G, T, P or E suffixes for kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.',
    );
  }
  return n;
}

/** A byte count as qemu-img prints it: three significant digits and a binary unit ("324 KiB", "1.5 GiB"). */
export function humanSize(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'];
  // QEMU's size_to_str: pick the unit so that the number stays below 1000.
  let i = 0;
  if (bytes > 0) i = Math.max(0, Math.floor((Math.floor(Math.log2(bytes / (1000 / 1024))) + 1 - 1) / 10));
  i = Math.min(i, units.length - 1);
  const value = bytes / 2 ** (i * 10);
  return `${formatG3(value)} ${units[i]}`;
}

/** printf("%0.3g"): three significant digits, no trailing zeros. */
function formatG3(v: number): string {
  if (v === 0) return '0';
  return String(Number(v.toPrecision(3)));
}

/**
 * JSON as qemu-img prints it (QEMU's qobject_to_json_pretty): four-space
 * indents, an empty list or object still spread over two lines, and every
 * character outside printable ASCII escaped as \uXXXX (upper-case hex,
 * surrogate pairs beyond the BMP), so names with such characters come out
 * byte for byte as qemu-img writes them.
 */
export function qemuJson(value: unknown, indent = 0): string {
  const nl = (n: number) => '\n' + ' '.repeat(n * 4);
  if (Array.isArray(value)) {
    return '[' + value.map((v) => nl(indent + 1) + qemuJson(v, indent + 1)).join(',') + nl(indent) + ']';
  }
  if (typeof value === 'object' && value !== null) {
    const members = Object.entries(value).filter(([, v]) => v !== undefined);
    return '{' + members.map(([k, v]) => `${nl(indent + 1)}${qemuJsonString(k)}: ${qemuJson(v, indent + 1)}`).join(',') + nl(indent) + '}';
  }
  if (typeof value === 'string') return qemuJsonString(value);
  return String(value);
}

function qemuJsonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    const ch = s[i];
    if (ch === '"') out += '\\"';
    else if (ch === '\\') out += '\\\\';
    else if (ch === '\b') out += '\\b';
    else if (ch === '\f') out += '\\f';
    else if (ch === '\n') out += '\\n';
    else if (ch === '\r') out += '\\r';
    else if (ch === '\t') out += '\\t';
    // UTF-16 code units are what QEMU prints for code points beyond the BMP too (a surrogate pair).
    else if (c < 0x20 || c >= 0x7f) out += `\\u${c.toString(16).toUpperCase().padStart(4, '0')}`;
    else out += ch;
  }
  return out + '"';
}

/** Bytes the file takes on disk (st_blocks), as qemu-img's "disk size" / actual-size. */
export function allocatedBytes(filename: string): number {
  try {
    return fs.statSync(filename).blocks * 512;
  } catch {
    return 0;
  }
}

/** qemu-img's -p line: "    (12.34/100%)" rewritten in place, to stdout. */
export class Progress {
  private last = -1;
  constructor(private readonly enabled: boolean) {}

  update(done: number, total: number): void {
    if (!this.enabled) return;
    const pct = total === 0 ? 100 : Math.min(100, (done * 100) / total);
    // Redraw only when the shown value changes by a whole percent (or at the end), as qemu-img does.
    if (pct !== 100 && Math.floor(pct) === Math.floor(this.last)) return;
    this.last = pct;
    process.stdout.write(`    (${pct.toFixed(2)}/100%)\r`);
  }

  finish(): void {
    if (!this.enabled) return;
    if (this.last !== 100) process.stdout.write('    (100.00/100%)\r');
    process.stdout.write('\n');
  }
}
