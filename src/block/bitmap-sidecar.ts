/**
 * Persistent dirty bitmaps for raw images, in a sidecar file next to the
 * image (IMAGE.vdisk-bitmaps): raw has no room for them, and QEMU keeps none.
 *
 * The sidecar is tied to its image: it records the image's size, device and
 * inode, and at a clean close its modification time. At open, a sidecar
 * whose image is another file (copied, replaced) or was changed while no
 * vdisk served it (mtime moved) cannot be trusted: its bitmaps load as
 * inconsistent, with the reason. A sidecar left "open" by a daemon that died
 * keeps its crash-safe bitmaps (their bits were durable before each write)
 * and marks the others inconsistent, as QEMU does with "in use".
 *
 * Layout (big-endian, as qcow2):
 *   0   magic "VDSKBMAP"         8
 *   8   version (1)              u32
 *   12  state: 0 clean, 1 open   u32
 *   16  image size               u64
 *   24  image st_dev             u64
 *   32  image st_ino             u64
 *   40  image mtime (ns) at the clean close, 0 while open   u64
 *   48  bitmap count             u32
 *   52  where the data begins    u32 (a multiple of 4096)
 *   56  entries, each 8-aligned: name length u16, flags u16 (1 enabled,
 *       2 crash-safe, 4 inconsistent), granularity u32, data offset u64,
 *       data bytes u64, name
 *   data: each bitmap's bits (bit i = bit i % 8 of byte i / 8), 4 KiB aligned.
 *
 * Bits are updated in place 4 KiB at a time (crash-safe bitmaps); anything
 * else (a bitmap added, removed, resized, enabled) writes a new sidecar and
 * renames it over the old one, so a crash leaves one or the other, whole.
 */
import fs from 'node:fs';
import path from 'node:path';
import { VdiskError } from '../errors.js';
import { DirtyBitmap } from './dirty-bitmap.js';
import type { SparseBitmap } from './sparse-bitmap.js';
import type { ChunkStore } from './crash-safe-bitmaps.js';

const MAGIC = Buffer.from('VDSKBMAP');
const VERSION = 1;
const STATE_CLEAN = 0;
const STATE_OPEN = 1;
const FLAG_ENABLED = 1;
const FLAG_CRASH_SAFE = 2;
const FLAG_INCONSISTENT = 4;
const ALIGN = 4096;

export const SIDECAR_SUFFIX = '.vdisk-bitmaps';

export interface ImageIdentity {
  size: number;
  dev: bigint;
  ino: bigint;
  mtimeNs: bigint;
}

/** What a bitmap's entry says, plus where its data is. */
interface Entry {
  name: string;
  flags: number;
  granularity: number;
  dataOffset: number;
  dataBytes: number;
}

export interface LoadedBitmap {
  bitmap: DirtyBitmap;
  crashSafe: boolean;
  /** Why it cannot be trusted, when it cannot. */
  inconsistentReason?: string;
  /** Whether it survived an unclean stop (crash-safe: a superset of what changed). */
  recovered: boolean;
}

function alignUp(n: number, a: number): number {
  return Math.ceil(n / a) * a;
}

export function sidecarPath(image: string): string {
  return image + SIDECAR_SUFFIX;
}

export function imageIdentity(fd: number, size: number): ImageIdentity {
  const st = fs.fstatSync(fd, { bigint: true });
  return { size, dev: st.dev, ino: st.ino, mtimeNs: st.mtimeNs };
}

