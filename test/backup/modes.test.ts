/**
 * Backup beyond iotest 124: bitmap-mode never and always on success and on
 * failure (what the bitmap holds afterwards), sync=bitmap with full backups,
 * sync=top over a backing file, a 4 GiB sparse disk with 1% dirty, and the
 * block-job verbs (set-speed, pause, resume, cancel of a paused job) with
 * qemu-img as the referee of every image.
 */
import t from 'tap';
import path from 'node:path';
import { Harness, MiB, WRITES1, WRITES2 } from '../helpers/backup.js';
import { requireTool, run } from '../helpers/tools.js';

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io']) requireTool(t, tool);
});

t.test('bitmap-mode never: the bitmap is kept as it was, plus new writes', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const b = await h.addBitmap('bitmap0', d);
  await h.anchor(d);
  await h.writes(d, WRITES1);
  const [target] = b.newTarget();
  await h.qimg(['create', '-f', 'qcow2', '-b', b.lastTarget()[0] === target ? path.join(h.dir, 'drive0.full.qcow2') : b.lastTarget()[0], '-F', 'qcow2', target]);
  t.ok(await h.backup({ 'job-id': 'drive0', device: 'drive0', sync: 'bitmap', bitmap: 'bitmap0', 'bitmap-mode': 'never', format: 'qcow2', target, mode: 'existing' }), 'sync=bitmap, never');
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 458752, busy: false, recording: true }, 'never: the bits are all still there');
  await h.reference(b);
  await h.checkBackups();
});

t.test('bitmap-mode always: cleared on success; on failure only what was not copied stays', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0', undefined, true);
  const b = await h.addBitmap('bitmap0', d);
  await h.anchor(d);
  await h.writes(d, WRITES1);
  // The blkdebug rule fails the first guest-data read after the flush: the job fails part way.
  let target = await h.prepare(b);
  const ok = await h.backup({ 'job-id': 'drive0', device: 'drive0', sync: 'bitmap', bitmap: 'bitmap0', 'bitmap-mode': 'always', format: 'qcow2', target, mode: 'existing' });
  t.notOk(ok, 'the job failed');
  const after = (await h.bitmapInfo(d, 'bitmap0'))!;
  t.ok((after.count as number) > 0 && (after.count as number) <= 458752, `always, on failure: what was not copied stays dirty (${after.count} of 458752 bytes)`);
  t.match(after, { busy: false, recording: true });
  // The failed target is kept (always): the next incremental goes on top of it and the chain is whole.
  const nextTarget = await h.prepare(b, target);
  await h.hmpWrites(d, WRITES2);
  t.ok(await h.backup({ 'job-id': 'drive0', device: 'drive0', sync: 'bitmap', bitmap: 'bitmap0', 'bitmap-mode': 'always', format: 'qcow2', target: nextTarget, mode: 'existing' }), 'the next one works');
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 0 }, 'always, on success: clear');
  const cmp = await run('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', nextTarget, d.file]);
  t.equal(cmp.code, 0, `the chain (full <- failed partial <- incremental) equals the drive: ${cmp.stdout.trim()}`);
  target = nextTarget;
});

