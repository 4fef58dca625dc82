/**
 * nbdinfo against vdisk: what a client learns in the handshake, the export
 * list, and the allocation map compared with qemu-nbd's map of the same file.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import path from 'node:path';
import { startDaemon, waitForSocket } from '../helpers/daemon.js';
import { patternBuffer, requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';
import fs from 'node:fs';

const MiB = 1024 * 1024;

t.test('nbdinfo --json: size, flags, block sizes, description', async (t) => {
  requireTool(t, 'nbdinfo');
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), 48 * MiB);
  const d = await startDaemon(t, {
    dir,
    args: [
      '--blockdev', `driver=file,node-name=f0,filename=${img}`,
      '--export', 'type=nbd,id=rw,node-name=f0,name=rw,writable=on,description=the writable one',
      '--export', 'type=nbd,id=ro,node-name=f0,name=ro',
    ],
  });
  const rw = await run('nbdinfo', ['--json', d.uri('rw')]);
  t.equal(rw.code, 0, rw.stderr);
  const e = JSON.parse(rw.stdout).exports[0];
  t.equal(e['export-name'], 'rw');
  t.equal(e['export-size'], 48 * MiB);
  t.equal(e.description, 'the writable one');
  t.equal(e.is_read_only, false);
  for (const f of ['can_flush', 'can_fua', 'can_trim', 'can_zero', 'can_fast_zero', 'can_cache', 'can_multi_conn', 'can_df']) t.equal(e[f], true, f);
  t.equal(e.block_size_minimum, 1);
  t.equal(e.block_size_preferred, 4096);
  t.equal(e.block_size_maximum, 32 * MiB);
  t.same(JSON.parse(rw.stdout).protocol, 'newstyle-fixed');
  t.same(e.contexts, ['base:allocation'], 'NBD_OPT_LIST_META_CONTEXT lists base:allocation');
  t.equal(JSON.parse(rw.stdout)['TLS'], false);

  const ro = await run('nbdinfo', ['--json', d.uri('ro')]);
  t.equal(ro.code, 0, ro.stderr);
  const r = JSON.parse(ro.stdout).exports[0];
  t.equal(r.is_read_only, true);
  t.equal(r.can_trim, false);
  t.equal(r.can_zero, false);

  // The empty name is the default export: the first one added.
  const def = await run('nbdinfo', ['--json', d.uri('')]);
  t.equal(def.code, 0, def.stderr);
  t.equal(JSON.parse(def.stdout).exports[0]['export-size'], 48 * MiB);

  const missing = await run('nbdinfo', [d.uri('nope')]);
  t.not(missing.code, 0, 'an unknown export is refused');
  t.match(missing.stderr, /nope|not present|unknown/i);
});

t.test('nbdinfo --list shows every export with its description', async (t) => {
  requireTool(t, 'nbdinfo');
  const dir = tempDir(t);
  const a = sparseFile(path.join(dir, 'a.img'), 1 * MiB);
  const b = sparseFile(path.join(dir, 'b.img'), 2 * MiB);
  const d = await startDaemon(t, {
    dir,
    args: [
      '--blockdev', `driver=file,node-name=fa,filename=${a}`,
      '--blockdev', `driver=file,node-name=fb,filename=${b}`,
      '--export', 'type=nbd,id=a,node-name=fa,description=disk a',
      '--export', 'type=nbd,id=b,node-name=fb,name=second,description=disk b',
    ],
  });
  const r = await run('nbdinfo', ['--list', '--json', d.uri()]);
  t.equal(r.code, 0, r.stderr);
  const list = JSON.parse(r.stdout).exports.map((e: Record<string, unknown>) => [e['export-name'], e.description, e['export-size']]);
  t.same(list, [
    ['fa', 'disk a', 1 * MiB],
    ['second', 'disk b', 2 * MiB],
  ]);
});

t.test('nbdinfo --map matches qemu-nbd on the same sparse file', async (t) => {
  requireTool(t, 'nbdinfo');
  requireTool(t, 'qemu-nbd');
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'sparse.img'), 64 * MiB);
  // Data at a few places, with holes between and at the end.
  const fd = fs.openSync(img, 'r+');
  for (const [off, len] of [
    [0, 64 * 1024],
    [5 * MiB, 3 * MiB],
    [20 * MiB + 4096, 8192],
    [63 * MiB, MiB],
  ]) fs.writeSync(fd, patternBuffer(len, off + 1), 0, len, off);
  fs.closeSync(fd);

  const d = await startDaemon(t, { dir, args: ['--blockdev', `driver=file,node-name=f0,filename=${img},read-only=on`, '--export', 'type=nbd,id=e0,node-name=f0,name=disk'] });
  const qsock = path.join(dir, 'qemu.sock');
  const q = spawn('qemu-nbd', ['-r', '-f', 'raw', '-t', '-x', 'disk', '-k', qsock, img], { stdio: 'ignore' });
  t.teardown(() => q.kill('SIGKILL'));
  await waitForSocket(qsock);

  const ours = await run('nbdinfo', ['--map', '--json', d.uri('disk')]);
  const theirs = await run('nbdinfo', ['--map', '--json', `nbd+unix:///disk?socket=${qsock}`]);
  t.equal(ours.code, 0, ours.stderr);
  t.equal(theirs.code, 0, theirs.stderr);
  const simplify = (s: string) => (JSON.parse(s) as Array<{ offset: number; length: number; type: number }>).map((e) => [e.offset, e.length, e.type]);
  t.same(simplify(ours.stdout), simplify(theirs.stdout), 'same extents and types as qemu-nbd');
  t.ok(simplify(ours.stdout).length >= 7, 'the map has the data and the holes');
});
