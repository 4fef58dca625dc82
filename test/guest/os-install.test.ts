/**
 * An OS install under blkverify, booted through the BIOS, and the installed
 * image booted through a FUSE export (issue 12). Everything runs under
 * qemu-system-x86_64 with TCG; the commands are the ones
 * docs/uses-os-install.md gives users.
 *
 * Install: the guest of test/guest/blkverify-guest.test.ts (Debian's kernel,
 * -kernel/-initrd, vdisk.mode=install) gets two virtio disks: a vdisk NBD
 * export of a blkverify pair (qcow2 under test, raw reference) reached
 * through QEMU's NBD client, and the install media
 * (scripts/build-install-media.sh) read-only. Its installer partitions the
 * disk with Debian's sfdisk, makes ext4, unpacks a small Debian system
 * (busybox-static, libc6, fdisk, extlinux, the kernel), makes an initrd,
 * installs extlinux and syslinux's MBR, writes the checksums of every file
 * and powers off. No mismatch; both children hold the same bytes.
 *
 * BIOS boot: a second VM with no -kernel boots from the same export
 * (SeaBIOS -> MBR -> extlinux -> kernel and initrd -> the installed
 * /sbin/init), which writes a line to /var/log/vdisk-boots, checks every
 * installed file and reports PASS. No mismatch.
 *
 * One sector inside an installed file (/usr/bin/extlinux, which no boot
 * runs) is then altered in the qcow2 image only. A boot on a read-only
 * export with mismatch-action=eio: the guest still boots, its check of that
 * file fails with EIO (never wrong data), and every BLKVERIFY_MISMATCH event
 * and log record names exactly the altered byte and sector. With
 * mismatch-action=log the guest reads the reference's data (PASS) and the
 * same mismatch is reported.
 *
 * FUSE: a qcow2 overlay whose backing file is the installed raw reference,
 * exported by vdisk as a FUSE file; qemu-system-x86_64 boots it through the
 * BIOS from `-drive file=MOUNTPOINT,format=raw,if=virtio`. The guest's write
 * lands in the overlay; the backing file is unchanged.
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { guestAssets, installMedia, runGuest, type Boot } from '../helpers/guest.js';
import { requireTool, run, tempDir, readAt } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const DISK_SIZE = 128 * MiB;
/** One boot at most (the install takes about 20 s, a BIOS boot about 10 s, on an idle 2-core machine). */
const BOOT_TIMEOUT_MS = 240_000;
/** The installed file that gets one altered sector: nothing runs it at boot, the check reads it. */
const VICTIM = 'usr/bin/extlinux';

// Five boots and the asset builds (a first build downloads packages): above tap's 300 s per file.
t.setTimeout(900_000);

t.before(() => {
  for (const tool of ['qemu-system-x86_64', 'qemu-img', 'qemu-io', 'debugfs', 'dumpe2fs', 'e2fsck', 'busybox', 'cpio']) requireTool(t, tool);
});

const sha256 = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

/** The daemon's JSON log records with the given message. */
function logRecords(d: DaemonHandle, message: string): Record<string, unknown>[] {
  return d
    .stderr()
    .split('\n')
    .filter((l) => l.startsWith('{'))
    .map((l) => JSON.parse(l) as Record<string, unknown>)
    .filter((r) => r.message === message);
}

/** A file of an ext4 filesystem at `offset` in a raw image, read by debugfs (no mount, no kernel). */
async function debugfsCat(image: string, offset: number, file: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const child = spawn('debugfs', ['-R', `cat /${file}`, `${image}?offset=${offset}`], { stdio: ['ignore', 'pipe', 'ignore'] });
  child.stdout.on('data', (d: Buffer) => chunks.push(d));
  await new Promise((resolve) => child.on('close', resolve));
  return Buffer.concat(chunks);
}

function blkverifyArgs(dir: string, raw: string, qcow: string, writable: boolean, mismatchAction?: string): string[] {
  const action = mismatchAction ? `,mismatch-action=${mismatchAction}` : '';
  return [
    '--qmp', `unix:${path.join(dir, 'qmp.sock')}`,
    '--blockdev', `driver=blkverify,node-name=v0,raw.driver=raw,raw.file.driver=file,raw.file.filename=${raw},test.driver=qcow2,test.file.driver=file,test.file.filename=${qcow}${action}`,
    '--export', `type=nbd,id=v0,node-name=v0,writable=${writable ? 'on' : 'off'}`,
  ];
}

