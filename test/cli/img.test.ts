/**
 * `vdisk img` against qemu-img as the referee: the same command lines give
 * the same JSON (info, map, check), the same verdicts and exit codes
 * (check, compare), and images vdisk makes (create, convert, rebase, resize)
 * are what qemu-img says they should be.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { VDISK, patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

const vdisk = (args: string[], cwd?: string) => run(process.execPath, [VDISK, 'img', ...args], { cwd, timeoutMs: 120_000 });
const qimg = (args: string[], cwd?: string) => run('qemu-img', args, { cwd, timeoutMs: 120_000 });
const qio = (args: string[], cwd?: string) => run('qemu-io', args, { cwd, timeoutMs: 60_000 });

async function ok(t: Test, p: Promise<{ code: number | null; stdout: string; stderr: string }>, what: string): Promise<string> {
  const r = await p;
  t.equal(r.code, 0, `${what}: exit 0${r.stderr ? ` (${r.stderr.trim()})` : ''}`);
  return r.stdout;
}

/** Both tools' JSON for the same command line, parsed. */
async function bothJson(t: Test, args: string[], cwd: string): Promise<[unknown, unknown]> {
  const ours = await ok(t, vdisk(args, cwd), `vdisk img ${args.join(' ')}`);
  const theirs = await ok(t, qimg(args, cwd), `qemu-img ${args.join(' ')}`);
  return [JSON.parse(ours), JSON.parse(theirs)];
}

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io']) requireTool(t, tool);
});