/** Parses a sidecar; throws a VdiskError naming what is wrong with it. */
function parse(buf: Buffer, file: string): { state: number; size: number; dev: bigint; ino: bigint; mtimeNs: bigint; entries: Entry[] } {
  const bad = (what: string) => new VdiskError('EINVAL', `bitmap sidecar '${file}' is invalid: ${what}`);
  if (buf.length < 56 || !buf.subarray(0, 8).equals(MAGIC)) throw bad('no VDSKBMAP magic');
  if (buf.readUInt32BE(8) !== VERSION) throw bad(`version ${buf.readUInt32BE(8)} is not ${VERSION}`);
  const count = buf.readUInt32BE(48);
  const dataStart = buf.readUInt32BE(52);
  const entries: Entry[] = [];
  let p = 56;
  for (let i = 0; i < count; i++) {
    if (p + 24 > dataStart || p + 24 > buf.length) throw bad('the entries run past the header');
    const nameLen = buf.readUInt16BE(p);
    const e: Entry = {
      flags: buf.readUInt16BE(p + 2),
      granularity: buf.readUInt32BE(p + 4),
      dataOffset: Number(buf.readBigUInt64BE(p + 8)),
      dataBytes: Number(buf.readBigUInt64BE(p + 16)),
      name: buf.toString('utf8', p + 24, p + 24 + nameLen),
    };
    if (p + 24 + nameLen > dataStart) throw bad(`the name of bitmap ${i} runs past the header`);
    if (e.dataOffset < dataStart || e.dataOffset + e.dataBytes > buf.length) throw bad(`the data of bitmap '${e.name}' lies outside the file`);
    entries.push(e);
    p += alignUp(24 + nameLen, 8);
  }
  return {
    state: buf.readUInt32BE(12),
    size: Number(buf.readBigUInt64BE(16)),
    dev: buf.readBigUInt64BE(24),
    ino: buf.readBigUInt64BE(32),
    mtimeNs: buf.readBigUInt64BE(40),
    entries,
  };
}

export interface SidecarBitmap {
  bitmap: DirtyBitmap;
  crashSafe: boolean;
  /** The content to write (crash-safe: what the tracker has promised; others: their bits). */
  content?: SparseBitmap;
}

/** Encodes a whole sidecar. */
function encode(id: ImageIdentity, state: number, list: SidecarBitmap[]): { buf: Buffer; offsets: Map<string, number> } {
  const names = list.map((x) => Buffer.from(x.bitmap.name ?? ''));
  let headerBytes = 56;
  for (const n of names) headerBytes += alignUp(24 + n.length, 8);
  const dataStart = alignUp(headerBytes, ALIGN);
  const sizes = list.map((x) => Math.ceil(x.bitmap.bits.size / 8));
  let total = dataStart;
  const offsets = new Map<string, number>();
  const at: number[] = [];
  for (let i = 0; i < list.length; i++) {
    at.push(total);
    offsets.set(list[i].bitmap.name ?? '', total);
    total += alignUp(Math.max(1, sizes[i]), ALIGN);
  }
  const buf = Buffer.alloc(total);
  MAGIC.copy(buf, 0);
  buf.writeUInt32BE(VERSION, 8);
  buf.writeUInt32BE(state, 12);
  buf.writeBigUInt64BE(BigInt(id.size), 16);
  buf.writeBigUInt64BE(id.dev, 24);
  buf.writeBigUInt64BE(id.ino, 32);
  buf.writeBigUInt64BE(state === STATE_CLEAN ? id.mtimeNs : 0n, 40);
  buf.writeUInt32BE(list.length, 48);
  buf.writeUInt32BE(dataStart, 52);
  let p = 56;
  for (let i = 0; i < list.length; i++) {
    const { bitmap: b, crashSafe, content } = list[i];
    // A bitmap that is not crash-safe is only right after a clean close: while open it says inconsistent.
    const inconsistent = b.inconsistent || (state === STATE_OPEN && !crashSafe);
    const flags = (b.enabled || b.recording ? FLAG_ENABLED : 0) | (crashSafe ? FLAG_CRASH_SAFE : 0) | (inconsistent ? FLAG_INCONSISTENT : 0);
    buf.writeUInt16BE(names[i].length, p);
    buf.writeUInt16BE(flags, p + 2);
    buf.writeUInt32BE(b.granularity, p + 4);
    buf.writeBigUInt64BE(BigInt(at[i]), p + 8);
    buf.writeBigUInt64BE(BigInt(sizes[i]), p + 16);
    names[i].copy(buf, p + 24);
    p += alignUp(24 + names[i].length, 8);
    if (!b.inconsistent) (content ?? b.bits).bytesOf(0, b.bits.size).copy(buf, at[i]);
  }
  return { buf, offsets };
}

/**
 * The sidecar of one raw image, open for as long as the image is: loads the
 * bitmaps, rewrites the file when they change, updates bits in place.
 */
export class BitmapSidecar implements ChunkStore {
  readonly chunkBytes = ALIGN;
  private fd: number | undefined;
  private offsets = new Map<string, number>();

  private constructor(
    readonly file: string,
    private readonly writable: boolean,
  ) {}

