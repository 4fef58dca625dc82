/** block-export-add, block-export-del, query-block-exports. */
import { VdiskError } from '../../errors.js';
import { any, enumOf, str, struct } from '../../qapi/schema.js';
import type { QmpCommand } from '../server.js';

export const EXPORT_COMMANDS: QmpCommand[] = [
  {
    name: 'block-export-add',
    // Boxed BlockExportOptions: the export registry checks them per export type.
    args: any,
    run: async (args, { daemon }) => {
      if (typeof args === 'object' && args !== null && !Object.hasOwn(args, 'id')) throw new VdiskError('EINVAL', "Parameter 'id' is missing");
      await daemon.blockExportAdd(args, 'json');
      return {};
    },
  },
  {
    name: 'block-export-del',
    args: struct('block-export-del', { id: str, '*mode': enumOf('BlockExportRemoveMode', ['safe', 'hard']) }),
    run: async (args, { daemon }) => {
      // With no client connected the export goes at once, its BLOCK_EXPORT_DELETED before the
      // reply (as QEMU); otherwise the reply comes when removal has started and the event follows
      // when the last client is gone.
      const idle = daemon.exports.get(args.id as string)?.handle.clientCount() === 0;
      const done = daemon.blockExportDel(args.id as string, (args.mode as 'safe' | 'hard' | undefined) ?? 'safe');
      if (idle) await done;
      else done.catch(() => undefined);
      return {};
    },
  },
  {
    name: 'query-block-exports',
    args: struct('query-block-exports', {}),
    run: (_a, { daemon }) => daemon.exports.query(),
  },
];
