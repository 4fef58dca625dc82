/**
 * blkdebug: a filter that fails requests on cue, to prove error paths
 * (QEMU's block/blkdebug.c; options in qapi/block-core.json).
 *
 * The node has a state (an integer, 1 at open) and rules. Events are
 * announced to it by its parent (a format driver reading data announces
 * read_aio, a flush announces flush_to_os and flush_to_disk, ...). On an
 * event, every rule registered for it whose state matches (0 = any) fires:
 * set-state rules move the state (the last one wins, applied after all
 * rules), inject-error rules become the active set. Each later request to
 * this node is checked against the active rules: the first whose iotype
 * and sector match fails the request with its errno; a 'once' rule is then
 * deleted.
 */
import { VdiskError, errnoError } from '../../errors.js';
import type { BlkdebugIoType, BlkdebugRule, DebugControl, InjectAction, InjectErrorRule } from '../debug-control.js';
import { FilterNode } from '../filter.js';
import type { BlockNode, Extent } from '../node.js';

export const BLKDEBUG_EVENTS = [
  'l1_update', 'l1_grow_alloc_table', 'l1_grow_write_table', 'l1_grow_activate_table', 'l2_load', 'l2_update',
  'l2_update_compressed', 'l2_alloc_cow_read', 'l2_alloc_write', 'read_aio', 'read_backing_aio', 'read_compressed',
  'write_aio', 'write_compressed', 'vmstate_load', 'vmstate_save', 'cow_read', 'cow_write', 'reftable_load',
  'reftable_grow', 'reftable_update', 'refblock_load', 'refblock_update', 'refblock_update_part', 'refblock_alloc',
  'refblock_alloc_hookup', 'refblock_alloc_write', 'refblock_alloc_write_blocks', 'refblock_alloc_write_table',
  'refblock_alloc_switch_table', 'cluster_alloc', 'cluster_alloc_bytes', 'cluster_free', 'flush_to_os',
  'flush_to_disk', 'pwritev_rmw_head', 'pwritev_rmw_after_head', 'pwritev_rmw_tail', 'pwritev_rmw_after_tail',
  'pwritev', 'pwritev_zero', 'pwritev_done', 'empty_image_prepare', 'l1_shrink_write_table',
  'l1_shrink_free_l2_clusters', 'cor_write', 'cluster_alloc_space', 'none',
] as const;
export { BLKDEBUG_IO_TYPES } from '../debug-control.js';
export type { BlkdebugIoType, BlkdebugRule, InjectAction, InjectErrorRule, SetStateRule } from '../debug-control.js';

/** Without iotype, a rule matches every request type except block-status (as QEMU). */
const DEFAULT_IO_TYPES: BlkdebugIoType[] = ['read', 'write', 'write-zeroes', 'discard', 'flush'];

export interface BlkdebugOptions {
  nodeName: string;
  image: BlockNode;
  readOnly?: boolean;
  align?: number;
  maxTransfer?: number;
  rules: BlkdebugRule[];
}

/**
 * Every request is first held by a breakpoint or failed by an active rule,
 * then handed to the image by the filter base; what the image does with it
 * (the events it announces to its own file) is unchanged by blkdebug.
 */
export class BlkdebugNode extends FilterNode implements DebugControl {
  readonly driverName = 'blkdebug';
  state = 1;
  /** Rules newest first, as QEMU keeps them. */
  readonly rules: BlkdebugRule[];
  private active: InjectErrorRule[] = [];
  private nextRuleId = 1;
  /** Breakpoints: an event that suspends the request announced after it, under a tag. */
  private breakpoints: Array<{ event: string; tag: string }> = [];
  private suspendNext: string | undefined;
  private suspended: Array<{ tag: string; resume: () => void }> = [];
  /** Where suspension messages go (QEMU prints them on stdout). */
  print: (line: string) => void = (line) => process.stdout.write(line);
  /** After a power cut: every request fails until powerOn(). */
  poweredOff = false;
  /** Old contents of ranges written since the last flush (kept only while a power-cut rule exists). */
  private journal: Array<{ offset: number; data: Buffer }> = [];

  constructor(o: BlkdebugOptions) {
    super({ nodeName: o.nodeName, readOnly: o.readOnly }, 'image', o.image);
    // Between a format and its file, blkdebug grows as the file does (qcow2 allocates past the end).
    this.growable = o.image.isGrowable;
    // A FUA write reaches the rules as a write then a flush: iotype=flush rules fire on it and the
    // power-cut journal counts it durable, as blkdebug always has treated it.
    this.nativeFua = false;
    if (o.align) {
      if (!Number.isInteger(Math.log2(o.align))) throw new VdiskError('EINVAL', 'Cannot meet constraints with align');
      this.limits.requestAlignment = Math.max(this.limits.requestAlignment, o.align);
    }
    if (o.maxTransfer) {
      if (o.maxTransfer % this.limits.requestAlignment) throw new VdiskError('EINVAL', 'Cannot meet constraints with max-transfer');
      this.limits.maxTransfer = o.maxTransfer;
    }
    this.rules = [...o.rules].reverse();
    for (const r of this.rules) r.id = this.nextRuleId++;
    this.debugEvent('none');
  }

