/** Nodes: blockdev-add, blockdev-del, query-named-block-nodes, block_resize, blockdev-create. */
import { blockDeviceInfo } from '../../block/info.js';
import { VdiskError } from '../../errors.js';
import { BLOCKDEV_CREATE_OPTIONS, CreateJob } from '../../jobs/create.js';
import { any, bool, int, str, struct } from '../../qapi/schema.js';
import type { QmpCommand } from '../server.js';

export const BLOCK_COMMANDS: QmpCommand[] = [
  {
    name: 'blockdev-add',
    // Boxed BlockdevOptions: the graph checks them against its driver table.
    args: any,
    run: async (args, { daemon }) => {
      await daemon.blockdevAdd(args, 'json');
      return {};
    },
  },
  {
    name: 'blockdev-del',
    args: struct('blockdev-del', { 'node-name': str }),
    run: async (args, { daemon }) => {
      await daemon.blockdevDel(args['node-name'] as string);
      return {};
    },
  },
  {
    name: 'query-named-block-nodes',
    args: struct('query-named-block-nodes', { '*flat': bool }),
    run: (args, { daemon }) => daemon.graph.list().map((n) => blockDeviceInfo(n, (args.flat as boolean | undefined) ?? false)),
  },
  {
    name: 'block_resize',
    args: struct('block_resize', { '*device': str, '*node-name': str, size: int('int') }),
    run: async (args, { daemon }) => {
      const device = args.device as string | undefined;
      const nodeName = args['node-name'] as string | undefined;
      if ((device === undefined) === (nodeName === undefined)) {
        throw new VdiskError('EINVAL', "Need exactly one of 'device' and 'node-name'");
      }
      const name = (nodeName ?? device)!;
      const node = daemon.graph.get(name);
      if (!node) throw new VdiskError('ENOENT', `Cannot find device='${device ?? ''}' nor node-name='${nodeName ?? ''}'`);
      const size = args.size as number;
      if (size < 0) throw new VdiskError('EINVAL', "Parameter 'size' expects a >0 size");
      // An export promised its clients a size (QEMU's exports do not share the resize permission).
      const exp = daemon.exports.list().find((e) => e.node === node);
      if (exp) throw new VdiskError('EBUSY', `Cannot resize node '${name}': it is exported as '${exp.id}'`);
      await node.truncate(size);
      return {};
    },
  },
  {
    name: 'blockdev-create',
    args: struct('blockdev-create', { 'job-id': str, options: BLOCKDEV_CREATE_OPTIONS }),
    run: (args, { daemon }) => {
      daemon.jobs.add(new CreateJob(args['job-id'] as string, daemon.graph, args.options as Record<string, unknown>));
      return {};
    },
  },
];
