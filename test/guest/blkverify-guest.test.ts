/**
 * A real guest on a blkverify pair (issue 6): Debian's Linux kernel boots
 * under qemu-system-x86_64 (TCG, no KVM) with a small initramfs
 * (scripts/build-guest.sh; its /init is scripts/guest/init.sh), and its only
 * disk is a vdisk NBD export of a blkverify node whose test child is a qcow2
 * image and whose reference is a raw file, reached through QEMU's own NBD
 * client as a virtio-blk disk.
 *
 * First boot: the guest makes an ext4 filesystem with e2fsprogs, writes files
 * of random data, checksums them, syncs, unmounts, drops its caches, runs
 * e2fsck -fn, mounts again and checks every file; it must print
 * "VDISK-GUEST: PASS" and vdisk must report no mismatch. On the host
 * afterwards both children hold the same bytes (qemu-img compare), the qcow2
 * image is consistent (qemu-img check), and the reference is a clean
 * filesystem (e2fsck) whose files have the guest's checksums (debugfs).
 *
 * The disk has discard=unmap, so mke2fs's discard of the whole disk and its
 * zeroing reach blkverify as NBD TRIM and WRITE_ZEROES besides READ, WRITE and FLUSH.
 *
 * Then one sector inside a file's data is altered in the qcow2 image only
 * (qemu-io; every byte differs from the reference's), and a second boot
 * (read-only export, vdisk.mode=verify) runs e2fsck -fn and checks the files
 * again: the metadata agrees, the altered file's read fails with EIO in the
 * guest, every BLKVERIFY_MISMATCH event and log line points at exactly the
 * altered byte and sector, and the daemon keeps serving.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { guestAssets, runGuest, type Boot, type GuestAssets } from '../helpers/guest.js';
import { requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const DISK_SIZE = 64 * MiB;
/** One boot of the guest, at most (about 10 s on a 2-core machine under TCG). */
const BOOT_TIMEOUT_MS = 150_000;
/** The file whose data gets one altered sector before the second boot. */
const VICTIM = 'data/b';

t.before(() => {
  for (const tool of ['qemu-system-x86_64', 'qemu-img', 'qemu-io', 'debugfs', 'dumpe2fs', 'e2fsck', 'busybox', 'cpio']) requireTool(t, tool);
});

/** Boots the guest on an NBD export and waits for it to power off. */
function boot(guest: GuestAssets, nbdSocket: string, exportName: string, mode: 'full' | 'verify', readOnly: boolean, consoleFile: string): Promise<Boot> {
  return runGuest(
    [
      '-m', '256', '-smp', '1',
      '-kernel', guest.vmlinuz, '-initrd', guest.initramfs,
      '-append', `console=ttyS0 panic=-1 quiet loglevel=4 vdisk.mode=${mode}`,
      '-blockdev', `driver=nbd,node-name=disk0,server.type=unix,server.path=${nbdSocket},export=${exportName},read-only=${readOnly ? 'on' : 'off'},discard=unmap`,
      '-device', 'virtio-blk-pci,drive=disk0',
    ],
    consoleFile,
    BOOT_TIMEOUT_MS,
  );
}

function serveArgs(dir: string, raw: string, qcow: string, writable: boolean): string[] {
  return [
    '--qmp', `unix:${path.join(dir, 'qmp.sock')}`,
    '--blockdev', `driver=blkverify,node-name=v0,raw.driver=raw,raw.file.driver=file,raw.file.filename=${raw},test.driver=qcow2,test.file.driver=file,test.file.filename=${qcow}`,
    '--export', `type=nbd,id=v0,node-name=v0,writable=${writable ? 'on' : 'off'}`,
  ];
}

/** The daemon's JSON log records with the given message. */
function logRecords(d: DaemonHandle, message: string): Record<string, unknown>[] {
  return d
    .stderr()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((r) => r.message === message);
}

/** A file of the raw reference image, read by debugfs (no mount, no kernel). */
async function debugfsCat(image: string, file: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const child = spawn('debugfs', ['-R', `cat /${file}`, image], { stdio: ['ignore', 'pipe', 'ignore'] });
  child.stdout.on('data', (d: Buffer) => chunks.push(d));
  await new Promise((resolve) => child.on('close', resolve));
  return Buffer.concat(chunks);
}

const sha256 = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