t.test('sync=full with a bitmap (on-success) clears it; sync=top copies only the top layer', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const b = await h.addBitmap('bitmap0', d);
  await h.writes(d, WRITES1);
  t.ok(await h.backup({ 'job-id': 'drive0', device: 'drive0', sync: 'full', bitmap: 'bitmap0', 'bitmap-mode': 'on-success', format: 'qcow2', target: path.join(h.dir, 'drive0.full.qcow2') }), 'full backup that syncs the bitmap');
  t.match(await h.bitmapInfo(d, 'bitmap0'), { count: 0 }, 'the bitmap now counts from the full backup');
  await h.hmpWrites(d, WRITES2);
  t.ok(await h.incremental(b), 'an incremental on top of it');
  await h.checkBackups();

  // sync=top: an overlay over a base; the backup gets the overlay's data and the same base.
  const base = path.join(h.dir, 'base.qcow2');
  const top = path.join(h.dir, 'top.qcow2');
  await h.qimg(['create', '-f', 'qcow2', base, '64M']);
  t.equal((await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x21 0 8M', base])).code, 0);
  await h.qimg(['create', '-f', 'qcow2', '-b', base, '-F', 'qcow2', top]);
  t.equal((await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x22 4M 1M', top])).code, 0);
  await h.w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'top', file: { driver: 'file', filename: top } });
  const topBackup = path.join(h.dir, 'top.backup.qcow2');
  t.ok(await h.backup({ 'job-id': 'top', device: 'top', sync: 'top', format: 'qcow2', target: topBackup }), 'sync=top');
  const map = JSON.parse((await run('qemu-img', ['map', '-U', '--output=json', topBackup])).stdout) as Array<{ start: number; length: number; depth: number; data: boolean }>;
  const own = map.filter((e) => e.depth === 0 && e.data).reduce((n, e) => n + e.length, 0);
  t.equal(own, MiB, 'only the overlay’s 1 MiB is in the backup itself');
  const info = JSON.parse((await run('qemu-img', ['info', '-U', '--output=json', topBackup])).stdout);
  t.equal(info['backing-filename'], base, "the backup's backing file is the source's");
  const cmp = await run('qemu-img', ['compare', '-U', topBackup, top]);
  t.equal(cmp.code, 0, `the backup reads as the source: ${cmp.stdout.trim()}`);
});

t.test('a 4 GiB sparse disk with 1% dirty: the incremental holds exactly the dirty clusters', async (t) => {
  const h = new Harness(t);
  await h.start();
  const file = path.join(h.dir, 'big.qcow2');
  await h.qimg(['create', '-f', 'qcow2', file, '4G']);
  await h.w.ok('blockdev-add', { driver: 'qcow2', 'node-name': 'big', file: { driver: 'file', filename: file } });
  await h.w.ok('nbd-server-start', { addr: { type: 'unix', data: { path: path.join(h.dir, 'nbd.sock') } } }).catch(() => undefined);
  await h.w.ok('block-export-add', { type: 'nbd', id: 'e-big', 'node-name': 'big', writable: true });
  const full = path.join(h.dir, 'big.full.qcow2');
  await h.w.ok('block-dirty-bitmap-add', { node: 'big', name: 'b' });
  t.ok(await h.backup({ 'job-id': 'big', device: 'big', sync: 'full', format: 'qcow2', target: full }), 'full backup of an empty 4 GiB disk');
  // 1% of the 65536 clusters, spread out with a fixed stride.
  const clusters = 655;
  const cmds: string[] = [];
  for (let i = 0; i < clusters; i++) cmds.push('-c', `write -P ${(i % 200) + 1} ${(i * 100 + 7) * 65536} 64k`);
  const w = await run('qemu-io', ['-f', 'raw', ...cmds, `nbd+unix:///big?socket=${path.join(h.dir, 'nbd.sock')}`], { timeoutMs: 120_000 });
  t.equal(w.code, 0, w.stderr);
  t.match(await h.bitmapInfo({ id: 'big', file, nbd: '' }, 'b'), { count: clusters * 65536 });
  const inc = path.join(h.dir, 'big.inc.qcow2');
  await h.qimg(['create', '-f', 'qcow2', '-b', full, '-F', 'qcow2', inc]);
  const from = h.w.messages.length;
  await h.w.ok('drive-backup', { 'job-id': 'big', device: 'big', sync: 'incremental', bitmap: 'b', format: 'qcow2', target: inc, mode: 'existing' });
  t.ok(await h.waitBackup('big', from), 'the incremental');
  const done = h.w.messages.slice(from).find((m) => m.event === 'BLOCK_JOB_COMPLETED');
  t.equal(done?.data?.len, clusters * 65536, 'its length is the dirty bytes');
  const map = JSON.parse((await run('qemu-img', ['map', '-U', '--output=json', inc])).stdout) as Array<{ length: number; depth: number; data: boolean }>;
  t.equal(map.filter((e) => e.depth === 0 && e.data).reduce((n, e) => n + e.length, 0), clusters * 65536, 'exactly the dirty clusters are in the incremental');
  const cmp = await run('qemu-img', ['compare', '-U', inc, file], { timeoutMs: 120_000 });
  t.equal(cmp.code, 0, `and the chain equals the disk: ${cmp.stdout.trim()}`);
});

t.test('block-job verbs: set-speed, pause, resume, cancel of a paused job', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const from = h.w.messages.length;
  await h.w.ok('drive-backup', { 'job-id': 'slow', device: 'drive0', sync: 'full', format: 'qcow2', target: path.join(h.dir, 'slow.qcow2'), speed: 1 });
  await h.w.ok('block-job-set-speed', { device: 'slow', speed: 2 });
  t.same((await h.w.cmd('block-job-set-speed', { device: 'slow', speed: -1 })).error, { class: 'GenericError', desc: "Parameter 'speed' expects a non-negative value" });
  t.same((await h.w.cmd('block-job-pause', { device: 'nope' })).error, { class: 'DeviceNotActive', desc: "Block job 'nope' not found" });
  await h.w.ok('block-job-pause', { device: 'slow' });
  t.same((await h.w.cmd('block-job-pause', { device: 'slow' })).error, { class: 'GenericError', desc: 'Job is already paused' });
  const jobs = (await h.w.ok('query-block-jobs')) as Array<Record<string, unknown>>;
  t.match(jobs[0], { device: 'slow', speed: 2, paused: true });
  t.same((await h.w.cmd('block-job-cancel', { device: 'slow' })).error, { class: 'GenericError', desc: "The block job for device 'slow' is currently paused" });
  await h.w.ok('block-job-resume', { device: 'slow' });
  t.same((await h.w.cmd('block-job-resume', { device: 'slow' })).error, { class: 'GenericError', desc: "Can't resume a job that was not paused" });
  await h.w.ok('block-job-pause', { device: 'slow' });
  await h.w.ok('block-job-cancel', { device: 'slow', force: true });
  const ev = await h.w.waitFor((m) => m.event === 'BLOCK_JOB_CANCELLED', 20_000, from);
  t.match(ev.data, { device: 'slow', type: 'backup', speed: 2 });
  await h.noJobs();
  void d;
});

