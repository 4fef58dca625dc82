/**
 * query-qmp-schema walked the way libvirt probes it (qemuMonitorJSONGetQMPSchema
 * and virQEMUQAPISchemaPathGet: command -> arg-type -> member -> type, '+case'
 * for a union's variant), checked to be self-consistent (every type name
 * resolves), to list exactly query-commands, and compared with the real
 * qemu-storage-daemon 7.2's answer: same entry layout per meta-type and, for
 * the commands both have, the same argument member names where vdisk takes
 * all of QEMU's.
 */
import t from 'tap';
import { startQsd, startVdiskQmp } from '../helpers/peers.js';
import { requireTools, tempDir } from '../helpers/tools.js';

type Info = Record<string, unknown> & { name: string; 'meta-type': string };
type Member = { name: string; type: string; default?: null };

class Schema {
  readonly by = new Map<string, Info>();
  constructor(readonly list: Info[]) {
    for (const e of list) this.by.set(e.name, e);
  }
  get(name: string): Info {
    const e = this.by.get(name);
    if (!e) throw new Error(`no schema entry '${name}'`);
    return e;
  }
  /** libvirt's query path: 'blockdev-add/arg-type/+file/filename' (a step names a member, or '+case' a variant). */
  path(query: string): Info | Member | undefined {
    const [head, ...steps] = query.split('/');
    let cur: Info | undefined = this.by.get(head);
    let member: Member | undefined;
    for (const step of steps) {
      if (!cur) return undefined;
      if (step === 'arg-type' || step === 'ret-type') {
        cur = this.by.get(cur[step] as string);
        continue;
      }
      if (cur['meta-type'] === 'array') cur = this.by.get(cur['element-type'] as string);
      if (!cur) return undefined;
      if (step.startsWith('+')) {
        const v = (cur.variants as Array<{ case: string; type: string }> | undefined)?.find((x) => x.case === step.slice(1));
        if (!v) return undefined;
        cur = this.by.get(v.type);
        continue;
      }
      member = (cur.members as Member[] | undefined)?.find((m) => m.name === step);
      if (!member) return undefined;
      cur = this.by.get(member.type);
      if (step === steps[steps.length - 1]) return member;
    }
    return cur?.['meta-type'] === 'array' ? this.by.get(cur['element-type'] as string) : cur;
  }
  enumValues(typeName: string): string[] {
    const e = this.get(typeName);
    return (e.values as string[]) ?? [];
  }
}

async function schemaOf(t: Tap, who: 'qsd' | 'vdisk'): Promise<{ schema: Schema; commands: string[] }> {
  const dir = tempDir(t);
  const w = who === 'qsd' ? await startQsd(t, dir) : await startVdiskQmp(t, dir);
  const list = (await w.ok('query-qmp-schema')) as Info[];
  const commands = ((await w.ok('query-commands')) as Array<{ name: string }>).map((c) => c.name);
  if (who === 'qsd') await w.ok('quit').catch(() => undefined);
  return { schema: new Schema(list), commands };
}
type Tap = Parameters<typeof startQsd>[0];