/** The disk as QEMU's NBD client on the daemon's export, a virtio-blk disk the BIOS boots first. */
function nbdDisk(socket: string, readOnly: boolean, bootindex = true): string[] {
  return [
    '-blockdev', `driver=nbd,node-name=disk0,server.type=unix,server.path=${socket},export=v0,read-only=${readOnly ? 'on' : 'off'},discard=unmap`,
    '-device', `virtio-blk-pci,drive=disk0${bootindex ? ',bootindex=1' : ''}`,
  ];
}

function checkBoot(t: Test, b: Boot, what: string): void {
  t.equal(b.signal, null, `${what}: QEMU ended by itself within ${BOOT_TIMEOUT_MS / 1000} s`, { console: b.console });
  t.equal(b.code, 0, `${what}: QEMU exited with 0 (the guest powered off)`, { console: b.console });
}

/** Asserts a boot of the installed system through the BIOS up to its init. */
function checkBiosBoot(t: Test, b: Boot): void {
  t.match(b.console, /^SYSLINUX 6\.04 /m, 'SeaBIOS ran the MBR, which started extlinux');
  t.match(b.console, /^VDISK-GUEST: initrd: kernel \S+, root=UUID=[0-9a-f-]+$/m, "extlinux loaded the kernel and the installed initrd, with the installer's root=UUID=");
  t.match(b.console, /^VDISK-GUEST: initrd: mounted \/dev\/vda1 read-only, switch_root to its \/sbin\/init$/m, 'the initrd found the root partition');
  t.match(b.console, /^VDISK-GUEST: installed system up: kernel \S+, root \/dev\/vda1, vdisk installed system/m, "the installed system's init runs");
  t.match(b.console, /^VDISK-GUEST: packages: .*busybox-static=.*extlinux=.*libc6=/m, 'with its packages in /var/lib/dpkg/status');
}

