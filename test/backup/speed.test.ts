/**
 * The speed limit of backup jobs, as QEMU's: `speed` (bytes/s) holds over
 * the whole job at any value, block-job-set-speed applies at once, and
 * cancel / pause / resume wake a job asleep under the limit, with offset and
 * len in events and query-block-jobs telling what was really copied.
 *
 * No timing assertions: a job limited to 1 byte/s copies one chunk and then
 * sleeps for hours, so a verb that did not wake it would never be answered
 * (the wait below is bounded and fails); and the 100 KiB/s case checks an
 * upper bound on the bytes copied given the time the test itself measured,
 * which a slow machine only makes easier to meet.
 */
import t, { type Test } from 'tap';
import path from 'node:path';
import { Harness, MiB } from '../helpers/backup.js';
import { requireTool, run } from '../helpers/tools.js';

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io']) requireTool(t, tool);
});

const CLUSTER = 64 * 1024;

/** 64 scattered 64 KiB writes (4 MiB dirty, no two clusters adjacent). */
const SCATTERED: Array<[number, string, string]> = Array.from({ length: 64 }, (_, i) => [0x10 + (i % 200), String(i * 512 * 1024), '64k']);

async function jobInfo(h: Harness, id: string): Promise<Record<string, unknown> | undefined> {
  const jobs = (await h.w.ok('query-block-jobs')) as Array<Record<string, unknown>>;
  return jobs.find((j) => j.device === id);
}

async function setUp(t: Test): Promise<{ h: Harness; target: string }> {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0', []);
  const b = await h.addBitmap('bitmap0', d);
  await h.anchor(d);
  await h.writes(d, SCATTERED);
  const target = await h.prepare(b);
  return { h, target };
}

t.test('speed=1: one chunk, then the job sleeps; set-speed 0 finishes it at once', async (t) => {
  const { h, target } = await setUp(t);
  const from = h.w.messages.length;
  await h.w.ok('drive-backup', { 'job-id': 'drive0', device: 'drive0', sync: 'incremental', bitmap: 'bitmap0', format: 'qcow2', target, mode: 'existing', speed: 1 });
  await new Promise((r) => setTimeout(r, 1000));
  const info = (await jobInfo(h, 'drive0'))!;
  t.match(info, { len: 4 * MiB, speed: 1, status: 'running' }, 'the job runs, 4 MiB to copy');
  t.equal(info.offset, CLUSTER, 'after a second at 1 byte/s exactly one chunk (one 64 KiB cluster) was copied');
  await h.w.ok('block-job-set-speed', { device: 'drive0', speed: 0 });
  t.ok(await h.waitBackup('drive0', from), 'without a limit the job finishes (it was woken, not left asleep)');
  await h.reference(h.bitmaps[0]);
  await h.checkBackups();
});

t.test('cancel wakes a sleeping job; BLOCK_JOB_CANCELLED tells what was copied', async (t) => {
  const { h, target } = await setUp(t);
  const from = h.w.messages.length;
  await h.w.ok('drive-backup', { 'job-id': 'drive0', device: 'drive0', sync: 'incremental', bitmap: 'bitmap0', format: 'qcow2', target, mode: 'existing', speed: 1 });
  await new Promise((r) => setTimeout(r, 300));
  await h.w.ok('block-job-cancel', { device: 'drive0' });
  const ev = await h.w.waitFor((m) => m.event === 'BLOCK_JOB_CANCELLED', 10_000, from);
  t.same(ev.data, { type: 'backup', device: 'drive0', len: 4 * MiB, offset: CLUSTER, speed: 1 }, 'cancelled with offset = the one chunk copied');
  t.match(await h.bitmapInfo(h.drives[0], 'bitmap0'), { count: 4 * MiB, busy: false }, 'the bitmap keeps every bit');
  await h.noJobs();
});

t.test('pause and resume wake a sleeping job; a lower speed applies at once', async (t) => {
  const { h, target } = await setUp(t);
  const from = h.w.messages.length;
  await h.w.ok('drive-backup', { 'job-id': 'drive0', device: 'drive0', sync: 'incremental', bitmap: 'bitmap0', format: 'qcow2', target, mode: 'existing', speed: 1 });
  await new Promise((r) => setTimeout(r, 300));
  await h.w.ok('block-job-pause', { device: 'drive0' });
  await h.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'paused', 10_000, from);
  t.match(await jobInfo(h, 'drive0'), { paused: true, status: 'paused', offset: CLUSTER }, 'paused at once, one chunk copied');
  // A new speed while paused is taken as the job resumes.
  await h.w.ok('block-job-set-speed', { device: 'drive0', speed: 0 });
  await h.w.ok('block-job-resume', { device: 'drive0' });
  await h.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'running', 10_000, from);
  const done = await h.w.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED', 30_000, from);
  t.same(done.data, { type: 'backup', device: 'drive0', len: 4 * MiB, offset: 4 * MiB, speed: 0 }, 'completed: offset == len');
  await h.reference(h.bitmaps[0]);
  await h.checkBackups();
});

t.test('100 KiB/s holds: the bytes copied never run ahead of the time taken', async (t) => {
  const { h, target } = await setUp(t);
  const speed = 100 * 1024;
  const from = h.w.messages.length;
  const started = performance.now();
  await h.w.ok('drive-backup', { 'job-id': 'drive0', device: 'drive0', sync: 'incremental', bitmap: 'bitmap0', format: 'qcow2', target, mode: 'existing', speed });
  let samples = 0;
  let last = 0;
  while (performance.now() - started < 2500) {
    await new Promise((r) => setTimeout(r, 100));
    const info = await jobInfo(h, 'drive0');
    if (!info) break;
    const elapsed = (performance.now() - started) / 1000;
    // QEMU's limiter lets one chunk go, then stretches the slice to what it cost: after any
    // elapsed time at most one chunk more than the speed allows has been copied.
    const allowed = speed * elapsed + CLUSTER;
    t.ok((info.offset as number) <= allowed, `at ${elapsed.toFixed(2)} s: ${info.offset} bytes <= ${Math.round(allowed)}`);
    t.ok((info.offset as number) >= last, 'offset never goes back');
    last = info.offset as number;
    samples++;
  }
  t.ok(samples >= 5, `sampled ${samples} times while the job ran`);
  t.ok(last > CLUSTER, `the job makes progress under the limit (${last} bytes)`);
  await h.w.ok('block-job-set-speed', { device: 'drive0', speed: 0 });
  t.ok(await h.waitBackup('drive0', from), 'finishes once unlimited');
  const cmp = await run('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', target, h.drives[0].file]);
  t.equal(cmp.code, 0, `the backup chain equals the drive: ${cmp.stdout.trim()}`);
});

t.test('sync=none waits without polling and is cancelled at once', async (t) => {
  const h = new Harness(t);
  await h.start();
  const d = await h.addDrive('drive0');
  const target = path.join(h.dir, 'none.qcow2');
  await h.qimg(['create', '-f', 'qcow2', '-b', d.file, '-F', 'qcow2', target]);
  const from = h.w.messages.length;
  await h.w.ok('drive-backup', { 'job-id': 'fleece', device: 'drive0', sync: 'none', format: 'qcow2', target, mode: 'existing' });
  await h.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.status === 'running', 10_000, from);
  await h.w.ok('block-job-cancel', { device: 'fleece' });
  const ev = await h.w.waitFor((m) => m.event === 'BLOCK_JOB_CANCELLED', 10_000, from);
  t.match(ev.data, { device: 'fleece', offset: 0 }, 'cancelled; nothing was copied');
});
