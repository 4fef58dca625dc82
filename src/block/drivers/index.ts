/**
 * The driver table: each driver's QEMU name, its blockdev-add options (QAPI
 * members, QEMU's names) and how to open it. Adding a driver is one file in
 * this directory and one entry here.
 */
import type { Members } from '../../qapi/schema.js';
import { bool, enumOf, int, str } from '../../qapi/schema.js';
import type { BlockNode, ChildRole } from '../node.js';
import { FileNode } from './file.js';
import { NullNode } from './null-co.js';
import { RawNode } from './raw.js';

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
}

export interface DriverDef {
  name: string;
  /** Driver-specific members of BlockdevOptions; `BLOCKDEV_REF` marks a child reference. */
  members: Members;
  open(options: Record<string, unknown>, ctx: OpenContext): Promise<BlockNode>;
}

/** Placeholder type for a child reference, replaced by the BlockdevRef alternate in graph.ts. */
export const BLOCKDEV_REF = { kind: 'any' } as const;

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
    members: { file: BLOCKDEV_REF, '*offset': int('int'), '*size': int('int') },
    async open(o, { common, openChild }) {
      const file = await openChild(o.file, 'file');
      return new RawNode({
        nodeName: common.nodeName,
        file,
        offset: o.offset as number | undefined,
        size: o.size as number | undefined,
        readOnly: common.readOnly,
      });
    },
  },
  {
    name: 'null-co',
    members: { '*size': int('int'), '*latency-ns': int('uint64'), '*read-zeroes': bool },
    async open(o, { common }) {
      return new NullNode({
        nodeName: common.nodeName,
        size: o.size as number | undefined,
        latencyNs: o['latency-ns'] as number | undefined,
        readOnly: common.readOnly,
      });
    },
  },
];
