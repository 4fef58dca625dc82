/**
 * The FUSE export (block-export-add type=fuse), with the real kernel as the
 * client and real tools as referees: cmp and dd through the mounted file,
 * losetup + mkfs.ext4 + mount + e2fsck on it (then the same files read from
 * the image itself once the export is gone), qemu-img compare of a qcow2
 * exported through FUSE against a raw copy, a blkdebug error reaching dd as
 * EIO, fallocate and SEEK_DATA/SEEK_HOLE (python3 and util-linux), the
 * read-only, growable and directory-mountpoint variants, and the lifecycle:
 * block-export-del, query-block-exports, BLOCK_EXPORT_DELETED, SIGTERM, QMP
 * quit, an external umount, and a stale mount left by a killed daemon being
 * cleared by the next start.
 */
import t, { type Test } from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

t.before(() => {
  for (const tool of ['qemu-img', 'python3', 'losetup', 'mkfs.ext4', 'e2fsck', 'mount', 'umount', 'fallocate', 'cmp', 'dd']) requireTool(t, tool);
});

function isMounted(mountpoint: string): boolean {
  return fs
    .readFileSync('/proc/self/mountinfo', 'utf8')
    .split('\n')
    .some((l) => l.split(' ')[4] === mountpoint);
}

async function waitUntil(cond: () => boolean, what: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A daemon with a QMP socket and one raw (or given) image; returns the daemon and a QMP connection. */
async function daemonWithQmp(t: Test, dir: string, args: string[] = []) {
  const sock = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn', ...args] });
  const w = await QmpWire.connect(sock);
  t.teardown(() => w.close());
  return { d, w };
}

/** Unmounts anything a failed test left at a path, so teardown can remove the temp dir. */
function cleanupMount(t: Test, mountpoint: string): void {
  t.teardown(async () => {
    for (let i = 0; i < 4 && isMounted(mountpoint); i++) await run('umount', ['-l', mountpoint]);
  });
}

function py(script: string, ...args: string[]) {
  return run('python3', ['-c', script, ...args]);
}

t.test('cmp, dd writes, attributes, read-only and size checks, query and delete', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'disk.raw');
  fs.writeFileSync(img, patternBuffer(8 * MiB, 7));
  const mnt = path.join(dir, 'disk.fuse');
  fs.writeFileSync(mnt, '');
  cleanupMount(t, mnt);
  const { w } = await daemonWithQmp(t, dir, ['--blockdev', `driver=file,node-name=f0,filename=${img}`]);
  await w.ok('block-export-add', { type: 'fuse', id: 'e0', 'node-name': 'f0', mountpoint: mnt, writable: true });
  t.ok(isMounted(mnt), 'mounted on the regular file');

  const st = fs.statSync(mnt);
  t.equal(st.size, 8 * MiB, 'getattr: the size of the node');
  t.equal(st.mode & 0o170777, 0o100600, 'a regular file, rw for its owner (QEMU’s mode)');
  t.ok(Math.abs(st.mtimeMs - Date.now()) < 60_000, 'times are now-ish');
  t.equal((await run('cmp', [mnt, img])).code, 0, 'cmp: the FUSE file is the image');

  const data = patternBuffer(3 * MiB, 99);
  const src = path.join(dir, 'src.bin');
  fs.writeFileSync(src, data);
  const dd = await run('dd', [`if=${src}`, `of=${mnt}`, 'bs=1M', 'seek=2', 'conv=notrunc,fsync', 'status=none']);
  t.equal(dd.code, 0, `dd through the file: ${dd.stderr}`);
  t.same(fs.readFileSync(img).subarray(2 * MiB, 5 * MiB), data, 'the writes are in the image');
  t.equal((await run('cmp', [mnt, img])).code, 0, 'and read back the same through FUSE');

  const edge = await py(
    `import os,sys
fd=os.open(sys.argv[1],os.O_RDONLY)
print(len(os.pread(fd,65536,8*1024*1024-1000)), len(os.pread(fd,4096,8*1024*1024)), len(os.pread(fd,4096,9*1024*1024)))
try:
  os.truncate(sys.argv[1], 16*1024*1024)
except OSError as e: print(e.errno)
os.truncate(sys.argv[1], 8*1024*1024); print('same-size ok')`,
    mnt,
  );
  t.equal(edge.stdout, '1000 0 0\n1\nsame-size ok\n', `reads past the end are short; truncate of a non-growable export is EPERM: ${edge.stderr}`);

  t.same(await w.ok('query-block-exports'), [{ id: 'e0', type: 'fuse', 'node-name': 'f0', 'shutting-down': false }]);
  await w.ok('block-export-del', { id: 'e0' });
  await w.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED' && m.data?.id === 'e0');
  t.notOk(isMounted(mnt), 'the mount is gone with the export');
  t.equal(fs.statSync(mnt).size, 0, 'the mountpoint file is what it was');
  t.same(await w.ok('query-block-exports'), []);

  // Read-only: opening for writing is refused, reading works.
  await w.ok('block-export-add', { type: 'fuse', id: 'ro', 'node-name': 'f0', mountpoint: mnt });
  t.equal(fs.statSync(mnt).mode & 0o777, 0o400, 'read-only export: r-- for the owner');
  t.throws(() => fs.openSync(mnt, 'r+'), { code: 'EACCES' }, 'open for writing: EACCES, even for root');
  t.equal((await run('cmp', [mnt, img])).code, 0);
  const r = await w.cmd('block-export-add', { type: 'fuse', id: 'again', 'node-name': 'f0', mountpoint: mnt });
  t.match(r.error?.desc, /already/, 'a second export on the same mountpoint is refused');
  const missing = await w.cmd('block-export-add', { type: 'fuse', id: 'x', 'node-name': 'f0', mountpoint: path.join(dir, 'nope', 'x') });
  t.ok(missing.error, 'a mountpoint that does not exist is an error');
  await w.ok('block-export-del', { id: 'ro' });
  await waitUntil(() => !isMounted(mnt), 'unmount');
});