  override get debugControl(): DebugControl {
    return this;
  }

  /** An event announced by the parent: rules for it fire in the state as it was before. */
  override debugEvent(event: string): void {
    const bp = this.breakpoints.find((b) => b.event === event);
    if (bp) this.suspendNext = bp.tag;
    const before = this.state;
    let newState = before;
    let injected = false;
    for (const r of this.rules) {
      if (r.event !== event || (r.state !== 0 && r.state !== before)) continue;
      r.hits++;
      if (r.kind === 'set-state') newState = r.newState;
      else {
        // The first matching inject rule of this event replaces the active set.
        if (!injected) this.active = [];
        injected = true;
        this.active.unshift(r);
      }
    }
    this.state = newState;
  }

  /** qemu-io's break EVENT TAG. */
  addBreakpoint(event: string, tag: string): void {
    if (!(BLKDEBUG_EVENTS as readonly string[]).includes(event)) throw new VdiskError('EINVAL', `Invalid argument`);
    this.breakpoints.push({ event, tag });
  }

  /** qemu-io's remove_break TAG: the breakpoint goes and requests held under it go on. */
  removeBreakpoint(tag: string): void {
    const before = this.breakpoints.length;
    this.breakpoints = this.breakpoints.filter((b) => b.tag !== tag);
    const held = this.suspended.filter((x) => x.tag === tag);
    if (before === this.breakpoints.length && held.length === 0) throw new VdiskError('ENOENT', 'No such file or directory');
    for (const h of held) this.resumeOne(h);
    if (this.suspendNext === tag) this.suspendNext = undefined;
  }

  /** qemu-io's resume TAG: one request held under the tag goes on. */
  resume(tag: string): void {
    const h = this.suspended.find((x) => x.tag === tag);
    if (!h) throw new VdiskError('ENOENT', 'No such file or directory');
    this.resumeOne(h);
  }

  isSuspended(tag: string): boolean {
    return this.suspended.some((x) => x.tag === tag);
  }

  private resumeOne(h: { tag: string; resume: () => void }): void {
    this.suspended.splice(this.suspended.indexOf(h), 1);
    this.print(`blkdebug: Resuming request '${h.tag}'\n`);
    h.resume();
  }

  /** Holds the request if a breakpoint fired just before it. */
  private async maybeSuspend(): Promise<void> {
    const tag = this.suspendNext;
    if (tag === undefined) return;
    this.suspendNext = undefined;
    this.print(`blkdebug: Suspended request '${tag}'\n`);
    await new Promise<void>((resume) => this.suspended.push({ tag, resume }));
  }

  /** Fails the request if an active rule matches it. */
  private async check(type: BlkdebugIoType, offset: number, length: number): Promise<void> {
    await this.maybeSuspend();
    for (const r of this.active) {
      if (!r.iotypes.includes(type)) continue;
      if (r.sector >= 0) {
        const at = r.sector * 512;
        if (length === 0 || at < offset || at >= offset + length) continue;
      }
      if (r.once) {
        this.active = this.active.filter((x) => x !== r);
        const i = this.rules.indexOf(r);
        if (i >= 0) this.rules.splice(i, 1);
      }
      r.injected++;
      switch (r.action) {
        case 'delay':
          await new Promise((resolve) => setTimeout(resolve, r.delayMs));
          return;
        case 'drop-connection':
          throw new VdiskError('EIO', `blkdebug: connection dropped on ${type} at ${offset}`, { code: 'VDISK_DROP_CONNECTION' });
        case 'power-cut':
          await this.powerCut();
          throw new VdiskError('EIO', `blkdebug: power cut on ${type} at ${offset}`);
      }
      if (r.errno === 0) return;
      // Not immediately: complete the failure asynchronously, as QEMU does.
      if (!r.immediately) await new Promise((resolve) => setImmediate(resolve));
      throw errnoError(-r.errno, `blkdebug: injected error on ${type} at ${offset}`);
    }
  }

  /** Adds a rule at run time (newest first, as QEMU keeps them); returns its id. */
  addRule(rule: BlkdebugRule): number {
    rule.id = this.nextRuleId++;
    this.rules.unshift(rule);
    return rule.id;
  }

  removeRule(id: number): void {
    const i = this.rules.findIndex((r) => r.id === id);
    if (i < 0) throw new VdiskError('ENOENT', `blkdebug node '${this.nodeName}' has no rule ${id}`);
    const [r] = this.rules.splice(i, 1);
    this.active = this.active.filter((a) => a !== r);
  }

  /** Every write since the last flush is undone, then the node is dead until powerOn(). */
  private async powerCut(): Promise<void> {
    for (const j of this.journal.reverse()) await this.filtered.write(j.offset, j.data);
    this.journal = [];
    await this.filtered.flush();
    this.poweredOff = true;
  }

  powerOn(): void {
    this.poweredOff = false;
  }

  private get journaling(): boolean {
    return this.rules.some((r) => r.kind === 'inject-error' && r.action === 'power-cut');
  }

