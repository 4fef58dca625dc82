/**
 * A harness for backup tests after QEMU's iotest 124: a vdisk daemon with a
 * QMP socket, qcow2 drives exported over NBD (guest writes come from qemu-io
 * over NBD or from human-monitor-command qemu-io), bitmaps with their chains
 * of incremental and reference backups, and 124's check_backups.
 */
import type { Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from './daemon.js';
import { QmpWire } from './qmp.js';
import { run, tempDir } from './tools.js';

export const MiB = 1024 * 1024;

export interface Drive {
  id: string;
  file: string;
  nbd: string;
}

/** 124's Bitmap: a name on a drive and its chain of (incremental, reference) backups. */
export class Bitmap {
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

export class Harness {
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

  /** The same writes through the monitor (124's hmp_io_writes): human-monitor-command qemu-io. */
  async hmpWrites(d: Drive, patterns: Array<[number, string, string]>): Promise<void> {
    for (const [p, off, len] of patterns) {
      const r = await this.w.ok('human-monitor-command', { 'command-line': `qemu-io ${d.id} "write -P ${p} ${off} ${len}"` });
      if (r !== '') throw new Error(`hmp write failed: ${String(r)}`);
    }
    await this.w.ok('human-monitor-command', { 'command-line': `qemu-io ${d.id} "flush"` });
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

export const WRITES1: Array<[number, string, string]> = [
  [0xab, '0', '512'],
  [0xfe, '16M', '256k'],
  [0x64, '32736k', '64k'],
];
export const WRITES2: Array<[number, string, string]> = [
  [0x9a, '0', '512'],
  [0x55, '8M', '352k'],
  [0x78, '15872k', '1M'],
];
