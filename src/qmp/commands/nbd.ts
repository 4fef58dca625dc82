/** nbd-server-start (SocketAddressLegacy, as QEMU's QMP takes it), nbd-server-stop, object-add and object-del. */
import { SOCKET_ADDRESS_LEGACY, flattenLegacyAddress } from '../../nbd/server.js';
import { any, int, str, struct } from '../../qapi/schema.js';
import type { QmpCommand } from '../server.js';

export const NBD_COMMANDS: QmpCommand[] = [
  {
    name: 'nbd-server-start',
    args: struct('nbd-server-start', { addr: SOCKET_ADDRESS_LEGACY, '*tls-creds': str, '*tls-authz': str, '*max-connections': int('uint32') }),
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
    name: 'nbd-server-stop',
    args: struct('nbd-server-stop', {}),
    run: async (_a, { daemon }) => {
      await daemon.nbdServerStop();
      return {};
    },
  },
];