  /** Opens the sidecar of `image` if there is one (undefined when there is none). */
  static async open(image: string, id: ImageIdentity, writable: boolean): Promise<{ sidecar: BitmapSidecar; loaded: LoadedBitmap[] } | undefined> {
    const file = sidecarPath(image);
    let buf: Buffer;
    try {
      buf = await fs.promises.readFile(file);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
      throw new VdiskError('EIO', `cannot read bitmap sidecar '${file}': ${(err as Error).message}`);
    }
    const parsed = parse(buf, file);
    // Why none of its bitmaps can be trusted, if so.
    let untrusted: string | undefined;
    if (parsed.dev !== id.dev || parsed.ino !== id.ino) {
      untrusted = 'the sidecar belongs to another file (the image was copied or replaced)';
    } else if (parsed.size !== id.size) {
      untrusted = `the image is ${id.size} bytes, the sidecar was written for ${parsed.size} (resized outside vdisk)`;
    } else if (parsed.state === STATE_CLEAN && parsed.mtimeNs !== id.mtimeNs) {
      untrusted = 'the image was modified while vdisk was not serving it';
    }
    const crashed = parsed.state === STATE_OPEN;
    const loaded: LoadedBitmap[] = parsed.entries.map((e) => {
      const b = new DirtyBitmap(e.name, e.granularity, id.size, { enabled: (e.flags & FLAG_ENABLED) !== 0, persistent: true });
      const crashSafe = (e.flags & FLAG_CRASH_SAFE) !== 0;
      let reason = untrusted;
      if (!reason && e.flags & FLAG_INCONSISTENT) {
        reason = crashed ? 'the daemon stopped without closing the image and the bitmap was not crash-safe' : 'it was stored inconsistent';
      }
      if (reason) b.inconsistent = true;
      else b.bits.setFromBytes(buf.subarray(e.dataOffset, e.dataOffset + e.dataBytes), 0, b.bits.size);
      return { bitmap: b, crashSafe, inconsistentReason: reason, recovered: crashed && !reason };
    });
    const sidecar = new BitmapSidecar(file, writable);
    return { sidecar, loaded };
  }

  /** A sidecar for an image that had none (the first persistent bitmap was added). */
  static create(image: string): BitmapSidecar {
    return new BitmapSidecar(sidecarPath(image), true);
  }

  /**
   * Writes the sidecar afresh (a new file renamed over the old one): state
   * open while the image is served, clean at its close. No bitmaps: the
   * sidecar is removed.
   */
  async rewrite(id: ImageIdentity, list: SidecarBitmap[], state: 'open' | 'clean'): Promise<void> {
    if (!this.writable) throw new VdiskError('EROFS', `bitmap sidecar '${this.file}' is read-only`);
    this.closeFd();
    if (list.length === 0) {
      if (!fs.existsSync(this.file)) return;
      await fs.promises.rm(this.file, { force: true });
      await syncDir(this.file);
      return;
    }
    const { buf, offsets } = encode(id, state === 'open' ? STATE_OPEN : STATE_CLEAN, list);
    const tmp = `${this.file}.tmp`;
    const fd = fs.openSync(tmp, 'w', 0o600);
    try {
      fs.writeSync(fd, buf, 0, buf.length, 0);
      fs.fdatasyncSync(fd);
    } finally {
      fs.closeSync(fd);
    }
    await fs.promises.rename(tmp, this.file);
    await syncDir(this.file);
    this.offsets = offsets;
    if (state === 'open') this.fd = fs.openSync(this.file, 'r+');
  }

  async writeChunks(bitmap: DirtyBitmap, chunks: Array<{ index: number; data: Buffer }>): Promise<void> {
    const at = this.offsets.get(bitmap.name ?? '');
    if (this.fd === undefined || at === undefined) throw new VdiskError('EIO', `bitmap '${bitmap.name}' has no place in sidecar '${this.file}'`);
    for (const c of chunks) {
      await new Promise<void>((resolve, reject) =>
        fs.write(this.fd!, c.data, 0, c.data.length, at + c.index * ALIGN, (err) => (err ? reject(err) : resolve())),
      );
    }
  }

  sync(): Promise<void> {
    const fd = this.fd;
    if (fd === undefined) return Promise.resolve();
    return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
  }

  close(): void {
    this.closeFd();
  }

  private closeFd(): void {
    if (this.fd !== undefined) fs.closeSync(this.fd);
    this.fd = undefined;
  }
}

/** fsync of the directory, so a rename or removal survives a crash. */
async function syncDir(file: string): Promise<void> {
  const fd = fs.openSync(path.dirname(file), 'r');
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}