t.test('fallocate (punch hole, zero range, allocate) and SEEK_DATA / SEEK_HOLE', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'sparse.raw');
  // 16 MiB sparse, data at [4M, 6M) only.
  const fd = fs.openSync(img, 'w');
  fs.ftruncateSync(fd, 16 * MiB);
  fs.writeSync(fd, patternBuffer(2 * MiB, 3), 0, 2 * MiB, 4 * MiB);
  fs.closeSync(fd);
  const mnt = path.join(dir, 'm');
  fs.writeFileSync(mnt, '');
  cleanupMount(t, mnt);
  const { w } = await daemonWithQmp(t, dir, ['--blockdev', `driver=file,node-name=f0,filename=${img},discard=unmap`]);
  await w.ok('block-export-add', { type: 'fuse', id: 'e0', 'node-name': 'f0', mountpoint: mnt, writable: true });

  const seek = `import os,sys
fd=os.open(sys.argv[1],os.O_RDONLY)
def s(off,wh):
  try: return os.lseek(fd,off,wh)
  except OSError as e: return -e.errno
print(s(0,os.SEEK_DATA), s(0,os.SEEK_HOLE), s(4<<20,os.SEEK_HOLE), s(7<<20,os.SEEK_DATA), s(16<<20,os.SEEK_HOLE))`;
  t.equal((await py(seek, mnt)).stdout, `${4 * MiB} 0 ${6 * MiB} -6 -6\n`, 'SEEK_DATA/SEEK_HOLE follow block status; past the data: ENXIO');

  t.equal((await run('fallocate', ['-p', '-o', String(4 * MiB), '-l', String(MiB), mnt])).code, 0, 'punch hole');
  t.equal((await run('fallocate', ['-z', '-o', String(5 * MiB), '-l', '4096', mnt])).code, 0, 'zero range');
  t.equal((await run('fallocate', ['-o', '0', '-l', String(MiB), mnt])).code, 0, 'plain allocation inside the disk');
  const after = fs.readFileSync(img);
  t.ok(after.subarray(4 * MiB, 5 * MiB + 4096).equals(Buffer.alloc(MiB + 4096)), 'punched and zeroed ranges read as zeroes in the image');
  t.same(after.subarray(5 * MiB + 4096, 6 * MiB), patternBuffer(2 * MiB, 3).subarray(MiB + 4096), 'the rest is untouched');
  t.equal((await py(seek, mnt)).stdout.split(' ')[0], String(5 * MiB), 'the punched range is a hole now (discard=unmap)');
  const grow = await run('fallocate', ['-o', String(16 * MiB), '-l', String(MiB), mnt]);
  t.not(grow.code, 0, 'allocating past the end of a non-growable export fails');
  t.equal(fs.statSync(mnt).size, 16 * MiB);
  await w.ok('block-export-del', { id: 'e0' });
  await waitUntil(() => !isMounted(mnt), 'unmount');
});

