/**
 * Backups to object storage (x-backup-s3, `vdisk img restore-s3`) against a real radosgw in a
 * throwaway Ceph cluster (scripts/ceph-cluster.sh start + rgw-start). One daemon, one 64 MiB
 * qcow2 drive written over NBD with qemu-io, one bucket made through the S3 API:
 *
 *   t0 copy -> full backup (guest writes land while it runs) -> t1 copy -> incremental
 *   -> more guest writes -> restore both points in time, qemu-img compare with the copies
 *
 * then: the manifests' checksums against `sha256sum` of the downloaded objects, bad credentials
 * (a clear error, the bitmap untouched), and a corrupted and a missing object found by restore.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { S3Client } from '../../src/backup/s3/client.js';
import type { Manifest } from '../../src/backup/s3/manifest.js';
import { Harness, MiB, WRITES1, WRITES2 } from '../helpers/backup.js';
import { startCeph, startRgw } from '../helpers/ceph.js';
import { makePki } from '../helpers/tls.js';
import { VDISK, requireTools, run, tempDir } from '../helpers/tools.js';

requireTools(t, 'qemu-img', 'qemu-io', 'sha256sum', 'radosgw', 'radosgw-admin', 'curl', 'certtool');
const ceph = await startCeph(t);
// The gateway also serves https, with a certificate for 127.0.0.1 from a test CA.
const pki = await makePki(tempDir(t, 'vdisk-s3-pki-'));
const rgw = await startRgw(ceph, { cert: path.join(pki.server, 'server-cert.pem'), key: path.join(pki.server, 'server-key.pem') });
t.comment(`radosgw up with an S3 user in ${rgw.startSeconds.toFixed(1)} s at ${rgw.endpoint} and ${rgw.httpsEndpoint}`);

const BUCKET = 'vdisk-backups';
const PREFIX = 'vm1/disk0/';
const s3 = new S3Client({ endpoint: rgw.endpoint, bucket: BUCKET, credentials: { accessKey: rgw.accessKey, secretKey: rgw.secretKey } });
t.teardown(() => s3.close());
await s3.createBucket();

const h = new Harness(t);
await h.start();
const drive = await h.addDrive('d0');
await h.w.ok('object-add', { 'qom-type': 'secret', id: 's3key', data: rgw.secretKey });
await h.w.ok('block-dirty-bitmap-add', { node: 'd0', name: 'b0' });

const s3Args = { endpoint: rgw.endpoint, bucket: BUCKET, prefix: PREFIX, 'access-key': rgw.accessKey, secret: 's3key' };
const nbdUri = `nbd+unix:///d0?socket=${drive.nbd}`;
/** The drive as the guest sees it now, as a raw file (read through the NBD export). */
async function snapshot(name: string): Promise<string> {
  const file = path.join(h.dir, name);
  const r = await run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', nbdUri, file]);
  if (r.code !== 0) throw new Error(`qemu-img convert: ${r.stderr}`);
  return file;
}
async function getJson<T>(key: string): Promise<T> {
  return JSON.parse((await s3.getObject(key)).toString('utf8')) as T;
}
function restoreS3(args: string[]) {
  return run(VDISK, ['img', 'restore-s3', '--endpoint', rgw.endpoint, '--bucket', BUCKET, '--prefix', PREFIX, ...args], {
    env: { ...process.env, AWS_ACCESS_KEY_ID: rgw.accessKey, AWS_SECRET_ACCESS_KEY: rgw.secretKey },
    timeoutMs: 120_000,
  });
}
async function bitmapState() {
  const info = await h.bitmapInfo(drive, 'b0');
  const hash = (await h.w.ok('x-debug-block-dirty-bitmap-sha256', { node: 'd0', name: 'b0' })) as { sha256: string };
  return { count: info?.count, busy: info?.busy, sha256: hash.sha256 };
}

let fullKey = '';
let incKey = '';
let t0 = '';
let t1 = '';