t.test('create: the images qemu-img would make, and its errors', async (t) => {
  const dir = tempDir(t);
  for (const cs of ['512', '4k', '64k', '2M']) {
    const name = `c${cs}.qcow2`;
    const out = await ok(t, vdisk(['create', '-f', 'qcow2', '-o', `cluster_size=${cs}`, name, '100M'], dir), `create ${name}`);
    t.match(out, new RegExp(`^Formatting '${name}', fmt=qcow2 cluster_size=\\d+ extended_l2=off compression_type=zlib size=104857600 lazy_refcounts=off refcount_bits=16\\n$`));
    const chk = await qimg(['check', name], dir);
    t.equal(chk.code, 0, `qemu-img check ${name}: ${chk.stdout}${chk.stderr}`);
    const [ours, theirs] = await bothJson(t, ['info', '--output=json', name], dir);
    t.same(ours, theirs, `info of ${name} agrees with qemu-img`);
  }
  await ok(t, vdisk(['create', '-f', 'raw', 'base.raw', '64M'], dir), 'create raw');
  t.equal(fs.statSync(path.join(dir, 'base.raw')).size, 64 * MiB);
  t.equal(fs.statSync(path.join(dir, 'base.raw')).blocks, 0, 'raw is sparse');
  // No size: the backing file's.
  await ok(t, vdisk(['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'top.qcow2'], dir), 'create with backing');
  const [ours, theirs] = await bothJson(t, ['info', '--output=json', 'top.qcow2'], dir);
  t.same(ours, theirs, 'a qcow2 with a backing file: info agrees');
  t.equal((ours as Record<string, unknown>)['virtual-size'], 64 * MiB, "the backing file's size");
  await ok(t, vdisk(['create', '-f', 'qcow2', '-o', 'compat=0.10,refcount_bits=16', 'v2.qcow2', '1G'], dir), 'compat=0.10');
  t.same(...(await bothJson(t, ['info', '--output=json', 'v2.qcow2'], dir)), 'a version 2 image: info agrees');
  await ok(t, vdisk(['create', '-f', 'qcow2', '-o', 'lazy_refcounts=on,refcount_bits=8', 'lazy.qcow2', '1G'], dir), 'lazy refcounts');
  t.same(...(await bothJson(t, ['info', '--output=json', 'lazy.qcow2'], dir)), 'lazy_refcounts and refcount_bits=8: info agrees');
  t.equal((await qimg(['check', 'lazy.qcow2'], dir)).code, 0, 'and qemu-img check is clean');

  for (const [args, message] of [
    [['-f', 'qcow2', '-b', 'base.raw', 'e1.qcow2'], /Backing file specified without backing format/],
    [['-f', 'qcow2', '-o', 'cluster_size=3000', 'e2.qcow2', '1M'], /Cluster size must be a power of two between 512 and 2048k/],
    [['-f', 'qcow2', '-o', 'foo=1', 'e3.qcow2', '1M'], /Invalid parameter 'foo'/],
    [['-f', 'qcow2', 'e4.qcow2', 'abc'], /Invalid image size specified/],
    [['-f', 'vmdkx', 'e5', '1M'], /Unknown file format 'vmdkx'/],
    [['-f', 'qcow2', '-b', 'nonexist', '-F', 'raw', 'e6.qcow2'], /Could not open backing image/],
    [['-f', 'qcow2', '-o', 'extended_l2=on', 'e7.qcow2', '1M'], /Extended L2/],
  ] as Array<[string[], RegExp]>) {
    const r = await vdisk(['create', ...args], dir);
    t.equal(r.code, 1, `create ${args.join(' ')}: exit 1`);
    t.match(r.stderr, message);
  }
  for (const refused of ['e1.qcow2', 'e2.qcow2', 'e3.qcow2', 'e4.qcow2', 'e6.qcow2', 'e7.qcow2']) {
    t.notOk(fs.existsSync(path.join(dir, refused)), `${refused}: a refused create leaves no file`);
  }
});

t.test('info and map agree with qemu-img on images qemu-img wrote', async (t) => {
  const dir = tempDir(t);
  await ok(t, qimg(['create', '-f', 'raw', 'base.raw', '16M'], dir), 'base');
  await ok(t, qio(['-f', 'raw', '-c', 'write -P 7 1M 1M', '-c', 'write -P 9 8M 4k', 'base.raw'], dir), 'base data');
  await ok(t, qimg(['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'mid.qcow2'], dir), 'mid');
  await ok(t, qio(['-c', 'write -P 1 0 64k', '-c', 'write -z 1M 64k', '-c', 'write -P 2 3M 200k', 'mid.qcow2'], dir), 'mid data');
  await ok(t, qimg(['create', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'mid.qcow2', '-F', 'qcow2', 'top.qcow2'], dir), 'top');
  await ok(t, qio(['-c', 'write -P 3 4k 8k', '-c', 'write -z 3M 4k', '-c', 'write -P 4 15M 1k', 'top.qcow2'], dir), 'top data');
  fs.writeFileSync(path.join(dir, 'pattern.raw'), Buffer.concat([Buffer.alloc(MiB, 0x55), patternBuffer(MiB, 3), Buffer.alloc(2 * MiB)]));
  await ok(t, qimg(['convert', '-c', '-O', 'qcow2', 'pattern.raw', 'comp.qcow2'], dir), 'compressed image');

  for (const img of ['base.raw', 'mid.qcow2', 'top.qcow2', 'comp.qcow2']) {
    t.same(...(await bothJson(t, ['info', '--output=json', img], dir)), `info ${img}`);
    t.same(...(await bothJson(t, ['map', '--output=json', img], dir)), `map ${img}`);
  }
  t.same(...(await bothJson(t, ['info', '--output=json', '--backing-chain', 'top.qcow2'], dir)), 'info --backing-chain');
  t.same(...(await bothJson(t, ['map', '--output=json', '--start-offset=1M', '--max-length=3M', 'top.qcow2'], dir)), 'map of a window');
  t.equal(await ok(t, vdisk(['map', 'mid.qcow2'], dir), 'human map'), await ok(t, qimg(['map', 'mid.qcow2'], dir), 'qemu-img human map'), 'human map is the same text');
  const human = await ok(t, vdisk(['info', 'top.qcow2'], dir), 'human info');
  t.match(human, /^image: top\.qcow2\nfile format: qcow2\nvirtual size: 16 MiB \(16777216 bytes\)\ndisk size: .+\ncluster_size: 4096\nbacking file: mid\.qcow2\nbacking file format: qcow2\n/);
  const comp = await vdisk(['map', 'comp.qcow2'], dir);
  t.equal(comp.code, 1, 'human map of compressed clusters fails as in qemu-img');
  t.match(comp.stderr, /compressed clusters/);
  const missing = await vdisk(['info', 'nonexist.qcow2'], dir);
  t.equal(missing.code, 1);
  t.match(missing.stderr, /Could not open 'nonexist\.qcow2': No such file or directory/);
});

/** Sets a refcount (16-bit refcounts, first refcount block) by editing the file, as a damaged image would have it. */
function setRefcount(file: string, cluster: number, value: number): void {
  const fd = fs.openSync(file, 'r+');
  try {
    const h = Buffer.alloc(104);
    fs.readSync(fd, h, 0, 104, 0);
    const tableOffset = Number(h.readBigUInt64BE(48));
    const e = Buffer.alloc(8);
    fs.readSync(fd, e, 0, 8, tableOffset);
    const block = Number(e.readBigUInt64BE(0));
    const v = Buffer.alloc(2);
    v.writeUInt16BE(value);
    fs.writeSync(fd, v, 0, 2, block + cluster * 2);
  } finally {
    fs.closeSync(fd);
  }
}

t.test('check: verdicts, repairs and exit codes as qemu-img', async (t) => {
  const dir = tempDir(t);
  await ok(t, qimg(['create', '-f', 'qcow2', 'a.qcow2', '64M'], dir), 'create');
  await ok(t, qio(['-c', 'write -P 1 0 1M', '-c', 'write -P 2 10M 64k', 'a.qcow2'], dir), 'write');
  const clean = await vdisk(['check', 'a.qcow2'], dir);
  t.equal(clean.code, 0);
  t.equal(clean.stdout, (await qimg(['check', 'a.qcow2'], dir)).stdout, 'the same report for a clean image');
  t.same(...(await bothJson(t, ['check', '--output=json', 'a.qcow2'], dir)), 'check --output=json');

  // A leak: a cluster at the end of the file with refcount 1 and no reference.
  fs.copyFileSync(path.join(dir, 'a.qcow2'), path.join(dir, 'leak.qcow2'));
  const clusters = Math.ceil(fs.statSync(path.join(dir, 'leak.qcow2')).size / 65536);
  fs.truncateSync(path.join(dir, 'leak.qcow2'), (clusters + 1) * 65536);
  setRefcount(path.join(dir, 'leak.qcow2'), clusters, 1);
  const ql = await qimg(['check', 'leak.qcow2'], dir);
  const vl = await vdisk(['check', 'leak.qcow2'], dir);
  t.equal(ql.code, 3, 'qemu-img: leaks only is exit 3');
  t.equal(vl.code, 3, 'vdisk: exit 3 too');
  t.equal(vl.stdout, ql.stdout, 'the same report');
  t.match(vl.stderr, new RegExp(`Leaked cluster ${clusters} refcount=1 reference=0`));
  const fixed = await vdisk(['check', '-r', 'leaks', 'leak.qcow2'], dir);
  t.equal(fixed.code, 0, `-r leaks repairs: ${fixed.stdout}`);
  t.match(fixed.stdout, /The following inconsistencies were found and repaired:\n\n {4}1 leaked clusters\n {4}0 corruptions\n/);
  t.equal((await qimg(['check', 'leak.qcow2'], dir)).code, 0, 'qemu-img agrees it is clean now');

  // A corruption: the refcount of a data cluster dropped to 0 while the L2 table uses it.
  fs.copyFileSync(path.join(dir, 'a.qcow2'), path.join(dir, 'bad.qcow2'));
  const map = JSON.parse((await qimg(['map', '--output=json', 'bad.qcow2'], dir)).stdout) as Array<{ offset?: number }>;
  setRefcount(path.join(dir, 'bad.qcow2'), map[0].offset! / 65536, 0);
  const qb = await qimg(['check', 'bad.qcow2'], dir);
  const vb = await vdisk(['check', 'bad.qcow2'], dir);
  t.equal(qb.code, 2, 'qemu-img: corruption is exit 2');
  t.equal(vb.code, 2, 'vdisk: exit 2 too');
  t.same(JSON.parse((await vdisk(['check', '--output=json', 'bad.qcow2'], dir)).stdout).corruptions, JSON.parse((await qimg(['check', '--output=json', 'bad.qcow2'], dir)).stdout).corruptions, 'the same number of corruptions');
  t.equal((await vdisk(['check', '-r', 'leaks', 'bad.qcow2'], dir)).code, 2, '-r leaks leaves a corruption');
  const all = await vdisk(['check', '-r', 'all', 'bad.qcow2'], dir);
  t.equal(all.code, 0, `-r all repairs it: ${all.stdout}`);
  const after = await qimg(['check', 'bad.qcow2'], dir);
  t.equal(after.code, 0, `qemu-img agrees: ${after.stdout}`);
  const rd = await qio(['-r', '-c', 'read -P 1 0 1M', 'bad.qcow2'], dir);
  t.notMatch(rd.stdout, /Pattern verification failed/, 'the data is intact');

  await ok(t, qimg(['create', '-f', 'raw', 'r.raw', '1M'], dir), 'raw');
  const raw = await vdisk(['check', 'r.raw'], dir);
  t.equal(raw.code, 63, 'raw has no checks: exit 63, as qemu-img');
  t.equal((await qimg(['check', 'r.raw'], dir)).code, 63);
});

t.test('compare: exit codes and the first differing offset, as qemu-img', async (t) => {
  const dir = tempDir(t);
  await ok(t, qimg(['create', '-f', 'raw', 'a.raw', '16M'], dir), 'a');
  await ok(t, qimg(['create', '-f', 'qcow2', 'b.qcow2', '16M'], dir), 'b');
  await ok(t, qimg(['create', '-f', 'raw', 'c.raw', '20M'], dir), 'c');
  const cases: Array<[string[], string]> = [
    [['a.raw', 'b.qcow2'], 'empty raw and empty qcow2'],
    [['-s', 'a.raw', 'b.qcow2'], 'strict: allocation differs'],
    [['a.raw', 'c.raw'], 'different sizes, zero tail'],
    [['-s', 'a.raw', 'c.raw'], 'strict: sizes differ'],
  ];
  for (const [args, what] of cases) {
    const ours = await vdisk(['compare', ...args], dir);
    const theirs = await qimg(['compare', ...args], dir);
    t.equal(ours.code, theirs.code, `${what}: exit ${theirs.code}`);
    t.equal(ours.stdout, theirs.stdout, `${what}: ${theirs.stdout.trim()}`);
  }
  await ok(t, qio(['-f', 'qcow2', '-c', 'write -P 5 3000000 100', 'b.qcow2'], dir), 'write into b');
  await ok(t, qio(['-f', 'raw', '-c', 'write -P 6 18M 4k', 'c.raw'], dir), 'write into the tail of c');
  for (const [args, what] of [
    [['a.raw', 'b.qcow2'], 'content differs'],
    [['b.qcow2', 'a.raw'], 'the other way round'],
    [['a.raw', 'c.raw'], 'the longer tail has data'],
    [['-f', 'qcow2', '-F', 'qcow2', 'b.qcow2', 'b.qcow2'], 'same image'],
  ] as Array<[string[], string]>) {
    const ours = await vdisk(['compare', ...args], dir);
    const theirs = await qimg(['compare', ...args], dir);
    t.equal(ours.code, theirs.code, `${what}: exit ${theirs.code}`);
    t.equal(ours.stdout, theirs.stdout, `${what}: ${theirs.stdout.trim()}`);
  }
  const missing = await vdisk(['compare', 'a.raw', 'nonexist'], dir);
  t.equal(missing.code, 2, 'an error is exit 2');
  t.match(missing.stderr, /nonexist/);
});

t.test('convert: raw <-> qcow2, sparse, -B, -n and -p', async (t) => {
  const dir = tempDir(t);
  const src = Buffer.concat([patternBuffer(3 * MiB, 11), Buffer.alloc(5 * MiB), patternBuffer(MiB + 4096, 12), Buffer.alloc(MiB - 4096)]);
  src.fill(0, 100 * 1024, 200 * 1024); // a zero run inside data: skipped in the output
  fs.writeFileSync(path.join(dir, 'src.raw'), src);
  const out = await ok(t, vdisk(['convert', '-p', '-f', 'raw', '-O', 'qcow2', '-o', 'cluster_size=16k', 'src.raw', 'out.qcow2'], dir), 'raw -> qcow2');
  t.match(out, /\(100\.00\/100%\)/, 'progress reaches 100%');
  t.equal((await qimg(['compare', '-f', 'raw', '-F', 'qcow2', 'src.raw', 'out.qcow2'], dir)).code, 0, 'qemu-img: same content');
  t.equal((await qimg(['check', 'out.qcow2'], dir)).code, 0, 'qemu-img check clean');
  const map = JSON.parse((await qimg(['map', '--output=json', 'out.qcow2'], dir)).stdout) as Array<{ start: number; length: number; data: boolean }>;
  const dataBytes = map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
  t.ok(dataBytes <= 4 * MiB + 4096 + 16384, `only data was written (${dataBytes} bytes allocated)`);
  t.notOk(map.some((e) => e.data && e.start <= 150 * 1024 && e.start + e.length > 150 * 1024), 'the zero run inside data is not allocated');

  await ok(t, vdisk(['convert', '-O', 'raw', 'out.qcow2', 'back.raw'], dir), 'qcow2 -> raw');
  t.ok(fs.readFileSync(path.join(dir, 'back.raw')).equals(src), 'round trip is exact');
  t.ok(fs.statSync(path.join(dir, 'back.raw')).blocks * 512 < src.length / 2, 'and the raw output is sparse');

  // A chain flattened, and one kept on a base with -B.
  await ok(t, qimg(['create', '-f', 'qcow2', '-b', 'src.raw', '-F', 'raw', 'top.qcow2'], dir), 'overlay');
  await ok(t, qio(['-c', 'write -P 9 1M 64k', '-c', 'write -z 9M 1M', 'top.qcow2'], dir), 'overlay data');
  await ok(t, vdisk(['convert', '-O', 'qcow2', 'top.qcow2', 'flat.qcow2'], dir), 'flatten');
  t.equal((await qimg(['compare', 'top.qcow2', 'flat.qcow2'], dir)).code, 0, 'flattened: same content');
  t.equal(JSON.parse((await qimg(['info', '--output=json', 'flat.qcow2'], dir)).stdout)['backing-filename'], undefined, 'and no backing file');
  await ok(t, vdisk(['convert', '-O', 'qcow2', '-B', 'src.raw', '-F', 'raw', 'top.qcow2', 'thin.qcow2'], dir), 'convert -B');
  t.equal((await qimg(['compare', 'top.qcow2', 'thin.qcow2'], dir)).code, 0, '-B: same content');
  const thinMap = JSON.parse((await qimg(['map', '--output=json', 'thin.qcow2'], dir)).stdout) as Array<{ depth: number; data: boolean; length: number }>;
  t.ok(thinMap.filter((e) => e.depth === 0 && e.data).reduce((n, e) => n + e.length, 0) <= 64 * 1024, '-B: only the overlay data is in the new image');
  const missingF = await vdisk(['convert', '-O', 'qcow2', '-B', 'src.raw', 'top.qcow2', 'x.qcow2'], dir);
  t.equal(missingF.code, 1);
  t.match(missingF.stderr, /Use of backing file requires explicit backing format/);

  // -n: into an existing image, which must be written over (zeroes included).
  fs.writeFileSync(path.join(dir, 'existing.raw'), Buffer.alloc(src.length, 0xee));
  await ok(t, vdisk(['convert', '-n', '-O', 'raw', 'out.qcow2', 'existing.raw'], dir), 'convert -n');
  t.ok(fs.readFileSync(path.join(dir, 'existing.raw')).equals(src), '-n: the old content is gone, zeroes included');
  fs.writeFileSync(path.join(dir, 'small.raw'), Buffer.alloc(MiB));
  const small = await vdisk(['convert', '-n', '-O', 'raw', 'out.qcow2', 'small.raw'], dir);
  t.equal(small.code, 1);
  t.match(small.stderr, /output file is smaller than input file/);
});

t.test('rebase: safe keeps the content, -u only renames, "" flattens', async (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, 'old.raw'), Buffer.concat([patternBuffer(2 * MiB, 21), Buffer.alloc(2 * MiB)]));
  fs.writeFileSync(path.join(dir, 'new.raw'), Buffer.concat([patternBuffer(MiB, 21), patternBuffer(3 * MiB, 22)]));
  await ok(t, qimg(['create', '-f', 'qcow2', '-o', 'cluster_size=4k', '-b', 'old.raw', '-F', 'raw', 'img.qcow2'], dir), 'overlay');
  await ok(t, qio(['-c', 'write -P 3 512k 12k', 'img.qcow2'], dir), 'overlay data');
  await ok(t, qimg(['convert', '-O', 'raw', 'img.qcow2', 'before.raw'], dir), 'content before');

  await ok(t, vdisk(['rebase', '-b', 'new.raw', '-F', 'raw', 'img.qcow2'], dir), 'safe rebase');
  const info = JSON.parse((await qimg(['info', '--output=json', 'img.qcow2'], dir)).stdout);
  t.equal(info['backing-filename'], 'new.raw');
  t.equal(info['backing-filename-format'], 'raw');
  t.equal((await qimg(['compare', '-F', 'raw', 'img.qcow2', 'before.raw'], dir)).code, 0, 'the content is unchanged (qemu-img compare)');
  t.equal((await qimg(['check', 'img.qcow2'], dir)).code, 0, 'qemu-img check clean');

  fs.renameSync(path.join(dir, 'new.raw'), path.join(dir, 'moved.raw'));
  await ok(t, vdisk(['rebase', '-u', '-b', 'moved.raw', '-F', 'raw', 'img.qcow2'], dir), 'unsafe rebase after a move');
  t.equal((await qimg(['compare', '-F', 'raw', 'img.qcow2', 'before.raw'], dir)).code, 0, 'the content is unchanged');

  await ok(t, vdisk(['rebase', '-b', '', 'img.qcow2'], dir), 'rebase onto nothing');
  t.equal(JSON.parse((await qimg(['info', '--output=json', 'img.qcow2'], dir)).stdout)['backing-filename'], undefined, 'no backing file');
  fs.rmSync(path.join(dir, 'moved.raw'));
  t.equal((await qimg(['compare', '-F', 'raw', 'img.qcow2', 'before.raw'], dir)).code, 0, 'the image holds everything now');

  const noFmt = await vdisk(['rebase', '-b', 'old.raw', 'img.qcow2'], dir);
  t.equal(noFmt.code, 1);
  t.match(noFmt.stderr, /backing format must be specified/);
});

t.test('resize: grow both formats, shrink only with --shrink', async (t) => {
  const dir = tempDir(t);
  await ok(t, qimg(['create', '-f', 'qcow2', 'a.qcow2', '16M'], dir), 'qcow2');
  await ok(t, qio(['-c', 'write -P 8 15M 1M', 'a.qcow2'], dir), 'data at the end');
  t.equal(await ok(t, vdisk(['resize', 'a.qcow2', '+1G'], dir), 'grow qcow2'), 'Image resized.\n');
  t.equal(JSON.parse((await qimg(['info', '--output=json', 'a.qcow2'], dir)).stdout)['virtual-size'], 16 * MiB + 1024 * MiB);
  t.equal((await qimg(['check', 'a.qcow2'], dir)).code, 0, 'qemu-img check clean after growing');
  const rd = await qio(['-c', 'read -P 8 15M 1M', '-c', 'read -P 0 16M 1M', '-c', 'read -P 0 1040M 1M', 'a.qcow2'], dir);
  t.notMatch(rd.stdout, /verification failed/, 'old data kept, new space reads zeroes');

  await ok(t, qimg(['create', '-f', 'raw', 'r.raw', '16M'], dir), 'raw');
  const refused = await vdisk(['resize', '-f', 'raw', 'r.raw', '8M'], dir);
  t.equal(refused.code, 1, 'shrinking without --shrink is refused');
  t.match(refused.stderr, /Use the --shrink option/);
  t.equal(fs.statSync(path.join(dir, 'r.raw')).size, 16 * MiB, 'and nothing changed');
  await ok(t, vdisk(['resize', '-f', 'raw', '--shrink', 'r.raw', '-8M'], dir), 'shrink raw');
  t.equal(fs.statSync(path.join(dir, 'r.raw')).size, 8 * MiB);
  const zero = await vdisk(['resize', 'a.qcow2', '0'], dir);
  t.equal(zero.code, 1);
  t.match(zero.stderr, /New image size must be positive/);
});

t.test('convert -c: compressed clusters qemu-img reads, checks and maps as compressed', async (t) => {
  const dir = tempDir(t);
  const text = Buffer.alloc(3 * MiB, 'vdisk compresses this well. ');
  fs.writeFileSync(path.join(dir, 'text.raw'), Buffer.concat([text, Buffer.alloc(MiB), patternBuffer(MiB, 3)]));
  await ok(t, vdisk(['convert', '-c', '-O', 'qcow2', 'text.raw', 'c.qcow2'], dir), 'convert -c');
  t.equal((await qimg(['compare', '-f', 'raw', '-F', 'qcow2', 'text.raw', 'c.qcow2'], dir)).code, 0, 'same content');
  const chk = await qimg(['check', '--output=json', 'c.qcow2'], dir);
  t.equal(chk.code, 0, 'qemu-img check clean');
  const j = JSON.parse(chk.stdout);
  t.ok(j['compressed-clusters'] >= 48, `compressed clusters: ${j['compressed-clusters']}`);
  // Each compressed cluster has a host cluster of its own, written only as far as its data goes:
  // the file's length is that of an uncompressed image, the space it takes is small.
  t.ok(fs.statSync(path.join(dir, 'c.qcow2')).blocks * 512 < 2 * MiB, `and takes little space (${fs.statSync(path.join(dir, 'c.qcow2')).blocks * 512} bytes)`);
  const r = await vdisk(['convert', '-c', '-O', 'raw', 'text.raw', 'x.raw'], dir);
  t.equal(r.code, 1, 'raw cannot be compressed');
  t.match(r.stderr, /Compression not supported for format 'raw'/);
});
