/**
 * Meta contexts compared with qemu-storage-daemon 7.2. Each daemon gets the
 * same qcow2 overlay over a backing file, the same bitmaps (same QMP
 * commands) and the same writes (qemu-io over NBD), and exports it with
 * bitmaps and allocation-depth. nbdinfo, qemu-img map and nbdsh (libnbd)
 * must then get the same answers from vdisk as from QEMU, socket paths
 * aside; the raw wire check covers what no tool shows (context ids).
 */
import t from 'tap';
import path from 'node:path';
import { RawClient } from '../helpers/nbd-raw.js';
import { type Peer, startPeers } from '../helpers/peers.js';
import { nbdsh, requireTools, run, runOk } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;


/**
 * Both daemons with: base.qcow2 (data at 0-1M and 6M-6M+192k) under
 * top.qcow2; bitmaps b0 (64 KiB granules) and big (1 MiB granules) on top;
 * export `disk` (writable, both bitmaps, allocation-depth) and `plain`
 * (read-only, base:allocation only); then the same writes through each
 * daemon's own NBD server.
 */
async function setUp(t: Tap.Test): Promise<[Peer, Peer]> {
  const peers = await startPeers(t, async (dir) => {
    await runOk(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'base.qcow2'), '8M']);
    await runOk(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 1M', '-c', 'write -P 5 6M 192k', path.join(dir, 'base.qcow2')]);
    await runOk(t, 'qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.join(dir, 'base.qcow2'), '-F', 'qcow2', path.join(dir, 'top.qcow2')]);
  });
  for (const p of peers) {
    await p.w.ok('blockdev-add', {
      driver: 'qcow2',
      'node-name': 'top',
      file: { driver: 'file', filename: path.join(p.dir, 'top.qcow2') },
      backing: { driver: 'qcow2', 'node-name': 'base', 'read-only': true, file: { driver: 'file', filename: path.join(p.dir, 'base.qcow2') } },
    });
    await p.w.ok('nbd-server-start', { addr: { type: 'unix', data: { path: p.nbdSocket } } });
    await p.w.ok('block-dirty-bitmap-add', { node: 'top', name: 'b0' });
    await p.w.ok('block-dirty-bitmap-add', { node: 'top', name: 'big', granularity: MiB });
    await p.w.ok('block-export-add', {
      type: 'nbd',
      id: 'e1',
      'node-name': 'top',
      name: 'disk',
      description: 'overlay',
      writable: true,
      bitmaps: ['b0', 'big'],
      'allocation-depth': true,
    });
    await p.w.ok('block-export-add', { type: 'nbd', id: 'e2', 'node-name': 'top', name: 'plain' });
    // A filter above the overlay: QEMU counts it as a layer of the chain for allocation depth.
    await p.w.ok('blockdev-add', { driver: 'blkdebug', 'node-name': 'dbg', image: 'top' });
    await p.w.ok('block-export-add', { type: 'nbd', id: 'e3', 'node-name': 'dbg', name: 'filtered', 'allocation-depth': true });
    // discard is dropped by the node (discard=ignore, the default): it marks nothing, on either daemon.
    await runOk(t, 'qemu-io', ['-f', 'raw', '-c', 'write -P 2 512k 4k', '-c', 'write -P 3 3M 64k', '-c', 'write -z 5M 128k', '-c', 'discard 6M 64k', '-c', 'write -P 4 7999k 1k', p.uri('disk')]);
  }
  return peers;
}

/** nbdinfo --map's text lines as [offset, length, type]. */
function mapLines(out: string): number[][] {
  return out
    .trim()
    .split('\n')
    .map((l) => l.trim().split(/\s+/).slice(0, 3).map(Number));
}