t.test('full backup: point in time while the guest writes, zero chunks skipped, bitmap cleared', async (t) => {
  t0 = await snapshot('t0.raw');
  const from = h.w.messages.length;
  // 16 MiB/s: the 64 MiB job takes about 4 s, so the guest's writes below land while it runs.
  await h.w.ok('x-backup-s3', { ...s3Args, 'job-id': 's3full', device: 'd0', sync: 'full', bitmap: 'b0', speed: 16 * MiB });
  await h.writes(drive, WRITES1);
  const jobs = (await h.w.ok('query-block-jobs')) as Array<{ device: string; type: string }>;
  t.ok(jobs.some((j) => j.device === 's3full' && j.type === 'backup'), 'the guest wrote while the job ran');
  t.ok(await h.waitBackup('s3full', from), 'the full backup completed');
  t1 = await snapshot('t1.raw');

  const latest = await getJson<{ manifest: string; sha256: string }>(`${PREFIX}latest.json`);
  fullKey = latest.manifest;
  t.match(fullKey, /^vm1\/disk0\/manifests\/\d{8}T\d{9}Z-full\.json$/, 'latest.json names the full manifest');
  const m = await getJson<Manifest>(fullKey);
  t.equal(m.sync, 'full');
  t.equal(m.size, 64 * MiB);
  t.equal(m.chunkSize, 4 * MiB);
  t.equal(m.bitmap, 'b0');
  t.equal(m.parent, null);
  // 124's pattern: data at 0, 1 MiB and 32 MiB, so chunks 0 and 8; the other 14 are zeroes and have no object.
  t.same(m.chunks.map((c) => c.offset), [0, 32 * MiB], 'only the chunks holding data are listed');
  t.equal(m.stats.uploadedChunks, 2);
  // on-success: the bitmap now holds only what was written after the point in time. WRITES1 covers
  // 7 granules of 64 KiB: 0, four at 16 MiB, and 32736k + 64k straddles two.
  t.equal((await bitmapState()).count, 7 * 65536, 'the bitmap was cleared at the point in time and holds the writes made during the job');
});

t.test('incremental: only the dirty chunks are read, the rest come from the parent', async (t) => {
  // WRITES1 landed during the full backup, after its point in time: chunks 0, 4, 7 and 8 (32736k + 64k crosses 32 MiB).
  const from = h.w.messages.length;
  await h.w.ok('x-backup-s3', { ...s3Args, 'job-id': 's3inc', device: 'd0', sync: 'incremental', bitmap: 'b0' });
  t.ok(await h.waitBackup('s3inc', from), 'the incremental completed');
  const latest = await getJson<{ manifest: string }>(`${PREFIX}latest.json`);
  incKey = latest.manifest;
  t.match(incKey, /-inc\.json$/);
  const m = await getJson<Manifest>(incKey);
  const full = await getJson<Manifest>(fullKey);
  t.equal(m.sync, 'incremental');
  t.equal(m.parent?.key, fullKey, 'the parent is the full backup');
  t.equal(m.parent?.id, full.id);
  t.equal(m.stats.readChunks, 4, 'four chunks read from the disk');
  t.same(m.chunks.map((c) => c.offset / MiB), [0, 4 * 4, 7 * 4, 8 * 4], 'the changed chunks and the parent data chunks');
  const origin = Object.fromEntries(m.chunks.map((c) => [c.offset / MiB, c.origin]));
  t.same(origin, { 0: m.id, 16: m.id, 28: m.id, 32: m.id }, 'every listed chunk changed, so every one is this backup\'s');
  t.equal((await bitmapState()).count, 0, 'the bitmap is clean after the incremental');

  // A chunk the incremental did not read keeps the parent's entry: write one chunk, back up, look.
  await h.writes(drive, [[0x42, '60M', '4k']]);
  const from2 = h.w.messages.length;
  await h.w.ok('x-backup-s3', { ...s3Args, 'job-id': 's3inc2', device: 'd0', sync: 'incremental', bitmap: 'b0' });
  t.ok(await h.waitBackup('s3inc2', from2));
  const key2 = (await getJson<{ manifest: string }>(`${PREFIX}latest.json`)).manifest;
  const m2 = await getJson<Manifest>(key2);
  t.equal(m2.parent?.key, incKey);
  t.equal(m2.stats.readChunks, 1);
  t.equal(m2.stats.uploadedChunks, 1);
  t.same(m2.chunks.filter((c) => c.origin === m.id).map((c) => c.offset / MiB), [0, 16, 28, 32], 'unchanged chunks reference the parent\'s objects');
  t.same(m2.chunks.filter((c) => c.origin === m2.id).map((c) => c.offset / MiB), [60]);
  // Later guest writes: the disk now differs from both points in time the restores must give.
  await h.writes(drive, WRITES2);
});

