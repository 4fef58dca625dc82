/**
 * The Linux kernel's own NBD client on vdisk exports (issue 12): Debian's
 * kernel boots under qemu-system-x86_64 (TCG, no KVM) with a small initramfs
 * (scripts/build-guest.sh; its /init is scripts/guest/init.sh) and no disk.
 * It reaches the daemon over QEMU's user networking (virtio-net): the daemon
 * listens on 127.0.0.1:PORT (a free port), which the guest dials as
 * 10.0.2.2:PORT; nothing leaves the machine. The guest attaches the export
 * with Debian's nbd-client 3.24 as a user would:
 *
 *   nbd-client 10.0.2.2 PORT /dev/nbd0 -N NAME -C 4 -b 4096
 *
 * 1. A raw image (vdisk.mode=nbd-client): mke2fs -t ext4, files of random data
 *    and their checksums, sync, an 8 MiB file written and deleted, fstrim,
 *    umount, nbd-client -d, attach again, e2fsck -fn, mount read-only and
 *    check every file. The guest must say PASS and see a 4096-byte logical
 *    block size; the daemon must have taken four connections per attach,
 *    each ended by NBD_CMD_DISC (a clean nbd-client -d), and TRIM requests;
 *    on the host the image is sparse wherever fstrim trimmed, e2fsck -fn
 *    finds it clean and debugfs reads every file with the guest's checksum.
 * 2. The same run on a blkverify node (qcow2 test child, raw reference): no
 *    mismatch, both children hold the same bytes (qemu-img compare), the
 *    qcow2 image is consistent (qemu-img check).
 * 3. The daemon restarted while the guest is attached and idle, by SIGTERM
 *    and by SIGKILL (vdisk.mode=nbd-restart): the guest flushes its files,
 *    the host stops the daemon and starts it again on the same port, then
 *    tells the guest (second serial port). What the guest sees, and what
 *    docs/uses-nbd-client.md documents: the kernel does not reconnect.
 *    nbd-client 3.24 configures the device over netlink and exits, setting
 *    no dead-connection timeout, so nobody hands the kernel new sockets;
 *    with -nonetlink -persist it would reconnect only if the NBD_DO_IT ioctl
 *    failed, and Linux 6.1 returns 0 from it when the server goes away (tried
 *    by hand: the same I/O errors). So the next request fails with EIO (a
 *    write to ext4 may fail with EROFS instead, once ext4 has seen the EIO
 *    and gone read-only), and the user recovers with umount, nbd-client -d,
 *    nbd-client again and mount (the journal is replayed). Every file
 *    flushed before the restart must then be intact: sha256sum -c in the
 *    guest, e2fsck and debugfs on the host. SIGKILL is the harder case: a
 *    flush that was answered means the data is in the image file, so even a
 *    killed daemon loses none of it.
 *
 * The boots run one after another (each about 20-40 s on two busy cores).
 */
import t, { type Test } from 'tap';
import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { startDaemon, type DaemonHandle } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { guestAssets, runGuest, type Boot, type GuestAssets } from '../helpers/guest.js';
import { requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const DISK_SIZE = 64 * MiB;
/** One boot of the guest, at most. */
const BOOT_TIMEOUT_MS = 240_000;
/** nbd-client's options in every attach (init.sh's defaults, given explicitly). */
const CONNECTIONS = 4;
const BLOCK_SIZE = 4096;

// Four boots and the guest build: more than tap's default 300 s per file on a busy machine.
t.setTimeout(1_200_000);

t.before(() => {
  for (const tool of ['qemu-system-x86_64', 'qemu-img', 'debugfs', 'dumpe2fs', 'e2fsck', 'busybox', 'cpio']) requireTool(t, tool);
});

/** A TCP port nothing listens on now (the kernel picks it; it is free again once closed). */
async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', resolve));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise((resolve) => s.close(resolve));
  return port;
}

interface BootOptions {
  mode: 'nbd-client' | 'nbd-restart';
  port: number;
  exportName: string;
  consoleFile: string;
  /** A unix socket QEMU listens on, as the guest's second serial port (/dev/ttyS1). */
  ctlSocket?: string;
}

