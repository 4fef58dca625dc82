/**
 * Copying whole disks through vdisk with nbdcopy, qemu-img convert and
 * qemu-img compare, over unix sockets and TCP on 127.0.0.1, and qemu-io
 * driving single requests. Every copy is checked byte for byte.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { patternBuffer, requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

async function serveWritable(t: Tap.Test, size: number, tcp = false) {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'target.img'), size);
  const args = ['--blockdev', `driver=file,node-name=f0,filename=${img},discard=unmap`, '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on'];
  if (tcp) args.push('--nbd-server', 'addr.type=inet,addr.host=127.0.0.1,addr.port=0');
  const d = await startDaemon(t, { dir, args });
  // The banner names the TCP endpoint with the port the kernel chose.
  const port = /nbd:\/\/127\.0\.0\.1:(\d+)\//.exec(d.stdout())?.[1];
  return { d, dir, img, tcpUri: port ? `nbd://127.0.0.1:${port}/disk` : undefined };
}

function randomFile(file: string, size: number, seed: number): string {
  fs.writeFileSync(file, patternBuffer(size, seed));
  return file;
}

t.test('nbdcopy into vdisk and back out, one and four connections', async (t) => {
  requireTool(t, 'nbdcopy');
  const { d, dir, img } = await serveWritable(t, 64 * MiB);
  const src = randomFile(path.join(dir, 'src.bin'), 64 * MiB, 11);
  let r = await run('nbdcopy', [src, d.uri('disk')]);
  t.equal(r.code, 0, r.stderr);
  t.ok(fs.readFileSync(img).equals(fs.readFileSync(src)), 'the image holds what was copied in');
  const back = path.join(dir, 'back.bin');
  r = await run('nbdcopy', [d.uri('disk'), back]);
  t.equal(r.code, 0, r.stderr);
  t.ok(fs.readFileSync(back).equals(fs.readFileSync(src)), 'copied out equals the source');

  // Multi-conn: four connections with many requests each, into a fresh region pattern.
  const src2 = randomFile(path.join(dir, 'src2.bin'), 64 * MiB, 12);
  r = await run('nbdcopy', ['--connections=4', '--requests=64', '--flush', src2, d.uri('disk')]);
  t.equal(r.code, 0, r.stderr);
  t.ok(fs.readFileSync(img).equals(fs.readFileSync(src2)), 'four connections wrote everything');
  const back2 = path.join(dir, 'back2.bin');
  r = await run('nbdcopy', ['--connections=4', d.uri('disk'), back2]);
  t.equal(r.code, 0, r.stderr);
  t.ok(fs.readFileSync(back2).equals(fs.readFileSync(src2)));
});

t.test('nbdcopy keeps a sparse source sparse (zeroes become holes)', async (t) => {
  requireTool(t, 'nbdcopy');
  const { d, dir, img } = await serveWritable(t, 64 * MiB);
  // Start from a full target so holes have to be made.
  fs.writeFileSync(img, patternBuffer(64 * MiB, 3));
  const src = sparseFile(path.join(dir, 'sparse.bin'), 64 * MiB);
  const fd = fs.openSync(src, 'r+');
  fs.writeSync(fd, patternBuffer(MiB, 4), 0, MiB, 10 * MiB);
  fs.closeSync(fd);
  const r = await run('nbdcopy', [src, d.uri('disk')]);
  t.equal(r.code, 0, r.stderr);
  t.ok(fs.readFileSync(img).equals(fs.readFileSync(src)), 'content equal');
  t.ok(fs.statSync(img).blocks * 512 < 8 * MiB, `the target became sparse (${fs.statSync(img).blocks * 512} bytes allocated)`);
});

t.test('qemu-img convert and compare over nbd+unix:// and nbd://', async (t) => {
  requireTool(t, 'qemu-img');
  const { d, dir, tcpUri } = await serveWritable(t, 32 * MiB, true);
  t.ok(tcpUri, 'the banner shows the TCP endpoint');
  const src = randomFile(path.join(dir, 'src.bin'), 32 * MiB, 21);
  for (const uri of [d.uri('disk'), tcpUri!]) {
    let r = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', src, uri]);
    t.equal(r.code, 0, `convert into ${uri}: ${r.stderr}`);
    r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, uri]);
    t.equal(r.code, 0, `compare with ${uri}: ${r.stdout}${r.stderr}`);
    const out = path.join(dir, 'out.raw');
    r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', uri, out]);
    t.equal(r.code, 0, r.stderr);
    t.ok(fs.readFileSync(out).equals(fs.readFileSync(src)), 'converted out equals the source');
    fs.rmSync(out);
  }
  // A difference is found and located.
  const other = randomFile(path.join(dir, 'other.bin'), 32 * MiB, 21);
  const fd = fs.openSync(other, 'r+');
  fs.writeSync(fd, Buffer.from([0xff ^ fs.readFileSync(src)[5 * MiB + 7]]), 0, 1, 5 * MiB + 7);
  fs.closeSync(fd);
  const r = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', other, d.uri('disk')]);
  t.equal(r.code, 1, 'compare reports a difference');
  t.match(r.stdout, new RegExp(`offset ${5 * MiB}`), 'at the right sector');
});

t.test('qemu-io: patterns, write -z, write -z -u, discard, flush, errors', async (t) => {
  requireTool(t, 'qemu-io');
  const { d, img } = await serveWritable(t, 16 * MiB);
  const io = (...cmds: string[]) => run('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), d.uri('disk')]);
  let r = await io('write -P 0xa5 0 1M', 'write -P 0x5a 1M 64k', 'read -P 0xa5 0 1M', 'read -P 0x5a 1M 64k', 'read -P 0 2M 1M', 'flush');
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /verification failed|error/i, r.stdout);
  t.match(r.stdout, /wrote 1048576\/1048576 bytes at offset 0/);
  t.match(r.stdout, /read 65536\/65536 bytes at offset 1048576/);

  r = await io('write -z 4k 8k', 'read -P 0 4k 8k', 'read -P 0xa5 0 4k', 'read -P 0xa5 12k 4k');
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /verification failed/);
  r = await io('write -z -u 256k 512k', 'read -P 0 256k 512k', 'discard 768k 256k', 'read -P 0xa5 0 4k');
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /verification failed/);
  t.ok(fs.statSync(img).blocks * 512 <= 1088 * 1024 - 768 * 1024 + 64 * 1024, 'write -z -u and discard punched holes in the image');

  // A read past the end fails cleanly and the server keeps serving.
  r = await io('read 16M 512');
  t.match(r.stdout + r.stderr, /past the end|Input\/output error|Invalid argument|out of range/i);
  r = await io('read -P 0xa5 0 512');
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /verification failed/);
});

t.test('qemu-io: a read-only export refuses writes', async (t) => {
  requireTool(t, 'qemu-io');
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), MiB);
  const d = await startDaemon(t, { dir, args: ['--blockdev', `driver=file,node-name=f0,filename=${img},read-only=on`, '--export', 'type=nbd,id=e0,node-name=f0,name=disk'] });
  const r = await run('qemu-io', ['-f', 'raw', '-c', 'write 0 512', d.uri('disk')]);
  t.not(r.code, 0);
  t.match(r.stdout + r.stderr, /read.only|Operation not permitted|Permission denied/i);
  const ok = await run('qemu-io', ['-r', '-f', 'raw', '-c', 'read -P 0 0 512', d.uri('disk')]);
  t.equal(ok.code, 0, ok.stderr);
});
