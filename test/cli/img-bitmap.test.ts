/**
 * `vdisk img bitmap` and the bitmaps of `vdisk img info` / `vdisk io -c info`,
 * with QEMU 7.2's tools as the referee.
 *
 * Each scenario applies the same command lines with qemu-img to one copy of
 * an image and with vdisk to another, and then wants: the same exit codes
 * and messages (the program name and qemu-img's random #blockNNN node names
 * aside), the same `qemu-img info --output=json` (file name and disk usage
 * aside), a clean `qemu-img check` of vdisk's copy, and the same bitmap
 * CONTENT: both copies are exported read-only by qemu-nbd with every bitmap
 * (-B) and read with `nbdinfo --map=qemu:dirty-bitmap:NAME`. The bitmaps are
 * filled first by qemu-io writes while they record, and written to again
 * after the scenario, so an enabled bitmap must really be stored enabled.
 */
import t, { type Test } from 'tap';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon, waitForSocket } from '../helpers/daemon.js';
import { stopQsd } from '../helpers/peers.js';
import { VDISK, requireTool, run, tempDir } from '../helpers/tools.js';

const IMG = '@IMG@';

const vimg = (args: string[], cwd: string) => run(process.execPath, [VDISK, 'img', ...args], { cwd, timeoutMs: 60_000 });
const qimg = (args: string[], cwd: string) => run('qemu-img', args, { cwd, timeoutMs: 60_000 });

// About 900 runs of qemu-img, qemu-io, qemu-nbd and vdisk: 130 s on a quiet
// 2-core machine, more than tap's 300 s per file when the machine is busy.
t.setTimeout(900_000);

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io', 'qemu-nbd', 'qemu-storage-daemon', 'nbdinfo']) requireTool(t, tool);
});

async function must(t: Test, cmd: string, args: string[], cwd: string): Promise<string> {
  const r = await run(cmd, args, { cwd, timeoutMs: 60_000 });
  t.equal(r.code, 0, `${cmd} ${args.join(' ')}${r.code ? `: ${r.stdout}${r.stderr}` : ''}`);
  // qemu-io reports a failed command on stdout and still exits 0.
  if (cmd === 'qemu-io' && /failed/.test(r.stdout)) t.fail(`${cmd} ${args.join(' ')}: ${r.stdout}`);
  return r.stdout;
}

/**
 * base.qcow2 (64 MiB) holds b0 (64 KiB, recording), b1 (4 KiB, disabled
 * after the first writes) and b2 (1 MiB, recording, added after them), all
 * with content; other.qcow2 holds `src`; small.qcow2 (32 MiB) holds `small`.
 */