t.test('restore both points in time and compare with the copies taken then', async (t) => {
  const out0 = path.join(h.dir, 'restored-full.raw');
  const r0 = await restoreS3(['--manifest', fullKey, out0]);
  t.equal(r0.code, 0, `restore of the full backup: ${r0.stderr}`);
  t.match(r0.stdout, /every chunk verified/);
  const c0 = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', out0, t0]);
  t.equal(c0.code, 0, `the full backup is the disk at its start, not with the writes made during it: ${c0.stdout}`);

  const out1 = path.join(h.dir, 'restored-inc.qcow2');
  const r1 = await restoreS3(['-O', 'qcow2', '--manifest', incKey, out1]);
  t.equal(r1.code, 0, `restore of the incremental: ${r1.stderr}`);
  const c1 = await run('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', out1, t1]);
  t.equal(c1.code, 0, `the incremental is the disk at its start: ${c1.stdout}`);
  const check = await run('qemu-img', ['check', out1]);
  t.equal(check.code, 0, 'the restored qcow2 passes qemu-img check');

  const now = await snapshot('now.raw');
  const cNow = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', out0, now]);
  t.equal(cNow.code, 1, 'and the disk has changed since (the comparison means something)');

  const outLatest = path.join(h.dir, 'restored-latest.raw');
  const rl = await restoreS3([outLatest]);
  t.equal(rl.code, 0, 'without --manifest, latest.json is restored');
  const verify = await restoreS3(['--verify-only', '--manifest', fullKey]);
  t.equal(verify.code, 0, `--verify-only: ${verify.stdout}${verify.stderr}`);
});

t.test('the manifests list checksums that sha256sum of the downloaded objects agrees with', async (t) => {
  const listed = await s3.listObjects(`${PREFIX}chunks/`);
  const dir = path.join(h.dir, 'objects');
  fs.mkdirSync(dir);
  const files: string[] = [];
  for (const o of listed) {
    const file = path.join(dir, path.basename(o.key));
    fs.writeFileSync(file, await s3.getObject(o.key));
    files.push(file);
  }
  const sums = await run('sha256sum', files);
  t.equal(sums.code, 0);
  const byKey = new Map(sums.stdout.trim().split('\n').map((line) => {
    const [sum, file] = line.split(/\s+/);
    return [`${PREFIX}chunks/${path.basename(file)}`, sum];
  }));
  const referenced = new Set<string>();
  for (const key of [fullKey, incKey]) {
    const m = await getJson<Manifest>(key);
    for (const c of m.chunks) {
      t.equal(byKey.get(c.key), c.sha256, `${path.basename(key)}: chunk at ${c.offset / MiB} MiB`);
      t.equal(fs.statSync(path.join(dir, path.basename(c.key))).size, c.length, 'object size is the chunk length');
      referenced.add(c.key);
    }
  }
  t.ok(referenced.size >= 2 && referenced.size <= listed.length, `${referenced.size} objects referenced, ${listed.length} stored`);
});