t.test('an OS install under blkverify, booted through the BIOS and through FUSE', async (t) => {
  // One after the other: on a fresh machine both would fetch the kernel package.
  const guest = await guestAssets();
  const media = await installMedia();
  const dir = tempDir(t, 'vdisk-os-install-');
  const raw = path.join(dir, 'reference.img');
  const qcow = path.join(dir, 'test.qcow2');
  fs.closeSync(fs.openSync(raw, 'w'));
  fs.truncateSync(raw, DISK_SIZE);
  const created = await run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, String(DISK_SIZE)]);
  t.equal(created.code, 0, 'qemu-img create -f qcow2', { stderr: created.stderr });

  /** Where the root partition starts on the disk (from the MBR the installer wrote). */
  let partStart = 0;
  let files = 0;
  let altered = -1;
  const timings: string[] = [];

  /** Boots with the daemon serving the blkverify pair; returns the boot, its events and the daemon. */
  async function bootOnBlkverify(name: string, qemuArgs: (socket: string) => string[], writable: boolean, mismatchAction?: string) {
    const runDir = path.join(dir, name);
    fs.mkdirSync(runDir);
    const d = await startDaemon(t, { dir: runDir, args: blkverifyArgs(runDir, raw, qcow, writable, mismatchAction) });
    const w = await QmpWire.connect(path.join(runDir, 'qmp.sock'));
    const started = Date.now();
    const b = await runGuest(['-m', '512', '-smp', '1', ...qemuArgs(d.socket)], path.join(runDir, 'console.txt'), BOOT_TIMEOUT_MS);
    timings.push(`${name} ${((Date.now() - started) / 1000).toFixed(1)} s`);
    // A reply after the guest is gone: every event sent before it has arrived.
    await w.ok('query-version');
    const events = w.events('BLKVERIFY_MISMATCH');
    w.close();
    return { b, d, events };
  }

  await t.test('install: sfdisk, mkfs.ext4, the packages, an initrd, extlinux and its MBR; no mismatch', async (t) => {
    const { b, d, events } = await bootOnBlkverify(
      'install',
      (socket) => [
        '-kernel', guest.vmlinuz, '-initrd', guest.initramfs,
        '-append', 'console=ttyS0 panic=-1 quiet loglevel=4 vdisk.mode=install',
        ...nbdDisk(socket, false, false),
        '-blockdev', `driver=file,node-name=media0,filename=${media},read-only=on`,
        '-device', 'virtio-blk-pci,drive=media0',
      ],
      true,
    );
    checkBoot(t, b, 'install');
    t.equal(b.verdict, 'PASS', `the installer's verdict: ${b.verdicts.join(' | ') || 'none'}`, { console: b.console });
    t.match(b.console, /^VDISK-GUEST: install: sfdisk: \/dev\/vda1 : start= +2048, size= +\d+, type=83, bootable$/m, 'sfdisk made one bootable Linux partition');
    t.match(b.console, /^VDISK-GUEST: install: mke2fs -t ext4 \/dev\/vda1: UUID /m, 'mke2fs made ext4 on it');
    t.match(b.console, /^VDISK-GUEST: install: extlinux --install \/boot\/extlinux; mbr\.bin on \/dev\/vda$/m, 'extlinux and the MBR were installed');
    t.match(b.console, /^\/boot\/extlinux is device \/dev\/vda1$/m, "in extlinux's words");
    t.notMatch(b.console, /^VDISK-GUEST: kernel: /m, "the guest's kernel logged no I/O or filesystem error");
    t.same(events, [], 'no BLKVERIFY_MISMATCH event');
    t.same(logRecords(d, 'blkverify-mismatch'), [], 'no mismatch in the log');
    t.equal(await d.stop(), 0, 'the daemon stops cleanly');

    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, qcow]);
    t.equal(cmp.code, 0, 'qemu-img compare: the reference and the qcow2 image hold the same bytes', { output: cmp.stdout + cmp.stderr });
    const check = await run('qemu-img', ['check', qcow]);
    t.equal(check.code, 0, 'qemu-img check: the qcow2 image is consistent', { output: check.stdout + check.stderr });

    // The MBR: syslinux's boot code, one bootable Linux partition at 1 MiB, the boot signature.
    const mbr = readAt(raw, 0, 512);
    t.equal(mbr.readUInt16LE(510), 0xaa55, 'the MBR has the boot signature');
    t.equal(mbr[446], 0x80, 'partition 1 is bootable');
    t.equal(mbr[446 + 4], 0x83, 'partition 1 is a Linux partition');
    partStart = mbr.readUInt32LE(446 + 8) * 512;
    t.equal(partStart, MiB, 'partition 1 starts at 1 MiB');
    const fsck = await run('e2fsck', ['-fn', `${raw}?offset=${partStart}`]);
    t.equal(fsck.code, 0, 'e2fsck -fn on the host: the root partition is a clean filesystem', { output: fsck.stdout + fsck.stderr });
    const mbrBin = await debugfsCat(raw, partStart, 'usr/lib/syslinux/mbr/mbr.bin');
    t.equal(mbrBin.length, 440, "syslinux-common's mbr.bin is installed");
    t.ok(mbr.subarray(0, 440).equals(mbrBin), 'the boot code in the MBR is mbr.bin');
    const conf = (await debugfsCat(raw, partStart, 'boot/extlinux/extlinux.conf')).toString('utf8');
    t.match(conf, /^\s*KERNEL \/boot\/vmlinuz-\S+$/m, 'extlinux.conf names the kernel');
    t.ok((await debugfsCat(raw, partStart, 'boot/extlinux/ldlinux.sys')).length > 0, 'ldlinux.sys is in /boot/extlinux');
    const manifest = (await debugfsCat(raw, partStart, 'var/lib/vdisk/MANIFEST')).toString('utf8');
    files = manifest.trim().split('\n').length;
    t.ok(files > 100, `the manifest names ${files} installed files`);
    t.match(manifest, new RegExp(`^[0-9a-f]{64}  \\./${VICTIM}$`, 'm'), `among them ${VICTIM}`);
    t.match(manifest, /  \.\/lib\/x86_64-linux-gnu\/libc\.so\.6$/m, 'and libc6');
  });

  await t.test('BIOS boot (no -kernel) of the installed disk on the blkverify export: PASS, no mismatch', async (t) => {
    t.ok(partStart > 0, 'the install made a partition');
    const { b, d, events } = await bootOnBlkverify('bios', (socket) => nbdDisk(socket, false), true);
    checkBoot(t, b, 'BIOS boot');
    checkBiosBoot(t, b);
    t.equal(b.verdict, 'PASS', `the installed system's verdict: ${b.verdicts.join(' | ') || 'none'}`, { console: b.console });
    t.match(b.console, /^VDISK-GUEST: wrote \/var\/log\/vdisk-boots: 1 boot\(s\)$/m, 'it wrote to the disk');
    t.match(b.console, new RegExp(`^VDISK-GUEST: sha256sum -c /var/lib/vdisk/MANIFEST: ${files} files OK$`, 'm'), 'every installed file has its checksum');
    t.notMatch(b.console, /^VDISK-GUEST: kernel: /m, "the guest's kernel logged no I/O or filesystem error");
    t.same(events, [], 'no BLKVERIFY_MISMATCH event');
    t.same(logRecords(d, 'blkverify-mismatch'), [], 'no mismatch in the log');
    t.equal(await d.stop(), 0, 'the daemon stops cleanly');
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, qcow]);
    t.equal(cmp.code, 0, 'qemu-img compare: the children still hold the same bytes', { output: cmp.stdout + cmp.stderr });
    t.match((await debugfsCat(raw, partStart, 'var/log/vdisk-boots')).toString('utf8'), /^boot \S+ kernel \S+\n$/, "the guest's line is in /var/log/vdisk-boots");
  });

  await t.test(`one sector of /${VICTIM} altered in the qcow2 image only`, async (t) => {
    const dump = await run('dumpe2fs', ['-h', `${raw}?offset=${partStart}`]);
    const blockSize = Number(/^Block size:\s+(\d+)/m.exec(dump.stdout)?.[1]);
    t.ok(blockSize >= 1024, `block size ${blockSize}`);
    const size = (await debugfsCat(raw, partStart, VICTIM)).length;
    t.ok(size > 4 * blockSize, `/${VICTIM} is ${size} bytes`);
    const logical = Math.floor(size / blockSize / 2);
    const bmap = await run('debugfs', ['-R', `bmap /${VICTIM} ${logical}`, `${raw}?offset=${partStart}`]);
    const physical = Number(bmap.stdout.trim());
    t.ok(physical > 0, `block ${logical} of /${VICTIM} is block ${physical} of the filesystem`);
    // The second sector of that block (not block-aligned: the report must find the exact byte).
    altered = partStart + physical * blockSize + 512;
    const pattern = readAt(raw, altered, 1)[0] ^ 0xff;
    const io = await run('qemu-io', ['-f', 'qcow2', '-c', `write -P 0x${pattern.toString(16)} ${altered} 512`, qcow]);
    t.equal(io.code, 0, `qemu-io: write -P 0x${pattern.toString(16)} ${altered} 512`, { output: io.stdout + io.stderr });
    t.notMatch(io.stdout, /failed/, 'the write did not fail');
    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, qcow]);
    t.equal(cmp.code, 1, 'qemu-img compare now finds a difference');
    t.match(cmp.stdout, `Content mismatch at offset ${altered}!`, `at byte ${altered} (sector ${altered / 512}), and nowhere before`);
  });

  /** Checks the events and log records of the altered sector's mismatch. */
  function checkMismatch(t: Test, d: DaemonHandle, events: { data?: unknown }[], action: string): void {
    t.ok(events.length >= 1, `${events.length} BLKVERIFY_MISMATCH event(s)`);
    for (const ev of events) {
      const data = ev.data as Record<string, number | string>;
      t.match(data, { 'node-name': 'v0', operation: 'read', action, 'mismatch-offset': altered, sector: altered / 512 }, `event at ${data.offset}+${data.bytes} names byte ${altered}, sector ${altered / 512}`);
      t.ok(Number(data.offset) <= altered && altered < Number(data.offset) + Number(data.bytes), 'the read covered the altered sector');
      t.not(data['test-sha256'], data['raw-sha256'], 'with differing hashes');
    }
    const logged = logRecords(d, 'blkverify-mismatch');
    t.equal(logged.length, events.length, 'one log record per event');
    for (const rec of logged) t.match(String(rec.line), new RegExp(`^blkverify: read offset=\\d+ bytes=\\d+ contents mismatch at offset ${altered}$`), `log: ${rec.line}`);
    t.equal(d.proc.exitCode, null, 'the daemon is still running');
  }

  await t.test('BIOS boot with mismatch-action=eio (read-only): the guest gets EIO for the altered file, the mismatch is reported at its sector', async (t) => {
    t.ok(altered > 0, 'a sector was altered');
    const { b, d, events } = await bootOnBlkverify('eio', (socket) => nbdDisk(socket, true), false, 'eio');
    checkBoot(t, b, 'BIOS boot');
    checkBiosBoot(t, b);
    t.match(b.console, /^VDISK-GUEST: vda is read-only: nothing written$/m, 'the guest sees a read-only disk');
    t.match(b.verdict ?? '', /^FAIL sha256sum -c exited with 1: /, `the installed system's verdict is FAIL: ${b.verdicts.join(' | ') || 'none'}`, { console: b.console });
    t.match(b.console, new RegExp(`^sha256sum: can't read '\\./${VICTIM}': Input/output error$`, 'm'), `the guest read /${VICTIM} and got EIO`);
    t.match(b.console, new RegExp(`^\\./${VICTIM}: FAILED$`, 'm'), `/${VICTIM} failed its check`);
    const failed = b.console.split('\n').filter((l) => /^\.\/\S+: FAILED$/.test(l));
    t.same(failed, [`./${VICTIM}: FAILED`], 'and no other file');
    t.match(b.console, /^VDISK-GUEST: kernel: .*I\/O error, dev vda, sector \d+/m, "the guest's kernel logged the I/O error");
    checkMismatch(t, d, events, 'eio');
    t.equal(await d.stop(), 0, 'the daemon stops cleanly');
  });

  await t.test('BIOS boot with mismatch-action=log (read-only): the guest reads the reference, PASS, the mismatch is reported', async (t) => {
    t.ok(altered > 0, 'a sector was altered');
    const { b, d, events } = await bootOnBlkverify('log', (socket) => nbdDisk(socket, true), false, 'log');
    checkBoot(t, b, 'BIOS boot');
    checkBiosBoot(t, b);
    t.equal(b.verdict, 'PASS', `the installed system's verdict: ${b.verdicts.join(' | ') || 'none'}`, { console: b.console });
    t.match(b.console, new RegExp(`^VDISK-GUEST: sha256sum -c /var/lib/vdisk/MANIFEST: ${files} files OK$`, 'm'), `every file, /${VICTIM} too, read back with its checksum`);
    checkMismatch(t, d, events, 'log');
    t.equal(await d.stop(), 0, 'the daemon stops cleanly');
  });

  await t.test('FUSE: a qcow2 overlay on the installed image, exported as a file, boots through the BIOS', async (t) => {
    t.ok(partStart > 0, 'the install made a partition');
    const runDir = path.join(dir, 'fuse');
    fs.mkdirSync(runDir);
    const overlay = path.join(runDir, 'overlay.qcow2');
    const mountpoint = path.join(runDir, 'disk.img');
    const created = await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', raw, '-F', 'raw', overlay]);
    t.equal(created.code, 0, 'qemu-img create -f qcow2 -b reference.img -F raw overlay.qcow2', { stderr: created.stderr });
    const before = sha256(fs.readFileSync(raw));
    fs.writeFileSync(mountpoint, '');
    const d = await startDaemon(t, {
      dir: runDir,
      nbdServer: false,
      args: [
        '--blockdev', `driver=qcow2,node-name=o0,file.driver=file,file.filename=${overlay}`,
        '--export', `type=fuse,id=f0,node-name=o0,mountpoint=${mountpoint},writable=on`,
      ],
    });
    t.equal(fs.statSync(mountpoint).size, DISK_SIZE, 'the mountpoint is a file of the disk size');
    const started = Date.now();
    const b = await runGuest(['-m', '512', '-smp', '1', '-drive', `file=${mountpoint},format=raw,if=virtio`], path.join(runDir, 'console.txt'), BOOT_TIMEOUT_MS);
    timings.push(`fuse ${((Date.now() - started) / 1000).toFixed(1)} s`);
    checkBoot(t, b, 'FUSE boot');
    checkBiosBoot(t, b);
    t.equal(b.verdict, 'PASS', `the installed system's verdict: ${b.verdicts.join(' | ') || 'none'}`, { console: b.console });
    t.match(b.console, /^VDISK-GUEST: wrote \/var\/log\/vdisk-boots: 2 boot\(s\)$/m, 'it wrote its line after the BIOS boot\'s');
    t.match(b.console, new RegExp(`^VDISK-GUEST: sha256sum -c /var/lib/vdisk/MANIFEST: ${files} files OK$`, 'm'), 'every installed file has its checksum');
    t.equal(await d.stop(), 0, 'the daemon stops cleanly');
    t.equal(fs.statSync(mountpoint).size, 0, 'the mount is gone');

    t.equal(sha256(fs.readFileSync(raw)), before, 'the backing file is unchanged');
    const check = await run('qemu-img', ['check', overlay]);
    t.equal(check.code, 0, 'qemu-img check: the overlay is consistent', { output: check.stdout + check.stderr });
    const flat = path.join(runDir, 'flat.img');
    const conv = await run('qemu-img', ['convert', '-O', 'raw', overlay, flat]);
    t.equal(conv.code, 0, 'qemu-img convert the overlay to raw', { stderr: conv.stderr });
    const boots = (await debugfsCat(flat, partStart, 'var/log/vdisk-boots')).toString('utf8');
    t.equal(boots.trim().split('\n').length, 2, "the overlay holds the guest's new line");
    t.equal((await debugfsCat(raw, partStart, 'var/log/vdisk-boots')).toString('utf8').trim().split('\n').length, 1, 'the backing file does not');
    const fsck = await run('e2fsck', ['-fn', `${flat}?offset=${partStart}`]);
    t.equal(fsck.code, 0, 'e2fsck -fn: the overlay holds a clean filesystem', { output: fsck.stdout + fsck.stderr });
  });

  t.comment(`boot times: ${timings.join(', ')}`);
});
