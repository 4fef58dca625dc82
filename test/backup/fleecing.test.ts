/**
 * Fleecing: blockdev-backup sync=none from a source into a qcow2 overlay
 * whose backing is the source, the overlay exported over NBD and read while
 * the guest keeps writing to the source. The overlay must read as the source
 * did when the job started, for every reader, however the reads and writes
 * interleave; copy-before-write is a filter above the source while the job
 * runs; a scratch limit makes the job give up its point in time (with a
 * clear error) rather than fail the guest's writes, and from then on the
 * overlay refuses what it never saved instead of showing new data.
 *
 * Readers and writers are real tools: qemu-io, nbdcopy, fio's nbd engine.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io', 'nbdcopy', 'fio']) requireTool(t, tool);
});

interface Setup {
  w: QmpWire;
  dir: string;
  sock: string;
  /** The source's content when the job started. */
  reference: string;
  source: string;
  fleece: string;
  uri: (name: string) => string;
}

/** A 64 MiB qcow2 source full of distinct data, exported writable as 'drive0'; a fleecing overlay node 'fleece'. */
async function setUp(t: Test): Promise<Setup> {
  const dir = tempDir(t);
  const reference = path.join(dir, 'reference.raw');
  fs.writeFileSync(reference, patternBuffer(SIZE, 1234));
  const source = path.join(dir, 'drive0.qcow2');
  const fleece = path.join(dir, 'fleece.qcow2');
  t.equal((await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', reference, source])).code, 0);
  // -u: the backing file is not opened (vdisk will hold it); the size is given.
  t.equal((await run('qemu-img', ['create', '-f', 'qcow2', '-u', '-b', source, '-F', 'qcow2', fleece, String(SIZE)])).code, 0);
  const qmp = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, args: ['--qmp', `unix:${qmp}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(qmp);
  t.teardown(() => w.close());
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'drive0', file: { driver: 'file', filename: source } });
  await w.ok('block-export-add', { type: 'nbd', id: 'e-drive0', 'node-name': 'drive0', writable: true });
  // As libvirt does: the overlay's backing is the open source node.
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'fleece', file: { driver: 'file', filename: fleece }, backing: 'drive0' });
  return { w, dir, sock: d.socket, reference, source, fleece, uri: (name) => d.uri(name) };
}

async function qemuIo(uri: string, cmds: string[], readOnly = false): Promise<{ code: number | null; out: string }> {
  const r = await run('qemu-io', ['-f', 'raw', ...(readOnly ? ['-r'] : []), ...cmds.flatMap((c) => ['-c', c]), uri]);
  return { code: r.code, out: r.stdout + r.stderr };
}

/** The bytes of the reference at [offset, offset + length), as a qemu-io pattern check is not possible for random data. */
function refSlice(s: Setup, offset: number, length: number): Buffer {
  const fd = fs.openSync(s.reference, 'r');
  const b = Buffer.alloc(length);
  fs.readSync(fd, b, 0, length, offset);
  fs.closeSync(fd);
  return b;
}

/** qemu-io's `read -v` line for 16 bytes: "00000000:  a1 b2 ...". */
function hexLine(b: Buffer): string {
  return [...b].map((x) => x.toString(16).padStart(2, '0')).join(' ');
}

/** Reads [offset, offset + length) of an export with nbdcopy into a file and returns it. */
async function readExport(s: Setup, name: string, file: string): Promise<Buffer> {
  const r = await run('nbdcopy', [s.uri(name), file], { timeoutMs: 60_000 });
  if (r.code !== 0) throw new Error(`nbdcopy ${name}: ${r.stderr}`);
  return fs.readFileSync(file);
}

t.test('the fleecing overlay keeps the point in time while the source is written', async (t) => {
  const s = await setUp(t);
  const from = s.w.messages.length;
  await s.w.ok('blockdev-backup', { 'job-id': 'fleecing', device: 'drive0', target: 'fleece', sync: 'none' });
  await s.w.ok('block-export-add', { type: 'nbd', id: 'e-fleece', 'node-name': 'fleece', name: 'fleece' });

  // The filter sits above the source: the guest's export now goes through it.
  const nodes = (await s.w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
  const cbw = nodes.find((n) => n.drv === 'copy-before-write');
  t.ok(cbw, 'a copy-before-write node is in the graph');
  const exports = (await s.w.ok('query-block-exports')) as Array<Record<string, unknown>>;
  t.equal(exports.find((e) => e.id === 'e-drive0')?.['node-name'], cbw?.['node-name'], 'the source export now uses the filter, as in QEMU');
  t.ok(nodes.some((n) => n.drv === 'snapshot-access'), "the overlay's backing is the point-in-time view");

  // The report's case: the guest writes 0x77 at 1 MiB; the overlay still reads the old data.
  let r = await qemuIo(s.uri('drive0'), ['write -P 0x77 1M 64k', 'flush']);
  t.equal(r.code, 0, r.out);
  const old = refSlice(s, MiB, 65536);
  const got = (await readExport(s, 'fleece', path.join(s.dir, 'fleece-1.raw'))).subarray(MiB, MiB + 65536);
  t.ok(got.equals(old), 'the fleecing export reads the data from before the write');
  r = await qemuIo(s.uri('drive0'), ['read -P 0x77 1M 64k'], true);
  t.notMatch(r.out, /verification failed/, 'the source has the new data');
  const job = ((await s.w.ok('query-block-jobs')) as Array<Record<string, unknown>>)[0];
  t.match(job, { device: 'fleecing', len: SIZE, offset: 65536 }, 'progress: len is the disk, offset what was saved');

  // Many readers and one busy writer at once: every full read of the overlay is the point in time.
  const writer = run('fio', [
    '--name=guest', '--ioengine=nbd', `--uri=${s.uri('drive0')}`, '--rw=randwrite', '--bs=4k', '--iodepth=8',
    `--size=${SIZE}`, '--time_based', '--runtime=4', '--randseed=7', '--output-format=terse',
  ], { timeoutMs: 60_000 });
  const reads = [1, 2, 3].map((i) => readExport(s, 'fleece', path.join(s.dir, `fleece-r${i}.raw`)));
  const want = fs.readFileSync(s.reference);
  for (const [i, b] of (await Promise.all(reads)).entries()) {
    t.ok(b.equals(want), `concurrent full read ${i + 1} equals the source at the start of the job`);
  }
  const fr = await writer;
  t.equal(fr.code, 0, `fio wrote through the filter: ${fr.stderr}`);
  const after = await readExport(s, 'fleece', path.join(s.dir, 'fleece-after.raw'));
  t.ok(after.equals(want), 'and after the writer is done');
  const src = await readExport(s, 'drive0', path.join(s.dir, 'source-now.raw'));
  t.notOk(src.equals(want), 'while the source did change');

  // The end of a fleecing session: the export goes, the job is cancelled, the overlay is deleted.
  await s.w.ok('block-export-del', { id: 'e-fleece' });
  await s.w.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED' && m.data?.id === 'e-fleece', 10_000, from);
  await s.w.ok('block-job-cancel', { device: 'fleecing' });
  await s.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'null', 10_000, from);
  const back = (await s.w.ok('query-block-exports')) as Array<Record<string, unknown>>;
  t.equal(back.find((e) => e.id === 'e-drive0')?.['node-name'], 'drive0', 'the source export is back on the source');
  t.notOk(((await s.w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>).some((n) => n.drv === 'copy-before-write'), 'the filter is gone');
  await s.w.ok('blockdev-del', { 'node-name': 'fleece' });
  t.notOk(((await s.w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>).some((n) => n.drv === 'snapshot-access'), 'the view went with the overlay');
  r = await qemuIo(s.uri('drive0'), ['write -P 0x78 2M 64k', 'read -P 0x78 2M 64k']);
  t.equal(r.code, 0, r.out);
  t.notMatch(r.out, /verification failed/, 'the source is served as before');
});

t.test('after the job ends the overlay refuses what it never saved', async (t) => {
  const s = await setUp(t);
  const from = s.w.messages.length;
  await s.w.ok('blockdev-backup', { 'job-id': 'fleecing', device: 'drive0', target: 'fleece', sync: 'none' });
  await s.w.ok('block-export-add', { type: 'nbd', id: 'e-fleece', 'node-name': 'fleece', name: 'fleece' });
  t.equal((await qemuIo(s.uri('drive0'), ['write -P 0x55 0 64k'])).code, 0);
  await s.w.ok('block-job-cancel', { device: 'fleecing' });
  await s.w.waitFor((m) => m.event === 'BLOCK_JOB_CANCELLED', 10_000, from);
  // Saved before the end: still the old data.
  const saved = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -v 0 16', s.uri('fleece')]);
  t.equal(saved.code, 0, saved.stderr);
  t.match(saved.stdout, hexLine(refSlice(s, 0, 16)), 'a saved cluster still reads, with the old data');
  // Never saved: the source may have changed since, so the read fails rather than lie.
  t.equal((await qemuIo(s.uri('drive0'), ['write -P 0x66 8M 4k'])).code, 0);
  const r = await qemuIo(s.uri('fleece'), ['read 8M 4k'], true);
  t.match(r.out, /read failed: (Permission denied|Operation not permitted)/, `an unsaved cluster fails to read: ${r.out}`);
});

t.test('x-scratch-limit: the job gives up its point in time; guest writes go on', async (t) => {
  const s = await setUp(t);
  const from = s.w.messages.length;
  await s.w.ok('blockdev-backup', { 'job-id': 'fleecing', device: 'drive0', target: 'fleece', sync: 'none', 'x-scratch-limit': 256 * 1024 });
  await s.w.ok('block-export-add', { type: 'nbd', id: 'e-fleece', 'node-name': 'fleece', name: 'fleece' });
  // 4 clusters fit, the fifth does not.
  const r = await qemuIo(s.uri('drive0'), ['write -P 0x21 0 256k', 'write -P 0x22 1M 64k', 'read -P 0x22 1M 64k', 'flush']);
  t.equal(r.code, 0, 'every guest write succeeds');
  t.notMatch(r.out, /failed/, r.out);
  const ev = await s.w.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED', 10_000, from);
  t.match(ev.data, {
    device: 'fleecing',
    error: 'copy-before-write needs more than the scratch limit of 262144 bytes (x-scratch-limit): the point in time is given up',
    offset: 256 * 1024,
  }, 'the job fails with an error that says why');
  const saved = await run('nbdcopy', [s.uri('fleece'), path.join(s.dir, 'x.raw')]);
  t.not(saved.code, 0, 'a full read of the overlay fails');
  const ok = await qemuIo(s.uri('fleece'), ['read -v 0 16'], true);
  t.equal(ok.code, 0, 'the clusters saved before the limit still read');
  t.match(ok.out, hexLine(refSlice(s, 0, 16)), 'with the old data');
  const lost = await qemuIo(s.uri('fleece'), ['read 1M 64k'], true);
  t.match(lost.out, /read failed/, 'the cluster written past the limit is refused, not shown new');
});

// libvirt makes a fresh overlay for every backup; a node reused with nothing saved in it (the
// first job saw no writes) must still work: the second job's view replaces the first one's.
t.test('fleecing twice on the same overlay node: the second job replaces the first view', async (t) => {
  const s = await setUp(t);
  let from = s.w.messages.length;
  await s.w.ok('blockdev-backup', { 'job-id': 'f1', device: 'drive0', target: 'fleece', sync: 'none' });
  await s.w.ok('block-job-cancel', { device: 'f1' });
  await s.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'null', 10_000, from);
  t.equal((await qemuIo(s.uri('drive0'), ['write -P 0x31 4M 64k'])).code, 0);
  from = s.w.messages.length;
  await s.w.ok('blockdev-backup', { 'job-id': 'f2', device: 'drive0', target: 'fleece', sync: 'none' });
  const views = ((await s.w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>).filter((n) => n.drv === 'snapshot-access');
  t.equal(views.length, 1, 'one view');
  await s.w.ok('block-export-add', { type: 'nbd', id: 'e-fleece', 'node-name': 'fleece', name: 'fleece' });
  // The second point in time includes the write made between the jobs.
  const r = await qemuIo(s.uri('fleece'), ['read -P 0x31 4M 64k'], true);
  t.equal(r.code, 0, r.out);
  t.notMatch(r.out, /verification failed/, 'the overlay reads the second point in time');
  await s.w.ok('block-export-del', { id: 'e-fleece' });
  await s.w.ok('block-job-cancel', { device: 'f2' });
  await s.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'null', 10_000, from);
});
