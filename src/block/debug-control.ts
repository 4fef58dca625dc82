/**
 * What a debugging node (blkdebug) offers the rest of vdisk through
 * BlockNode.debugControl: qemu-io's breakpoint commands and the run-time
 * rule commands of QMP (x-blkdebug-*). Callers outside the filters find a
 * node that can be debugged by asking for this, never by its class.
 *
 * The rule types live here rather than in the filter so that the node
 * contract can name them without importing a driver.
 */

/** The request types an inject-error rule can match (QEMU's BlkdebugIOType). */
export const BLKDEBUG_IO_TYPES = ['read', 'write', 'write-zeroes', 'discard', 'flush', 'block-status'] as const;
export type BlkdebugIoType = (typeof BLKDEBUG_IO_TYPES)[number];

/**
 * What an active inject rule does to a matching request. QEMU only fails
 * it ('error'); vdisk can also hold it back ('delay'), cut the client's
 * connection without a reply ('drop-connection', NBD clients), or lose every
 * write since the last flush and then fail everything until the node is
 * powered on again ('power-cut': what a crash of the host would do).
 */
export type InjectAction = 'error' | 'delay' | 'drop-connection' | 'power-cut';

export interface InjectErrorRule {
  kind: 'inject-error';
  id: number;
  action: InjectAction;
  delayMs: number;
  event: string;
  state: number;
  iotypes: BlkdebugIoType[];
  errno: number;
  sector: number;
  once: boolean;
  immediately: boolean;
  /** Times an event activated it. */
  hits: number;
  /** Requests it acted on. */
  injected: number;
}

export interface SetStateRule {
  kind: 'set-state';
  id: number;
  event: string;
  state: number;
  newState: number;
  hits: number;
}

export type BlkdebugRule = InjectErrorRule | SetStateRule;

export interface DebugControl {
  // ---- breakpoints (qemu-io's break, remove_break, resume, wait_break) ----

  /** Suspends the next request announced after `event`, under `tag`. EINVAL for an unknown event. */
  addBreakpoint(event: string, tag: string): void;
  /** Drops the breakpoint and lets the requests held under `tag` go on; ENOENT if there is neither. */
  removeBreakpoint(tag: string): void;
  /** Lets one request held under `tag` go on; ENOENT if none is held. */
  resume(tag: string): void;
  /** Whether a request is held under `tag` (wait_break polls it). */
  isSuspended(tag: string): boolean;

  // ---- the rule state machine (x-blkdebug-add-rule, -query, -remove-rule, -power-on) ----

  /** The current state (1 at open); rules fire only in their state (0 = any). */
  readonly state: number;
  /** Rules newest first. */
  readonly rules: readonly BlkdebugRule[];
  /** After a power-cut rule fired, every request fails until powerOn(). */
  readonly poweredOff: boolean;
  /** Adds a rule (its id is set); returns the id. */
  addRule(rule: BlkdebugRule): number;
  /** ENOENT when the node has no rule with that id. */
  removeRule(id: number): void;
  powerOn(): void;
}
