/**
 * Incremental backup, after QEMU's iotest 124 (../shared/seeds), on vdisk:
 * full "anchor" backups, bitmaps, incremental backups chained by backing
 * files, each checked against a full reference backup taken right after it
 * and the last one against the live image, with qemu-img compare as the
 * referee. Guest writes come from qemu-io over vdisk's NBD export of the
 * drive, as a guest's would. Also: transactions that pair bitmap clears with
 * full backups, the bitmap errors 124 expects, growing the drive, the exact
 * event sequences, and point-in-time under concurrent writes.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { Harness, MiB, WRITES1, WRITES2 } from '../helpers/backup.js';
import type { QmpMessage } from '../helpers/qmp.js';
import { patternBuffer, requireTool, run } from '../helpers/tools.js';

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io']) requireTool(t, tool);
});

async function incrementalSimple(t: Test, granularity?: number): Promise<void> {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const b = await h.addBitmap('bitmap0', d, granularity ? { granularity } : {});
  await h.anchor(d);
  // A "hollow" incremental backup: nothing written yet.
  t.ok(await h.incremental(b), 'an empty incremental');
  await h.writes(d, WRITES1);
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: granularity === 131072 ? 655360 : granularity === 32768 ? 360448 : 458752, busy: false, recording: true });
  t.ok(await h.incremental(b), 'incremental 1');
  // 124 writes through the monitor; the first set came over NBD, this one through human-monitor-command.
  await h.hmpWrites(d, WRITES2);
  t.ok(await h.incremental(b), 'incremental 2');
  await h.noJobs();
  await h.checkBackups();
}

t.test('incremental simple (64 KiB bitmap)', (t) => incrementalSimple(t));
t.test('small granularity (32 KiB)', (t) => incrementalSimple(t, 32768));
t.test('large granularity (128 KiB)', (t) => incrementalSimple(t, 131072));

t.test('a larger cluster size target (128 KiB), rebased afterwards', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const full = path.join(h.dir, 'drive0.full.qcow2');
  await h.qimg(['create', '-f', 'qcow2', '-o', 'cluster_size=128k', full, '64M']);
  t.ok(await h.backup({ device: 'drive0', sync: 'full', format: 'qcow2', target: full, mode: 'existing' }), 'anchor into a 128 KiB cluster image (job-id defaults to the device)');
  const b = await h.addBitmap('bitmap0', d);
  await h.writes(d, WRITES1);
  t.match(await h.bitmapInfo(d, 'bitmap0'), { name: 'bitmap0', count: 458752, granularity: 65536, persistent: false });
  const [target] = b.newTarget();
  await h.qimg(['create', '-f', 'qcow2', '-o', 'cluster_size=128k', target, '64M']);
  t.ok(await h.backup({ device: 'drive0', sync: 'incremental', bitmap: 'bitmap0', format: 'qcow2', target, mode: 'existing' }), 'incremental');
  await h.reference(b);
  await h.qimg(['rebase', '-f', 'qcow2', '-u', '-b', full, '-F', 'qcow2', target]);
  await h.checkBackups();
});

t.test('transaction: bitmap clears paired with a full backup; both bitmaps in sync', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const b0 = await h.addBitmap('bitmap0', d);
  await h.writes(d, WRITES1);
  const b1 = await h.addBitmap('bitmap1', d);
  const full0 = path.join(h.dir, 'drive0.full.qcow2');
  const from = h.w.messages.length;
  await h.w.ok('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-clear', data: { node: 'drive0', name: 'bitmap0' } },
      { type: 'block-dirty-bitmap-clear', data: { node: 'drive0', name: 'bitmap1' } },
      { type: 'drive-backup', data: { 'job-id': 'drive0', device: 'drive0', target: full0, sync: 'full', format: 'qcow2' } },
    ],
  });
  t.ok(await h.waitBackup('drive0', from), 'the full backup of the transaction');
  await h.writes(d, WRITES2);
  t.ok(await h.incremental(b0), 'incremental via bitmap0');
  t.ok(await h.incremental(b1), 'incremental via bitmap1');
  await h.checkBackups();
});

t.test('bitmap errors as 124 expects them, and nothing is left running', async (t) => {
  const h = new Harness(t);
  await h.start();
  await h.addDrive('drive0');
  const err = path.join(h.dir, 'err.qcow2');
  let r = await h.w.cmd('drive-backup', { device: 'drive0', sync: 'incremental', format: 'qcow2', target: err });
  t.same(r.error, { class: 'GenericError', desc: "must provide a valid bitmap name for 'incremental' sync mode" }, 'incremental without a bitmap');
  r = await h.w.cmd('drive-backup', { device: 'drive0', sync: 'incremental', bitmap: 'unknown', format: 'qcow2', target: err });
  t.same(r.error, { class: 'GenericError', desc: "Bitmap 'unknown' could not be found" });
  t.ok(fs.existsSync(err), 'as in QEMU, the target was created before the bitmap was checked');
  r = await h.w.cmd('block-dirty-bitmap-add', { node: 'drive0', name: 'bitmap0', granularity: 64000 });
  t.same(r.error, { class: 'GenericError', desc: 'Granularity must be power of 2 and at least 512' });
  for (const [args, desc] of [
    [{ sync: 'full', bitmap: 'b', 'bitmap-mode': 'never' }, "Bitmap sync mode 'never' has no meaningful effect when combined with sync mode 'full'"],
    [{ sync: 'none', bitmap: 'b', 'bitmap-mode': 'always' }, "sync mode 'none' does not produce meaningful bitmap outputs"],
    [{ sync: 'full', bitmap: 'b' }, 'Bitmap sync mode must be given when providing a bitmap'],
    [{ sync: 'full', 'bitmap-mode': 'always' }, 'Cannot specify bitmap sync mode without a bitmap'],
    [{ sync: 'incremental', bitmap: 'b', 'bitmap-mode': 'always' }, "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'"],
  ] as Array<[Record<string, unknown>, string]>) {
    await h.w.ok('block-dirty-bitmap-add', { node: 'drive0', name: 'b' }).catch(() => undefined);
    r = await h.w.cmd('drive-backup', { device: 'drive0', format: 'qcow2', target: err, ...args });
    t.same(r.error, { class: 'GenericError', desc }, JSON.stringify(args));
  }
  await h.noJobs();
  t.same(await h.w.ok('query-jobs'), [], 'no job left over by failed prepares');
  t.match(await h.bitmapInfo(h.drives[0], 'b'), { busy: false, recording: true }, 'the bitmap is untouched');
});

t.test('growing before a backup: dirty bits past the old end are backed up', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const b = await h.addBitmap('bitmap0', d);
  await h.anchor(d);
  await h.w.cmd('block-export-del', { id: 'e-drive0' });
  await h.w.ok('block_resize', { device: 'drive0', size: 65 * MiB });
  await h.w.ok('block-export-add', { type: 'nbd', id: 'e-drive0', 'node-name': 'drive0', writable: true });
  await h.writes(d, [[0xcc, '64M', '64k']]);
  const target = await h.prepare(b, undefined, ['-o', 'size=65M']);
  t.ok(await h.incremental(b, true, target), 'incremental after growing');
  await h.checkBackups();
});

t.test('event sequences and bitmap states during a job (success, cancel)', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const b = await h.addBitmap('bitmap0', d);
  await h.anchor(d);
  await h.writes(d, WRITES1);
  const events = (from: number): Array<[string, unknown]> =>
    h.w.messages.slice(from).filter((m: QmpMessage) => m.event).map((m) => [m.event!, m.event === 'JOB_STATUS_CHANGE' ? m.data?.status : m.data]);

  // A slow incremental (1 byte/s: the first 64 KiB cluster, then a long sleep), cancelled: the
  // bitmap keeps its bits and gets the new writes.
  const target = await h.prepare(b);
  let from = h.w.messages.length;
  await h.w.ok('drive-backup', { 'job-id': 'drive0', device: 'drive0', sync: 'incremental', bitmap: 'bitmap0', format: 'qcow2', target, mode: 'existing', speed: 1 });
  const during = await h.bitmapInfo(d, 'bitmap0');
  t.match(during, { count: 458752, busy: true, recording: true }, 'during the job: busy, recording, count unchanged');
  const nodes = (await h.w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
  const list = nodes.find((n) => n['node-name'] === 'drive0')!['dirty-bitmaps'] as Array<Record<string, unknown>>;
  t.equal(list.filter((x) => x.name === undefined).length, 1, 'the successor is listed without a name');
  t.ok(nodes.some((n) => n.drv === 'copy-before-write'), 'the copy-before-write filter is in the graph');
  t.same(((await h.w.ok('query-block-jobs')) as Array<Record<string, unknown>>).map((j) => [j.device, j.type, j.status]), [['drive0', 'backup', 'running']]);
  t.match((await h.w.cmd('block-dirty-bitmap-clear', { node: 'drive0', name: 'bitmap0' })).error?.desc, /currently in use by another operation/, 'a busy bitmap cannot be cleared');
  await h.writes(d, [[0x11, '40M', '64k']]);
  await h.w.ok('block-job-cancel', { device: 'drive0' });
  await h.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'null', 20_000, from);
  t.same(events(from), [
    ['JOB_STATUS_CHANGE', 'created'],
    ['JOB_STATUS_CHANGE', 'running'],
    ['JOB_STATUS_CHANGE', 'aborting'],
    ['BLOCK_JOB_CANCELLED', { type: 'backup', device: 'drive0', len: 458752, offset: 65536, speed: 1 }],
    ['JOB_STATUS_CHANGE', 'concluded'],
    ['JOB_STATUS_CHANGE', 'null'],
  ]);
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 458752 + 65536, busy: false, recording: true }, 'after cancel: the old bits and the new write');
  b.delTarget();
  t.notOk(((await h.w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>).some((n) => n.drv === 'copy-before-write'), 'the filter is gone');

  // Success: the bitmap then holds only writes made during the job (none here).
  from = h.w.messages.length;
  t.ok(await h.incremental(b), 'incremental after the cancelled one');
  t.same(events(from).slice(0, 7).map((e) => (e[0] === 'JOB_STATUS_CHANGE' ? e[1] : e[0])), ['created', 'running', 'waiting', 'pending', 'BLOCK_JOB_COMPLETED', 'concluded', 'null']);
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 0, busy: false, recording: true });
  await h.checkBackups();
});

t.test('point in time: the backup is the disk as it was when the job started', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0', []);
  const before = patternBuffer(64 * MiB, 7);
  fs.writeFileSync(path.join(h.dir, 'before.raw'), before);
  // Fill the drive through the export, then back it up slowly while overwriting everything.
  const fill = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', path.join(h.dir, 'before.raw'), `nbd+unix:///drive0?socket=${d.nbd}`]);
  t.equal(fill.code, 0, fill.stderr);
  const target = path.join(h.dir, 'pit.qcow2');
  const from = h.w.messages.length;
  await h.w.ok('drive-backup', { 'job-id': 'pit', device: 'drive0', sync: 'full', format: 'qcow2', target, speed: 16 * MiB });
  const over = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0xee 0 64M', `nbd+unix:///drive0?socket=${d.nbd}`], { timeoutMs: 120_000 });
  t.equal(over.code, 0, over.stderr);
  t.ok(await h.waitBackup('pit', from), 'the job completes');
  const cmp = await run('qemu-img', ['compare', '-U', '-f', 'raw', '-F', 'qcow2', path.join(h.dir, 'before.raw'), target]);
  t.equal(cmp.code, 0, `the backup holds the old data everywhere: ${cmp.stdout.trim()}`);
  const now = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0xee 0 64M', `nbd+unix:///drive0?socket=${d.nbd}`]);
  t.notMatch(now.stdout, /verification failed/, 'while the drive has the new data');
});

t.test('blkdebug: an incremental backup that fails, then one that works (124 test_incremental_failure)', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0', undefined, true);
  await h.anchor(d);
  const b = await h.addBitmap('bitmap0', d);
  await h.writes(d, WRITES1);
  const from = h.w.messages.length;
  t.notOk(await h.incremental(b, false), 'the first incremental fails with EIO');
  const err = h.w.messages.slice(from).find((m) => m.event === 'BLOCK_JOB_ERROR');
  t.same(err?.data, { device: 'drive0', operation: 'read', action: 'report' }, 'BLOCK_JOB_ERROR as QEMU reports it');
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 458752, busy: false, recording: true }, 'the bitmap kept its bits');
  await h.hmpWrites(d, WRITES2);
  t.ok(await h.incremental(b), 'the next incremental works and includes both sets of writes');
  await h.noJobs();
  await h.checkBackups();
});

t.test('blkdebug: on-source-error=stop pauses, resume finishes (124 test_incremental_pause)', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0', undefined, true);
  await h.anchor(d);
  const b = await h.addBitmap('bitmap0', d);
  await h.writes(d, WRITES1);
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 458752, granularity: 65536, busy: false, recording: true });
  const target = await h.prepare(b);
  const from = h.w.messages.length;
  await h.w.ok('drive-backup', { 'job-id': 'drive0', device: 'drive0', sync: 'incremental', bitmap: 'bitmap0', format: 'qcow2', target, mode: 'existing', 'on-source-error': 'stop' });
  const ev = await h.w.waitFor((m) => m.event === 'BLOCK_JOB_ERROR', 20_000, from);
  t.same(ev.data, { device: 'drive0', action: 'stop', operation: 'read' });
  await h.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'paused', 20_000, from);
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 458752, granularity: 65536, busy: true, recording: true });
  const jobs = (await h.w.ok('query-block-jobs')) as Array<Record<string, unknown>>;
  t.match(jobs[0], { device: 'drive0', status: 'paused', paused: true, 'io-status': 'failed' });
  await h.w.ok('block-job-resume', { device: 'drive0' });
  t.ok(await h.waitBackup('drive0', from), 'resumed and completed');
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 0, granularity: 65536, busy: false, recording: true });
  await h.reference(b);
  await h.checkBackups();
});

async function transactionFailure(t: Test, race: boolean): Promise<void> {
  const h = new Harness(t);
  await h.start();
  const d0 = await h.addDrive('drive0');
  const d1 = await h.addDrive('drive1', [[0x14, 0, 512], [0x5d, MiB, 32 * 1024], [0xcd, 32 * MiB, 124 * 1024]], true);
  const b0 = await h.addBitmap('bitmap0', d0);
  const b1 = await h.addBitmap('bitmap0', d1);
  await h.anchor(d0);
  await h.anchor(d1);
  await h.noJobs();
  if (!race) await h.writes(d0, WRITES1);
  await h.hmpWrites(d1, [[0xba, '0', '512'], [0xef, '16M', '256k'], [0x46, '32736k', '64k']]);
  const actions = async () => [
    { type: 'drive-backup', data: { 'job-id': 'drive0', device: 'drive0', target: await h.prepare(b0), sync: 'incremental', format: 'qcow2', mode: 'existing', bitmap: 'bitmap0' } },
    { type: 'drive-backup', data: { 'job-id': 'drive1', device: 'drive1', target: await h.prepare(b1), sync: 'incremental', format: 'qcow2', mode: 'existing', bitmap: 'bitmap0' } },
  ];
  let from = h.w.messages.length;
  await h.w.ok('transaction', { actions: await actions(), properties: { 'completion-mode': 'grouped' } });
  await h.w.waitFor((m) => m.event === 'BLOCK_JOB_CANCELLED' && m.data?.device === 'drive0', 30_000, from);
  t.notOk(await h.waitBackup('drive1', from), 'drive1 fails');
  const err = h.w.messages.slice(from).find((m) => m.event === 'BLOCK_JOB_ERROR');
  t.same(err?.data, { device: 'drive1', action: 'report', operation: 'read' });
  await h.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.id === 'drive0' && m.data?.status === 'null', 20_000, from);
  await h.noJobs();
  t.match(await h.bitmapInfo(d0, 'bitmap0'), { count: race ? 0 : 458752, busy: false }, 'drive0 kept its bits (cancelled with the group)');
  t.match(await h.bitmapInfo(d1, 'bitmap0'), { count: 458752, busy: false }, 'drive1 kept its bits');
  b0.delTarget();
  b1.delTarget();
  if (race) return;
  from = h.w.messages.length;
  await h.w.ok('transaction', { actions: await actions(), properties: { 'completion-mode': 'grouped' } });
  t.ok(await h.waitBackup('drive0', from), 'drive0 succeeds this time');
  t.ok(await h.waitBackup('drive1', from), 'and drive1');
  await h.reference(b0);
  await h.reference(b1);
  await h.noJobs();
  await h.checkBackups();
}

t.test('grouped transaction: one job fails, the other is cancelled, both bitmaps restored, then both work (124)', (t) => transactionFailure(t, false));
t.test('grouped transaction race: a job with nothing to copy is cancelled cleanly (124)', (t) => transactionFailure(t, true));

t.test('transaction rollback: a failing action undoes the ones before it', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const b = await h.addBitmap('bitmap0', d);
  await h.writes(d, WRITES1);
  const from = h.w.messages.length;
  const r = await h.w.cmd('transaction', {
    actions: [
      { type: 'block-dirty-bitmap-clear', data: { node: 'drive0', name: 'bitmap0' } },
      { type: 'block-dirty-bitmap-add', data: { node: 'drive0', name: 'fresh' } },
      { type: 'drive-backup', data: { 'job-id': 'j', device: 'drive0', target: path.join(h.dir, 'x.qcow2'), sync: 'full', format: 'qcow2' } },
      { type: 'abort', data: {} },
    ],
  });
  t.same(r.error, { class: 'GenericError', desc: 'Transaction aborted using Abort action' });
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 458752 }, 'the clear was undone');
  t.equal(await h.bitmapInfo(d, 'fresh'), undefined, 'the added bitmap is gone');
  await h.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'null', 20_000, from);
  t.same(
    h.w.messages.slice(from).filter((m) => m.event).map((m) => [m.event, m.data?.status]),
    [['JOB_STATUS_CHANGE', 'created'], ['JOB_STATUS_CHANGE', 'aborting'], ['JOB_STATUS_CHANGE', 'concluded'], ['JOB_STATUS_CHANGE', 'null']],
    'the job that never started: created, aborting, concluded, null; no cancel event',
  );
  t.same(await h.w.ok('query-jobs'), []);
  t.notOk(((await h.w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>).some((n) => n.drv === 'copy-before-write'), 'no filter left behind');
  const g = await h.w.cmd('transaction', { actions: [{ type: 'block-dirty-bitmap-clear', data: { node: 'drive0', name: 'bitmap0' } }], properties: { 'completion-mode': 'grouped' } });
  t.same(g.error, { class: 'GenericError', desc: "Action 'block-dirty-bitmap-clear' does not support transaction property completion-mode = grouped" });
  void b;
});