t.test('nbdinfo and qemu-img map: the same answers as qemu-storage-daemon', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img', 'qemu-io', 'nbdinfo')) return;
  const [qsd, vd] = await setUp(t);
  const bitmapMap = (p: Peer, bitmap: string) => [
    'map',
    '--output=json',
    '--image-opts',
    `driver=nbd,server.type=unix,server.path=${p.nbdSocket},export=disk,x-dirty-bitmap=qemu:dirty-bitmap:${bitmap}`,
  ];
  const commands: Array<[string, string, (p: Peer) => string[]]> = [
    ['nbdinfo --map=qemu:dirty-bitmap:b0', 'nbdinfo', (p) => ['--map=qemu:dirty-bitmap:b0', p.uri('disk')]],
    ['nbdinfo --map=qemu:dirty-bitmap:big', 'nbdinfo', (p) => ['--map=qemu:dirty-bitmap:big', p.uri('disk')]],
    ['nbdinfo --map=qemu:dirty-bitmap:big --json', 'nbdinfo', (p) => ['--map=qemu:dirty-bitmap:big', '--json', p.uri('disk')]],
    ['nbdinfo --map=qemu:allocation-depth', 'nbdinfo', (p) => ['--map=qemu:allocation-depth', p.uri('disk')]],
    ['nbdinfo --map (base:allocation)', 'nbdinfo', (p) => ['--map', p.uri('disk')]],
    ['nbdinfo --map=qemu:allocation-depth through blkdebug', 'nbdinfo', (p) => ['--map=qemu:allocation-depth', p.uri('filtered')]],
    ['nbdinfo --json disk', 'nbdinfo', (p) => ['--json', p.uri('disk')]],
    ['nbdinfo --json plain', 'nbdinfo', (p) => ['--json', p.uri('plain')]],
    ['qemu-img map x-dirty-bitmap=qemu:dirty-bitmap:b0', 'qemu-img', (p) => bitmapMap(p, 'b0')],
    ['qemu-img map x-dirty-bitmap=qemu:dirty-bitmap:big', 'qemu-img', (p) => bitmapMap(p, 'big')],
  ];
  const ours = new Map<string, string>();
  for (const [label, cmd, args] of commands) {
    const q = await run(cmd, args(qsd));
    const v = await run(cmd, args(vd));
    t.equal(q.code, 0, `${label} on qemu-storage-daemon ${q.stderr}`);
    t.equal(v.code, 0, `${label} on vdisk ${v.stderr}`);
    t.equal(v.stdout.replaceAll(vd.dir, 'DIR'), q.stdout.replaceAll(qsd.dir, 'DIR'), `${label}: the same output`);
    ours.set(label, v.stdout);
  }
  // What the writes did, spelled out, so a mistake both could share does not pass unseen.
  const dirty = (label: string) => mapLines(ours.get(label)!).filter((l) => l[2] === 1).map((l) => [l[0], l[1]]);
  t.same(dirty('nbdinfo --map=qemu:dirty-bitmap:b0'), [[512 * 1024, 65536], [3 * MiB, 65536], [5 * MiB, 128 * 1024], [7936 * 1024, 65536]], 'b0: the 64 KiB granules written');
  t.same(dirty('nbdinfo --map=qemu:dirty-bitmap:big'), [[0, MiB], [3 * MiB, MiB], [5 * MiB, MiB], [7 * MiB, MiB]], 'big: the 1 MiB granules written');
  const depths = new Set(mapLines(ours.get('nbdinfo --map=qemu:allocation-depth')!).map((l) => l[2]));
  t.same([...depths].sort(), [0, 1, 2], 'depths 0 (nowhere), 1 (overlay) and 2 (backing file) all appear');
  const filtered = new Set(mapLines(ours.get('nbdinfo --map=qemu:allocation-depth through blkdebug')!).map((l) => l[2]));
  t.same([...filtered].sort(), [0, 1, 3], 'through a filter: the overlay stays 1, the backing file is 3');
  const info = JSON.parse(ours.get('nbdinfo --json disk')!).exports[0];
  t.same(info.contexts, ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:big']);
  t.same(JSON.parse(ours.get('nbdinfo --json plain')!).exports[0].contexts, ['base:allocation'], 'an export without bitmaps lists base:allocation only');
});