/** Boots the guest with a NIC on QEMU's user network and waits for it to power off. */
function boot(guest: GuestAssets, o: BootOptions): Promise<Boot> {
  const append = [
    'console=ttyS0 panic=-1 quiet loglevel=4',
    `vdisk.mode=${o.mode} vdisk.port=${o.port} vdisk.export=${o.exportName}`,
    `vdisk.connections=${CONNECTIONS} vdisk.blocksize=${BLOCK_SIZE}`,
  ].join(' ');
  return runGuest(
    [
      '-m', '256', '-smp', '2',
      '-kernel', guest.vmlinuz, '-initrd', guest.initramfs,
      '-append', append,
      // The guest is 10.0.2.15 and reaches the host's 127.0.0.1 as 10.0.2.2; it dials nothing else.
      '-netdev', 'user,id=n0',
      '-device', 'virtio-net-pci,netdev=n0',
      ...(o.ctlSocket ? ['-chardev', `socket,id=ctl,path=${o.ctlSocket},server=on,wait=off`, '-device', 'isa-serial,chardev=ctl'] : []),
    ],
    o.consoleFile,
    BOOT_TIMEOUT_MS,
  );
}

function tcpServerArgs(port: number): string[] {
  return ['--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=${port}`];
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

/** The requests one `nbd-client-disconnected` record counts, by command (lower case). */
const requests = (r: Record<string, unknown>) => (r.requests ?? {}) as Record<string, number>;
const requestBytes = (r: Record<string, unknown>) => (r.requestBytes ?? {}) as Record<string, number>;
const sum = (records: Record<string, unknown>[], field: (r: Record<string, unknown>) => Record<string, number>, cmd: string) =>
  records.reduce((n, r) => n + (field(r)[cmd] ?? 0), 0);

/** A file of an ext4 image, read by debugfs (no mount, no kernel). */
async function debugfsCat(image: string, file: string): Promise<Buffer> {
  const chunks: Buffer[] = [];
  const child = spawn('debugfs', ['-R', `cat /${file}`, image], { stdio: ['ignore', 'pipe', 'ignore'] });
  child.stdout.on('data', (d: Buffer) => chunks.push(d));
  await new Promise((resolve) => child.on('close', resolve));
  return Buffer.concat(chunks);
}

const sha256 = (b: Buffer) => crypto.createHash('sha256').update(b).digest('hex');

/** Checks a raw ext4 image on the host: e2fsck -fn clean, every file of `manifest` with its checksum. */
async function checkImage(t: Test, image: string, manifest: string): Promise<void> {
  const fsck = await run('e2fsck', ['-fn', image]);
  t.equal(fsck.code, 0, 'e2fsck -fn on the host: a clean filesystem', { output: fsck.stdout + fsck.stderr });
  const entries = manifest
    .trim()
    .split('\n')
    .map((l) => l.split(/\s+/));
  t.equal(entries.length, 15, "the guest's manifest names 15 files");
  for (const [sum, file] of entries) t.equal(sha256(await debugfsCat(image, file)), sum, `${file} on the host has the guest's checksum`);
}

/** The guest's run as the nbd-client mode prints it; shared by the raw and the blkverify exports. */
function checkClientRun(t: Test, b: Boot): void {
  t.equal(b.signal, null, `QEMU ended by itself within ${BOOT_TIMEOUT_MS / 1000} s`, { console: b.console });
  t.equal(b.code, 0, 'QEMU exited with 0 (the guest powered off)', { console: b.console });
  t.equal(b.verdict, 'PASS', `the guest's verdict: ${b.verdicts.join(' | ') || 'none'}`, { console: b.console });
  const attached = b.console.split('\n').filter((l) => l.startsWith('VDISK-GUEST: attached'));
  t.equal(attached.length, 2, 'the guest attached twice', { console: b.console });
  for (const line of attached) {
    t.match(line, ` -C ${CONNECTIONS} -b ${BLOCK_SIZE}: ${DISK_SIZE / 512} sectors`, `nbd-client -C ${CONNECTIONS} -b ${BLOCK_SIZE}: the whole export`);
    t.match(line, `logical_block_size=${BLOCK_SIZE},`, `-b ${BLOCK_SIZE} gives /dev/nbd0 a ${BLOCK_SIZE}-byte logical block size`);
    t.notMatch(line, /discard_max_bytes=0,/, 'the device takes discards (vdisk sends NBD_FLAG_SEND_TRIM)');
  }
  t.match(b.console, /^mke2fs 1\.\d+/m, "the filesystem was made by e2fsprogs' mke2fs");
  t.match(b.console, /VDISK-GUEST: e2fsck -fn: clean/, 'e2fsck -fn found it clean after reattaching');
  t.match(b.console, /VDISK-GUEST: sha256sum -c: 15 files OK/, 'every file read back with its checksum after reattaching');
  t.equal((b.console.match(/^VDISK-GUEST: detached: nbd-client -d/gm) ?? []).length, 2, 'nbd-client -d detached it twice');
  t.notMatch(b.console, /^VDISK-GUEST: kernel: /m, "the guest's kernel logged no I/O or filesystem error");
}

/**
 * The daemon's side of that run: four connections per attach, each ended by
 * NBD_CMD_DISC with nothing in flight, TRIM requests among them. Returns the
 * bytes TRIM covered.
 */
function checkServerSide(t: Test, d: DaemonHandle, exportName: string, console = ''): number {
  const connected = logRecords(d, 'nbd-client-connected');
  const gone = logRecords(d, 'nbd-client-disconnected');
  t.equal(connected.length, 2 * CONNECTIONS, `${CONNECTIONS} connections per attach, two attaches`);
  t.ok(
    connected.every((r) => r.export === exportName),
    `every connection chose export '${exportName}'`,
  );
  t.equal(gone.length, connected.length, 'every connection ended');
  t.ok(
    gone.every((r) => requests(r).disc === 1 && r.inFlight === 0),
    'each with NBD_CMD_DISC and nothing in flight (nbd-client -d is a clean disconnect)',
    // On failure: why each connection ended (closedBy), the daemon's warnings and the guest's NBD driver lines.
    {
      records: gone,
      warnings: d.stderr().split('\n').filter((l) => /"level":"(warn|error)"/.test(l)),
      guestNbd: console.split('\n').filter((l) => l.startsWith('VDISK-GUEST: nbd-kernel: ')),
    },
  );
  t.comment(`requests per connection: ${gone.map((r) => JSON.stringify(r.requests)).join(' ')}`);
  t.ok(sum(gone, requests, 'write') > 0 && sum(gone, requests, 'flush') > 0, 'writes and flushes reached the server');
  const trims = sum(gone, requests, 'trim');
  const trimBytes = sum(gone, requestBytes, 'trim');
  t.ok(trims > 0, `fstrim reached the server as ${trims} TRIM requests`);
  t.ok(trimBytes >= 8 * MiB, `covering ${trimBytes} bytes (at least the deleted 8 MiB file)`);
  return trimBytes;
}

/** The bytes fstrim -v said it trimmed. */
function fstrimBytes(t: Test, b: Boot): number {
  const m = /^VDISK-GUEST: fstrim -v \/mnt: .*?(\d+) bytes/m.exec(b.console);
  t.ok(m, 'the guest ran fstrim -v', { console: b.console });
  return Number(m?.[1] ?? 0);
}

/** The free blocks of an ext4 image as byte ranges [start, end), from dumpe2fs's group lines. */
async function freeRanges(t: Test, image: string): Promise<Array<[number, number]>> {
  const r = await run('dumpe2fs', [image]);
  t.equal(r.code, 0, 'dumpe2fs', { stderr: r.stderr });
  const blockSize = Number(/^Block size:\s+(\d+)/m.exec(r.stdout)?.[1]);
  const ranges: Array<[number, number]> = [];
  for (const m of r.stdout.matchAll(/^\s+Free blocks: (.+)$/gm)) {
    for (const item of m[1].split(', ')) {
      const [a, b = a] = item.split('-').map(Number);
      ranges.push([a * blockSize, (b + 1) * blockSize]);
    }
  }
  return ranges;
}

/** The ranges of a raw image file that hold data (not holes), as qemu-img map sees them. */
async function dataRanges(t: Test, image: string): Promise<Array<[number, number]>> {
  const r = await run('qemu-img', ['map', '--output=json', '-f', 'raw', image]);
  t.equal(r.code, 0, 'qemu-img map', { stderr: r.stderr });
  return (JSON.parse(r.stdout) as Array<{ start: number; length: number; data: boolean }>).filter((e) => e.data).map((e) => [e.start, e.start + e.length]);
}

/** Bytes two lists of ranges have in common. */
function overlap(a: Array<[number, number]>, b: Array<[number, number]>): number {
  let n = 0;
  for (const [s1, e1] of a) for (const [s2, e2] of b) n += Math.max(0, Math.min(e1, e2) - Math.max(s1, s2));
  return n;
}

/** Bytes of a file that take space on the host's disk. */
const allocated = (file: string) => fs.statSync(file).blocks * 512;

t.test('the kernel NBD client on vdisk exports', async (t) => {
  const guest = await guestAssets();
  const dir = tempDir(t, 'vdisk-guest-nbd-');

  await t.test('a raw image: -C 4 -b 4096, ext4, files, fstrim, nbd-client -d, attach again, all there', async (t) => {
    const run1 = path.join(dir, 'raw');
    fs.mkdirSync(run1);
    const img = path.join(run1, 'disk.raw');
    fs.closeSync(fs.openSync(img, 'w'));
    fs.truncateSync(img, DISK_SIZE);
    const port = await freePort();
    const d = await startDaemon(t, {
      dir: run1,
      nbdServer: false,
      args: [
        ...tcpServerArgs(port),
        '--blockdev', `driver=raw,node-name=disk0,discard=unmap,file.driver=file,file.filename=${img}`,
        '--export', 'type=nbd,id=e0,node-name=disk0,name=disk0,writable=on',
      ],
    });

    const started = Date.now();
    const b = await boot(guest, { mode: 'nbd-client', port, exportName: 'disk0', consoleFile: path.join(run1, 'console.txt') });
    t.comment(`boot took ${((Date.now() - started) / 1000).toFixed(1)} s`);
    checkClientRun(t, b);
    const trimmed = fstrimBytes(t, b);
    t.equal(await d.stop(), 0, 'the daemon stops cleanly');
    const trimBytes = checkServerSide(t, d, 'disk0', b.console);
    t.ok(trimBytes >= trimmed, `the TRIM requests (${trimBytes} bytes) cover what fstrim reported (${trimmed} bytes)`);

    // fstrim trimmed every free block, among them the deleted 8 MiB file's, and nothing
    // allocated any since (umount, then a read-only check): with discard=unmap each free
    // block of the filesystem is a hole in the image file now.
    t.ok(trimmed >= 8 * MiB, `fstrim trimmed ${trimmed} bytes`);
    const used = allocated(img);
    t.ok(used <= DISK_SIZE - trimmed, `the image takes ${used} bytes on the host, at most the ${DISK_SIZE - trimmed} bytes not trimmed`);
    const free = await freeRanges(t, img);
    const data = await dataRanges(t, img);
    const freeBytes = free.reduce((n, [a, b]) => n + b - a, 0);
    t.ok(freeBytes >= trimmed, `the filesystem has ${freeBytes} bytes free (dumpe2fs)`);
    t.equal(overlap(free, data), 0, 'none of them is allocated in the image file (qemu-img map: every free block is a hole)');

    const manifest = (await debugfsCat(img, 'MANIFEST')).toString('utf8');
    await checkImage(t, img, manifest);
  });

  await t.test('a blkverify node (qcow2 test, raw reference): the same run, no mismatch, both children equal', async (t) => {
    const run2 = path.join(dir, 'blkverify');
    fs.mkdirSync(run2);
    const raw = path.join(run2, 'raw.img');
    const qcow = path.join(run2, 'test.qcow2');
    fs.closeSync(fs.openSync(raw, 'w'));
    fs.truncateSync(raw, DISK_SIZE);
    const created = await run('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, String(DISK_SIZE)]);
    t.equal(created.code, 0, 'qemu-img create -f qcow2', { stderr: created.stderr });
    const port = await freePort();
    const d = await startDaemon(t, {
      dir: run2,
      nbdServer: false,
      args: [
        ...tcpServerArgs(port),
        '--qmp', `unix:${path.join(run2, 'qmp.sock')}`,
        '--blockdev',
        `driver=blkverify,node-name=v0,discard=unmap,raw.driver=raw,raw.file.driver=file,raw.file.filename=${raw},test.driver=qcow2,test.file.driver=file,test.file.filename=${qcow}`,
        '--export', 'type=nbd,id=v0,node-name=v0,name=v0,writable=on',
      ],
    });
    const w = await QmpWire.connect(path.join(run2, 'qmp.sock'));
    t.teardown(() => w.close());

    const started = Date.now();
    const b = await boot(guest, { mode: 'nbd-client', port, exportName: 'v0', consoleFile: path.join(run2, 'console.txt') });
    t.comment(`boot took ${((Date.now() - started) / 1000).toFixed(1)} s`);
    checkClientRun(t, b);
    // A reply after the guest is gone: every event sent before it has arrived.
    await w.ok('query-version');
    t.same(w.events('BLKVERIFY_MISMATCH'), [], 'no BLKVERIFY_MISMATCH event');
    t.same(logRecords(d, 'blkverify-mismatch'), [], 'no mismatch in the log');
    t.equal(await d.stop(), 0, 'the daemon stops cleanly');
    checkServerSide(t, d, 'v0', b.console);

    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'qcow2', raw, qcow]);
    t.equal(cmp.code, 0, 'qemu-img compare: the reference and the qcow2 image hold the same bytes', { output: cmp.stdout + cmp.stderr });
    const check = await run('qemu-img', ['check', qcow]);
    t.equal(check.code, 0, 'qemu-img check: the qcow2 image is consistent', { output: check.stdout + check.stderr });
    const manifest = (await debugfsCat(raw, 'MANIFEST')).toString('utf8');
    await checkImage(t, raw, manifest);
  });

  for (const signal of ['SIGTERM', 'SIGKILL'] as const) {
    await t.test(`the daemon restarted by ${signal} while attached: the guest gets EIO, reattaches, every flushed file is intact`, async (t) => {
      const runDir = path.join(dir, `restart-${signal}`);
      fs.mkdirSync(runDir);
      const img = path.join(runDir, 'disk.raw');
      fs.closeSync(fs.openSync(img, 'w'));
      fs.truncateSync(img, DISK_SIZE);
      const port = await freePort();
      const args = [
        ...tcpServerArgs(port),
        '--blockdev', `driver=raw,node-name=disk0,discard=unmap,file.driver=file,file.filename=${img}`,
        '--export', 'type=nbd,id=e0,node-name=disk0,name=disk0,writable=on',
      ];
      const first = await startDaemon(t, { dir: runDir, nbdServer: false, args });
      const consoleFile = path.join(runDir, 'console.txt');
      const ctlSocket = path.join(runDir, 'ctl.sock');
      const consoleText = () => (fs.existsSync(consoleFile) ? fs.readFileSync(consoleFile, 'utf8') : '');

      const started = Date.now();
      let booted: Boot | undefined;
      const booting = boot(guest, { mode: 'nbd-restart', port, exportName: 'disk0', consoleFile, ctlSocket }).then((b) => (booted = b));
      while (!booted && !consoleText().includes('waiting for the host to restart the server')) {
        await new Promise((resolve) => setTimeout(resolve, 200));
      }
      t.notOk(booted, 'the guest flushed its files and waits, still attached', { console: booted?.console });
      if (booted) return;
      // The checksums of the files the guest flushed, before anything happens to the daemon.
      const manifest = [...consoleText().matchAll(/^VDISK-GUEST: manifest: (.*)$/gm)].map((m) => m[1].trim()).join('\n') + '\n';

      const code = await first.stop(signal);
      t.equal(code, signal === 'SIGTERM' ? 0 : null, signal === 'SIGTERM' ? 'SIGTERM: the daemon exits 0' : 'SIGKILL: the daemon dies');
      t.equal(logRecords(first, 'nbd-client-connected').length, CONNECTIONS, `the first daemon served ${CONNECTIONS} connections`);
      if (signal === 'SIGTERM') {
        const gone = logRecords(first, 'nbd-client-disconnected');
        t.equal(gone.length, CONNECTIONS, 'and closed each of them on SIGTERM');
        t.ok(sum(gone, requests, 'flush') > 0, 'after the flushes the guest sent');
        t.ok(gone.every((r) => r.inFlight === 0 && requests(r).disc === undefined), 'nothing in flight; the guest had not disconnected');
      }
      const second = await startDaemon(t, { dir: runDir, nbdServer: false, args });
      await new Promise<void>((resolve, reject) => {
        const s = net.connect(ctlSocket, () => s.end('restarted\n', () => resolve()));
        s.on('error', reject);
      });
      const b = await booting;
      t.comment(`boot took ${((Date.now() - started) / 1000).toFixed(1)} s`);

      t.equal(b.signal, null, `QEMU ended by itself within ${BOOT_TIMEOUT_MS / 1000} s`, { console: b.console });
      t.equal(b.code, 0, 'QEMU exited with 0 (the guest powered off)', { console: b.console });
      t.match(b.console, /^VDISK-GUEST: the host says: restarted$/m, 'the guest heard that the daemon is back');
      // The documented behaviour: no reconnection. The device fails every request with EIO; the
      // filesystem's write fails with EIO, or with EROFS when ext4's own background writes hit the
      // dead device first, aborted the journal and remounted it read-only.
      t.match(b.console, /^VDISK-GUEST: direct read of \/dev\/nbd0 after the restart: failed: .*Input\/output error/m, 'a read of the device after the restart fails with EIO (the kernel does not reconnect)', {
        console: b.console,
      });
      t.match(b.console, /^VDISK-GUEST: write after the restart: failed: .*(Input\/output error|Read-only file system)/m, 'and so does a write to the filesystem (EIO or EROFS)', {
        console: b.console,
      });
      t.match(b.console, /^VDISK-GUEST: dmesg: .*(Dead connection, failed to find a fallback|I\/O error, dev nbd0)/m, "the guest's kernel reports the dead connection");
      t.match(b.console, /^VDISK-GUEST: detached: nbd-client -d \/dev\/nbd0$/m, 'nbd-client -d releases the dead device');
      const attached = b.console.split('\n').filter((l) => l.startsWith('VDISK-GUEST: attached'));
      t.equal(attached.length, 2, 'and nbd-client attaches it again to the new daemon');
      t.match(b.console, /VDISK-GUEST: e2fsck -fn: clean/, 'e2fsck -fn: clean after the journal replay');
      t.match(b.console, /VDISK-GUEST: sha256sum -c: 15 files OK/, 'every file flushed before the restart reads back with its checksum');
      t.equal(b.verdict, 'PASS', `the guest's verdict: ${b.verdicts.join(' | ') || 'none'}`, { console: b.console });

      t.equal(await second.stop(), 0, 'the second daemon stops cleanly');
      const gone = logRecords(second, 'nbd-client-disconnected');
      t.equal(logRecords(second, 'nbd-client-connected').length, CONNECTIONS, `the second daemon served the reattach's ${CONNECTIONS} connections`);
      t.ok(
        gone.length === CONNECTIONS && gone.every((r) => requests(r).disc === 1),
        'each ended by NBD_CMD_DISC',
        { records: gone },
      );
      await checkImage(t, img, manifest);
    });
  }
});