  /** Keeps the old contents of a range about to change, for a power cut. */
  private async remember(offset: number, length: number): Promise<void> {
    if (!this.journaling) return;
    const end = Math.min(offset + length, this.filtered.size);
    if (end <= offset) return;
    const data = Buffer.alloc(end - offset);
    await this.filtered.read(offset, data);
    this.journal.push({ offset, data });
  }

  private alive(): void {
    if (this.poweredOff) throw new VdiskError('EIO', `blkdebug node '${this.nodeName}' has lost power`);
  }

  /** Breakpoints and active rules act on a request before the filter base hands it on. */
  private async admit(type: BlkdebugIoType, offset: number, length: number): Promise<void> {
    this.alive();
    await this.check(type, offset, length);
  }

  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    await this.admit('read', offset, buf.length);
    await super.doRead(offset, buf);
  }

  protected override async doWrite(offset: number, buf: Buffer, flags: number): Promise<void> {
    await this.admit('write', offset, buf.length);
    await this.remember(offset, buf.length);
    await super.doWrite(offset, buf, flags);
  }

  /** A compressed write is a write to the rules and the power-cut journal. */
  protected override async doWriteCompressed(offset: number, buf: Buffer): Promise<void> {
    await this.admit('write', offset, buf.length);
    await this.remember(offset, buf.length);
    await super.doWriteCompressed(offset, buf);
  }

  protected override async doWriteZeroes(offset: number, length: number, flags: number): Promise<void> {
    await this.admit('write-zeroes', offset, length);
    await this.remember(offset, length);
    await super.doWriteZeroes(offset, length, flags);
  }

  protected override async doDiscard(offset: number, length: number): Promise<void> {
    await this.admit('discard', offset, length);
    await this.remember(offset, length);
    await super.doDiscard(offset, length);
  }

  protected override async doFlush(): Promise<void> {
    await this.admit('flush', 0, 0);
    // What is flushed is durable: a later power cut keeps it. (The image is flushed after this.)
    this.journal = [];
  }

  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    await this.admit('block-status', offset, length);
    return super.doBlockStatus(offset, length);
  }

  /**
   * A prefetch hint reaches the image. No rule type matches it (QEMU's
   * BlkdebugIOType has none for it), but a node without power does nothing.
   */
  protected override async doCache(offset: number, length: number): Promise<void> {
    this.alive();
    await super.doCache(offset, length);
  }
}

/** Turns checked QAPI options (inject-error, set-state lists) into rules. */
export function blkdebugRules(injects: Array<Record<string, unknown>>, sets: Array<Record<string, unknown>>): BlkdebugRule[] {
  const rules: BlkdebugRule[] = [];
  for (const o of injects) {
    rules.push({
      kind: 'inject-error',
      id: 0,
      action: (o.action as InjectAction | undefined) ?? 'error',
      delayMs: (o['delay-ms'] as number | undefined) ?? 0,
      event: o.event as string,
      state: (o.state as number | undefined) ?? 0,
      iotypes: o.iotype !== undefined ? [o.iotype as BlkdebugIoType] : DEFAULT_IO_TYPES,
      errno: (o.errno as number | undefined) ?? 5,
      sector: (o.sector as number | undefined) ?? -1,
      once: (o.once as boolean | undefined) ?? false,
      immediately: (o.immediately as boolean | undefined) ?? false,
      hits: 0,
      injected: 0,
    });
  }
  for (const o of sets) {
    rules.push({ kind: 'set-state', id: 0, event: o.event as string, state: (o.state as number | undefined) ?? 0, newState: o.new_state as number, hits: 0 });
  }
  return rules;
}

/**
 * Reads a blkdebug config file (QEMU's -readconfig syntax):
 *
 *   [inject-error]
 *   event = "read_aio"
 *   errno = "5"
 *
 * Sections inject-error and set-state; values are double-quoted strings;
 * '#' starts a comment. Returns the sections as keyval objects (strings),
 * for the same schema check as the QMP options.
 */
export function parseBlkdebugConfig(text: string, filename: string): { inject: Array<Record<string, string>>; set: Array<Record<string, string>> } {
  const inject: Array<Record<string, string>> = [];
  const set: Array<Record<string, string>> = [];
  let current: Record<string, string> | undefined;
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const where = `${filename}:${i + 1}`;
    const section = /^\[([a-z-]+)\]$/.exec(line);
    if (section) {
      current = {};
      if (section[1] === 'inject-error') inject.push(current);
      else if (section[1] === 'set-state') set.push(current);
      else throw new VdiskError('EINVAL', `${where}: unknown section [${section[1]}] (expected [inject-error] or [set-state])`);
      return;
    }
    const kv = /^([a-z_-]+)\s*=\s*"([^"]*)"$/.exec(line);
    if (!kv) throw new VdiskError('EINVAL', `${where}: expected key = "value"`);
    if (!current) throw new VdiskError('EINVAL', `${where}: '${kv[1]}' is outside a section`);
    current[kv[1]] = kv[2];
  });
  return { inject, set };
}
