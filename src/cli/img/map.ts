/**
 * `vdisk img map`: where each range of an image's content comes from, as
 * qemu-img map prints it.
 *
 *   vdisk img map [-f FMT] [--output=human|json] [--start-offset=N] [--max-length=N] [-U] FILENAME
 *
 * JSON entries carry start, length, depth (0 = the image itself, 1 = its
 * backing file, ...; for ranges allocated nowhere, the depth of the bottom
 * layer), present, zero, data and, where the bytes sit in a file at a known
 * place, offset. Neighbouring entries that agree on everything (and whose
 * offsets continue) are merged, as qemu-img does.
 */
import type { BlockNode } from '../../block/node.js';
import { Status } from '../../block/node.js';
import { VdiskError } from '../../errors.js';
import { parseImgArgs } from './args.js';
import { openImage, parseImageSize } from './image.js';
import { outputFormat } from './info.js';

export const MAP_USAGE = `Usage: vdisk img map [-f FMT] [--output=human|json] [--start-offset=N] [--max-length=N] [-U] FILENAME
`;

export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
  /** The file holding the data (human output only). */
  filename?: string;
}

export async function mapCommand(argv: string[]): Promise<number> {
  const { flags, positionals } = parseImgArgs(
    argv,
    { f: 'value', output: 'value', 'start-offset': 'value', 's': 'value', 'max-length': 'value', l: 'value', U: 'bool', 'force-share': 'bool' },
    MAP_USAGE,
  );
  if (positionals.length !== 1) throw new VdiskError('EINVAL', `Expecting one image file name\n${MAP_USAGE}`);
  const output = outputFormat(flags.output as string | undefined);
  const startText = (flags['start-offset'] ?? flags.s) as string | undefined;
  const lengthText = (flags['max-length'] ?? flags.l) as string | undefined;
  const img = await openImage(positionals[0], { format: flags.f as string | undefined, readOnly: true, forceShare: Boolean(flags.U || flags['force-share']) });
  try {
    const size = img.node.size;
    const start = startText === undefined ? 0 : Math.min(parseImageSize(startText), size);
    const end = lengthText === undefined ? size : Math.min(size, start + parseImageSize(lengthText));
    const entries = await mapImage(img.node, start, end);
    if (output === 'json') {
      process.stdout.write('[' + entries.map(jsonEntry).join(',\n') + ']\n');
      return 0;
    }
    process.stdout.write(`${'Offset'.padEnd(16)}${'Length'.padEnd(16)}${'Mapped to'.padEnd(16)}File\n`);
    for (const e of entries) {
      if (e.data && e.offset === undefined) {
        process.stderr.write('vdisk: File contains external, encrypted or compressed clusters.\n');
        return 1;
      }
      if (e.data && !e.zero) process.stdout.write(`${hex(e.start)}${hex(e.length)}${hex(e.offset ?? 0)}${e.filename ?? ''}\n`);
    }
    return 0;
  } finally {
    await img.close();
  }
}

/** The merged map of [start, end). */
export async function mapImage(node: BlockNode, start: number, end: number): Promise<MapEntry[]> {
  let layers = 1;
  for (let n: BlockNode | undefined = node; (n = n.child('backing')); ) layers++;
  const out: MapEntry[] = [];
  for (let off = start; off < end; ) {
    const ext = await node.blockStatus(off, Math.min(end - off, 1 << 30));
    const depth = ext.depth === 0 ? layers - 1 : ext.depth - 1;
    const e: MapEntry = {
      start: off,
      length: ext.length,
      depth,
      present: ext.depth !== 0,
      zero: (ext.flags & Status.ZERO) !== 0,
      data: (ext.flags & Status.DATA) !== 0,
    };
    if (ext.hostOffset !== undefined && !ext.compressed) e.offset = ext.hostOffset;
    // As QEMU: a range has a file name exactly when its place in that file is known.
    if (e.offset !== undefined) e.filename = (ext.from ?? node).filename;
    const last = out[out.length - 1];
    if (last && mergeable(last, e)) last.length += e.length;
    else out.push(e);
    off += ext.length;
  }
  return out;
}

function mergeable(a: MapEntry, b: MapEntry): boolean {
  if (a.depth !== b.depth || a.present !== b.present || a.zero !== b.zero || a.data !== b.data || a.filename !== b.filename) return false;
  if ((a.offset === undefined) !== (b.offset === undefined)) return false;
  return a.offset === undefined || a.offset + a.length === b.offset;
}

function jsonEntry(e: MapEntry): string {
  const offset = e.offset === undefined ? '' : `, "offset": ${e.offset}`;
  return `{ "start": ${e.start}, "length": ${e.length}, "depth": ${e.depth}, "present": ${e.present}, "zero": ${e.zero}, "data": ${e.data}${offset}}`;
}

/** printf("%#-16" PRIx64): 0x-prefixed hex (plain "0" for zero), left-aligned in 16 columns. */
function hex(n: number): string {
  return (n === 0 ? '0' : `0x${n.toString(16)}`).padEnd(16);
}
