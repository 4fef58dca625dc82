/** nbd-server-start (SocketAddressLegacy, as QEMU's QMP takes it), x-query-nbd-server, nbd-server-stop, object-add and object-del. */
import { VdiskError } from '../../errors.js';
import { SOCKET_ADDRESS_LEGACY, flattenLegacyAddress } from '../../qapi/sockets.js';
import { any, int, str, struct } from '../../qapi/schema.js';
import type { QmpCommand } from '../server.js';

export const NBD_COMMANDS: QmpCommand[] = [
  {
    name: 'nbd-server-start',
    args: struct('nbd-server-start', {
      addr: SOCKET_ADDRESS_LEGACY,
      '*tls-creds': str,
      '*tls-authz': str,
      '*max-connections': int('uint32'),
      // vdisk's extensions (docs/design/limits.md).
      '*x-idle-timeout': int('uint32'),
      '*x-buffer-limit': int('size'),
    }),
    run: async (args, { daemon }) => {
      const { addr, ...rest } = args;
      await daemon.nbdServerStart({ addr: flattenLegacyAddress(addr as Record<string, unknown>), ...rest }, 'json');
      return {};
    },
  },
  {
    name: 'object-add',
    // Boxed ObjectOptions: the object registry checks them per qom-type.
    args: any,
    run: (args, { daemon }) => {
      daemon.objectAdd(args, 'json');
      return {};
    },
  },
  {
    name: 'object-del',
    args: struct('object-del', { id: str }),
    run: (args, { daemon }) => {
      daemon.objectDel(args.id as string);
      return {};
    },
  },
  {
    // vdisk's: the server's limits, what its clients make it buffer, and each connection.
    name: 'x-query-nbd-server',
    args: struct('x-query-nbd-server', {}),
    run: (_a, { daemon }) => {
      const server = daemon.nbdServer;
      if (!server) throw new VdiskError('ENOENT', 'NBD server not running');
      return server.query();
    },
  },
  {
    name: 'nbd-server-stop',
    args: struct('nbd-server-stop', {}),
    run: async (_a, { daemon }) => {
      await daemon.nbdServerStop();
      return {};
    },
  },
];