async function images(t: Test): Promise<string> {
  const dir = tempDir(t, 'vdisk-bitmap-');
  await must(t, 'qemu-img', ['create', '-f', 'qcow2', 'base.qcow2', '64M'], dir);
  await must(t, 'qemu-img', ['bitmap', '--add', 'base.qcow2', 'b0'], dir);
  await must(t, 'qemu-img', ['bitmap', '--add', '-g', '4k', 'base.qcow2', 'b1'], dir);
  await must(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -P 1 0 512', '-c', 'write -P 2 16M 256k', '-c', 'write -P 3 32736k 64k', 'base.qcow2'], dir);
  await must(t, 'qemu-img', ['bitmap', '--disable', 'base.qcow2', 'b1'], dir);
  await must(t, 'qemu-img', ['bitmap', '--add', '-g', '1M', 'base.qcow2', 'b2'], dir);
  await must(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -P 4 40M 1k', '-c', 'write -z 48M 2M', 'base.qcow2'], dir);
  await must(t, 'qemu-img', ['create', '-f', 'qcow2', '-o', 'cluster_size=4k', 'other.qcow2', '64M'], dir);
  await must(t, 'qemu-img', ['bitmap', '--add', 'other.qcow2', 'src'], dir);
  await must(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -P 5 8M 1M', '-c', 'write -P 6 60M 12k', 'other.qcow2'], dir);
  await must(t, 'qemu-img', ['create', '-f', 'qcow2', 'small.qcow2', '32M'], dir);
  await must(t, 'qemu-img', ['bitmap', '--add', 'small.qcow2', 'small'], dir);
  await must(t, 'qemu-img', ['create', '-f', 'raw', 'disk.raw', '64M'], dir);
  await must(t, 'qemu-img', ['create', '-f', 'qcow2', '-o', 'compat=0.10', 'v2.qcow2', '64M'], dir);
  return dir;
}

/** An image's bitmaps as qemu-img info lists them. */
async function listed(img: string, dir: string): Promise<Array<{ name: string; granularity: number; flags: string[] }>> {
  const r = await qimg(['info', '-U', '--output=json', img], dir);
  return JSON.parse(r.stdout)['format-specific']?.data?.bitmaps ?? [];
}

/** qemu-img info --output=json without what differs between two copies (their names, their disk usage). */
async function infoOf(img: string, dir: string): Promise<unknown> {
  const r = await qimg(['info', '--output=json', img], dir);
  const info = JSON.parse(r.stdout);
  delete info.filename;
  delete info['actual-size'];
  return info;
}

/** Every consistent bitmap's dirty map, read over NBD from qemu-nbd (read-only). */
async function contents(t: Test, img: string, dir: string): Promise<Record<string, string>> {
  const names = (await listed(img, dir)).filter((b) => !b.flags.includes('in-use')).map((b) => b.name);
  if (names.length === 0) return {};
  const sock = path.join(dir, `nbd-${path.basename(img)}.sock`);
  const args = ['-r', '-t', '-f', 'qcow2', '-k', sock, ...names.flatMap((n) => ['-B', n]), img];
  const p: ChildProcess = spawn('qemu-nbd', args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  p.stderr!.setEncoding('utf8').on('data', (d) => (err += d));
  const exited = new Promise((r) => p.on('exit', r));
  const out: Record<string, string> = {};
  try {
    await waitForSocket(sock);
    for (const n of names) {
      const r = await run('nbdinfo', [`--map=qemu:dirty-bitmap:${n}`, `nbd+unix:///?socket=${sock}`], { timeoutMs: 30_000 });
      t.equal(r.code, 0, `nbdinfo --map of ${n} in ${img}${r.code ? `: ${r.stderr}` : ''}`);
      out[n] = r.stdout;
    }
  } catch (e) {
    t.fail(`qemu-nbd ${args.join(' ')}: ${(e as Error).message} ${err}`);
  } finally {
    p.kill('SIGTERM');
    await exited;
  }
  return out;
}

/** A message with what must differ taken out: the program's name, QEMU's random node names, the copy's name. */
/**
 * What vdisk adds to info output where it has something to say (x-state and
 * x-reason of an inconsistent or recovered bitmap), taken out so the rest can
 * be compared with QEMU's byte for byte.
 */
function qemuPart(text: string): string {
  return text
    .replace(/^\s*x (state|reason): .*\n/gm, '')
    .replace(/,\n\s*"x-state": "[^"]*",\n\s*"x-reason": "(?:[^"\\]|\\.)*"/g, '');
}

function normalise(text: string, img: string): string {
  return text
    .replace(/^(qemu-img|vdisk): /gm, 'PROG: ')
    .replace(/Try '(qemu-img|vdisk img) --help'/g, "Try 'PROG --help'")
    .replace(/#block\d+/g, '#blockN')
    .split(img)
    .join('IMG');
}

interface Copies {
  q: string;
  v: string;
}

/** Runs `bitmap ARGS` with qemu-img on its copy and vdisk on its own; the same exit code and messages. */
async function both(t: Test, dir: string, args: string[], copies: Copies, what: string): Promise<number | null> {
  const q = await qimg(['bitmap', ...args.map((a) => a.split(IMG).join(copies.q))], dir);
  const v = await vimg(['bitmap', ...args.map((a) => a.split(IMG).join(copies.v))], dir);
  t.equal(v.code, q.code, `${what}: exit ${q.code}`);
  t.equal(normalise(v.stderr, copies.v), normalise(q.stderr, copies.q), `${what}: the same messages${q.stderr ? ` (${q.stderr.trim()})` : ''}`);
  t.equal(v.stdout, q.stdout, `${what}: the same output`);
  return q.code;
}

/** The two copies hold the same bitmaps, flags, granularities and bits, and vdisk's passes qemu-img check. */
async function sameImages(t: Test, dir: string, copies: Copies, what: string): Promise<void> {
  t.same(await infoOf(copies.v, dir), await infoOf(copies.q, dir), `${what}: qemu-img info agrees`);
  const chk = await qimg(['check', copies.v], dir);
  t.equal(chk.code, 0, `${what}: qemu-img check of vdisk's image is clean${chk.code ? `: ${chk.stdout}${chk.stderr}` : ''}`);
  t.same(await contents(t, copies.v, dir), await contents(t, copies.q, dir), `${what}: the same bits in every bitmap`);
}

let copyCount = 0;
function copies(dir: string, from = 'base.qcow2'): Copies {
  const n = copyCount++;
  const c = { q: `q${n}.qcow2`, v: `v${n}.qcow2` };
  fs.copyFileSync(path.join(dir, from), path.join(dir, c.q));
  fs.copyFileSync(path.join(dir, from), path.join(dir, c.v));
  return c;
}

const SCENARIOS: Array<{ what: string; steps: string[][]; exit?: number }> = [
  { what: 'add with -g', steps: [['--add', '-g', '128k', IMG, 'n1']] },
  { what: 'add with --granularity=', steps: [['--add', '--granularity=2M', IMG, 'n1']] },
  { what: 'add then disable', steps: [['--add', '--disable', IMG, 'n2']] },
  { what: 'merge within the image (granularities differ)', steps: [['--merge', 'b1', IMG, 'b0']] },
  { what: 'merge from another image, -b -F', steps: [['--merge', 'src', '-b', 'other.qcow2', '-F', 'qcow2', IMG, 'b1']] },
  { what: 'merge from another image, format probed', steps: [['--add', '--merge', 'src', '-b', 'other.qcow2', IMG, 'fresh']] },
  { what: 'clear', steps: [['--clear', IMG, 'b0']] },
  { what: 'enable', steps: [['--enable', IMG, 'b1']] },
  { what: 'disable', steps: [['--disable', IMG, 'b0']] },
  { what: 'remove', steps: [['--remove', IMG, 'b0']] },
  { what: 'several operations in one call', steps: [['--remove', '--add', '-g', '4k', '--disable', '--merge', 'b1', '--merge', 'b2', IMG, 'b0']] },
  {
    what: 'a series of calls (directory order: kept, removed, re-added)',
    steps: [
      ['--add', IMG, 'x'],
      ['--add', '--disable', IMG, 'y'],
      ['--remove', IMG, 'b1'],
      ['--add', '-g', '512', IMG, 'b1'],
      ['--remove', IMG, 'x'],
      ['--merge', 'b0', '--enable', IMG, 'y'],
      ['--clear', '--merge', 'b2', IMG, 'b0'],
    ],
  },
  { what: 'a failing operation keeps the ones before it', steps: [['--add', '--merge', 'nope', IMG, 'p']], exit: 1 },
];

t.test('operations: the same images as qemu-img bitmap, bit for bit', async (t) => {
  const dir = await images(t);
  for (const s of SCENARIOS) {
    const c = copies(dir);
    for (const [i, step] of s.steps.entries()) {
      const code = await both(t, dir, [...step], c, `${s.what} (${i + 1}: ${step.join(' ')})`);
      if (i === s.steps.length - 1) t.equal(code, s.exit ?? 0, `${s.what}: qemu-img exits ${s.exit ?? 0}`);
    }
    await sameImages(t, dir, c, s.what);
    // Recording state on disk is what decides which bitmaps see the next writes.
    for (const img of [c.q, c.v]) await must(t, 'qemu-io', ['-f', 'qcow2', '-c', 'write -P 7 20M 64k', '-c', 'write -P 8 63M 4k', img], dir);
    await sameImages(t, dir, c, `${s.what}, then written to`);
  }
});

t.test('errors: exit codes and messages of qemu-img bitmap', async (t) => {
  const dir = await images(t);
  const cases: Array<[string, string[]]> = [
    ['a missing bitmap', ['--enable', IMG, 'nope']],
    ['a missing bitmap to remove', ['--remove', IMG, 'nope']],
    ['a missing merge source', ['--merge', 'nope', IMG, 'b0']],
    ['a missing merge target', ['--merge', 'b0', IMG, 'nope']],
    ['a missing source in the other image', ['--merge', 'nope', '-b', 'other.qcow2', '-F', 'qcow2', IMG, 'b0']],
    ['an existing bitmap', ['--add', IMG, 'b0']],
    ['disable before add', ['--disable', '--add', IMG, 'x']],
    ['granularity not a power of 2', ['--add', '-g', '1000', IMG, 'x']],
    ['granularity too small', ['--add', '-g', '256', IMG, 'x']],
    ['granularity 4G (0 as uint32)', ['--add', '-g', '4G', IMG, 'x']],
    ['granularity 1.5k', ['--add', '-g', '1.5k', IMG, 'x']],
    ['granularity with a bad suffix', ['--add', '-g', '1x', IMG, 'x']],
    ['granularity negative', ['--add', '-g', '-1', IMG, 'x']],
    ['granularity too large', ['--add', '-g', '99E', IMG, 'x']],
    ['granularity without --add', ['--clear', '-g', '4k', IMG, 'b0']],
    ['-F without -b', ['--merge', 'b0', '-F', 'qcow2', IMG, 'b1']],
    ['-b without --merge', ['--add', '-b', 'other.qcow2', IMG, 'x']],
    ['no operation', [IMG, 'b0']],
    ['no bitmap name', ['--add', IMG]],
    ['an empty bitmap name', ['--add', IMG, '']],
    ['a name too long', ['--add', IMG, 'n'.repeat(1024)]],
    ['bitmaps of different sizes', ['--merge', 'small', '-b', 'small.qcow2', IMG, 'b0']],
    ['a qcow2 v2 image', ['--add', 'v2.qcow2', 'x']],
    ['a raw image opened as qcow2', ['--add', '-f', 'qcow2', 'disk.raw', 'x']],
    ['an unknown format', ['--add', '-f', 'vmdkx', IMG, 'x']],
    ['a missing image', ['--add', 'nonexist.qcow2', 'x']],
    ['a missing source image', ['--merge', 'src', '-b', 'nonexist.qcow2', IMG, 'b0']],
    ['the source is the image itself (its own lock)', ['--merge', 'b0', '-b', IMG, IMG, 'b1']],
    ['a read-only image (--image-opts read-only=on)', ['--add', '--image-opts', `driver=qcow2,file.filename=${IMG},read-only=on`, 'x']],
    ['--image-opts and -f', ['--add', '--image-opts', '-f', 'qcow2', IMG, 'x']],
    ['an unknown object type', ['--object', 'foo', '--add', IMG, 'x']],
    ['an object qemu-img cannot create', ['--object', 'iothread,id=io0', '--add', IMG, 'x']],
    ['a secret without data', ['--object', 'secret,id=s0', '--add', IMG, 'x']],
  ];
  for (const [what, args] of cases) {
    const c = copies(dir);
    const code = await both(t, dir, [...args], c, what);
    t.equal(code, 1, `${what}: qemu-img exits 1`);
    t.same(await infoOf(c.v, dir), await infoOf(c.q, dir), `${what}: the images agree afterwards`);
  }
  // What succeeds on the way: --image-opts, -g 0 (no granularity), a hex size, a secret object.
  for (const [what, args] of [
    ['--image-opts', ['--add', '--image-opts', `driver=qcow2,file.filename=${IMG}`, 'x']],
    ['--image-opts, format probed', ['--add', '--image-opts', `file.filename=${IMG}`, 'x']],
    ['-g 0 is no granularity', ['--add', '-g', '0', '--disable', IMG, 'x']],
    ['a hex granularity (with the deprecation warning)', ['--add', '-g', '0x1k', IMG, 'x']],
    ['granularity 2G, the largest', ['--add', '-g', '2G', IMG, 'x']],
    ['a secret object', ['--object', 'secret,id=s0,data=x', '--add', IMG, 'x']],
    ['long options by a prefix', ['--ad', '--gran', '8k', '--disa', IMG, 'x']],
  ] as Array<[string, string[]]>) {
    const c = copies(dir);
    t.equal(await both(t, dir, [...args], c, what), 0, `${what}: qemu-img exits 0`);
    await sameImages(t, dir, c, what);
  }
});

/** Leaves b0 and b2 of a copy of base.qcow2 "in use" on disk: a writer that held them died (kill -9). */
async function inUseImage(t: Test, dir: string, name: string): Promise<void> {
  fs.copyFileSync(path.join(dir, 'base.qcow2'), path.join(dir, name));
  const sock = path.join(dir, `qsd-${name}.sock`);
  const p = spawn(
    'qemu-storage-daemon',
    ['--blockdev', `driver=file,node-name=f,filename=${name}`, '--blockdev', 'driver=qcow2,node-name=d,file=f', '--chardev', `socket,path=${sock},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'],
    { cwd: dir, stdio: 'ignore' },
  );
  const exited = new Promise((r) => p.on('exit', r));
  t.teardown(() => p.kill('SIGKILL'));
  // The monitor socket appears after the block devices were opened (options are applied in order).
  await waitForSocket(sock);
  p.kill('SIGKILL');
  await exited;
  t.same((await listed(name, dir)).map((b) => b.flags), [['in-use', 'auto'], ['in-use'], ['in-use', 'auto']], 'qemu-storage-daemon killed: every bitmap is in use on disk');
}

t.test('an in-use bitmap: what still works and what is refused', async (t) => {
  const dir = await images(t);
  await inUseImage(t, dir, 'iu.qcow2');
  const steps: Array<[string, string[], number]> = [
    ['clear', ['--clear', IMG, 'b0'], 1],
    ['enable', ['--enable', IMG, 'b1'], 1],
    ['disable', ['--disable', IMG, 'b0'], 1],
    ['merge into it', ['--merge', 'b2', IMG, 'b0'], 1],
    ['merge from it', ['--add', '--merge', 'b0', IMG, 'c'], 1],
    ['add another', ['--add', IMG, 'd'], 0],
    ['remove it', ['--remove', IMG, 'b1'], 0],
  ];
  const c = copies(dir, 'iu.qcow2');
  for (const [what, args, exit] of steps) {
    t.equal(await both(t, dir, [...args], c, what), exit, `${what}: qemu-img exits ${exit}`);
    await sameImages(t, dir, c, what);
  }
});

t.test('locks: a daemon holding the image stops both tools, as QEMU does', async (t) => {
  const dir = await images(t);
  // qemu-storage-daemon holds both copies: neither tool may touch them.
  const c = copies(dir);
  const sock = path.join(dir, 'qsd.sock');
  const held = (file: string, i: number) => ['--blockdev', `driver=file,node-name=f${i},filename=${file}`, '--blockdev', `driver=qcow2,node-name=d${i},file=f${i}`];
  const qsd = spawn('qemu-storage-daemon', [...held(c.q, 1), ...held(c.v, 2), '--chardev', `socket,path=${sock},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0'], {
    cwd: dir,
    stdio: 'ignore',
  });
  t.teardown(() => qsd.kill('SIGKILL'));
  await waitForSocket(sock);
  t.equal(await both(t, dir, ['--add', IMG, 'x'], c, 'held by qemu-storage-daemon'), 1, 'qemu-img is refused');
  const e = copies(dir);
  const src = await both(t, dir, ['--merge', 'b0', '-b', c.q, `${IMG}`, 'b1'], e, 'a merge source held by qemu-storage-daemon');
  t.equal(src, 1, 'reading a source a writer holds is refused too');
  await stopQsd(qsd, sock);

  // vdisk serve holds the image: qemu-img is refused, and vdisk img bitmap in the same words.
  const d = copies(dir);
  const daemon = await startDaemon(t, {
    dir,
    args: ['--blockdev', `driver=qcow2,node-name=d0,file.driver=file,file.filename=${path.join(dir, d.v)}`, '--export', 'type=nbd,id=e0,node-name=d0,writable=on'],
  });
  const q = await qimg(['bitmap', '--add', d.v, 'x'], dir);
  t.equal(q.code, 1, 'qemu-img bitmap on an image vdisk serve holds: exit 1');
  t.match(q.stderr, /Failed to get "write" lock\nIs another process using the image/, `qemu-img names the lock (${q.stderr.trim()})`);
  const v = await vimg(['bitmap', '--add', d.v, 'x'], dir);
  t.equal(v.code, 1, 'vdisk img bitmap too');
  t.equal(normalise(v.stderr, d.v), normalise(q.stderr, d.v), 'with the same message');
  await daemon.stop();
  t.same((await listed(d.v, dir)).map((b) => b.name), ['b0', 'b1', 'b2'], 'and nothing changed');
});

t.test('info: bitmaps in format-specific information, as qemu-img info and qemu-io info print them', async (t) => {
  const dir = await images(t);
  await inUseImage(t, dir, 'iu.qcow2');
  await must(t, 'qemu-img', ['create', '-f', 'qcow2', 'none.qcow2', '16M'], dir);
  await must(t, 'qemu-img', ['create', '-f', 'qcow2', 'one.qcow2', '16M'], dir);
  await must(t, 'qemu-img', ['bitmap', '--add', '--disable', 'one.qcow2', 'lone'], dir);
  // A name qemu-img's JSON escapes (non-ASCII, a quote, a backslash).
  await must(t, 'qemu-img', ['bitmap', '--add', '-g', '512', 'one.qcow2', 'é "x\\y'], dir);
  // A chain: top (one bitmap) over base (three), over a raw file.
  await must(t, 'qemu-img', ['create', '-f', 'qcow2', '-b', 'base.qcow2', '-F', 'qcow2', 'top.qcow2'], dir);
  await must(t, 'qemu-img', ['bitmap', '--add', 'top.qcow2', 'top'], dir);
  await must(t, 'qemu-img', ['create', '-f', 'qcow2', '-b', 'iu.qcow2', '-F', 'qcow2', 'over-iu.qcow2'], dir);
  for (const img of ['none.qcow2', 'one.qcow2', 'base.qcow2', 'iu.qcow2', 'top.qcow2', 'over-iu.qcow2', 'v2.qcow2']) {
    for (const extra of [[], ['--output=json'], ['--backing-chain'], ['--backing-chain', '--output=json']]) {
      const args = ['info', ...extra, img];
      const q = await qimg(args, dir);
      const v = await vimg(args, dir);
      t.equal(v.code, q.code, `${args.join(' ')}: exit ${q.code}`);
      t.equal(qemuPart(v.stdout), q.stdout, `${args.join(' ')}: the same text, byte for byte${v.stdout === q.stdout ? '' : " (besides vdisk's x-state/x-reason)"}`);
      if (img === 'iu.qcow2') t.match(v.stdout, /x.state.*inconsistent/, `${args.join(' ')}: vdisk says the in-use bitmap is inconsistent`);
    }
  }
  // qemu-io's info: read-only shows the image as it is; writable shows QEMU's bitmaps in use while it
  // is open. vdisk keeps them crash-safe (consistent on disk while open), so writable it shows what
  // qemu-io shows read-only; the bitmaps left in use by a crash stay in use in both.
  for (const img of ['none.qcow2', 'one.qcow2', 'base.qcow2', 'iu.qcow2']) {
    const readOnly = await run('qemu-io', ['-r', '-c', 'info', copies(dir, img).q], { cwd: dir });
    for (const ro of [true, false]) {
      const c = copies(dir, img);
      const flags = ro ? ['-r'] : [];
      const q = await run('qemu-io', [...flags, '-c', 'info', c.q], { cwd: dir });
      const v = await run(process.execPath, [VDISK, 'io', ...flags, '-c', 'info', c.v], { cwd: dir });
      t.equal(v.code, q.code, `qemu-io ${flags.join(' ')} -c info ${img}: exit ${q.code}`);
      t.equal(qemuPart(v.stdout), ro ? q.stdout : readOnly.stdout, `qemu-io ${flags.join(' ')} -c info ${img}: the same text${ro ? '' : ' (as at rest: crash-safe bitmaps are never in use)'}`);
      t.same(await infoOf(c.v, dir), await infoOf(c.q, dir), `${img} after qemu-io ${flags.join(' ')}: the images agree`);
    }
  }
});

t.test('a raw image: vdisk keeps persistent bitmaps in a sidecar (qemu-img cannot)', async (t) => {
  const dir = tempDir(t);
  const raw = path.join(dir, 'disk.raw');
  await must(t, 'qemu-img', ['create', '-f', 'raw', raw, '16M'], dir);
  const q = await run('qemu-img', ['bitmap', '--add', '-f', 'raw', raw, 'x'], { cwd: dir });
  t.equal(q.code, 1, `qemu-img refuses: ${q.stderr.trim()}`);
  const v = await run(process.execPath, [VDISK, 'img', 'bitmap', '--add', '-g', '128k', '-f', 'raw', raw, 'x'], { cwd: dir });
  t.equal(v.code, 0, `vdisk img bitmap adds it: ${v.stderr}`);
  t.ok(fs.existsSync(`${raw}.vdisk-bitmaps`), 'in the sidecar');
  const info = JSON.parse((await run(process.execPath, [VDISK, 'img', 'info', '--output=json', raw])).stdout);
  t.match(info['x-bitmaps'], [{ name: 'x', granularity: 131072, flags: ['auto'] }], 'vdisk img info lists it');
  const theirs = JSON.parse((await run('qemu-img', ['info', '--output=json', raw])).stdout);
  t.equal(theirs.format, 'raw', 'qemu-img still sees a plain raw image');
  t.equal((await run(process.execPath, [VDISK, 'img', 'bitmap', '--disable', '-f', 'raw', raw, 'x'], { cwd: dir })).code, 0);
  t.match(JSON.parse((await run(process.execPath, [VDISK, 'img', 'info', '--output=json', raw])).stdout)['x-bitmaps'], [{ name: 'x', flags: [], 'x-state': 'disabled' }]);
  t.equal((await run(process.execPath, [VDISK, 'img', 'bitmap', '--remove', '-f', 'raw', raw, 'x'], { cwd: dir })).code, 0);
  t.notOk(fs.existsSync(`${raw}.vdisk-bitmaps`), 'the last bitmap removed takes the sidecar with it');
});