const NBDSH_SCRIPT = `
import json
M = 1048576
SIZE = ${SIZE}
ASKED = ['qemu:dirty-bitmap:big', 'base:allocation', 'qemu:dirty-bitmap:nope', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0', 'other:thing']
out = {}

def listing(queries):
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_uri(URI)
    for q in queries:
        h.add_meta_context(q)
    got = []
    h.opt_list_meta_context(lambda name: got.append(name) or 0)
    h.opt_abort()
    return got

out['list'] = [[q, listing(q)] for q in [
    [], ['base:'], ['qemu:'], ['qemu:dirty-bitmap:'],
    ['qemu:dirty-bitmap:big', 'nope:x', 'base:allocation', 'qemu:dirty-bitmap:zz'],
    ['base:allocation', 'base:allocation'], ['qemu:allocation-depth:'], ['qemu:dirty-bitmap:b'], [''], ['qemu:allocation-depth'],
]]

h = nbd.NBD()
for c in ASKED:
    h.add_meta_context(c)
h.connect_uri(URI)
out['can'] = [[c, h.can_meta_context(c)] for c in ASKED]

def status(offset, length, flags=0):
    chunks = []
    def cb(name, off, entries, err):
        assert off == offset, (off, offset)
        chunks.append([name, list(entries)])
        return 0
    h.block_status(length, offset, cb, flags)
    return chunks

cases = [[0, SIZE], [524288 + 1000, 1000], [3 * M, 100 * 1024], [2 * M - 512, 4096], [7 * M + 512, 512], [8126464 + 100, SIZE - 8126464 - 100]]
out['status'] = [[o, l, f, status(o, l, f)] for (o, l) in cases for f in (0, nbd.CMD_FLAG_REQ_ONE)]
# Writes on this very connection mark the enabled bitmaps; the next block status shows them.
h.pwrite(b'\\x07' * 4096, 2 * M + 8192)
h.zero(65536, 4 * M + 65536)
out['after'] = status(0, SIZE)
out['after_one'] = status(2 * M, M, nbd.CMD_FLAG_REQ_ONE)
print(json.dumps(out))
`;

interface NbdshOut {
  list: Array<[string[], string[]]>;
  can: Array<[string, boolean]>;
  status: Array<[number, number, number, Array<[string, number[]]>]>;
  after: Array<[string, number[]]>;
  after_one: Array<[string, number[]]>;
}

t.test('nbdsh: several contexts at once, REQ_ONE, LIST wildcards, writes after export', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img', 'qemu-io', 'nbdsh')) return;
  const [qsd, vd] = await setUp(t);
  const results: NbdshOut[] = [];
  for (const p of [qsd, vd]) {
    const r = await nbdsh(`URI = ${JSON.stringify(p.uri('disk'))}\n${NBDSH_SCRIPT}`);
    t.equal(r.code, 0, `nbdsh against ${p.name} ${r.stderr.slice(-2000)}`);
    results.push(JSON.parse(r.stdout) as NbdshOut);
  }
  const [q, v] = results;
  t.same(v.list, q.list, 'LIST answers as qemu-storage-daemon, wildcard by wildcard');
  t.same(v.can, q.can, 'the same contexts negotiated');
  t.same(v.status, q.status, 'the same block status, context by context');
  t.same(v.after, q.after, 'the same block status after more writes');
  t.same(v.after_one, q.after_one);

  const list = new Map(v.list.map(([queries, got]) => [JSON.stringify(queries), got]));
  const all = ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0', 'qemu:dirty-bitmap:big'];
  t.same(list.get('[]'), all, 'no query lists everything');
  t.same(list.get('["qemu:"]'), all.slice(1), 'qemu: lists every qemu context');
  t.same(list.get('["qemu:dirty-bitmap:"]'), all.slice(2), 'qemu:dirty-bitmap: lists the bitmaps');
  t.same(list.get('["base:"]'), ['base:allocation']);
  t.same(list.get('["qemu:dirty-bitmap:big","nope:x","base:allocation","qemu:dirty-bitmap:zz"]'), ['base:allocation', 'qemu:dirty-bitmap:big'], 'unknown names are skipped, the order is the server’s');
  t.same(list.get('["qemu:dirty-bitmap:b"]'), [], 'a prefix of a bitmap name is not a wildcard');
  t.same(
    v.can.filter(([, can]) => can).map(([c]) => c),
    ['qemu:dirty-bitmap:big', 'base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0'],
  );
  for (const [offset, length, flags, chunks] of v.status) {
    const what = `block status ${offset}+${length}${flags ? ' REQ_ONE' : ''}`;
    t.same(chunks.map(([name]) => name), all, `${what}: one chunk per context, in QEMU's order`);
    for (const [name, entries] of chunks) {
      const lengths = entries.filter((_, i) => i % 2 === 0);
      const sum = lengths.reduce((a, b) => a + b, 0);
      if (flags) t.equal(lengths.length, 1, `${what} ${name}: one extent`);
      else t.equal(sum, length, `${what} ${name}: covers the request exactly`);
      t.ok(sum <= length, `${what} ${name}: nothing past the request`);
    }
  }
  const byName = (chunks: Array<[string, number[]]>) => new Map(chunks);
  const small = byName(v.status.find(([o, l, f]) => o === 524288 + 1000 && l === 1000 && f === 0)![3]);
  t.same(small.get('qemu:dirty-bitmap:big'), [1000, 1], 'a 1 MiB granule reports only the 1000 bytes asked for');
  t.same(small.get('qemu:allocation-depth'), [1000, 1]);
  const after = byName(v.after);
  const dirtyRuns = (e: number[]) => {
    const runs: number[][] = [];
    for (let i = 0, at = 0; i < e.length; at += e[i], i += 2) if (e[i + 1] === 1) runs.push([at, e[i]]);
    return runs;
  };
  t.same(
    dirtyRuns(after.get('qemu:dirty-bitmap:b0')!),
    [[512 * 1024, 65536], [2 * MiB, 65536], [3 * MiB, 65536], [4 * MiB + 65536, 65536], [5 * MiB, 128 * 1024], [7936 * 1024, 65536]],
    'b0 now also has the granules written and zeroed after the export was made',
  );
  t.same(dirtyRuns(after.get('qemu:dirty-bitmap:big')!), [[0, MiB], [2 * MiB, 4 * MiB], [7 * MiB, MiB]]);
});

