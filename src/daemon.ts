/**
 * The daemon: one block graph, its exports and the NBD server, with the
 * operations QMP commands and command-line options both call, so every
 * option has exactly one implementation.
 */
import { EventEmitter } from 'node:events';
import { VdiskError } from './errors.js';
import { logEvent } from './log.js';
import { BlockGraph } from './block/graph.js';
import type { BlockNode } from './block/node.js';
import { type BlockExport, ExportRegistry } from './export/registry.js';
import { type NbdServerOptions, NbdServer, checkNbdServerOptions, nbdExportDriver } from './nbd/server.js';
import { fuseExportDriver } from './fuse/export.js';
import type { InputMode } from './qapi/schema.js';
import { JobManager } from './jobs/job.js';
import { ObjectRegistry, type UserObject } from './objects/registry.js';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
}

export class Daemon extends EventEmitter {
  readonly graph = new BlockGraph();
  readonly exports = new ExportRegistry(this.graph);
  readonly jobs = new JobManager();
  /** --object / object-add: TLS credentials and authorization objects. */
  readonly objects = new ObjectRegistry();
  private nbd: NbdServer | undefined;
  private shuttingDown: Promise<void> | undefined;

  constructor() {
    super();
    this.graph.objects = this.objects;
    this.exports.registerDriver(nbdExportDriver(() => this.nbd, this.graph));
    // A FUSE session the kernel ended (someone unmounted it) takes its export with it, as in QEMU.
    this.exports.registerDriver(
      fuseExportDriver((id) => {
        if (this.exports.get(id)?.shuttingDown === false) void this.exports.delete(id, 'hard').catch(() => undefined);
      }),
    );
    this.exports.on('event', (e: QmpEvent) => this.emit('event', e));
    this.jobs.on('event', (e: QmpEvent) => this.emit('event', e));
    this.graph.onEvent = (e) => this.emit('event', e);
  }

  get nbdServer(): NbdServer | undefined {
    return this.nbd;
  }

  /** blockdev-add */
  blockdevAdd(options: unknown, mode: InputMode = 'json'): Promise<BlockNode> {
    return this.graph.add(options, mode);
  }

  /** blockdev-del */
  blockdevDel(nodeName: string): Promise<void> {
    return this.graph.delete(nodeName);
  }

  /** nbd-server-start (flat SocketAddress, as qemu-storage-daemon's --nbd-server). */
  async nbdServerStart(options: unknown, mode: InputMode = 'json'): Promise<NbdServer> {
    const checked: NbdServerOptions = checkNbdServerOptions(options, mode);
    if (this.nbd) throw new VdiskError('EEXIST', 'NBD server already running');
    this.nbd = await NbdServer.start(checked, this.objects);
    return this.nbd;
  }

  /** object-add */
  objectAdd(options: unknown, mode: InputMode = 'json'): UserObject {
    return this.objects.add(options, mode);
  }

  /** object-del */
  objectDel(id: string): void {
    this.objects.delete(id);
  }

  /** nbd-server-stop: removes every NBD export, then stops listening. */
  async nbdServerStop(): Promise<void> {
    const server = this.nbd;
    if (!server) throw new VdiskError('ENOENT', 'NBD server not running');
    await this.exports.deleteAll('nbd');
    this.nbd = undefined;
    await server.stop();
  }

  /** block-export-add */
  blockExportAdd(options: unknown, mode: InputMode = 'json'): Promise<BlockExport> {
    return this.exports.add(options, mode);
  }

  /** block-export-del */
  blockExportDel(id: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    return this.exports.delete(id, mode);
  }

  /**
   * Orderly shutdown: stop accepting clients, let requests in flight finish
   * and their replies go out, remove the exports, flush and close every node.
   */
  shutdown(): Promise<void> {
    this.shuttingDown ??= (async () => {
      logEvent('info', 'shutdown-started', {});
      await this.jobs.cancelAll();
      if (this.nbd) {
        const server = this.nbd;
        this.nbd = undefined;
        await server.stop();
      }
      await this.exports.deleteAll();
      await this.graph.closeAll();
      logEvent('info', 'shutdown-complete', {});
    })();
    return this.shuttingDown;
  }
}
