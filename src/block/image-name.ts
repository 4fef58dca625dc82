/**
 * Image names as QEMU's tools take them: a host file path, an NBD URI
 * (nbd://host[:port]/export, nbd+unix:///export?socket=PATH), or an RBD
 * image (rbd:pool[/namespace]/image[@snap][:conf=...:id=...]). Each becomes a
 * protocol blockdev; the format on top is given or probed from the first
 * bytes, which works the same over a file and over NBD.
 */
import fs from 'node:fs';
import path from 'node:path';
import { VdiskError } from '../errors.js';
import { isQcow2 } from './drivers/qcow2/format.js';
import { NbdClientNode, isNbdUri, parseNbdUri } from './drivers/nbd.js';
import { RbdNode, isRbdName, parseRbdFilename } from './drivers/rbd.js';
import type { BlockNode } from './node.js';

export { isNbdUri, isRbdName };

/** Whether a name is a protocol's (NBD URI, rbd:) rather than a host path: nothing to look for on disk. */
export function isProtocolName(name: string): boolean {
  return isNbdUri(name) || isRbdName(name);
}

/** The protocol blockdev for an image name: driver=nbd for a URI, driver=file otherwise. */
export function protocolBlockdev(name: string): Record<string, unknown> {
  if (isNbdUri(name)) {
    const { server, exportName } = parseNbdUri(name);
    return { driver: 'nbd', server, export: exportName };
  }
  if (isRbdName(name)) return { driver: 'rbd', ...parseRbdFilename(name) };
  return { driver: 'file', filename: name };
}

/** QEMU's path_combine for a backing name: URIs and absolute paths stay, a relative path is taken from the overlay's directory. */
export function resolveBackingName(overlay: string, name: string): string {
  if (name.startsWith('json:') || isProtocolName(name) || path.isAbsolute(name) || isProtocolName(overlay)) return name;
  return path.join(path.dirname(overlay), name);
}

/** Probes the format from an open protocol node's first bytes. */
export async function probeNodeFormat(node: BlockNode): Promise<string> {
  const magic = Buffer.alloc(4);
  if (node.size >= 4) await node.read(0, magic);
  return isQcow2(magic) ? 'qcow2' : 'raw';
}

/** Probes an image's format by name: the file's first bytes, or (for a URI) one short-lived NBD connection's, or a read-only RBD open's. */
export async function probeImageFormat(name: string): Promise<string> {
  if (isRbdName(name)) {
    const image = await RbdNode.open(parseRbdFilename(name), { nodeName: 'probe', readOnly: true, direct: false, objects: undefined });
    try {
      return await probeNodeFormat(image);
    } finally {
      await image.close();
    }
  }
  if (!isNbdUri(name)) return probeFileFormat(name);
  const client = await NbdClientNode.fromUri(name, { nodeName: 'probe', readOnly: true });
  try {
    return await probeNodeFormat(client);
  } finally {
    await client.close();
  }
}

/** Probes a host file's format (synchronously: callers that only have a path and no graph). */
export function probeFileFormat(filename: string): string {
  let fd: number;
  try {
    fd = fs.openSync(filename, 'r');
  } catch (err) {
    throw new VdiskError('ENOENT', `Could not open backing file '${filename}': ${(err as Error).message}`);
  }
  try {
    const b = Buffer.alloc(4);
    fs.readSync(fd, b, 0, 4, 0);
    return isQcow2(b) ? 'qcow2' : 'raw';
  } finally {
    fs.closeSync(fd);
  }
}