// ---- the raw wire: context ids, and what a selection is good for -------------------------

const OPT_GO = 7;
const OPT_STRUCTURED_REPLY = 8;
const OPT_LIST_META_CONTEXT = 9;
const OPT_SET_META_CONTEXT = 10;
const REP_ACK = 1;
const REP_META_CONTEXT = 4;
const CMD_BLOCK_STATUS = 7;

function metaOption(exportName: string, queries: string[]): Buffer {
  const parts: Buffer[] = [];
  const u32 = (n: number) => {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(n);
    return b;
  };
  parts.push(u32(Buffer.byteLength(exportName)), Buffer.from(exportName), u32(queries.length));
  for (const q of queries) parts.push(u32(Buffer.byteLength(q)), Buffer.from(q));
  return Buffer.concat(parts);
}

/** Sends a meta context option; returns its replies as "id name" lines, and the final reply type. */
async function metaContexts(c: RawClient, option: number, exportName: string, queries: string[]): Promise<string[]> {
  c.sendOption(option, metaOption(exportName, queries));
  const lines: string[] = [];
  for (;;) {
    const r = await c.optionReply();
    if (r.type !== REP_META_CONTEXT) return [...lines, r.type === REP_ACK ? 'ACK' : `error ${r.type - 2 ** 31}`];
    lines.push(`${r.data.readUInt32BE(0)} ${r.data.toString('utf8', 4)}`);
  }
}

async function goExport(c: RawClient, name: string): Promise<void> {
  const n = Buffer.from(name);
  const d = Buffer.alloc(4 + n.length + 2);
  d.writeUInt32BE(n.length, 0);
  n.copy(d, 4);
  c.sendOption(OPT_GO, d);
  for (;;) {
    const r = await c.optionReply();
    if (r.type === REP_ACK) return;
    if (r.type !== 3) throw new Error(`GO refused: ${r.type} ${r.data.toString()}`);
  }
}

/** One BLOCK_STATUS request; its reply chunks as "type flags id extent-count" (or the error value). */
async function blockStatusChunks(c: RawClient, offset: number, length: number, flags = 0): Promise<string[]> {
  c.request(CMD_BLOCK_STATUS, offset, length, 77, flags);
  const out: string[] = [];
  for (;;) {
    const h = await c.read(20);
    if (h.readUInt32BE(0) !== 0x668e33ef) throw new Error(`not a structured reply: ${h.toString('hex')}`);
    const chunkFlags = h.readUInt16BE(4);
    const type = h.readUInt16BE(6);
    const payload = await c.read(h.readUInt32BE(16));
    if (type === 5) out.push(`status done=${chunkFlags & 1} id=${payload.readUInt32BE(0)} extents=${(payload.length - 4) / 8}`);
    else out.push(`type ${type} done=${chunkFlags & 1} error=${payload.readUInt32BE(0)}`);
    if (chunkFlags & 1) return out;
  }
}