t.test('growable, and a directory mountpoint showing one file named after the export', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'g.raw');
  fs.writeFileSync(img, Buffer.alloc(MiB, 1));
  const mdir = path.join(dir, 'mnt');
  fs.mkdirSync(mdir);
  cleanupMount(t, mdir);
  const { w } = await daemonWithQmp(t, dir, ['--blockdev', `driver=file,node-name=f0,filename=${img}`]);
  await w.ok('block-export-add', { type: 'fuse', id: 'disk0', 'node-name': 'f0', mountpoint: mdir, writable: true, growable: true });
  // The test process reads the directory through the thread pool; that is another process's mount.
  t.same(await fs.promises.readdir(mdir), ['disk0'], 'one file, named after the export');
  const file = path.join(mdir, 'disk0');
  t.equal((await fs.promises.stat(file)).size, MiB);
  const tail = patternBuffer(MiB, 5);
  await fs.promises.writeFile(path.join(dir, 'tail'), tail);
  t.equal((await run('dd', [`if=${path.join(dir, 'tail')}`, `of=${file}`, 'bs=1M', 'seek=2', 'conv=notrunc', 'status=none'])).code, 0, 'a write past the end');
  t.equal((await fs.promises.stat(file)).size, 3 * MiB, 'grew the export');
  t.equal(fs.statSync(img).size, 3 * MiB, 'and the image');
  t.same(fs.readFileSync(img).subarray(2 * MiB), tail);
  t.ok(fs.readFileSync(img).subarray(MiB, 2 * MiB).equals(Buffer.alloc(MiB)), 'the gap reads as zeroes');
  t.equal((await py('import os,sys; os.truncate(sys.argv[1], 1<<20); print(os.stat(sys.argv[1]).st_size)', file)).stdout, `${MiB}\n`, 'truncate works when growable');
  await w.ok('block-export-del', { id: 'disk0' });
  await waitUntil(() => !isMounted(mdir), 'unmount');
  t.same(fs.readdirSync(mdir), [], 'the directory is empty again');
});

