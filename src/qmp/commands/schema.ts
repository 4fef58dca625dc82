/**
 * query-qmp-schema: QEMU's SchemaInfo list, generated from the tables the
 * commands are checked with (each QmpCommand's args, the graph's
 * BlockdevOptions, the export and object registries), so what it describes
 * is what vdisk accepts and cannot drift from it.
 *
 * As QEMU does, type names are masked (numbered in the order they are met;
 * "0" is the empty object), builtins keep their names, an array of T is
 * "[T]", and every integer type is "int". Commands and events keep theirs.
 * Return types are a table here: vdisk's handlers do not declare them.
 */
import type { Daemon } from '../../daemon.js';
import { OBJECT_OPTIONS } from '../../objects/registry.js';
import { type Members, type Type, any, arrayOf, bool, enumOf, int, str, struct, union } from '../../qapi/schema.js';
import type { QmpCommand, QmpServer } from '../server.js';
import { BLOCK_STATS } from './stats.js';

type Entry = Record<string, unknown>;
const i64 = int('int');
const EMPTY = struct('q_empty', {});

const JOB_STATUS = enumOf('JobStatus', ['undefined', 'created', 'running', 'paused', 'ready', 'standby', 'waiting', 'pending', 'aborting', 'concluded', 'null']);
const JOB_TYPE = enumOf('JobType', ['commit', 'stream', 'mirror', 'backup', 'create', 'amend', 'snapshot-load', 'snapshot-save', 'snapshot-delete']);
const IO_STATUS = enumOf('BlockDeviceIoStatus', ['ok', 'failed', 'nospace']);
const JOB_INFO = struct('JobInfo', { id: str, type: JOB_TYPE, status: JOB_STATUS, 'current-progress': i64, 'total-progress': i64, '*error': str });
const BLOCK_JOB_INFO = struct('BlockJobInfo', {
  type: str, device: str, len: i64, offset: i64, busy: bool, paused: bool, speed: i64, 'io-status': IO_STATUS, ready: bool,
  status: JOB_STATUS, 'auto-finalize': bool, 'auto-dismiss': bool, '*error': str,
});
const VERSION_TRIPLE = struct('VersionTriple', { major: i64, minor: i64, micro: i64 });

/** What each command returns; a command not named here returns the empty object. */
const RETURNS: Record<string, Type> = {
  'query-version': struct('VersionInfo', { qemu: VERSION_TRIPLE, package: str }),
  'query-commands': arrayOf(struct('CommandInfo', { name: str })),
  'query-blockstats': arrayOf(BLOCK_STATS),
  // BlockDeviceInfo is large and vdisk fills a subset; 'any' says so rather than promise all of it.
  'query-named-block-nodes': arrayOf(any),
  'query-block-exports': arrayOf(struct('BlockExportInfo', { id: str, type: enumOf('BlockExportType', ['nbd', 'fuse']), 'node-name': str, 'shutting-down': bool })),
  'query-jobs': arrayOf(JOB_INFO),
  'query-block-jobs': arrayOf(BLOCK_JOB_INFO),
  'x-debug-block-dirty-bitmap-sha256': struct('BlockDirtyBitmapSha256', { sha256: str }),
  'human-monitor-command': str,
  'x-blkdebug-add-rule': struct('x-blkdebug-add-rule-return', { id: i64 }),
  'x-blkdebug-query': any,
};