t.test('a Linux guest on a blkverify export: a clean run, then one altered sector caught', async (t) => {
  const guest = await guestAssets();
  const dir = tempDir(t, 'vdisk-guest-');
  const raw = path.join(dir, 'raw.img');
  const qcow = path.join(dir, 'test.qcow2');
  fs.closeSync(fs.openSync(raw, 'w'));
  fs.truncateSync(raw, DISK_SIZE);
  const created = await run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, String(DISK_SIZE)]);
  t.equal(created.code, 0, 'qemu-img create -f qcow2', { stderr: created.stderr });

  let manifest = '';
  let altered = -1;

  await t.test('first boot: mkfs.ext4, write, checksum, fsck, read back: PASS, no mismatch', async (t) => {
    const run1 = path.join(dir, 'run1');
    fs.mkdirSync(run1);
    const d = await startDaemon(t, { dir: run1, args: serveArgs(run1, raw, qcow, true) });
    const w = await QmpWire.connect(path.join(run1, 'qmp.sock'));
    t.teardown(() => w.close());

    const started = Date.now();
    const b = await boot(guest, d.socket, 'v0', 'full', false, path.join(run1, 'console.txt'));
    t.comment(`first boot took ${((Date.now() - started) / 1000).toFixed(1)} s`);
    t.equal(b.signal, null, `QEMU ended by itself within ${BOOT_TIMEOUT_MS / 1000} s`, { console: b.console });
    t.equal(b.code, 0, 'QEMU exited with 0 (the guest powered off)', { console: b.console });
    t.equal(b.verdict, 'PASS', `the guest's verdict: ${b.verdicts.join(' | ') || 'none'}`, { console: b.console });
    t.match(b.console, /^mke2fs 1\.\d+/m, "the filesystem was made by e2fsprogs' mke2fs");
    t.match(b.console, /VDISK-GUEST: e2fsck -fn: clean/, 'e2fsck -fn found it clean');
    t.match(b.console, /VDISK-GUEST: sha256sum -c: 15 files OK/, 'every file read back with its checksum');
    t.notMatch(b.console, /^VDISK-GUEST: kernel: /m, "the guest's kernel logged no I/O or filesystem error");

    // A reply after the guest is gone: every event sent before it has arrived.
    await w.ok('query-version');
    t.same(w.events('BLKVERIFY_MISMATCH'), [], 'no BLKVERIFY_MISMATCH event');
    t.same(logRecords(d, 'blkverify-mismatch'), [], 'no mismatch in the log');
    t.notMatch(d.stderr(), /contents mismatch|return value mismatch/, 'no mismatch line at all');
    t.equal(await d.stop(), 0, 'the daemon stops cleanly');

    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, qcow]);
    t.equal(cmp.code, 0, 'qemu-img compare: the reference and the qcow2 image hold the same bytes', { output: cmp.stdout + cmp.stderr });
    const check = await run('qemu-img', ['check', qcow]);
    t.equal(check.code, 0, 'qemu-img check: the qcow2 image is consistent', { output: check.stdout + check.stderr });
    const fsck = await run('e2fsck', ['-fn', raw]);
    t.equal(fsck.code, 0, 'e2fsck -fn on the host: the reference is a clean filesystem', { output: fsck.stdout + fsck.stderr });

    manifest = (await debugfsCat(raw, 'MANIFEST')).toString('utf8');
    const entries = manifest.trim().split('\n').map((l) => l.split(/\s+/));
    t.equal(entries.length, 15, "the guest's manifest names 15 files");
    for (const [sum, file] of entries) t.equal(sha256(await debugfsCat(raw, file)), sum, `${file} on the host has the guest's checksum`);
  });

  await t.test('one sector of a file altered in the qcow2 image only', async (t) => {
    t.ok(manifest.includes(VICTIM), `${VICTIM} was written by the first boot`);
    const dump = await run('dumpe2fs', ['-h', raw]);
    const blockSize = Number(/^Block size:\s+(\d+)/m.exec(dump.stdout)?.[1]);
    t.ok(blockSize >= 1024, `block size ${blockSize}`);
    const size = (await debugfsCat(raw, VICTIM)).length;
    const logical = Math.floor(size / blockSize / 2);
    const bmap = await run('debugfs', ['-R', `bmap /${VICTIM} ${logical}`, raw]);
    const physical = Number(bmap.stdout.trim());
    t.ok(physical > 0, `block ${logical} of ${VICTIM} is block ${physical} of the disk`);
    // The second sector of that block (not block-aligned, so the report must find the exact byte).
    altered = physical * blockSize + 512;
    const fd = fs.openSync(raw, 'r');
    const orig = Buffer.alloc(512);
    fs.readSync(fd, orig, 0, 512, altered);
    fs.closeSync(fd);
    const pattern = orig[0] ^ 0xff;
    const io = await run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${pattern.toString(16)} ${altered} 512`, qcow]);
    t.equal(io.code, 0, `qemu-io: write -P 0x${pattern.toString(16)} ${altered} 512`, { output: io.stdout + io.stderr });
    t.notMatch(io.stdout, /failed/, 'the write did not fail');
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, qcow]);
    t.equal(cmp.code, 1, 'qemu-img compare now finds a difference');
    t.match(cmp.stdout, `Content mismatch at offset ${altered}!`, `at byte ${altered} (sector ${altered / 512}), and nowhere before`);
  });

  await t.test('second boot (read-only, verify): fsck clean, the altered file fails with EIO, the mismatch is reported at that sector', async (t) => {
    t.ok(altered > 0, 'a sector was altered');
    const run2 = path.join(dir, 'run2');
    fs.mkdirSync(run2);
    const d = await startDaemon(t, { dir: run2, args: serveArgs(run2, raw, qcow, false) });
    const w = await QmpWire.connect(path.join(run2, 'qmp.sock'));
    t.teardown(() => w.close());

    const started = Date.now();
    const b = await boot(guest, d.socket, 'v0', 'verify', true, path.join(run2, 'console.txt'));
    t.comment(`second boot took ${((Date.now() - started) / 1000).toFixed(1)} s`);
    t.equal(b.signal, null, `QEMU ended by itself within ${BOOT_TIMEOUT_MS / 1000} s`, { console: b.console });
    t.equal(b.code, 0, 'QEMU exited with 0 (the guest powered off)', { console: b.console });
    t.match(b.console, /VDISK-GUEST: disk \/dev\/vda: \d+ sectors, ro=1/, 'the guest sees a read-only disk');
    t.match(b.console, /VDISK-GUEST: e2fsck -fn: clean/, 'the metadata still agrees: e2fsck -fn is clean');
    t.match(b.verdict ?? '', /^FAIL sha256sum -c exited with 1: /, `the guest's verdict is FAIL: ${b.verdicts.join(' | ') || 'none'}`, { console: b.console });
    t.match(b.console, new RegExp(`^sha256sum: can't read '${VICTIM}': Input/output error$`, 'm'), `the guest read ${VICTIM} and got EIO`);
    t.match(b.console, new RegExp(`^${VICTIM}: FAILED$`, 'm'), `${VICTIM} failed its check`);
    const ok = b.console.split('\n').filter((l) => /^data\/\S+: OK$/.test(l));
    t.equal(ok.length, 14, 'every other file read back with its checksum', { console: b.console });
    t.match(b.console, /^VDISK-GUEST: kernel: .*I\/O error, dev vda, sector \d+/m, "the guest's kernel logged the I/O error");

    const first = await w.waitFor((m) => m.event === 'BLKVERIFY_MISMATCH');
    await w.ok('query-version');
    const events = w.events('BLKVERIFY_MISMATCH');
    t.comment(`BLKVERIFY_MISMATCH: ${JSON.stringify(first.data)}`);
    t.ok(events.length >= 1, `${events.length} BLKVERIFY_MISMATCH event(s)`);
    for (const ev of events) {
      const data = ev.data as Record<string, number | string>;
      t.match(data, { 'node-name': 'v0', operation: 'read', action: 'eio', 'mismatch-offset': altered, sector: altered / 512 }, `event at ${data.offset}+${data.bytes} names byte ${altered}, sector ${altered / 512}`);
      t.ok(Number(data.offset) <= altered && altered < Number(data.offset) + Number(data.bytes), 'the read covered the altered sector');
      t.not(data['test-sha256'], data['raw-sha256'], 'with differing hashes');
    }
    const logged = logRecords(d, 'blkverify-mismatch');
    t.equal(logged.length, events.length, 'one log record per event');
    for (const rec of logged) t.match(String(rec.line), new RegExp(`^blkverify: read offset=\\d+ bytes=\\d+ contents mismatch at offset ${altered}$`), `log: ${rec.line}`);
    t.equal(d.proc.exitCode, null, 'the daemon is still running');
    t.equal(await d.stop(), 0, 'and stops cleanly');
  });
});
