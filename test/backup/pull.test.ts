/**
 * A pull-mode backup as libvirt takes one, end to end, with real clients:
 *
 *   full:        one transaction adds the checkpoint bitmap chk0 and starts
 *                blockdev-backup sync=none into a fresh fleecing overlay; the
 *                overlay is exported and nbdcopy reads all of it.
 *   incremental: one transaction adds chk<n+1>, adds a disabled bitmap on
 *                the overlay, merges chk<n> into it and starts the fleecing
 *                job; the overlay is exported with that bitmap, and a client
 *                (nbdsh) copies only the extents qemu:dirty-bitmap says are
 *                dirty onto the previous backup.
 *
 * Meanwhile fio keeps writing to the guest's export of the source. Each
 * backup must equal the source at the instant of its transaction: the same
 * transaction also starts a push-mode full backup (drive-backup) into a
 * reference image, whose point in time is the same instant; qemu-img
 * compares the two. The incremental cycle runs twice.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { nbdsh, patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

t.before(() => {
  for (const tool of ['qemu-img', 'nbdcopy', 'nbdsh', 'fio']) requireTool(t, tool);
});

/** Copies the dirty extents of `context` from the export at `uri` into `file`; returns the bytes copied. */
async function copyDirty(uri: string, context: string, file: string): Promise<number> {
  const script = `
import os
h.add_meta_context(${JSON.stringify(context)})
h.connect_uri(${JSON.stringify(uri)})
assert h.can_meta_context(${JSON.stringify(context)})
size = h.get_size()
dirty = []
covered = [0]
def extents(ctx, offset, entries, err):
    if ctx != ${JSON.stringify(context)}:
        return 0
    o = offset
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            dirty.append((o, entries[i]))
        o += entries[i]
    covered[0] = o
    return 0
pos = 0
while pos < size:
    h.block_status(min(size - pos, 1 << 30), pos, extents)
    pos = covered[0]
fd = os.open(${JSON.stringify(file)}, os.O_WRONLY)
copied = 0
for (o, l) in dirty:
    while l > 0:
        n = min(l, 4 << 20)
        os.pwrite(fd, h.pread(n, o), o)
        o += n
        l -= n
        copied += n
os.close(fd)
print("copied", copied, "extents", len(dirty))
h.shutdown()
`;
  const r = await nbdsh(script, undefined, 120_000);
  if (r.code !== 0) throw new Error(`nbdsh: ${r.stderr}`);
  const m = /copied (\d+) extents (\d+)/.exec(r.stdout);
  if (!m) throw new Error(`nbdsh said: ${r.stdout}`);
  return Number(m[1]);
}

