/**
 * vdisk as a library: build a block graph (with vdisk's drivers or your own
 * node classes), export nodes over NBD, and drive it all from code.
 *
 *   const daemon = new Daemon();
 *   daemon.graph.insert(new MyNode({ nodeName: 'm0' }));
 *   await daemon.nbdServerStart({ addr: { type: 'unix', path: '/tmp/m0.sock' } });
 *   await daemon.blockExportAdd({ type: 'nbd', id: 'm0', 'node-name': 'm0', writable: true });
 *
 * A node class extends BlockNode and implements the hooks it supports
 * (doRead is required; see src/block/node.ts for the guarantees each gets).
 */
export { BlockNode, ReqFlags, Status, MAX_OFFSET } from './block/node.js';
export type { BackingControl, BlockLimits, ChildLink, ChildRole, Extent, FormatInfo, FormatSpecific, NodeOptions, NodeUser } from './block/node.js';
export { FilterNode } from './block/filter.js';
export type { DebugControl } from './block/debug-control.js';
export { BlockGraph, checkNodeName } from './block/graph.js';
export type { CommonOptions, DriverDef, OpenContext } from './block/drivers/index.js';
/** A driver's child option: a node name or inline options, opened with OpenContext.openChild. */
export { BLOCKDEV_REF, BLOCKDEV_REF_OR_NULL } from './block/drivers/index.js';
/** Option types for a driver's members (QAPI's names: int('size'), '*name' for optional). */
export { arrayOf, bool, enumOf, int, str, struct } from './qapi/schema.js';
export { FileNode, type FileOptions } from './block/drivers/file.js';
export { RawNode, type RawOptions } from './block/drivers/raw.js';
export { NullNode, type NullOptions } from './block/drivers/null-co.js';
export { Daemon, type QmpEvent } from './daemon.js';
export { BlockExport, ExportRegistry, type ExportDriver, type ExportHandle } from './export/registry.js';
export { NbdServer, type NbdServerOptions } from './nbd/server.js';
export type { SocketAddress } from './qapi/sockets.js';
export { NBD_DRIVER, NbdClientNode, type NbdClientAddress, type NbdClientOptions, parseNbdUri } from './block/drivers/nbd.js';
export { type IoCommandOptions, runIoCommand } from './io/index.js';
export { VdiskError, type Errno } from './errors.js';
export { setLogLevel, setLogFormat, type LogLevel } from './log.js';
export { VERSION } from './version.js';