t.test('bad credentials: a clear error, and the bitmap is left as it was', async (t) => {
  await h.writes(drive, [[0x17, '40M', '64k']]);
  const before = await bitmapState();
  t.ok((before.count ?? 0) > 0, 'the bitmap has dirty bits to lose');
  await h.w.ok('object-add', { 'qom-type': 'secret', id: 'wrong', data: 'not-the-secret-key-at-all-0123456789abcd' });
  const badSecret = await h.w.cmd('x-backup-s3', { ...s3Args, secret: 'wrong', 'job-id': 'bad1', device: 'd0', sync: 'incremental', bitmap: 'b0' });
  t.match(badSecret.error?.desc, /HTTP 403 SignatureDoesNotMatch.*the secret key does not match the access key/, `wrong secret: ${badSecret.error?.desc}`);
  const badKey = await h.w.cmd('x-backup-s3', { ...s3Args, 'access-key': 'NOSUCHKEY0123456789X', 'job-id': 'bad2', device: 'd0', sync: 'full', bitmap: 'b0' });
  t.match(badKey.error?.desc, /HTTP 403 InvalidAccessKeyId.*the access key is not known/, `unknown access key: ${badKey.error?.desc}`);
  const badBucket = await h.w.cmd('x-backup-s3', { ...s3Args, bucket: 'no-such-bucket', 'job-id': 'bad3', device: 'd0', sync: 'incremental', bitmap: 'b0' });
  t.match(badBucket.error?.desc, /HTTP 404 NoSuchBucket/, `missing bucket: ${badBucket.error?.desc}`);
  t.same(await bitmapState(), before, 'the bitmap: same bits, not busy');
  t.same(await h.w.ok('query-block-jobs'), [], 'no job was started');

  const rBad = await run(VDISK, ['img', 'restore-s3', '--endpoint', rgw.endpoint, '--bucket', BUCKET, '--prefix', PREFIX, path.join(h.dir, 'never.raw')], {
    env: { ...process.env, AWS_ACCESS_KEY_ID: rgw.accessKey, AWS_SECRET_ACCESS_KEY: 'wrong' },
  });
  t.equal(rBad.code, 1, 'restore with a wrong secret exits 1');
  t.match(rBad.stderr, /SignatureDoesNotMatch/);
  t.notOk(fs.existsSync(path.join(h.dir, 'never.raw')), 'and creates no image');
});

t.test('credentials revoked while the job runs: the job fails with S3\'s answer, the bitmap keeps its bits', async (t) => {
  // Ten chunks dirty; at 4 MiB/s the job reads about one chunk a second.
  await h.writes(drive, Array.from({ length: 10 }, (_, i): [number, string, string] => [0x30 + i, `${i * 4 + 2}M`, '4k']));
  const before = await bitmapState();
  const latestBefore = (await getJson<{ manifest: string }>(`${PREFIX}latest.json`)).manifest;
  const from = h.w.messages.length;
  await h.w.ok('x-backup-s3', { ...s3Args, 'job-id': 'revoked', device: 'd0', sync: 'incremental', bitmap: 'b0', speed: 4 * MiB });
  const suspend = await run('radosgw-admin', ['-c', ceph.conf, 'user', 'suspend', '--uid=vdisk-test'], { env: ceph.env });
  t.equal(suspend.code, 0, `radosgw-admin user suspend: ${suspend.stderr}`);
  t.teardown(() => run('radosgw-admin', ['-c', ceph.conf, 'user', 'enable', '--uid=vdisk-test'], { env: ceph.env }));
  const ev = await h.w.waitFor((m) => m.event === 'BLOCK_JOB_COMPLETED' && m.data?.device === 'revoked', 60_000, from);
  t.match(ev.data?.error, /^S3 PUT vm1\/disk0\/chunks\/[0-9a-f]{64} at .*: HTTP 403 UserSuspended/, `the job's error says what S3 answered: ${ev.data?.error}`);
  t.ok((ev.data?.offset as number) < (ev.data?.len as number), 'the job stopped part-way');
  await h.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.id === 'revoked' && m.data?.status === 'null', 20_000, from);
  t.same(await bitmapState(), before, 'the bitmap has the same bits as before the job, and is not busy');
  const enable = await run('radosgw-admin', ['-c', ceph.conf, 'user', 'enable', '--uid=vdisk-test'], { env: ceph.env });
  t.equal(enable.code, 0);
  // Read with the same (suspended until now) user, so only after it is enabled again.
  t.equal((await getJson<{ manifest: string }>(`${PREFIX}latest.json`)).manifest, latestBefore, 'latest.json still names the last complete backup');
  // The same incremental again, once the user is back: it succeeds and the chain goes on.
  const from2 = h.w.messages.length;
  await h.w.ok('x-backup-s3', { ...s3Args, 'job-id': 'again', device: 'd0', sync: 'incremental', bitmap: 'b0' });
  t.ok(await h.waitBackup('again', from2), 'the retried incremental completed');
  const m = await getJson<Manifest>((await getJson<{ manifest: string }>(`${PREFIX}latest.json`)).manifest);
  t.equal(m.parent?.key, latestBefore, 'its parent is the last complete backup');
  t.equal(m.stats.readChunks, 11, 'it read the ten chunks and the one written in the previous test');
});

