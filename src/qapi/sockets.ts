/**
 * QEMU's SocketAddress and SocketAddressLegacy (qapi/sockets.json): the NBD
 * server listens on one, the nbd block driver connects to one and QMP's
 * nbd-server-start takes the legacy form. Kept here, below all three, so the
 * block layer need not import the NBD server to name an address.
 */
import { VdiskError } from '../errors.js';
import { type Members, type Type, alternate, bool, enumOf, int, str, struct, union } from './schema.js';

/** SocketAddress (flat, as qemu-storage-daemon's --nbd-server takes it). */
export type SocketAddress =
  | { type: 'inet'; host: string; port: string | number; 'keep-alive'?: boolean }
  | { type: 'unix'; path: string; abstract?: boolean; tight?: boolean }
  | { type: 'fd'; str: string };

const INET_MEMBERS: Members = {
  host: str,
  port: alternate('port', [str, int('uint16')]),
  '*numeric': bool,
  '*to': int('uint16'),
  '*ipv4': bool,
  '*ipv6': bool,
  '*keep-alive': bool,
};
const UNIX_MEMBERS: Members = { path: str, '*abstract': bool, '*tight': bool };

/**
 * What to hand to bind(2)/connect(2) for a unix address: the path, or for
 * Linux's abstract namespace (abstract=on) a NUL byte then the name. libuv
 * (Node 20) passes the whole sun_path for an abstract name, the name padded
 * with NULs: that is QEMU's tight=off. QEMU's default, tight=on (the address
 * exactly as long as the name), is a different name to the kernel and cannot
 * be made through node:net, so it is refused rather than bound under a name
 * no tight=on client would find.
 */
export function unixSocketPath(addr: { path: string; abstract?: boolean; tight?: boolean }): string {
  if (!addr.abstract) return addr.path;
  if (addr.tight !== false) {
    throw new VdiskError('ENOTSUP', 'abstract unix sockets need tight=off in vdisk (the name padded to the whole sun_path; tight=on, QEMU\'s default, is not supported): add tight=off here and on the client');
  }
  return `\0${addr.path}`;
}

/** SocketAddress: flat union on type. */
export const SOCKET_ADDRESS: Type = union('SocketAddress', { type: enumOf('SocketAddressType', ['inet', 'unix', 'fd']) }, 'type', {
  inet: INET_MEMBERS,
  unix: UNIX_MEMBERS,
  fd: { str: str },
});

/** SocketAddressLegacy (nbd-server-start over QMP): the members nested under "data". */
export const SOCKET_ADDRESS_LEGACY: Type = union('SocketAddressLegacy', { type: enumOf('SocketAddressType', ['inet', 'unix', 'fd']) }, 'type', {
  inet: { data: struct('InetSocketAddress', INET_MEMBERS) },
  unix: { data: struct('UnixSocketAddress', UNIX_MEMBERS) },
  fd: { data: struct('String', { str: str }) },
});

/** Turns a SocketAddressLegacy ({type, data: {...}}) into the flat form. */
export function flattenLegacyAddress(addr: Record<string, unknown>): SocketAddress {
  return { type: addr.type, ...(addr.data as object) } as SocketAddress;
}
