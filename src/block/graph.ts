/**
 * The block graph: every node by node-name, with its children.
 *
 * The graph refuses a node-name twice, a child reference to a node that does
 * not exist, and deleting a node that something still uses (a parent node,
 * an export, a job). Children given inline in blockdev-add options get an
 * automatic name (#blockNNN, as QEMU) and go away with their last parent.
 */
import { VdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import { type InputMode, type Members, type Type, alternate, bool, check, enumOf, nullType, str, struct } from '../qapi/schema.js';
import { BLOCKDEV_REF, BLOCKDEV_REF_OR_NULL, type CommonOptions, DRIVERS, type DriverDef } from './drivers/index.js';
import type { BlockNode, ChildRole, NodeUser } from './node.js';
import type { ObjectRegistry } from '../objects/registry.js';

const NODE_NAME_MAX = 31;

/** Checks QEMU's node-name syntax: a letter, then letters, digits, '-', '.', '_'. */
export function checkNodeName(name: string): void {
  if (!/^[A-Za-z][A-Za-z0-9\-._]*$/.test(name)) throw new VdiskError('EINVAL', `Invalid node-name: '${name}'`);
  if (name.length > NODE_NAME_MAX) throw new VdiskError('EINVAL', 'Node name too long');
}

/** A parent's hold on its child, so the child knows it is in use and by whom. */
class ChildEdge implements NodeUser {
  constructor(
    readonly parent: BlockNode,
    readonly role: ChildRole,
  ) {}
  get userDescription(): string {
    return `node '${this.parent.nodeName}' (as ${this.role})`;
  }
  moveTo(from: BlockNode, to: BlockNode): boolean {
    return this.parent.replaceChild(from, to);
  }
}

/** Whether `target` is `from` or lies below it. */
function reaches(from: BlockNode, target: BlockNode): boolean {
  if (from === target) return true;
  return from.children.some((c) => reaches(c.node, target));
}

export class BlockGraph {
  private readonly nodes = new Map<string, BlockNode>();
  /** Nodes created by name at the top level (blockdev-add); others were made implicitly. */
  private readonly monitorOwned = new Set<string>();
  private readonly drivers = new Map<string, DriverDef>();
  private autoNameCounter = 0;
  /** Objects drivers may refer to by id (the nbd driver's tls-creds); the daemon sets it. */
  objects: ObjectRegistry | undefined;
  /** Where nodes' events go (the daemon forwards them to QMP). */
  onEvent: (e: { event: string; data: Record<string, unknown> }) => void = () => undefined;
  /** Names taken by nodes still being opened, so an inline child cannot take its parent's name. */
  private readonly reserved = new Set<string>();
  /** BlockdevOptions, a union on 'driver' (built from the driver table). */
  readonly blockdevOptions: Type;

  constructor(drivers: DriverDef[] = DRIVERS) {
    for (const d of drivers) this.drivers.set(d.name, d);
    this.blockdevOptions = this.buildSchema();
  }

  /** Adds a driver after construction (library users with their own node types). */
  registerDriver(def: DriverDef): void {
    if (this.drivers.has(def.name)) throw new VdiskError('EEXIST', `driver '${def.name}' is already registered`);
    this.drivers.set(def.name, def);
    (this as { blockdevOptions: Type }).blockdevOptions = this.buildSchema();
  }

  private buildSchema(): Type {
    const base: Members = {
      driver: enumOf('BlockdevDriver', [...this.drivers.keys()]),
      '*node-name': str,
      '*discard': enumOf('BlockdevDiscardOptions', ['ignore', 'unmap']),
      '*cache': struct('BlockdevCacheOptions', { '*direct': bool, '*no-flush': bool }),
      '*read-only': bool,
      '*auto-read-only': bool,
      '*force-share': bool,
      '*detect-zeroes': enumOf('BlockdevDetectZeroesOptions', ['off', 'on', 'unmap']),
    };
    const options: Type = { kind: 'union', name: 'BlockdevOptions', base, discriminator: 'driver', branches: {} };
    const ref = alternate('BlockdevRef', [str, options]);
    const refOrNull = alternate('BlockdevRefOrNull', [str, options, nullType]);
    for (const d of this.drivers.values()) {
      const members: Members = {};
      for (const [k, t] of Object.entries(d.members)) members[k] = t === BLOCKDEV_REF ? ref : t === BLOCKDEV_REF_OR_NULL ? refOrNull : t;
      (options as { branches: Record<string, Members> }).branches[d.name] = members;
    }
    return options;
  }

  get(name: string): BlockNode | undefined {
    return this.nodes.get(name);
  }

  /** Looks a node up the way QMP commands do, with QEMU's message. */
  find(name: string): BlockNode {
    const node = this.nodes.get(name);
    if (!node) throw new VdiskError('ENOENT', `Cannot find device='' nor node-name='${name}'`, { code: 'VDISK_NODE_NOT_FOUND' });
    return node;
  }

  /** Every node, newest first (as query-named-block-nodes lists them). */
  list(): BlockNode[] {
    return [...this.nodes.values()].reverse();
  }

  isMonitorOwned(name: string): boolean {
    return this.monitorOwned.has(name);
  }

  /**
   * blockdev-add: checks the options, opens the node and any inline children,
   * and adds them. On failure nothing is left behind.
   */
  async add(rawOptions: unknown, mode: InputMode = 'json'): Promise<BlockNode> {
    const options = check(this.blockdevOptions, rawOptions, '', mode) as Record<string, unknown>;
    if (options['node-name'] === undefined) {
      throw new VdiskError('EINVAL', "'node-name' must be specified for the root node");
    }
    const created: BlockNode[] = [];
    try {
      const node = await this.open(options, created);
      this.monitorOwned.add(node.nodeName);
      logEvent('info', 'node-added', { nodeName: node.nodeName, driver: node.driverName, filename: node.filename, size: node.size, readOnly: node.readOnly });
      return node;
    } catch (err) {
      // Undo in reverse order: parents before the children they hold.
      for (const n of created.reverse()) await this.forget(n);
      throw err;
    }
  }

  /**
   * Opens a node that belongs to an operation rather than to the user (a
   * backup job's target): auto-named unless the options name it, not
   * deletable with blockdev-del, and gone when the operation releases it.
   */
  async addImplicit(rawOptions: Record<string, unknown>, mode: InputMode = 'json'): Promise<BlockNode> {
    const options = check(this.blockdevOptions, rawOptions, '', mode) as Record<string, unknown>;
    const created: BlockNode[] = [];
    try {
      return await this.open(options, created);
    } catch (err) {
      for (const n of created.reverse()) await this.forget(n);
      throw err;
    }
  }

  /** Adds a node made by an operation (a copy-before-write filter), auto-named unless it has a name. */
  insertImplicit(node: BlockNode): BlockNode {
    if (node.nodeName) checkNodeName(node.nodeName);
    else node.nodeName = this.autoName();
    this.link(node);
    return node;
  }

  /**
   * Puts `filter` (an implicit node whose children include `below`) above
   * `below`: every user of `below` that can move (parent nodes whose driver
   * can swap the child, exports) now uses the filter, as QEMU's
   * bdrv_replace_node. A parent the filter itself reaches is left alone
   * (moving it would make a cycle: a fleecing target whose backing is the
   * source, under a copy-before-write filter whose target it is).
   */
  insertFilter(filter: BlockNode, below: BlockNode): void {
    this.insertImplicit(filter);
    for (const u of [...below.users]) {
      if (u instanceof ChildEdge && reaches(filter, u.parent)) continue;
      if (!u.moveTo?.(below, filter)) continue;
      below.users.delete(u);
      filter.users.add(u);
    }
    logEvent('debug', 'filter-inserted', { filter: filter.nodeName, driver: filter.driverName, below: below.nodeName });
  }

  /**
   * Takes a filter put in by insertFilter away again: its users go back to
   * `below`, then it is closed and removed. A user that cannot move back
   * keeps the filter in the graph (it passes requests through).
   */
  async removeFilter(filter: BlockNode, below: BlockNode): Promise<void> {
    for (const u of [...filter.users]) {
      if (u instanceof ChildEdge && u.parent === filter) continue;
      if (!u.moveTo?.(filter, below)) continue;
      filter.users.delete(u);
      below.users.add(u);
    }
    const left = [...filter.users].filter((u) => !(u instanceof ChildEdge && u.parent === filter));
    if (left.length) {
      logEvent('warn', 'filter-kept', { filter: filter.nodeName, usedBy: left.map((u) => u.userDescription) });
      return;
    }
    await this.release(filter);
  }

  /**
   * Points one parent's link to `old` at `replacement` (a node with the same
   * content), moving the graph's record of who uses what. False when the
   * parent's driver cannot swap that child.
   */
  replaceChildOf(parent: BlockNode, old: BlockNode, replacement: BlockNode): boolean {
    const edges = [...old.users].filter((u): u is ChildEdge => u instanceof ChildEdge && u.parent === parent);
    if (!parent.replaceChild(old, replacement)) return false;
    for (const e of edges) {
      old.users.delete(e);
      replacement.users.add(e);
    }
    return true;
  }

  /** Closes and removes an implicit node and the implicit children it leaves unused. */
  async release(node: BlockNode): Promise<void> {
    if (this.monitorOwned.has(node.nodeName)) return;
    await this.forget(node);
  }

  /** Adds a node object made by the caller (the library API). */
  insert(node: BlockNode): BlockNode {
    checkNodeName(node.nodeName);
    this.link(node);
    this.monitorOwned.add(node.nodeName);
    return node;
  }

  /** Puts a node whose children are in the graph into it, and records it as their user. */
  private link(node: BlockNode): void {
    if (this.nodes.has(node.nodeName) || this.reserved.has(node.nodeName)) {
      throw new VdiskError('EEXIST', `Duplicate nodes with node-name='${node.nodeName}'`);
    }
    for (const c of node.children) {
      if (this.nodes.get(c.node.nodeName) !== c.node) {
        throw new VdiskError('ENOENT', `node '${node.nodeName}' has child '${c.node.nodeName}' that is not in the graph`);
      }
    }
    for (const c of node.children) c.node.users.add(new ChildEdge(node, c.role));
    this.nodes.set(node.nodeName, node);
  }

  private async open(options: Record<string, unknown>, created: BlockNode[]): Promise<BlockNode> {
    const driver = this.drivers.get(options.driver as string)!;
    let name = options['node-name'] as string | undefined;
    if (name !== undefined) {
      checkNodeName(name);
      if (this.nodes.has(name) || this.reserved.has(name)) throw new VdiskError('EEXIST', `Duplicate nodes with node-name='${name}'`);
    } else {
      name = this.autoName();
    }
    this.reserved.add(name);
    try {
      return await this.openNamed(driver, name, options, created);
    } finally {
      this.reserved.delete(name);
    }
  }

  private async openNamed(driver: DriverDef, name: string, options: Record<string, unknown>, created: BlockNode[]): Promise<BlockNode> {
    const cache = (options.cache ?? {}) as Record<string, boolean>;
    const common: CommonOptions = {
      driver: driver.name,
      nodeName: name,
      readOnly: (options['read-only'] as boolean) ?? false,
      autoReadOnly: (options['auto-read-only'] as boolean) ?? false,
      forceShare: (options['force-share'] as boolean) ?? false,
      discard: (options.discard as 'ignore' | 'unmap') ?? 'ignore',
      direct: cache.direct ?? false,
      noFlush: cache['no-flush'] ?? false,
    };
    if (common.forceShare && !common.readOnly) {
      throw new VdiskError('EINVAL', 'force-share=on can only be used with read-only images');
    }
    const detectZeroes = (options['detect-zeroes'] as 'off' | 'on' | 'unmap') ?? 'off';
    if (detectZeroes === 'unmap' && common.discard !== 'unmap') {
      throw new VdiskError('EINVAL', "setting detect-zeroes to unmap is not allowed without setting discard operation to unmap");
    }
    const children: Array<{ role: ChildRole; node: BlockNode }> = [];
    const openChild = async (ref: unknown, role: ChildRole): Promise<BlockNode> => {
      let child: BlockNode;
      if (typeof ref === 'string') {
        const existing = this.nodes.get(ref);
        // A child reference is looked up as a device and as a node name, as QEMU's bdrv_lookup_bs.
        if (!existing) throw new VdiskError('ENOENT', `Cannot find device='${ref}' nor node-name='${ref}'`);
        child = existing;
      } else {
        const inline = { ...(ref as Record<string, unknown>) };
        // A child inherits read-only, discard and cache from its parent unless it says otherwise (as QEMU).
        if (inline['read-only'] === undefined && common.readOnly) inline['read-only'] = true;
        if (inline.discard === undefined && options.discard !== undefined) inline.discard = options.discard;
        if (inline.cache === undefined && options.cache !== undefined) inline.cache = options.cache;
        child = await this.open(inline, created);
      }
      children.push({ role, node: child });
      return child;
    };
    const node = await driver.open(options, { common, openChild, emitEvent: (event, data) => this.onEvent({ event, data }), objects: this.objects });
    node.detectZeroes = detectZeroes;
    node.discardEnabled = common.discard === 'unmap';
    node.cacheMode = { direct: common.direct, noFlush: common.noFlush };
    node.nodeName = name;
    for (const c of children) c.node.users.add(new ChildEdge(node, c.role));
    this.nodes.set(name, node);
    created.push(node);
    return node;
  }

  private autoName(): string {
    for (;;) {
      const name = `#block${++this.autoNameCounter}${Math.floor(Math.random() * 100)
        .toString()
        .padStart(2, '0')}`;
      if (!this.nodes.has(name) && !this.reserved.has(name)) return name;
    }
  }

  /** blockdev-del: removes a node nobody uses, and its implicit children that are left unused. */
  async delete(name: string): Promise<void> {
    const node = this.nodes.get(name);
    if (!node) throw new VdiskError('ENOENT', `Failed to find node with node-name='${name}'`);
    if (!this.monitorOwned.has(name)) throw new VdiskError('EPERM', `Node ${name} is not owned by the monitor`);
    if (node.users.size > 0) {
      const by = [...node.users].map((u) => u.userDescription).join(', ');
      throw new VdiskError('EBUSY', `Node ${name} is in use by ${by}`, { code: 'VDISK_NODE_IN_USE' });
    }
    await this.forget(node);
    logEvent('info', 'node-deleted', { nodeName: name });
  }

  /** Closes and removes a node, then its implicit children that nobody else holds. */
  private async forget(node: BlockNode): Promise<void> {
    if (this.nodes.get(node.nodeName) !== node) return;
    this.nodes.delete(node.nodeName);
    this.monitorOwned.delete(node.nodeName);
    await node.close();
    for (const c of node.children) {
      for (const u of c.node.users) {
        if (u instanceof ChildEdge && u.parent === node) c.node.users.delete(u);
      }
      if (c.node.users.size === 0 && !this.monitorOwned.has(c.node.nodeName)) await this.forget(c.node);
    }
  }

  /** Flushes and closes every node, parents before children (at shutdown). */
  async closeAll(): Promise<void> {
    const order = this.list(); // newest first: parents were added after their children
    for (const n of order) {
      if (!n.readOnly && !n.isClosed) {
        await n.flush().catch((err) => logEvent('error', 'flush-failed', { nodeName: n.nodeName, error: (err as Error).message }));
      }
    }
    for (const n of order) await n.close();
    this.nodes.clear();
    this.monitorOwned.clear();
  }
}