t.test('a cancelled job stores no manifest and gives the bitmap its bits back', async (t) => {
  await h.writes(drive, [[0x61, '1M', '4k'], [0x62, '9M', '4k'], [0x63, '17M', '4k'], [0x64, '25M', '4k']]);
  const before = await bitmapState();
  const latestBefore = (await getJson<{ manifest: string }>(`${PREFIX}latest.json`)).manifest;
  const manifestsBefore = (await s3.listObjects(`${PREFIX}manifests/`)).map((o) => o.key);
  t.equal(manifestsBefore.length, 4, 'full, inc, inc2 and the retried one (the revoked job stored none)');
  const from = h.w.messages.length;
  // 1 MiB/s: the first chunk goes at once, the next one seconds later.
  await h.w.ok('x-backup-s3', { ...s3Args, 'job-id': 'cancelled', device: 'd0', sync: 'incremental', bitmap: 'b0', speed: MiB });
  await h.w.ok('block-job-cancel', { device: 'cancelled' });
  const ev = await h.w.waitFor((m) => m.event === 'BLOCK_JOB_CANCELLED' && m.data?.device === 'cancelled', 30_000, from);
  t.ok((ev.data?.offset as number) < (ev.data?.len as number), 'cancelled part-way');
  await h.w.waitFor((m) => m.event === 'JOB_STATUS_CHANGE' && m.data?.id === 'cancelled' && m.data?.status === 'null', 20_000, from);
  t.same(await bitmapState(), before, 'the bitmap is as before the job');
  t.equal((await getJson<{ manifest: string }>(`${PREFIX}latest.json`)).manifest, latestBefore, 'latest.json is unchanged');
  t.same((await s3.listObjects(`${PREFIX}manifests/`)).map((o) => o.key), manifestsBefore, 'no manifest for the cancelled job');
});

t.test('a raw image whose size is not a multiple of the chunk size, 128 KiB chunks', async (t) => {
  const file = path.join(h.dir, 'odd.raw');
  const size = 5 * MiB + 3 * 4096;
  fs.writeFileSync(file, Buffer.alloc(0));
  fs.truncateSync(file, size);
  // Data in the first chunk, in the middle, and in the last (partial) chunk up to the image's last byte.
  const io = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 4k', '-c', 'write -P 0x22 2M 200k', '-c', `write -P 0x33 ${size - 8192} 8192`, file]);
  t.equal(io.code, 0, io.stderr);
  const expected = path.join(h.dir, 'odd-expected.raw');
  fs.copyFileSync(file, expected);
  await h.w.ok('blockdev-add', { driver: 'raw', 'node-name': 'odd', file: { driver: 'file', filename: file } });
  const from = h.w.messages.length;
  await h.w.ok('x-backup-s3', { ...s3Args, prefix: 'vm1/odd', 'job-id': 'odd', device: 'odd', sync: 'full', 'chunk-size': 128 * 1024 });
  t.ok(await h.waitBackup('odd', from), 'the backup completed');
  const m = await getJson<Manifest>((await getJson<{ manifest: string }>('vm1/odd/latest.json')).manifest);
  t.equal(m.size, size);
  t.equal(m.chunkSize, 128 * 1024);
  const last = m.chunks[m.chunks.length - 1];
  t.same([last.offset, last.length], [5 * MiB, 3 * 4096], 'the last chunk is the 12 KiB past 5 MiB');
  t.same(m.chunks.map((c) => c.offset / 1024), [0, 2048, 2176, 5120], 'chunks with data only (200k at 2M spans two)');
  for (const format of ['raw', 'qcow2']) {
    const out = path.join(h.dir, `odd-restored.${format}`);
    const r = await run(VDISK, ['img', 'restore-s3', '-O', format, '--endpoint', rgw.endpoint, '--bucket', BUCKET, '--prefix', 'vm1/odd', out], {
      env: { ...process.env, AWS_ACCESS_KEY_ID: rgw.accessKey, AWS_SECRET_ACCESS_KEY: rgw.secretKey },
    });
    t.equal(r.code, 0, `restore to ${format}: ${r.stderr}`);
    // qcow2 rounds the virtual size up to 512 bytes; this size is already a multiple of 4096.
    const c = await run('qemu-img', ['compare', '-f', format, '-F', 'raw', out, expected]);
    t.equal(c.code, 0, `restored ${format} = the image: ${c.stdout}`);
  }
  await h.w.ok('blockdev-del', { 'node-name': 'odd' });
});

