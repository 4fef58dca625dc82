/** nbd-server-start (SocketAddressLegacy, as QEMU's QMP takes it) and nbd-server-stop. */
import { SOCKET_ADDRESS_LEGACY, flattenLegacyAddress } from '../../nbd/server.js';
import { int, str, struct } from '../../qapi/schema.js';
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
    name: 'nbd-server-stop',
    args: struct('nbd-server-stop', {}),
    run: async (_a, { daemon }) => {
      await daemon.nbdServerStop();
      return {};
    },
  },
];
