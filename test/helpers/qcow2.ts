/**
 * Helpers for the qcow2 tests that use QEMU's tools as the referee: run
 * qemu-img / qemu-io and insist they succeed, open an image through the
 * block graph, read a whole node, and compare an image with a byte model.
 */
import type { Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { type BlockNode, Status } from '../../src/block/node.js';
import { type RunResult, run } from './tools.js';

export { rng } from './tools.js';

/** Runs a QEMU tool; any exit code but 0 (or one in `okCodes`) throws with its output. */
export async function tool(cmd: string, args: string[], okCodes: number[] = [0], timeoutMs = 60_000): Promise<RunResult> {
  const r = await run(cmd, args, { timeoutMs });
  if (r.code === null || !okCodes.includes(r.code)) {
    throw new Error(`${cmd} ${args.join(' ')} exited ${r.code ?? r.signal}:\n${r.stdout}${r.stderr}`);
  }
  // qemu-io reports failed commands on stdout and still exits 0.
  if (cmd === 'qemu-io' && /failed|error/i.test(r.stdout + r.stderr)) {
    throw new Error(`${cmd} ${args.join(' ')} reported an error:\n${r.stdout}${r.stderr}`);
  }
  return r;
}

export const qemuImg = (...args: string[]) => tool('qemu-img', args);

/** Runs qemu-io commands (one -c each) on an image of the given format. */
export function qemuIo(img: string, commands: string[], format = 'qcow2'): Promise<RunResult> {
  const args = ['-f', format];
  for (const c of commands) args.push('-c', c);
  args.push(img);
  return tool('qemu-io', args);
}

/** Asserts qemu-img check finds nothing at all: exit 0 and "No errors were found". */
export async function assertCleanCheck(t: Test, img: string, what: string): Promise<void> {
  const r = await run('qemu-img', ['check', img], { timeoutMs: 60_000 });
  t.equal(r.code, 0, `${what}: qemu-img check exits 0`);
  const text = `${r.stdout}${r.stderr}`;
  t.match(r.stdout, /No errors were found on the image/, `${what}: qemu-img check finds no errors${r.code === 0 ? '' : `\n${text.length > 2000 ? `${text.slice(0, 1000)}\n...\n${text.slice(-1000)}` : text}`}`);
}

/** Writes the model to a raw file and asks qemu-img compare whether the image holds exactly it. */
export async function compareImage(img: string, model: Buffer, dir: string, format = 'qcow2'): Promise<RunResult> {
  const raw = path.join(dir, `model-${path.basename(img)}.raw`);
  fs.writeFileSync(raw, model);
  const r = await run('qemu-img', ['compare', '-f', format, '-F', 'raw', img, raw], { timeoutMs: 60_000 });
  fs.rmSync(raw, { force: true });
  return r;
}

/** Opens a qcow2 image through a fresh graph (closed at teardown unless closed before). */
export async function openQcow2(
  t: Test,
  img: string,
  options: { readOnly?: boolean; discard?: boolean; nodeName?: string; backing?: null } = {},
): Promise<{ g: BlockGraph; q: BlockNode }> {
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const q = await g.add({
    driver: 'qcow2',
    'node-name': options.nodeName ?? 'q',
    ...(options.readOnly ? { 'read-only': true } : {}),
    ...(options.discard ? { discard: 'unmap' } : {}),
    ...(options.backing === null ? { backing: null } : {}),
    file: { driver: 'file', filename: img },
  });
  return { g, q };
}

/** Reads a whole node in chunks of `chunk` bytes (odd sizes exercise unaligned paths). */
export async function readAll(node: BlockNode, chunk = 1024 * 1024): Promise<Buffer> {
  const out = Buffer.alloc(node.size);
  for (let off = 0; off < node.size; off += chunk) {
    await node.read(off, out.subarray(off, Math.min(node.size, off + chunk)));
  }
  return out;
}

/** The first offset where two buffers differ, or -1. */
export function firstDifference(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  const step = 65536;
  for (let off = 0; off < n; off += step) {
    const end = Math.min(n, off + step);
    if (!a.subarray(off, end).equals(b.subarray(off, end))) {
      for (let i = off; i < end; i++) if (a[i] !== b[i]) return i;
    }
  }
  return a.length === b.length ? -1 : n;
}

/** Describes a mismatch for a test message: where, and the bytes around it. */
export function describeDifference(actual: Buffer, expected: Buffer): string {
  const at = firstDifference(actual, expected);
  if (at < 0) return 'identical';
  const show = (b: Buffer) => b.subarray(at, at + 16).toString('hex');
  return `first difference at byte ${at} (0x${at.toString(16)}): got ${show(actual)}, expected ${show(expected)}`;
}

/** The dirty bit (incompatible feature bit 0, header bytes 72..79) as it is on disk now. */
export function dirtyBitOnDisk(img: string): boolean {
  const fd = fs.openSync(img, 'r');
  try {
    const b = Buffer.alloc(80);
    fs.readSync(fd, b, 0, 80, 0);
    return (b.readBigUInt64BE(72) & 1n) === 1n;
  } finally {
    fs.closeSync(fd);
  }
}

/** One entry of qemu-img map --output=json. */
export interface MapEntry {
  start: number;
  length: number;
  depth: number;
  present?: boolean;
  zero: boolean;
  data: boolean;
  offset?: number;
}

/** qemu-img map --output=json of an image. */
export async function qemuMap(img: string): Promise<MapEntry[]> {
  const r = await qemuImg('map', '--output=json', img);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** Walks the whole disk comparing vdisk's block status with qemu-img map's entries at every boundary of either. */
export async function compareMap(t: Test, node: BlockNode, img: string, what: string): Promise<void> {
  const entries = await qemuMap(img);
  let pos = 0;
  let bad = 0;
  let i = 0;
  while (pos < node.size && bad < 5) {
    while (entries[i].start + entries[i].length <= pos) i++;
    const e = entries[i];
    const s = await node.blockStatus(pos, node.size - pos);
    const got = {
      data: (s.flags & Status.DATA) !== 0,
      zero: (s.flags & Status.ZERO) !== 0,
      // qemu-img map: depth 0 is the top image, vdisk's 1; an extent no layer has is present: false in
      // qemu-img map (its depth is the bottom layer's) and depth 0 in vdisk.
      depth: s.depth === 0 ? 'absent' : s.depth - 1,
      offset: e.offset === undefined ? 'n/a' : s.hostOffset,
    };
    const want = {
      data: e.data,
      zero: e.zero,
      depth: e.present === false ? 'absent' : e.depth,
      offset: e.offset === undefined ? 'n/a' : e.offset + (pos - e.start),
    };
    if (JSON.stringify(got) !== JSON.stringify(want)) {
      bad++;
      t.same(got, want, `${what}: block status at ${pos} (vdisk extent ${s.length} bytes, qemu entry ${JSON.stringify(e)})`);
    }
    pos = Math.min(pos + s.length, e.start + e.length);
  }
  t.equal(bad, 0, `${what}: block status agrees with qemu-img map`);
}