t.test('compress=on: a full backup into compressed qcow2 clusters', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const target = path.join(h.dir, 'comp.qcow2');
  t.ok(await h.backup({ 'job-id': 'drive0', device: 'drive0', sync: 'full', format: 'qcow2', target, compress: true }), 'compressed full backup');
  const chk = await run('qemu-img', ['check', '-U', '--output=json', target]);
  t.equal(chk.code, 0, 'qemu-img check clean');
  t.ok(JSON.parse(chk.stdout)['compressed-clusters'] > 0, 'with compressed clusters');
  t.equal((await run('qemu-img', ['compare', '-U', target, d.file])).code, 0, 'the backup equals the drive');
  const raw = path.join(h.dir, 'plain.raw');
  await h.qimg(['create', '-f', 'raw', raw, '64M']);
  const r = await h.w.cmd('drive-backup', { 'job-id': 'x', device: 'drive0', sync: 'full', format: 'raw', target: raw, mode: 'existing', compress: true });
  t.match(r.error?.desc, /Compression is not supported for this drive/, 'a raw target cannot be compressed');
});

t.test('a target flush that fails while the copy goes on fails the job, though the last flush works', async (t) => {
  // The target is flushed during the copy as well as before BLOCK_JOB_COMPLETED. A failed flush's
  // error is reported once (fsync), so one that failed during the copy must fail the job even when
  // the final flush succeeds: here the first flush after the target's first allocation fails, once.
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0', [[0x5a, 0, 64 * MiB]]);
  const file = path.join(h.dir, 'flaky.qcow2');
  await h.qimg(['create', '-f', 'qcow2', file, '64M']);
  await h.w.ok('blockdev-add', {
    driver: 'qcow2',
    'node-name': 'flaky',
    file: {
      driver: 'blkdebug',
      image: { driver: 'file', filename: file },
      'set-state': [{ event: 'cluster_alloc', state: 1, new_state: 2 }],
      'inject-error': [{ event: 'flush_to_os', iotype: 'flush', errno: 5, state: 2, once: true }],
    },
  });
  const from = h.w.messages.length;
  await h.w.ok('blockdev-backup', { 'job-id': 'bk', device: 'drive0', target: 'flaky', sync: 'full' });
  t.notOk(await h.waitBackup('bk', from), 'the job failed');
  // Nothing else failed: the same backup into a fresh target works and equals the drive.
  const good = path.join(h.dir, 'good.qcow2');
  t.ok(await h.backup({ 'job-id': 'bk2', device: 'drive0', sync: 'full', format: 'qcow2', target: good }), 'a backup into a good target');
  t.equal((await run('qemu-img', ['compare', '-U', good, d.file])).code, 0, 'which equals the drive');
});
