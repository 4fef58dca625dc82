/**
 * The driver table: each driver's QEMU name, its blockdev-add options (QAPI
 * members, QEMU's names) and how to open it. Adding a driver is one file in
 * this directory and one entry here.
 */
import type { Members } from '../../qapi/schema.js';
import { arrayOf, bool, check, enumOf, int, str, struct } from '../../qapi/schema.js';
import { BLKDEBUG_EVENTS, BLKDEBUG_IO_TYPES, BlkdebugNode, blkdebugRules, parseBlkdebugConfig } from '../filters/blkdebug.js';
import { BlkverifyNode, type MismatchAction } from '../filters/blkverify.js';
import fs from 'node:fs';
import { VdiskError } from '../../errors.js';
import { Qcow2Node } from './qcow2/qcow2.js';
import type { BlockNode, ChildRole } from '../node.js';
import { FileNode } from './file.js';
import { probeImageFormat, protocolBlockdev } from '../image-name.js';
import { NullNode } from './null-co.js';
import { RawNode } from './raw.js';
import { NBD_DRIVER } from './nbd.js';
import { RbdNode, type RbdOptions } from './rbd.js';
import type { ObjectRegistry } from '../../objects/registry.js';

/** The options every driver takes (BlockdevOptionsBase), already checked. */
export interface CommonOptions {
  driver: string;
  nodeName: string;
  readOnly: boolean;
  autoReadOnly: boolean;
  forceShare: boolean;
  discard: 'ignore' | 'unmap';
  direct: boolean;
  noFlush: boolean;
}

export interface OpenContext {
  common: CommonOptions;
  /** Opens (or looks up) a child given as a BlockdevRef and links it under `role`. */
  openChild(ref: unknown, role: ChildRole): Promise<BlockNode>;
  /** Sends a QMP event (a node that reports something as it happens: blkverify mismatches). */
  emitEvent(event: string, data: Record<string, unknown>): void;
  /** The daemon's objects (TLS credentials), when the graph has them. */
  objects: ObjectRegistry | undefined;
}

export interface DriverDef {
  name: string;
  /** Driver-specific members of BlockdevOptions; `BLOCKDEV_REF` marks a child reference. */
  members: Members;
  open(options: Record<string, unknown>, ctx: OpenContext): Promise<BlockNode>;
}

/** Placeholder type for a child reference, replaced by the BlockdevRef alternate in graph.ts. */
export const BLOCKDEV_REF = { kind: 'any' } as const;
/** Placeholder for BlockdevRefOrNull (a reference, or null for "none"). */
export const BLOCKDEV_REF_OR_NULL = { kind: 'any' } as const;

/** QEMU's inject-error rule, plus vdisk's action and delay-ms (see InjectAction). */
export const INJECT_ERROR = struct('BlkdebugInjectErrorOptions', {
  event: enumOf('BlkdebugEvent', BLKDEBUG_EVENTS),
  '*state': int('int'),
  '*iotype': enumOf('BlkdebugIOType', BLKDEBUG_IO_TYPES),
  '*errno': int('int'),
  '*sector': int('int'),
  '*once': bool,
  '*immediately': bool,
  '*action': enumOf('BlkdebugAction', ['error', 'delay', 'drop-connection', 'power-cut']),
  '*delay-ms': int('uint32'),
});
export const SET_STATE = struct('BlkdebugSetStateOptions', { event: enumOf('BlkdebugEvent', BLKDEBUG_EVENTS), '*state': int('int'), new_state: int('int') });

/** BlockdevOptionsRbd: the rbd driver's options, and blockdev-create's rbd `location`. */
export const RBD_OPTIONS_MEMBERS: Members = {
  pool: str,
  '*namespace': str,
  image: str,
  '*conf': str,
  '*snapshot': str,
  '*user': str,
  '*auth-client-required': arrayOf(enumOf('RbdAuthMode', ['cephx', 'none'])),
  '*key-secret': str,
  '*server': arrayOf(struct('InetSocketAddressBase', { host: str, port: str })),
  // QEMU's hidden option for an rbd: name's extra librados settings (JSON list).
  '*keyvalue-pairs': str,
  // vdisk's: break a held exclusive lock (fencing its holder); seconds to wait for the monitors.
  '*x-break-lock': bool,
  '*x-connect-timeout': int('int'),
};

