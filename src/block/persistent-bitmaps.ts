/**
 * Keeping a node's persistent bitmaps true on disk while the image is open
 * writable, whatever holds them (qcow2: in the image; raw: a sidecar file).
 *
 * Two modes per bitmap:
 *   crash-safe (vdisk's default): stored consistent, kept up to date bit by
 *     bit before each write (src/block/crash-safe-bitmaps.ts), so a crash
 *     leaves a usable superset;
 *   QEMU's: marked "in use" while open, stored at a clean close, so a crash
 *     leaves it inconsistent.
 * Anything that changes the set of bitmaps or their flags (add, remove,
 * enable, disable, resize) writes the whole set afresh through the backend,
 * with no bit round in progress; content that shrinks (a clear, a backup's
 * success) or grows other than by writes (a merge) is written back by the
 * tracker. The final store at a clean close stays the backend's own.
 */
import { logEvent } from '../log.js';
import { CrashSafeBitmaps, type ChunkStore } from './crash-safe-bitmaps.js';
import type { DirtyBitmap } from './dirty-bitmap.js';
import type { BlockNode } from './node.js';
import type { SparseBitmap } from './sparse-bitmap.js';

/** One bitmap as the backend writes it afresh. */
export interface StoreEntry {
  bitmap: DirtyBitmap;
  /** Crash-safe: stored consistent with `content`. Otherwise stored in use (QEMU's mode), with no content. */
  crashSafe: boolean;
  content?: SparseBitmap;
}

/** Where a node keeps its persistent bitmaps. */
export interface BitmapBackend extends ChunkStore {
  /** Writes every persistent bitmap afresh, so that a crash leaves either the old set or the new one. */
  rewrite(list: StoreEntry[]): Promise<void>;
}

export type PersistentChange = 'added' | 'removed' | 'flags' | 'content' | 'resized';

export class PersistentBitmaps {
  private readonly tracker: CrashSafeBitmaps;
  private hooked = false;

  constructor(
    private readonly node: BlockNode,
    private readonly backend: BitmapBackend,
  ) {
    this.tracker = new CrashSafeBitmaps(backend, () => node.dirtyBitmaps);
  }

  private persistent(): DirtyBitmap[] {
    return this.node.dirtyBitmaps.filter((b) => b.persistent && b.name !== undefined);
  }

  /** Crash-safe and trustworthy: tracked bit by bit. */
  private tracks(b: DirtyBitmap): boolean {
    return b.crashSafe && !b.inconsistent;
  }

  /** At open (writable): crash-safe bitmaps are tracked from their loaded content, the rest marked in use. */
  async start(): Promise<void> {
    await this.change(() => {
      for (const b of this.persistent()) if (this.tracks(b)) this.tracker.track(b.name!, b.bits);
    });
  }

  /** Keeps the disk true after a change to one bitmap (the node calls this; see bitmap-ops.ts). */
  async changed(change: PersistentChange, bitmap?: DirtyBitmap, name = bitmap?.name): Promise<void> {
    if (change === 'resized') {
      return this.change(() => this.tracker.resize((n) => this.persistent().find((b) => b.name === n)?.bits.size ?? 0));
    }
    if (name === undefined || bitmap === undefined) return;
    switch (change) {
      case 'added':
        bitmap.maintained = true;
        // A new bitmap in QEMU's mode reaches the disk at close, as in QEMU.
        if (!this.tracks(bitmap)) return;
        return this.change(() => this.tracker.track(name, this.tracker.exactContent(bitmap)));
      case 'removed':
        // Gone from the disk at once, as QEMU removes it.
        return this.change(() => this.tracker.untrack(name));
      case 'flags':
        // On disk a QEMU-mode bitmap is "in use" whatever its flags until the close.
        if (!this.tracks(bitmap)) return;
        return this.change(() => undefined);
      case 'content':
        if (this.tracker.isTracked(name)) await this.tracker.resync(name);
        return;
    }
  }

  /** Waits for every write-back in progress and stops tracking (before the backend's final store). */
  async close(): Promise<void> {
    await this.tracker.exclusively(
      () => undefined,
      async () => undefined,
    );
    this.unhook();
  }

  private async change(mutate: () => void): Promise<void> {
    for (const b of this.persistent()) b.maintained = true;
    await this.tracker.exclusively(mutate, (snapshot) =>
      this.backend.rewrite(
        this.persistent().map((b) => ({ bitmap: b, crashSafe: this.tracks(b), content: snapshot.get(b.name!) ?? (this.tracks(b) ? b.bits : undefined) })),
      ),
    );
    if (this.tracker.active) this.hook();
    else this.unhook();
    logEvent('debug', 'persistent-bitmaps-written', { nodeName: this.node.nodeName, bitmaps: this.persistent().map((b) => b.name) });
  }

  private hook(): void {
    if (this.hooked) return;
    this.hooked = true;
    // First, so its registration of the write is made before any other hook can fail.
    this.node.beforeWrite.unshift(this.tracker.before);
  }

  private unhook(): void {
    if (!this.hooked) return;
    this.hooked = false;
    const i = this.node.beforeWrite.indexOf(this.tracker.before);
    if (i >= 0) this.node.beforeWrite.splice(i, 1);
  }
}