/** The events vdisk sends, with their data. */
const EVENTS: Record<string, Type> = {
  JOB_STATUS_CHANGE: struct('q_obj_JOB_STATUS_CHANGE-arg', { id: str, status: JOB_STATUS }),
  BLOCK_EXPORT_DELETED: struct('q_obj_BLOCK_EXPORT_DELETED-arg', { id: str }),
  BLOCK_JOB_COMPLETED: struct('q_obj_BLOCK_JOB_COMPLETED-arg', { type: JOB_TYPE, device: str, len: i64, offset: i64, speed: i64, '*error': str }),
  BLOCK_JOB_CANCELLED: struct('q_obj_BLOCK_JOB_CANCELLED-arg', { type: JOB_TYPE, device: str, len: i64, offset: i64, speed: i64 }),
  BLOCK_JOB_ERROR: struct('q_obj_BLOCK_JOB_ERROR-arg', {
    device: str,
    operation: enumOf('IoOperationType', ['read', 'write']),
    action: enumOf('BlockErrorAction', ['ignore', 'report', 'stop']),
  }),
  BLOCK_JOB_PENDING: struct('q_obj_BLOCK_JOB_PENDING-arg', { type: JOB_TYPE, id: str }),
};

const CAPABILITIES_ARGS = struct('qmp_capabilities', { '*enable': arrayOf(enumOf('QMPCapability', ['oob'])) });

/**
 * Boxed commands take their arguments as one union, checked by a registry
 * at run time (their table entry says 'any'); the schema shows that union.
 */
function boxedArgs(name: string, daemon: Daemon): Type | undefined {
  switch (name) {
    case 'blockdev-add':
      return daemon.graph.blockdevOptions;
    case 'object-add':
      return OBJECT_OPTIONS;
    case 'block-export-add':
      return daemon.exports.optionsType();
  }
  return undefined;
}

/** Turns vdisk's Types into SchemaInfo entries, masking names as QEMU does. */
class SchemaBuilder {
  readonly entries: Entry[] = [];
  private readonly named = new Map<unknown, string>();
  private readonly byKey = new Map<string, string>();
  private next = 0;

  constructor() {
    this.ref(EMPTY);
  }

  private mask(key: unknown): string {
    const n = String(this.next++);
    this.named.set(key, n);
    return n;
  }

  ref(t: Type): string {
    switch (t.kind) {
      case 'str':
      case 'bool':
      case 'number':
      case 'any':
      case 'null':
        return this.builtin(t.kind);
      case 'int':
        return this.builtin('int');
      case 'array': {
        const el = this.ref(t.of);
        const name = `[${el}]`;
        if (!this.byKey.has(name)) {
          this.byKey.set(name, name);
          this.entries.push({ name, 'element-type': el, 'meta-type': 'array' });
        }
        return name;
      }
      case 'enum': {
        // Enums are values: two tables that build the same enum share one entry.
        const key = `enum:${t.name}:${t.values.join(',')}`;
        const known = this.byKey.get(key);
        if (known) return known;
        const name = String(this.next++);
        this.byKey.set(key, name);
        this.entries.push({ name, members: t.values.map((v) => ({ name: v })), 'meta-type': 'enum', values: [...t.values] });
        return name;
      }
      case 'struct':
        if (Object.keys(t.members).length === 0 && this.named.has(EMPTY)) return this.named.get(EMPTY)!;
        return this.object(t, t.members);
      case 'union': {
        const known = this.named.get(t);
        if (known) return known;
        const name = this.mask(t);
        const entry: Entry = { name, 'meta-type': 'object', members: [] as Entry[], tag: t.discriminator, variants: [] as Entry[] };
        this.entries.push(entry);
        entry.members = this.members(t.base);
        entry.variants = Object.entries(t.branches).map(([c, m]) => ({ case: c, type: Object.keys(m).length ? this.object(m, m) : this.ref(EMPTY) }));
        return name;
      }
      case 'alternate': {
        const known = this.named.get(t);
        if (known) return known;
        const name = this.mask(t);
        const entry: Entry = { name, 'meta-type': 'alternate', members: [] };
        this.entries.push(entry);
        entry.members = t.choices.map((c) => ({ type: this.ref(c) }));
        return name;
      }
    }
  }

  private builtin(name: string): string {
    if (!this.byKey.has(`builtin:${name}`)) {
      this.byKey.set(`builtin:${name}`, name);
      const jsonType = { str: 'string', bool: 'boolean', number: 'number', any: 'value', null: 'null', int: 'int' }[name];
      this.entries.push({ name, 'json-type': jsonType, 'meta-type': 'builtin' });
    }
    return name;
  }

