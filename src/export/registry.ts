/**
 * Exports: a node made visible to the outside under an id, by a protocol
 * (nbd or fuse). The shared work is done here once, as QEMU's
 * block/export/export.c does: id checks, node lookup, writable against a
 * read-only node, holding the node, and the BLOCK_EXPORT_DELETED event.
 * Each protocol plugs in an ExportDriver with only its own part.
 */
import { IoStats } from '../metrics/stats.js';
import { EventEmitter } from 'node:events';
import { VdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import type { BlockGraph } from '../block/graph.js';
import type { BlockNode, NodeUser } from '../block/node.js';
import { type InputMode, type Members, type Type, bool, check, enumOf, str, union } from '../qapi/schema.js';

/** What a protocol does for one of its exports. */
export interface ExportHandle {
  /** Connected clients (NBD connections, open FUSE mounts count as one). */
  clientCount(): number;
  /** Stops serving: refuses new clients; with hard, disconnects the connected ones. Resolves when no client is left. */
  shutdown(hard: boolean): Promise<void>;
}

export interface ExportDriver {
  type: string;
  /** Members of this type's branch of BlockExportOptions. */
  members: Members;
  create(exp: BlockExport, options: Record<string, unknown>): Promise<ExportHandle>;
}

export class BlockExport implements NodeUser {
  shuttingDown = false;
  handle!: ExportHandle;
  /**
   * The requests its clients made, as they made them (the NBD connection or FUSE session counts
   * them): a hole read without reading the node, a request the server refused itself, and the
   * node a backup's filter put in its place all count here, once.
   */
  readonly stats = new IoStats();

  constructor(
    readonly id: string,
    readonly type: string,
    /**
     * The node served. A filter inserted above it (a backup's copy-before-write)
     * takes its place, as QEMU's BlockBackend follows bdrv_replace_node: the
     * protocol drivers read it per request, so new requests go to the filter.
     */
    public node: BlockNode,
    readonly writable: boolean,
    /** Flush after every write. */
    readonly writethrough: boolean,
  ) {}

  get userDescription(): string {
    return `export '${this.id}'`;
  }

  moveTo(from: BlockNode, to: BlockNode): boolean {
    if (this.node !== from || to.size !== from.size) return false;
    this.node = to;
    return true;
  }
}

export interface ExportEvent {
  event: 'BLOCK_EXPORT_DELETED';
  data: { id: string };
}

const BASE_MEMBERS: Members = {
  '*id': str,
  'node-name': str,
  '*writable': bool,
  '*writethrough': bool,
  '*iothread': str,
  '*fixed-iothread': bool,
};

export class ExportRegistry extends EventEmitter {
  private readonly exports = new Map<string, BlockExport>();
  private readonly drivers = new Map<string, ExportDriver>();

  constructor(private readonly graph: BlockGraph) {
    super();
  }

  registerDriver(driver: ExportDriver): void {
    this.drivers.set(driver.type, driver);
  }

  private schemaMembers(type: string): Members {
    return { type: enumOf('BlockExportType', [...this.drivers.keys()]), ...BASE_MEMBERS, ...(this.drivers.get(type)?.members ?? {}) };
  }

  /** BlockExportOptions as a union on 'type' (what query-qmp-schema shows for block-export-add). */
  optionsType(): Type {
    const branches: Record<string, Members> = {};
    for (const d of this.drivers.values()) branches[d.type] = d.members;
    return union('BlockExportOptions', { type: enumOf('BlockExportType', [...this.drivers.keys()]), ...BASE_MEMBERS }, 'type', branches);
  }

  /** block-export-add. */
  async add(rawOptions: unknown, mode: InputMode = 'json'): Promise<BlockExport> {
    const raw = rawOptions as Record<string, unknown>;
    const type = typeof raw?.type === 'string' ? raw.type : '';
    const options = check({ kind: 'struct', name: 'BlockExportOptions', members: this.schemaMembers(type) }, rawOptions, '', mode) as Record<string, unknown>;
    const driver = this.drivers.get(options.type as string)!;
    // The id is required by QEMU's schema; vdisk's command line lets it default to the node name.
    const id = (options.id as string | undefined) ?? (options['node-name'] as string);
    if (!/^[A-Za-z][A-Za-z0-9\-._]*$/.test(id)) throw new VdiskError('EINVAL', 'Invalid block export id');
    if (this.exports.has(id)) throw new VdiskError('EEXIST', `Block export id '${id}' is already in use`);
    const node = this.graph.find(options['node-name'] as string);
    const writable = (options.writable as boolean | undefined) ?? false;
    if (writable && node.readOnly) throw new VdiskError('EROFS', 'Cannot export read-only node as writable');
    const exp = new BlockExport(id, driver.type, node, writable, (options.writethrough as boolean | undefined) ?? false);
    exp.handle = await driver.create(exp, options);
    node.users.add(exp);
    this.exports.set(id, exp);
    logEvent('info', 'export-added', { id, type: exp.type, nodeName: node.nodeName, writable });
    // Not a QMP event (QEMU has none for an added export): for the service manager's STATUS line.
    this.emit('changed');
    return exp;
  }

  /**
   * block-export-del. Returns once the deletion has started; the export is
   * gone (and BLOCK_EXPORT_DELETED sent) when its last client has left.
   */
  delete(id: string, mode: 'safe' | 'hard' = 'safe'): Promise<void> {
    const exp = this.exports.get(id);
    if (!exp) throw new VdiskError('ENOENT', `Export '${id}' is not found`);
    if (exp.shuttingDown) throw new VdiskError('EBUSY', `Export '${id}' is already shutting down`);
    if (mode === 'safe' && exp.handle.clientCount() > 0) {
      throw new VdiskError('EBUSY', `export '${id}' still in use`);
    }
    exp.shuttingDown = true;
    return exp.handle.shutdown(mode === 'hard').then(() => this.forget(exp));
  }

  private forget(exp: BlockExport): void {
    if (this.exports.get(exp.id) !== exp) return;
    this.exports.delete(exp.id);
    exp.node.users.delete(exp);
    logEvent('info', 'export-deleted', { id: exp.id });
    this.emit('event', { event: 'BLOCK_EXPORT_DELETED', data: { id: exp.id } } satisfies ExportEvent);
    this.emit('changed');
  }

  get(id: string): BlockExport | undefined {
    return this.exports.get(id);
  }

  list(): BlockExport[] {
    return [...this.exports.values()];
  }

  /** query-block-exports. */
  query(): Array<{ id: string; type: string; 'node-name': string; 'shutting-down': boolean }> {
    return this.list().map((e) => ({ id: e.id, type: e.type, 'node-name': e.node.nodeName, 'shutting-down': e.shuttingDown }));
  }

  /** Deletes every export of a type, disconnecting clients (nbd-server-stop, shutdown). */
  async deleteAll(type?: string): Promise<void> {
    const victims = this.list().filter((e) => type === undefined || e.type === type);
    await Promise.all(
      victims.map((e) => {
        e.shuttingDown = true;
        return e.handle.shutdown(true).then(() => this.forget(e));
      }),
    );
  }
}

export const EXPORT_DELETE_MODES = enumOf('BlockExportRemoveMode', ['safe', 'hard']);