export const DRIVERS: DriverDef[] = [
  {
    name: 'file',
    members: {
      filename: str,
      '*locking': enumOf('OnOffAuto', ['on', 'off', 'auto']),
      '*aio': enumOf('BlockdevAioOptions', ['threads', 'native', 'io_uring']),
      '*aio-max-batch': int('int'),
      '*drop-cache': bool,
      '*x-check-cache-dropped': bool,
    },
    async open(o, { common }) {
      return FileNode.open({
        nodeName: common.nodeName,
        filename: o.filename as string,
        readOnly: common.readOnly,
        autoReadOnly: common.autoReadOnly,
        locking: (o.locking as 'on' | 'off' | 'auto') ?? 'auto',
        direct: common.direct,
        noFlush: common.noFlush,
        discard: common.discard,
        forceShare: common.forceShare,
      });
    },
  },
  {
    name: 'raw',
    members: {
      file: BLOCKDEV_REF,
      '*offset': int('int'),
      '*size': int('int'),
      // vdisk: persistent bitmaps (in a sidecar file) crash-safe (default) or in QEMU's mode.
      '*x-crash-safe-bitmaps': bool,
    },
    async open(o, { common, openChild }) {
      nonNegative(o, 'offset');
      nonNegative(o, 'size');
      const file = await openChild(o.file, 'file');
      const node = new RawNode({
        nodeName: common.nodeName,
        file,
        offset: o.offset as number | undefined,
        size: o.size as number | undefined,
        readOnly: common.readOnly,
      });
      await node.openPersistentBitmaps((o['x-crash-safe-bitmaps'] as boolean | undefined) ?? true);
      return node;
    },
  },
  {
    name: 'qcow2',
    members: {
      file: BLOCKDEV_REF,
      '*backing': BLOCKDEV_REF_OR_NULL,
      // vdisk: persistent bitmaps crash-safe (default) or in QEMU's mode (in use while open).
      '*x-crash-safe-bitmaps': bool,
    },
    async open(o, { common, openChild }) {
      const file = await openChild(o.file, 'file');
      let backing: BlockNode | null | undefined;
      if (o.backing === null) backing = null;
      else if (o.backing !== undefined) backing = await openChild(o.backing, 'backing');
      const crashSafeBitmaps = o['x-crash-safe-bitmaps'] as boolean | undefined;
      return Qcow2Node.open({ nodeName: common.nodeName, file, backing, readOnly: common.readOnly, crashSafeBitmaps }, async (filename, format) => {
        // The backing file named in the header: read-only, in the format it was recorded with.
        return openChild({ driver: format ?? (await probeImageFormat(filename)), 'read-only': true, file: { ...protocolBlockdev(filename), 'read-only': true } }, 'backing');
      });
    },
  },
  {
    name: 'blkdebug',
    members: {
      image: BLOCKDEV_REF,
      '*config': str,
      '*align': int('int'),
      '*max-transfer': int('int32'),
      '*opt-write-zero': int('int32'),
      '*max-write-zero': int('int32'),
      '*opt-discard': int('int32'),
      '*max-discard': int('int32'),
      '*inject-error': arrayOf(INJECT_ERROR),
      '*set-state': arrayOf(SET_STATE),
      '*take-child-perms': arrayOf(enumOf('BlockPermission', ['consistent-read', 'write', 'write-unchanged', 'resize', 'graph-mod'])),
      '*unshare-child-perms': arrayOf(enumOf('BlockPermission', ['consistent-read', 'write', 'write-unchanged', 'resize', 'graph-mod'])),
    },
    async open(o, { common, openChild }) {
      let injects = (o['inject-error'] as Array<Record<string, unknown>> | undefined) ?? [];
      let sets = (o['set-state'] as Array<Record<string, unknown>> | undefined) ?? [];
      if (o.config !== undefined) {
        // Rules from the file are checked with the same schema as the QMP ones, then both apply.
        const file = o.config as string;
        let text: string;
        try {
          text = fs.readFileSync(file, 'utf8');
        } catch (err) {
          throw new VdiskError('ENOENT', `Could not read blkdebug config file '${file}': ${(err as Error).message}`);
        }
        const parsed = parseBlkdebugConfig(text, file);
        injects = [...parsed.inject.map((r) => check(INJECT_ERROR, r, 'inject-error', 'keyval') as Record<string, unknown>), ...injects];
        sets = [...parsed.set.map((r) => check(SET_STATE, r, 'set-state', 'keyval') as Record<string, unknown>), ...sets];
      }
      const image = await openChild(o.image, 'image');
      return new BlkdebugNode({
        nodeName: common.nodeName,
        image,
        readOnly: common.readOnly,
        align: o.align as number | undefined,
        maxTransfer: o['max-transfer'] as number | undefined,
        rules: blkdebugRules(injects, sets),
      });
    },
  },
  {
    name: 'blkverify',
    // mismatch-action is vdisk's: what a mismatch does (QEMU always aborts the process).
    members: { test: BLOCKDEV_REF, raw: BLOCKDEV_REF, '*mismatch-action': enumOf('BlkverifyMismatchAction', ['abort', 'eio', 'log']) },
    async open(o, { common, openChild, emitEvent }) {
      const raw = await openChild(o.raw, 'raw');
      const test = await openChild(o.test, 'test');
      return new BlkverifyNode({
        nodeName: common.nodeName,
        test,
        raw,
        readOnly: common.readOnly,
        mismatchAction: (o['mismatch-action'] as MismatchAction | undefined) ?? 'eio',
        onMismatch: (data) => emitEvent('BLKVERIFY_MISMATCH', data),
      });
    },
  },
  // QEMU's NBD client driver: a node on an export of any NBD server (vdisk's own client).
  NBD_DRIVER,
  // Ceph RBD through librbd (BlockdevOptionsRbd); the addon is loaded when one is opened.
  {
    name: 'rbd',
    members: RBD_OPTIONS_MEMBERS,
    async open(o, { common, objects }) {
      return RbdNode.open(o as unknown as RbdOptions, { nodeName: common.nodeName, readOnly: common.readOnly, direct: common.direct, objects });
    },
  },
  {
    name: 'null-co',
    members: { '*size': int('int'), '*latency-ns': int('uint64'), '*read-zeroes': bool },
    async open(o, { common }) {
      nonNegative(o, 'size');
      return new NullNode({
        nodeName: common.nodeName,
        size: o.size as number | undefined,
        latencyNs: o['latency-ns'] as number | undefined,
        readOnly: common.readOnly,
      });
    },
  },
];

/** QAPI says 'int' where QEMU's option parser takes only sizes; refuse negatives with QEMU's words. */
function nonNegative(o: Record<string, unknown>, key: string): void {
  const v = o[key];
  if (typeof v === 'number' && v < 0) throw new VdiskError('EINVAL', `Parameter '${key}' expects a non-negative number below 2^64`);
}