t.test('losetup, mkfs.ext4, mount, files, e2fsck on the FUSE file; then the image itself', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'fs.raw');
  const f = fs.openSync(img, 'w');
  fs.ftruncateSync(f, 128 * MiB);
  fs.closeSync(f);
  const mnt = path.join(dir, 'fs.fuse');
  fs.writeFileSync(mnt, '');
  const fsDir = path.join(dir, 'fsmnt');
  fs.mkdirSync(fsDir);
  cleanupMount(t, fsDir);
  cleanupMount(t, mnt);
  const { w } = await daemonWithQmp(t, dir, ['--blockdev', `driver=file,node-name=f0,filename=${img}`]);
  await w.ok('block-export-add', { type: 'fuse', id: 'e0', 'node-name': 'f0', mountpoint: mnt, writable: true });

  const lo = await run('losetup', ['--find', '--show', mnt]);
  t.equal(lo.code, 0, `losetup on the FUSE file: ${lo.stderr}`);
  const dev = lo.stdout.trim();
  let attached = true;
  t.teardown(async () => {
    if (isMounted(fsDir)) await run('umount', [fsDir]);
    if (attached) await run('losetup', ['-d', dev]);
  });
  const mk = await run('mkfs.ext4', ['-q', '-F', dev], { timeoutMs: 120_000 });
  t.equal(mk.code, 0, `mkfs.ext4: ${mk.stderr}`);
  t.equal((await run('mount', [dev, fsDir])).code, 0, 'mount the file system');
  const files: Record<string, string> = {};
  for (let i = 0; i < 8; i++) {
    const data = patternBuffer(((i * 777) % 5) * MiB + 12345 * i + 1, 100 + i);
    const name = `file${i}.bin`;
    fs.mkdirSync(path.join(fsDir, `d${i % 3}`), { recursive: true });
    fs.writeFileSync(path.join(fsDir, `d${i % 3}`, name), data);
    files[`d${i % 3}/${name}`] = crypto.createHash('sha256').update(data).digest('hex');
  }
  t.equal((await run('umount', [fsDir])).code, 0, 'umount');
  const fsck = await run('e2fsck', ['-fn', dev]);
  t.equal(fsck.code, 0, `e2fsck -fn is clean: ${fsck.stdout}${fsck.stderr}`);
  t.equal((await run('losetup', ['-d', dev])).code, 0);
  attached = false;

  // Safe deletion waits for the kernel's RELEASE of the loop device's file.
  const deadline = Date.now() + 10_000;
  for (;;) {
    const r = await w.cmd('block-export-del', { id: 'e0' });
    if (!r.error) break;
    if (Date.now() > deadline) throw new Error(r.error.desc);
    await new Promise((r) => setTimeout(r, 50));
  }
  await w.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED');
  t.notOk(isMounted(mnt));
  await w.ok('blockdev-del', { 'node-name': 'f0' });

  // The same files, read from the image itself through a loop device.
  t.equal((await run('mount', ['-o', 'loop,ro', img, fsDir])).code, 0, 'loop-mount the image file');
  for (const [name, sum] of Object.entries(files)) {
    t.equal(crypto.createHash('sha256').update(fs.readFileSync(path.join(fsDir, name))).digest('hex'), sum, `${name} has its checksum`);
  }
  t.equal((await run('umount', [fsDir])).code, 0);
});

t.test('a qcow2 image through FUSE equals its raw copy (qemu-img compare)', async (t) => {
  const dir = tempDir(t);
  const raw = path.join(dir, 'copy.raw');
  const buf = Buffer.alloc(32 * MiB);
  patternBuffer(3 * MiB, 11).copy(buf, 1 * MiB);
  patternBuffer(MiB, 12).copy(buf, 20 * MiB + 4096);
  fs.writeFileSync(raw, buf);
  const qcow = path.join(dir, 'd.qcow2');
  t.equal((await run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, qcow])).code, 0);
  const mnt = path.join(dir, 'q.fuse');
  fs.writeFileSync(mnt, '');
  cleanupMount(t, mnt);
  const { w } = await daemonWithQmp(t, dir, [
    '--blockdev', `driver=qcow2,node-name=q0,file.driver=file,file.filename=${qcow}`,
    '--export', `type=fuse,id=q,node-name=q0,mountpoint=${mnt}`,
  ]);
  t.equal(fs.statSync(mnt).size, 32 * MiB, 'the virtual size');
  const cmpRes = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', mnt, raw]);
  t.equal(cmpRes.code, 0, `qemu-img compare: identical: ${cmpRes.stdout}${cmpRes.stderr}`);
  const seek = await py('import os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); print(os.lseek(fd,0,os.SEEK_DATA), os.lseek(fd,4<<20,os.SEEK_HOLE))', mnt);
  t.equal(seek.stdout, `${MiB} ${4 * MiB}\n`, 'SEEK_DATA/SEEK_HOLE from qcow2 block status');
  await w.ok('block-export-del', { id: 'q' });
  await waitUntil(() => !isMounted(mnt), 'unmount');
});