async function wireTranscript(p: Peer): Promise<string[]> {
  const log: string[] = [];
  // 1. SET before structured replies is refused; LIST answers with id 0; SET gets QEMU's fixed ids
  //    in QEMU's order whatever order the client asked in; then GO and block status.
  const a = await RawClient.connect(p.nbdSocket);
  await a.greet();
  log.push('set before structured:', ...(await metaContexts(a, OPT_SET_META_CONTEXT, 'disk', ['base:allocation'])));
  a.sendOption(OPT_STRUCTURED_REPLY);
  log.push(`structured: ${(await a.optionReply()).type}`);
  log.push('list:', ...(await metaContexts(a, OPT_LIST_META_CONTEXT, 'disk', [])));
  log.push('list unknown export:', ...(await metaContexts(a, OPT_LIST_META_CONTEXT, 'nope', [])));
  log.push('set:', ...(await metaContexts(a, OPT_SET_META_CONTEXT, 'disk', ['qemu:dirty-bitmap:big', 'qemu:dirty-bitmap:b0', 'x:y', 'qemu:allocation-depth', 'base:allocation'])));
  await goExport(a, 'disk');
  log.push('block status:', ...(await blockStatusChunks(a, 0, SIZE)));
  log.push('block status REQ_ONE:', ...(await blockStatusChunks(a, 0, SIZE, 8)));
  log.push('block status of nothing:', ...(await blockStatusChunks(a, 0, 0)));
  a.close();
  // 2. A selection made for another export does not follow the client to this one.
  const b = await RawClient.connect(p.nbdSocket);
  await b.greet();
  b.sendOption(OPT_STRUCTURED_REPLY);
  await b.optionReply();
  log.push('set on plain:', ...(await metaContexts(b, OPT_SET_META_CONTEXT, 'plain', ['base:allocation', 'qemu:allocation-depth'])));
  await goExport(b, 'disk');
  log.push('block status on disk:', ...(await blockStatusChunks(b, 0, 4096)));
  b.close();
  // 3. A later SET replaces an earlier one, even with nothing.
  const c = await RawClient.connect(p.nbdSocket);
  await c.greet();
  c.sendOption(OPT_STRUCTURED_REPLY);
  await c.optionReply();
  log.push('set one bitmap:', ...(await metaContexts(c, OPT_SET_META_CONTEXT, 'disk', ['qemu:dirty-bitmap:big'])));
  log.push('set nothing known:', ...(await metaContexts(c, OPT_SET_META_CONTEXT, 'disk', ['qemu:dirty-bitmap:'])));
  await goExport(c, 'disk');
  log.push('block status:', ...(await blockStatusChunks(c, 0, 4096)));
  c.close();
  return log;
}

t.test('the wire: context ids, LIST ids, selections per export, as qemu-storage-daemon', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img', 'qemu-io')) return;
  const [qsd, vd] = await setUp(t);
  const q = await wireTranscript(qsd);
  const v = await wireTranscript(vd);
  t.same(v, q, 'the same replies, ids and chunks');
  t.same(v.slice(v.indexOf('set:') + 1, v.indexOf('set:') + 6), ['0 base:allocation', '1 qemu:allocation-depth', '2 qemu:dirty-bitmap:b0', '3 qemu:dirty-bitmap:big', 'ACK'], 'ids: 0, 1, then 2 + the bitmap index');
  t.same(v.slice(v.indexOf('list:') + 1, v.indexOf('list:') + 5).map((l) => l.split(' ')[0]), ['0', '0', '0', '0'], 'LIST replies carry id 0');
  const bs = v.slice(v.indexOf('block status:') + 1, v.indexOf('block status:') + 5);
  t.same(bs.map((l) => l.split(' ')[1]), ['done=0', 'done=0', 'done=0', 'done=1'], 'only the last chunk is DONE');
});