t.test('query-qmp-schema, probed as libvirt does and compared with qemu-storage-daemon', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon')) return;
  const [q, v] = [await schemaOf(t, 'qsd'), await schemaOf(t, 'vdisk')];
  const s = v.schema;

  // What libvirt's capability probing asks for.
  const driver = s.path('blockdev-add/arg-type/driver') as Member;
  t.ok(driver, 'blockdev-add takes a driver');
  t.equal(s.get(driver.type)['meta-type'], 'enum');
  for (const d of ['file', 'raw', 'qcow2', 'nbd', 'null-co', 'blkdebug']) t.ok(s.enumValues(driver.type).includes(d), `BlockdevDriver has ${d}`);
  t.ok(s.path('blockdev-add/arg-type/+file/filename'), 'blockdev-add/arg-type/+file/filename');
  t.ok(s.path('blockdev-add/arg-type/+qcow2/backing'), 'blockdev-add/arg-type/+qcow2/backing');
  t.ok(s.path('blockdev-add/arg-type/+nbd/tls-creds'), 'blockdev-add/arg-type/+nbd/tls-creds');
  t.notOk(s.path('blockdev-add/arg-type/+vvfat/dir'), 'a driver vdisk does not have is not claimed');
  for (const m of ['addr', 'tls-creds', 'tls-authz', 'max-connections']) t.ok(s.path(`nbd-server-start/arg-type/${m}`), `nbd-server-start/arg-type/${m}`);
  t.ok(s.path('block-export-add/arg-type/+nbd/name'), 'block-export-add/arg-type/+nbd/name');
  t.ok(s.path('object-add/arg-type/+tls-creds-x509/dir'), 'object-add/arg-type/+tls-creds-x509/dir');
  t.ok(s.path('query-blockstats/arg-type/query-nodes'), 'query-blockstats/arg-type/query-nodes');
  t.ok(s.path('query-blockstats/ret-type/stats/wr_highest_offset'), 'query-blockstats/ret-type/stats/wr_highest_offset');
  t.ok(s.path('block-dirty-bitmap-add/arg-type/persistent'), 'block-dirty-bitmap-add/arg-type/persistent');
  t.ok(s.by.has('JOB_STATUS_CHANGE') && s.get('JOB_STATUS_CHANGE')['meta-type'] === 'event', 'events are listed');

  // The command list is query-commands', no more, no less.
  const cmds = s.list.filter((e) => e['meta-type'] === 'command').map((e) => e.name);
  t.same([...cmds].sort(), [...v.commands].sort(), 'commands = query-commands');

  // Self-consistent: every reference names an entry.
  const refs: string[] = [];
  for (const e of s.list) {
    for (const k of ['arg-type', 'ret-type', 'element-type']) if (typeof e[k] === 'string') refs.push(e[k] as string);
    for (const m of (e.members as Array<{ type?: string }> | undefined) ?? []) if (m.type) refs.push(m.type);
    for (const x of (e.variants as Array<{ type: string }> | undefined) ?? []) refs.push(x.type);
  }
  t.same(refs.filter((r) => !s.by.has(r)), [], 'every type reference resolves');
  t.equal(new Set(s.list.map((e) => e.name)).size, s.list.length, 'names are unique');

  // The same layout as QEMU's: the keys each meta-type's entries have, and masked type names.
  const keys = (sch: Schema) => {
    const out: Record<string, Set<string>> = {};
    for (const e of sch.list) for (const k of Object.keys(e)) (out[e['meta-type']] ??= new Set()).add(k);
    return Object.fromEntries(Object.entries(out).map(([k, set]) => [k, [...set].sort()]));
  };
  const [qk, vk] = [keys(q.schema), keys(s)];
  t.same(Object.keys(vk).sort(), Object.keys(qk).sort(), 'the same meta-types');
  for (const mt of Object.keys(vk)) t.same(vk[mt].filter((k) => !qk[mt]?.includes(k)), [], `${mt} entries have only keys QEMU's have`);
  t.same(s.get('x-blkdebug-query').features, ['unstable'], "x- commands are marked 'unstable', as QEMU marks its own");
  t.same(s.get('0'), q.schema.get('0'), '"0" is the empty object, as in QEMU');
  for (const b of ['str', 'int', 'bool', 'any']) t.same(s.get(b), q.schema.get(b), `builtin ${b}`);
  t.ok(s.list.filter((e) => !['command', 'event', 'builtin'].includes(e['meta-type']) && !e.name.startsWith('[')).every((e) => /^\d+$/.test(e.name)), 'type names are masked');
  t.same(s.get('qmp_capabilities'), { ...s.get('qmp_capabilities'), 'meta-type': 'command' });

  // Commands both have: the same argument names (vdisk's own additions are x- prefixed).
  const memberNames = (sch: Schema, cmd: string) => {
    const at = sch.get(sch.get(cmd)['arg-type'] as string);
    return ((at.members as Member[] | undefined) ?? []).map((m) => `${m.name}${m.default === null ? '?' : ''}`).filter((n) => !n.startsWith('x-')).sort();
  };
  for (const cmd of ['nbd-server-start', 'query-blockstats', 'block-dirty-bitmap-add', 'blockdev-del', 'block-export-del', 'query-named-block-nodes', 'job-cancel']) {
    t.same(memberNames(s, cmd), memberNames(q.schema, cmd), `${cmd}: QEMU's arguments`);
  }
  // query-blockstats' reply: BlockStats and BlockDeviceStats member by member.
  const typeAt = (sch: Schema, p: string): Info => {
    const r = sch.path(p)!;
    return 'meta-type' in r ? (r as Info) : sch.get((r as Member).type);
  };
  const replyMembers = (sch: Schema, p: string) => (typeAt(sch, p).members as Member[]).map((m) => `${m.name}${m.default === null ? '?' : ''}`).sort();
  t.same(replyMembers(s, 'query-blockstats/ret-type'), replyMembers(q.schema, 'query-blockstats/ret-type'), 'BlockStats');
  t.same(replyMembers(s, 'query-blockstats/ret-type/stats'), replyMembers(q.schema, 'query-blockstats/ret-type/stats'), 'BlockDeviceStats');
});