t.test('https: the endpoint is checked against a tls-creds-x509 CA; an untrusted one is refused', async (t) => {
  const https = rgw.httpsEndpoint!;
  const httpsArgs = { ...s3Args, endpoint: https, prefix: 'vm1/https/' };
  const untrusted = await h.w.cmd('x-backup-s3', { ...httpsArgs, 'job-id': 'tls0', device: 'd0', sync: 'full' });
  t.match(untrusted.error?.desc, /^S3 list the bucket at https:\/\/127\.0\.0\.1:\d+\/vdisk-backups: .*(self.signed|unable to (get|verify))/i, `without the CA: ${untrusted.error?.desc}`);
  await h.w.ok('object-add', { 'qom-type': 'tls-creds-x509', id: 'rgw-ca', dir: pki.client, endpoint: 'client' });
  const expected = await snapshot('https-t.raw');
  const from = h.w.messages.length;
  await h.w.ok('x-backup-s3', { ...httpsArgs, 'tls-creds': 'rgw-ca', 'job-id': 'tls1', device: 'd0', sync: 'full' });
  t.ok(await h.waitBackup('tls1', from), 'a full backup over https completed');
  const out = path.join(h.dir, 'restored-https.raw');
  const args = ['--endpoint', https, '--bucket', BUCKET, '--prefix', 'vm1/https/'];
  const env = { ...process.env, AWS_ACCESS_KEY_ID: rgw.accessKey, AWS_SECRET_ACCESS_KEY: rgw.secretKey };
  const refused = await run(VDISK, ['img', 'restore-s3', ...args, out], { env });
  t.equal(refused.code, 1, 'restore without --ca-file refuses the test CA\'s certificate');
  t.match(refused.stderr, /self.signed|unable to (get|verify)/i);
  const r = await run(VDISK, ['img', 'restore-s3', ...args, '--ca-file', path.join(pki.client, 'ca-cert.pem'), out], { env, timeoutMs: 120_000 });
  t.equal(r.code, 0, `restore over https: ${r.stderr}`);
  const c = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', out, expected]);
  t.equal(c.code, 0, `restored over https = the disk: ${c.stdout}`);
});

t.test('restore finds a corrupted object and a missing one', async (t) => {
  const m = await getJson<Manifest>(fullKey);
  const [first, second] = m.chunks;
  const bytes = await s3.getObject(first.key);
  bytes[12345] ^= 0x01;
  await s3.putObject(first.key, bytes);
  const out = path.join(h.dir, 'corrupt.raw');
  const r = await restoreS3(['--manifest', fullKey, out]);
  t.equal(r.code, 1, 'exit status 1');
  t.match(r.stderr, new RegExp(`chunk at offset 0: object ${first.key} has SHA-256 [0-9a-f]{64}, the manifest says ${first.sha256} \\(the object is damaged or was replaced\\)`));
  t.match(r.stderr, /was removed: it does not hold the backup/);
  t.notOk(fs.existsSync(out), 'no half-restored image is left behind');

  await s3.deleteObject(second.key);
  const v = await restoreS3(['--verify-only', '--manifest', fullKey]);
  t.equal(v.code, 1);
  t.match(v.stderr, /2 of 2 chunk\(s\) failed verification/);
  t.match(v.stderr, new RegExp(`chunk at offset ${32 * MiB}: object ${second.key} is missing`));
});