  /** An object type; `key` identifies it (a struct Type, or a union branch's members). */
  private object(key: unknown, members: Members): string {
    const known = this.named.get(key);
    if (known) return known;
    const name = this.mask(key);
    // Registered before its members are walked: types may refer to themselves (BlockStats.parent).
    const entry: Entry = { name, members: [], 'meta-type': 'object' };
    this.entries.push(entry);
    entry.members = this.members(members);
    return name;
  }

  private members(members: Members): Entry[] {
    return Object.entries(members).map(([spec, t]) => {
      const optional = spec.startsWith('*');
      const m: Entry = { name: optional ? spec.slice(1) : spec };
      // QEMU marks an optional member with "default": null.
      if (optional) m.default = null;
      m.type = this.ref(t);
      if ((m.name as string).startsWith('x-')) m.features = ['unstable'];
      return m;
    });
  }
}

/** The whole SchemaInfo list: commands, then events, then the types they use. */
export function qmpSchema(server: QmpServer, daemon: Daemon): Entry[] {
  const b = new SchemaBuilder();
  const head: Entry[] = [];
  for (const name of server.commandNames()) {
    const args = name === 'qmp_capabilities' ? CAPABILITIES_ARGS : (boxedArgs(name, daemon) ?? server.command(name)!.args);
    // A command whose table says 'any' takes any object: QEMU has no such type, so it is shown empty.
    const argType = args.kind === 'any' ? b.ref(EMPTY) : b.ref(args);
    const retType = b.ref(RETURNS[name] ?? EMPTY);
    const entry: Entry = { name, 'ret-type': retType, 'meta-type': 'command', 'arg-type': argType };
    // QEMU marks its x- commands and members 'unstable' (libvirt avoids them unless told otherwise).
    if (name.startsWith('x-')) entry.features = ['unstable'];
    head.push(entry);
  }
  for (const [name, data] of Object.entries(EVENTS)) head.push({ name, 'meta-type': 'event', 'arg-type': b.ref(data) });
  return [...head, ...b.entries];
}

// Built once per daemon: the tables only change when a driver is registered, which rebuilds them.
const cache = new WeakMap<object, { key: unknown; schema: Entry[] }>();

export const SCHEMA_COMMANDS: QmpCommand[] = [
  {
    name: 'query-qmp-schema',
    args: struct('query-qmp-schema', {}),
    run: (_a, { server, daemon }) => {
      const key = daemon.graph.blockdevOptions;
      let c = cache.get(server);
      if (!c || c.key !== key) cache.set(server, (c = { key, schema: qmpSchema(server, daemon) }));
      return c.schema;
    },
  },
];

// query-qmp-schema's own return type refers to SchemaInfo; added after the table is built so the
// entry can describe itself without a cycle at module load.
RETURNS['query-qmp-schema'] = arrayOf(
  union('SchemaInfo', {
    name: str,
    'meta-type': enumOf('SchemaMetaType', ['builtin', 'enum', 'array', 'object', 'alternate', 'command', 'event']),
    '*features': arrayOf(str),
  }, 'meta-type', {
    builtin: { 'json-type': enumOf('JSONType', ['string', 'number', 'int', 'boolean', 'null', 'object', 'array', 'value']) },
    enum: { members: arrayOf(struct('SchemaInfoEnumMember', { name: str, '*features': arrayOf(str) })), values: arrayOf(str) },
    array: { 'element-type': str },
    object: {
      members: arrayOf(struct('SchemaInfoObjectMember', { name: str, type: str, '*default': any, '*features': arrayOf(str) })),
      '*tag': str,
      '*variants': arrayOf(struct('SchemaInfoObjectVariant', { case: str, type: str })),
    },
    alternate: { members: arrayOf(struct('SchemaInfoAlternateMember', { type: str })) },
    command: { 'arg-type': str, 'ret-type': str, '*allow-oob': bool },
    event: { 'arg-type': str },
  }),
);
