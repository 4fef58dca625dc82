/**
 * The fuzz generators (src/fuzz/) against the real daemon: random and
 * damaged byte streams on its NBD socket (handshake and transmission) and
 * its QMP socket. Afterwards the daemon is up and serves nbdinfo and QMP,
 * the read-only export's image and an image that is open but not exported
 * keep their sha256, and the writable export (a 1 MiB window of its file)
 * changed nothing outside its window.
 */
import t from 'tap';
import fc from 'fast-check';
import { createHash } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { QmpWire } from '../helpers/qmp.js';
import { patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';
import { EXPORT_SIZE, nbdStreamArb } from '../../src/fuzz/nbd.js';
import { qmpSafeStreamArb } from '../../src/fuzz/qmp.js';

const MiB = 1024 * 1024;
/** Connections per protocol; VDISK_FUZZ_SCALE=10 makes a longer run of the same test by hand. */
const SCALE = Number(process.env.VDISK_FUZZ_SCALE ?? 1);
const SEED = Number(process.env.VDISK_FUZZ_SEED ?? 1300);
const sha = (f: string) => createHash('sha256').update(fs.readFileSync(f)).digest('hex');

/** Sends a stream in a few writes, half-closes, and waits (bounded) for the daemon to close. */
function throwAt(socketPath: string, stream: Buffer, cuts: number[]): Promise<void> {
  return new Promise((resolve) => {
    const s = net.connect(socketPath);
    const done = () => {
      clearTimeout(timer);
      s.destroy();
      resolve();
    };
    // A stream the daemon waits on (a half-sent request) ends when we close; this only bounds a bug.
    const timer = setTimeout(done, 10_000);
    s.on('error', done);
    s.on('close', done);
    s.on('data', () => undefined);
    s.on('connect', () => {
      let pos = 0;
      for (const c of cuts) {
        if (pos >= stream.length) break;
        s.write(stream.subarray(pos, pos + c * 7));
        pos += c * 7;
      }
      s.end(stream.subarray(pos));
    });
  });
}

t.test('random and damaged streams on the NBD and QMP sockets', async (t) => {
  requireTool(t, 'nbdinfo');
  t.setTimeout(120_000 * SCALE);
  const dir = tempDir(t);
  const rwFile = path.join(dir, 'rw.img');
  const roFile = path.join(dir, 'ro.img');
  const hiddenFile = path.join(dir, 'hidden.img');
  fs.writeFileSync(rwFile, patternBuffer(3 * MiB, 1));
  fs.writeFileSync(roFile, patternBuffer(EXPORT_SIZE, 2));
  fs.writeFileSync(hiddenFile, patternBuffer(MiB, 3));
  const rwBefore = fs.readFileSync(rwFile);
  const roSha = sha(roFile);
  const hiddenSha = sha(hiddenFile);
  const qmp = path.join(dir, 'qmp.sock');
  const d = await startDaemon(t, {
    dir,
    args: [
      '--blockdev', `driver=file,node-name=frw,filename=${rwFile}`,
      // The writable export is the middle MiB of its file: a write outside it would show.
      '--blockdev', `driver=raw,node-name=rw,file=frw,offset=${MiB},size=${EXPORT_SIZE}`,
      '--blockdev', `driver=file,node-name=ro,filename=${roFile}`,
      '--blockdev', `driver=file,node-name=hidden,filename=${hiddenFile}`,
      '--export', 'type=nbd,id=e0,node-name=rw,name=rw,writable=on',
      '--export', 'type=nbd,id=e1,node-name=ro,name=ro',
      '--qmp', `unix:${qmp}`,
      '--log-level', 'error',
    ],
  });

  const nbdStreams = fc.sample(fc.tuple(nbdStreamArb, fc.array(fc.integer({ min: 1, max: 20 }), { minLength: 1, maxLength: 6 })), { seed: SEED, numRuns: 240 * SCALE });
  for (let i = 0; i < nbdStreams.length; i += 12) {
    await Promise.all(nbdStreams.slice(i, i + 12).map(([s, cuts]) => throwAt(d.socket, s, cuts)));
  }
  const qmpStreams = fc.sample(fc.tuple(qmpSafeStreamArb, fc.array(fc.integer({ min: 1, max: 20 }), { minLength: 1, maxLength: 6 })), { seed: SEED + 1, numRuns: 120 * SCALE });
  for (let i = 0; i < qmpStreams.length; i += 12) {
    await Promise.all(qmpStreams.slice(i, i + 12).map(([s, cuts]) => throwAt(qmp, s, cuts)));
  }

  t.equal(d.proc.exitCode, null, 'the daemon is still running');
  // --log-level error: any line at all is an internal error (a refused input logs at warn or below).
  t.equal(d.stderr(), '', 'no error was logged');
  for (const name of ['rw', 'ro']) {
    const r = await run('nbdinfo', ['--size', d.uri(name)], { timeoutMs: 20_000 });
    t.equal(r.code, 0, `nbdinfo still gets export '${name}': ${r.stderr}`);
    t.equal(r.stdout.trim(), String(EXPORT_SIZE));
  }
  const w = await QmpWire.connect(qmp);
  t.match(await w.cmd('query-version'), { return: { qemu: { major: 7 } } }, 'QMP still answers');
  const exports = await w.cmd('query-block-exports');
  t.equal((exports.return as unknown[]).length, 2, 'both exports are still there');
  w.close();

  t.equal(sha(roFile), roSha, 'the read-only export is unchanged');
  t.equal(sha(hiddenFile), hiddenSha, 'the image nobody exported is unchanged');
  const rwAfter = fs.readFileSync(rwFile);
  t.ok(rwAfter.subarray(0, MiB).equals(rwBefore.subarray(0, MiB)), 'nothing written before the writable window');
  t.ok(rwAfter.subarray(2 * MiB).equals(rwBefore.subarray(2 * MiB)), 'nothing written after the writable window');
  t.notOk(rwAfter.subarray(MiB, 2 * MiB).equals(rwBefore.subarray(MiB, 2 * MiB)), 'the fuzz did write inside the window (it reached transmission)');
});