t.test('full, then incremental twice, while the guest writes', async (t) => {
  const dir = tempDir(t);
  const source = path.join(dir, 'drive0.qcow2');
  const seed = path.join(dir, 'seed.raw');
  fs.writeFileSync(seed, patternBuffer(SIZE, 99));
  t.equal((await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', seed, source])).code, 0);
  const qmp = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, args: ['--qmp', `unix:${qmp}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(qmp);
  t.teardown(() => w.close());
  await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'drive0', file: { driver: 'file', filename: source } });
  await w.ok('block-export-add', { type: 'nbd', id: 'guest', 'node-name': 'drive0', writable: true });

  /** The guest: fio random writes through the source's export for a few seconds. */
  const guest = (seedNo: number) =>
    run('fio', [
      '--name=guest', '--ioengine=nbd', `--uri=${d.uri('drive0')}`, '--rw=randwrite', '--bs=4k', '--iodepth=4',
      `--size=${SIZE}`, '--time_based', '--runtime=2', `--randseed=${seedNo}`, '--rate_iops=100', '--output-format=terse',
    ], { timeoutMs: 60_000 });

  /** One backup cycle; returns the file the pulled backup is in. */
  async function cycle(n: number, previous: string | undefined): Promise<string> {
    const overlay = path.join(dir, `scratch${n}.qcow2`);
    const reference = path.join(dir, `ref${n}.qcow2`);
    t.equal((await run('qemu-img', ['create', '-f', 'qcow2', '-u', '-b', source, '-F', 'qcow2', overlay, String(SIZE)])).code, 0);
    await w.ok('blockdev-add', { driver: 'qcow2', 'node-name': `scratch${n}`, file: { driver: 'file', filename: overlay }, backing: 'drive0' });
    const actions: Array<{ type: string; data: Record<string, unknown> }> = [
      { type: 'block-dirty-bitmap-add', data: { node: 'drive0', name: `chk${n}`, persistent: true } },
    ];
    if (previous) {
      actions.push(
        { type: 'block-dirty-bitmap-add', data: { node: `scratch${n}`, name: 'backup-vda', disabled: true } },
        { type: 'block-dirty-bitmap-merge', data: { node: `scratch${n}`, target: 'backup-vda', bitmaps: [{ node: 'drive0', name: `chk${n - 1}` }] } },
      );
    }
    actions.push(
      { type: 'blockdev-backup', data: { 'job-id': `fleece${n}`, device: 'drive0', target: `scratch${n}`, sync: 'none' } },
      { type: 'drive-backup', data: { 'job-id': `ref${n}`, device: 'drive0', target: reference, format: 'qcow2', sync: 'full' } },
    );
    const from = w.messages.length;
    const writer = guest(n + 1);
    await new Promise((r) => setTimeout(r, 300)); // the guest is writing when the point in time is taken
    await w.ok('transaction', { actions });
    await w.ok('block-export-add', { type: 'nbd', id: `backup${n}`, 'node-name': `scratch${n}`, name: 'backup', ...(previous ? { bitmaps: ['backup-vda'] } : {}) });

    const pulled = path.join(dir, `pulled${n}.raw`);
    if (!previous) {
      const r = await run('nbdcopy', [d.uri('backup'), pulled], { timeoutMs: 60_000 });
      t.equal(r.code, 0, `full: nbdcopy read the whole overlay ${r.stderr}`);
    } else {
      fs.copyFileSync(previous, pulled);
      const copied = await copyDirty(d.uri('backup'), 'qemu:dirty-bitmap:backup-vda', pulled);
      t.ok(copied > 0 && copied < SIZE / 2, `incremental ${n}: only the dirty extents were copied (${copied} bytes of ${SIZE})`);
    }
    const fr = await writer;
    t.equal(fr.code, 0, `the guest kept writing through the backup: ${fr.stderr}`);
    await w.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED' && m.data?.device === `ref${n}`, 60_000, from);

    await w.ok('block-export-del', { id: `backup${n}` });
    await w.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED' && m.data?.id === `backup${n}`, 10_000, from);
    await w.ok('block-job-cancel', { device: `fleece${n}` });
    await w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.id === `fleece${n}` && m.data?.status === 'null', 10_000, from);
    await w.ok('blockdev-del', { 'node-name': `scratch${n}` });

    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', pulled, reference]);
    t.equal(cmp.code, 0, `cycle ${n}: the pulled backup equals the source at the transaction: ${cmp.stdout.trim()}`);
    return pulled;
  }

  const full = await cycle(0, undefined);
  const inc1 = await cycle(1, full);
  const inc2 = await cycle(2, inc1);
  t.notOk(fs.readFileSync(inc2).equals(fs.readFileSync(full)), 'the guest changed the disk between the cycles');
  const nodes = (await w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
  const bitmaps = (nodes.find((x) => x['node-name'] === 'drive0')?.['dirty-bitmaps'] ?? []) as Array<Record<string, unknown>>;
  t.same(bitmaps.map((b) => b.name).sort(), ['chk0', 'chk1', 'chk2'], 'the checkpoint bitmaps are all there, free again');
  t.ok(bitmaps.every((b) => b.busy === false && b.recording === true));
});