t.test('a blkdebug error reaches dd as EIO', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'e.raw');
  fs.writeFileSync(img, Buffer.alloc(4 * MiB, 3));
  const mnt = path.join(dir, 'e.fuse');
  fs.writeFileSync(mnt, '');
  cleanupMount(t, mnt);
  const { w } = await daemonWithQmp(t, dir);
  await w.ok('blockdev-add', {
    driver: 'raw',
    'node-name': 'dbg',
    file: { driver: 'blkdebug', image: { driver: 'file', filename: img }, 'inject-error': [{ event: 'read_aio', errno: 5, sector: 2048 }] },
  });
  await w.ok('block-export-add', { type: 'fuse', id: 'dbg', 'node-name': 'dbg', mountpoint: mnt });
  const bad = await run('dd', [`if=${mnt}`, 'of=/dev/null', 'bs=4k', 'skip=256', 'count=1', 'iflag=direct']);
  t.not(bad.code, 0, 'dd fails');
  t.match(bad.stderr, /Input\/output error/, 'with EIO');
  const good = await run('dd', [`if=${mnt}`, 'of=/dev/null', 'bs=4k', 'count=16', 'status=none']);
  t.equal(good.code, 0, 'other sectors read fine');
  await w.ok('block-export-del', { id: 'dbg' });
  await waitUntil(() => !isMounted(mnt), 'unmount');
});

t.test('lifecycle: SIGTERM, QMP quit, an external umount, and a stale mount after a crash', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'l.raw');
  fs.writeFileSync(img, patternBuffer(2 * MiB, 1));
  const mnt = path.join(dir, 'l.fuse');
  fs.writeFileSync(mnt, '');
  cleanupMount(t, mnt);
  const args = ['--blockdev', `driver=file,node-name=f0,filename=${img}`, '--export', `type=fuse,id=e0,node-name=f0,mountpoint=${mnt},writable=on`];

  const d1 = await startDaemon(t, { dir, nbdServer: false, args: [...args, '--log-level', 'warn'] });
  t.ok(isMounted(mnt), '--export type=fuse mounts');
  t.equal(await d1.stop('SIGTERM'), 0, 'SIGTERM: exit status 0');
  t.notOk(isMounted(mnt), 'and the mount is gone');

  const sub1 = path.join(dir, 'q1');
  fs.mkdirSync(sub1);
  const { d: d2, w } = await daemonWithQmp(t, sub1, args);
  t.ok(isMounted(mnt));
  await w.ok('quit');
  await new Promise((r) => d2.proc.once('exit', r));
  t.notOk(isMounted(mnt), 'QMP quit unmounts');

  const sub2 = path.join(dir, 'q2');
  fs.mkdirSync(sub2);
  const { w: w3 } = await daemonWithQmp(t, sub2, args);
  t.equal((await run('umount', [mnt])).code, 0, 'someone unmounts it');
  await w3.waitFor((m) => m.event === 'BLOCK_EXPORT_DELETED' && m.data?.id === 'e0');
  t.same(await w3.ok('query-block-exports'), [], 'the export went away with its mount');
  await w3.ok('quit');

  const d4 = await startDaemon(t, { dir, nbdServer: false, args: [...args, '--log-level', 'warn'] });
  d4.proc.kill('SIGKILL');
  await new Promise((r) => d4.proc.once('exit', r));
  t.ok(isMounted(mnt), 'a killed daemon leaves its mount behind');
  const stale = await run('stat', [mnt]);
  t.match(stale.stderr, /Transport endpoint is not connected/, 'stale: ENOTCONN');
  const d5 = await startDaemon(t, { dir, nbdServer: false, args: [...args, '--log-level', 'warn'] });
  t.match(d5.stderr(), /fuse-stale-mount-cleared/, 'the next start clears it');
  t.equal((await run('cmp', [mnt, img])).code, 0, 'and serves the image again');
  t.equal(await d5.stop('SIGTERM'), 0);
  t.notOk(isMounted(mnt));

  // A live mount belonging to another daemon is not taken over.
  const d6 = await startDaemon(t, { dir, nbdServer: false, args: [...args, '--log-level', 'warn'] });
  const sub3 = path.join(dir, 'q3');
  fs.mkdirSync(sub3);
  const other = await daemonWithQmp(t, sub3, ['--blockdev', `driver=file,node-name=g0,filename=${img},locking=off,read-only=on`]);
  const r = await other.w.cmd('block-export-add', { type: 'fuse', id: 'x', 'node-name': 'g0', mountpoint: mnt });
  t.match(r.error?.desc, /served by a running process/, 'a live FUSE mount elsewhere is refused');
  t.equal(await d6.stop('SIGTERM'), 0);
});
