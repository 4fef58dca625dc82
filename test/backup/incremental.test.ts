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
import { startDaemon } from '../helpers/daemon.js';
import { type QmpMessage, QmpWire } from '../helpers/qmp.js';
import { patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

interface Drive {
  id: string;
  file: string;
  nbd: string;
}

/** 124's Bitmap: a name on a drive and its chain of (incremental, reference) backups. */
class Bitmap {
  backups: Array<[string, string]> = [];
  private n = 0;
  constructor(
    readonly name: string,
    readonly drive: Drive,
    private readonly dir: string,
  ) {}
  newTarget(): [string, string] {
    const i = this.n++;
    const pair: [string, string] = [path.join(this.dir, `${this.drive.id}.${this.name}.${i}.inc.qcow2`), path.join(this.dir, `${this.drive.id}.${this.name}.${i}.ref.qcow2`)];
    this.backups.push(pair);
    return pair;
  }
  /** The newest incremental, or the drive's full backup (124's base_target). */
  lastTarget(): [string, string] {
    return this.backups[this.backups.length - 1] ?? [path.join(this.dir, `${this.drive.id}.full.qcow2`), ''];
  }
  delTarget(): void {
    for (const f of this.backups.pop() ?? []) fs.rmSync(f, { force: true });
    this.n--;
  }
}

class Harness {
  w!: QmpWire;
  dir!: string;
  drives: Drive[] = [];
  bitmaps: Bitmap[] = [];
  private nbdStarted = false;

  constructor(private readonly t: Test) {}

  async start(): Promise<void> {
    this.dir = tempDir(this.t);
    const sock = path.join(this.dir, 'qmp.sock');
    await startDaemon(this.t, { dir: this.dir, nbdServer: false, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn'] });
    this.w = await QmpWire.connect(sock);
    this.t.teardown(() => this.w.close());
  }

  async qimg(args: string[]): Promise<void> {
    const r = await run('qemu-img', args);
    if (r.code !== 0) throw new Error(`qemu-img ${args.join(' ')}: ${r.stderr}`);
  }

  /** A 64 MiB qcow2 drive with 124's default pattern, added and exported over NBD. */
  async addDrive(
    id: string,
    patterns: Array<[number, number, number]> = [[0x41, 0, 512], [0xd5, MiB, 32 * 1024], [0xdc, 32 * MiB, 124 * 1024]],
    blkdebug = false,
  ): Promise<Drive> {
    const file = path.join(this.dir, `${id}.qcow2`);
    await this.qimg(['create', '-f', 'qcow2', file, '64M']);
    const io = patterns.flatMap(([p, off, len]) => ['-c', `write -P ${p} ${off} ${len}`]);
    const r = await run('qemu-io', ['-f', 'qcow2', ...io, file]);
    if (r.code !== 0) throw new Error(r.stderr);
    const plain = { driver: 'file', filename: file };
    // 124's rules: after the first flush that follows a write, the next guest-data read fails once.
    const debug = {
      driver: 'blkdebug',
      image: plain,
      'set-state': [{ event: 'flush_to_disk', state: 1, new_state: 2 }],
      'inject-error': [{ event: 'read_aio', errno: 5, state: 2, immediately: false, once: true }],
    };
    await this.w.ok('blockdev-add', { driver: 'qcow2', 'node-name': id, file: blkdebug ? debug : plain });
    const nbd = path.join(this.dir, 'nbd.sock');
    if (!this.nbdStarted) {
      await this.w.ok('nbd-server-start', { addr: { type: 'unix', data: { path: nbd } } });
      this.nbdStarted = true;
    }
    await this.w.ok('block-export-add', { type: 'nbd', id: `e-${id}`, 'node-name': id, writable: true });
    const d = { id, file, nbd };
    this.drives.push(d);
    return d;
  }

  /** Guest writes (qemu-io through the NBD export), then a flush, as 124's hmp_io_writes. */
  async writes(d: Drive, patterns: Array<[number, string, string]>): Promise<void> {
    const io = patterns.flatMap(([p, off, len]) => ['-c', `write -P ${p} ${off} ${len}`]);
    const r = await run('qemu-io', ['-f', 'raw', ...io, '-c', 'flush', `nbd+unix:///${d.id}?socket=${d.nbd}`]);
    if (r.code !== 0 || /failed/.test(r.stdout + r.stderr)) throw new Error(`writes failed: ${r.stdout}${r.stderr}`);
  }

  async addBitmap(name: string, d: Drive, args: Record<string, unknown> = {}): Promise<Bitmap> {
    await this.w.ok('block-dirty-bitmap-add', { node: d.id, name, ...args });
    const b = new Bitmap(name, d, this.dir);
    this.bitmaps.push(b);
    return b;
  }

  /** drive-backup and wait for its end; true when BLOCK_JOB_COMPLETED has no error. */
  async backup(args: Record<string, unknown>, error = 'Input/output error'): Promise<boolean> {
    const from = this.w.messages.length;
    await this.w.ok('drive-backup', args);
    return this.waitBackup(args['job-id'] as string ?? args.device as string, from, error);
  }

  async waitBackup(id: string, from: number, error = 'Input/output error'): Promise<boolean> {
    const ev = await this.w.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED' && m.data?.device === id, 60_000, from);
    if (ev.data?.error !== undefined) {
      this.t.equal(ev.data.error, error, `the job failed with '${error}'`);
      return false;
    }
    this.t.equal(ev.data?.offset, ev.data?.len, 'offset == len on success');
    await this.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.id === id && m.data?.status === 'null', 20_000, from);
    return true;
  }

  /** The anchor: a full backup that starts the chain of a bitmap (or of a drive). */
  async anchor(d: Drive): Promise<void> {
    const target = path.join(this.dir, `${d.id}.full.qcow2`);
    this.t.ok(await this.backup({ 'job-id': d.id, device: d.id, sync: 'full', format: 'qcow2', target }), 'anchor backup');
  }

  async prepare(bitmap: Bitmap, parent?: string, extra: string[] = []): Promise<string> {
    parent ??= bitmap.lastTarget()[0];
    const [target] = bitmap.newTarget();
    await this.qimg(['create', '-f', 'qcow2', ...extra, '-b', parent, '-F', 'qcow2', target]);
    return target;
  }

  /** An incremental backup into a new overlay of the last target, then a reference full backup. */
  async incremental(bitmap: Bitmap, validate = true, target?: string): Promise<boolean> {
    target ??= await this.prepare(bitmap);
    const ok = await this.backup({ 'job-id': bitmap.drive.id, device: bitmap.drive.id, sync: 'incremental', bitmap: bitmap.name, format: 'qcow2', target, mode: 'existing' });
    if (!ok) {
      bitmap.delTarget();
      this.t.notOk(validate, 'a failure was expected');
    } else {
      await this.reference(bitmap);
    }
    return ok;
  }

  async reference(bitmap: Bitmap): Promise<void> {
    const [, ref] = bitmap.lastTarget();
    this.t.ok(await this.backup({ 'job-id': bitmap.drive.id, device: bitmap.drive.id, sync: 'full', format: 'qcow2', target: ref }), 'reference backup');
  }

  /** 124's check_backups: every incremental equals its reference; the last equals the drive. */
  async checkBackups(): Promise<void> {
    for (const b of this.bitmaps) {
      for (const [inc, ref] of b.backups) {
        const r = await run('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', inc, ref]);
        this.t.equal(r.code, 0, `${path.basename(inc)} == ${path.basename(ref)}: ${r.stdout.trim()}`);
        const c = await run('qemu-img', ['check', '-U', inc]);
        this.t.equal(c.code, 0, `qemu-img check ${path.basename(inc)}`);
      }
      const last = b.lastTarget()[0];
      const r = await run('qemu-img', ['compare', '-U', '-f', 'qcow2', '-F', 'qcow2', last, b.drive.file]);
      this.t.equal(r.code, 0, `the last backup of ${b.name} equals ${b.drive.id}: ${r.stdout.trim()}`);
    }
  }

  async bitmapInfo(d: Drive, name: string): Promise<Record<string, unknown> | undefined> {
    const nodes = (await this.w.ok('query-named-block-nodes')) as Array<Record<string, unknown>>;
    const list = nodes.find((n) => n['node-name'] === d.id)?.['dirty-bitmaps'] as Array<Record<string, unknown>> | undefined;
    return list?.find((b) => b.name === name);
  }

  async noJobs(): Promise<void> {
    this.t.same(await this.w.ok('query-block-jobs'), [], 'no active block jobs');
  }
}

const WRITES1: Array<[number, string, string]> = [
  [0xab, '0', '512'],
  [0xfe, '16M', '256k'],
  [0x64, '32736k', '64k'],
];
const WRITES2: Array<[number, string, string]> = [
  [0x9a, '0', '512'],
  [0x55, '8M', '352k'],
  [0x78, '15872k', '1M'],
];

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
  await h.writes(d, WRITES2);
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

  // A slow incremental (speed limit), cancelled: the bitmap keeps its bits and gets the new writes.
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
    ['BLOCK_JOB_CANCELLED', { type: 'backup', device: 'drive0', len: 458752, offset: (events(from).find((e) => e[0] === 'BLOCK_JOB_CANCELLED')?.[1] as { offset: number })?.offset, speed: 1 }],
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
  await h.writes(d, WRITES2);
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
  await h.writes(d1, [[0xba, '0', '512'], [0xef, '16M', '256k'], [0x46, '32736k', '64k']]);
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
