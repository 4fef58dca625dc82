/**
 * NBD URIs in every `vdisk img` command that reads an image, with qemu-img
 * as the referee: the exports are served by qemu-nbd (a server nobody here
 * wrote), and each command gives what qemu-img gives on the same URI — the
 * format probed through the export, the same JSON, verdicts, exit codes and
 * messages — and images written through a URI are what qemu-img reads back.
 */
import t, { type Test } from 'tap';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { VDISK, requireTool, run, tempDir } from '../helpers/tools.js';
import { waitForSocket } from '../helpers/daemon.js';

const MiB = 1024 * 1024;

const vdisk = (args: string[], cwd?: string) => run(process.execPath, [VDISK, 'img', ...args], { cwd, timeoutMs: 120_000 });
const qimg = (args: string[], cwd?: string) => run('qemu-img', args, { cwd, timeoutMs: 120_000 });

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io', 'qemu-nbd']) requireTool(t, tool);
});

/** Serves `image` as raw bytes (whatever is inside) on a unix socket, writable, until the test ends. */
async function serve(t: Test, image: string, name: string): Promise<string> {
  const sock = path.join(path.dirname(image), `${name}.sock`);
  const p: ChildProcess = spawn('qemu-nbd', ['-f', 'raw', '-t', '--shared=8', '-x', name, '-k', sock, image], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  p.stderr!.setEncoding('utf8').on('data', (d) => (err += d));
  const exited = new Promise((r) => p.on('exit', r));
  t.teardown(async () => {
    p.kill('SIGTERM');
    await exited;
  });
  await waitForSocket(sock).catch(() => {
    throw new Error(`qemu-nbd ${image} did not start: ${err}`);
  });
  return `nbd+unix:///${name}?socket=${sock}`;
}

/** Runs both tools; their exit codes must agree; returns [ours, theirs]. */
async function both(t: Test, args: string[], cwd: string, what = args.join(' ')) {
  const ours = await vdisk(args, cwd);
  const theirs = await qimg(args, cwd);
  t.equal(ours.code, theirs.code, `${what}: exit ${theirs.code} as qemu-img (ours: ${ours.stderr.trim()}; theirs: ${theirs.stderr.trim()})`);
  return [ours, theirs];
}

const stripTool = (s: string) => s.replace(/^(vdisk|qemu-img): /gm, '');

t.test('info, map, check and compare read through a URI as qemu-img does', async (t) => {
  const dir = tempDir(t);
  await run('qemu-img', ['create', '-f', 'qcow2', path.join(dir, 'q.qcow2'), '64M']);
  await run('qemu-io', ['-f', 'qcow2', '-c', 'write -P 0x11 0 1M', '-c', 'write -P 0x22 8M 64k', path.join(dir, 'q.qcow2')]);
  await run('qemu-img', ['create', '-f', 'raw', path.join(dir, 'r.raw'), '32M']);
  await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x33 4M 1M', path.join(dir, 'r.raw')]);
  const q = await serve(t, path.join(dir, 'q.qcow2'), 'q');
  const r = await serve(t, path.join(dir, 'r.raw'), 'r');

  // A qcow2 image served as raw bytes is probed as qcow2; a raw one as raw. nbd has no disk size
  // and (raw over nbd) no dirty flag: the JSON must say exactly what qemu-img's says.
  for (const uri of [q, r]) {
    const [ours, theirs] = await both(t, ['info', '--output=json', uri], dir);
    t.same(JSON.parse(ours.stdout), JSON.parse(theirs.stdout), `info --output=json ${uri}`);
    const [h1, h2] = await both(t, ['info', uri], dir);
    t.equal(h1.stdout, h2.stdout, `human info of ${uri} is qemu-img's, "disk size: unavailable" included`);
    t.match(h1.stdout, /^disk size: unavailable$/m);
    const [m1, m2] = await both(t, ['map', '--output=json', uri], dir);
    t.same(JSON.parse(m1.stdout), JSON.parse(m2.stdout), `map ${uri}`);
  }
  // -f given: no probing (the qcow2 export read as raw bytes).
  const [f1, f2] = await both(t, ['info', '--output=json', '-f', 'raw', q], dir);
  t.same(JSON.parse(f1.stdout), JSON.parse(f2.stdout), 'info -f raw on a qcow2 export');
  t.equal(JSON.parse(f1.stdout).format, 'raw');

  const [c1, c2] = await both(t, ['check', '--output=json', q], dir);
  t.same(JSON.parse(c1.stdout), JSON.parse(c2.stdout), 'check of a qcow2 image through its export');
  const [n1, n2] = await both(t, ['check', r], dir);
  t.equal(stripTool(n1.stderr), stripTool(n2.stderr), 'check of a raw export: the same refusal');

  const [s1] = await both(t, ['compare', '-U', q, 'q.qcow2'], dir, 'compare URI with its own file');
  t.equal(s1.stdout, 'Images are identical.\n');
  const [d1, d2] = await both(t, ['compare', q, r], dir, 'compare two different exports');
  t.equal(d1.stdout, d2.stdout, 'the same first mismatch');

  // Connection and export errors name the URI, as qemu-img's do.
  const gone = `nbd+unix:///q?socket=${path.join(dir, 'none.sock')}`;
  const [e1, e2] = await both(t, ['info', gone], dir, 'info on a socket nobody listens on');
  t.equal(stripTool(e1.stderr), stripTool(e2.stderr), 'the same message for a missing socket');
  const [x1, x2] = await both(t, ['info', `nbd+unix:///nope?socket=${path.join(dir, 'q.sock')}`], dir, 'info on a missing export');
  t.match(x1.stderr, /^vdisk: Could not open 'nbd\+unix:\/\/\/nope\?socket=[^']+': Requested export not available/);
  t.match(x2.stderr, /Requested export not available/);
  const [b1] = await both(t, ['info', 'nbd+unix:///q'], dir, 'a unix URI without its socket');
  t.match(b1.stderr, /No valid URL specified|socket/);
});

t.test('convert, create and rebase write and name URIs as qemu-img does', async (t) => {
  const dir = tempDir(t);
  const src = path.join(dir, 'src.raw');
  await run('qemu-img', ['create', '-f', 'raw', src, '16M']);
  await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 1M 2M', '-c', 'write -P 0x55 12M 64k', src]);
  fs.writeFileSync(path.join(dir, 'target.raw'), Buffer.alloc(0));
  fs.truncateSync(path.join(dir, 'target.raw'), 32 * MiB);
  fs.writeFileSync(path.join(dir, 'small.raw'), Buffer.alloc(0));
  fs.truncateSync(path.join(dir, 'small.raw'), 8 * MiB);
  const target = await serve(t, path.join(dir, 'target.raw'), 'target');
  const small = await serve(t, path.join(dir, 'small.raw'), 'small');

  // Reading from a URI.
  const out = await vdisk(['convert', '-O', 'qcow2', target, 'copy.qcow2'], dir);
  t.equal(out.code, 0, `convert from a URI: ${out.stderr}`);
  t.equal((await qimg(['compare', target, 'copy.qcow2'], dir)).code, 0, 'the copy equals the export');

  // Writing raw into an export (-n: it exists), then a qcow2 image laid out inside it.
  const n = await vdisk(['convert', '-n', '-O', 'raw', 'src.raw', target], dir);
  t.equal(n.code, 0, `convert -n into a URI: ${n.stderr}`);
  t.equal((await qimg(['compare', '-f', 'raw', '-F', 'raw', 'src.raw', target], dir)).code, 0, 'qemu-img compares the copy equal (the rest of the export is zero)');
  t.equal((await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x44 1M 2M', '-c', 'read -P 0x55 12M 64k', target])).code, 0, 'the data is in the export');
  const q = await vdisk(['convert', '-O', 'qcow2', 'src.raw', target], dir);
  t.equal(q.code, 0, `convert -O qcow2 into a URI: ${q.stderr}`);
  const chk = await qimg(['check', target], dir);
  t.equal(chk.code, 0, `qemu-img check of the qcow2 inside the export: ${chk.stdout}${chk.stderr}`);
  t.equal((await qimg(['compare', 'src.raw', target], dir)).stdout, 'Images are identical.\n', 'qemu-img reads the source back through the export');
  // An export too small for the image: qemu-img's refusal, word for word.
  const [g1, g2] = await both(t, ['convert', '-O', 'raw', 'src.raw', small], dir, 'convert into a smaller export');
  t.equal(stripTool(g1.stderr), stripTool(g2.stderr), 'the same message');
  t.match(g1.stderr, /error while converting raw: Cannot grow NBD nodes/);
  const [p1, p2] = await both(t, ['convert', '-O', 'raw', 'src.raw', path.join(dir, 'no', 'such', 'dir.raw')], dir, 'convert into a missing directory');
  t.equal(stripTool(p1.stderr), stripTool(p2.stderr), 'the same message for a file target');

  // A qcow2 overlay whose backing file is a URI: created, read and rebased by name, no path mangling.
  t.equal((await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x44 1M 2M', small])).code, 0, 'data in the small export');
  const c = await vdisk(['create', '-f', 'qcow2', '-b', small, '-F', 'raw', 'ov.qcow2'], dir);
  t.equal(c.code, 0, `create with a URI backing file: ${c.stderr}`);
  t.match(c.stdout, `size=${8 * MiB} backing_file=${small} backing_fmt=raw`, 'the size comes from the export');
  const [i1, i2] = await both(t, ['info', '--output=json', '--backing-chain', 'ov.qcow2'], dir);
  const drop = (chain: Array<Record<string, unknown>>) => chain.map(({ 'actual-size': _a, ...rest }) => rest);
  t.same(drop(JSON.parse(i1.stdout)), drop(JSON.parse(i2.stdout)), 'the chain through the URI is qemu-img\'s (disk usage aside)');
  t.equal((await run('qemu-io', ['-c', 'read -P 0x44 1M 2M', path.join(dir, 'ov.qcow2')])).code, 0, 'qemu-io reads the backing data through the URI');
  const m = await vdisk(['map', '--output=json', 'ov.qcow2'], dir);
  t.same(JSON.parse(m.stdout), JSON.parse((await qimg(['map', '--output=json', 'ov.qcow2'], dir)).stdout), 'map through the URI backing');
  await run('qemu-img', ['create', '-f', 'qcow2', path.join(dir, 'ov2.qcow2'), '8M']);
  const rb = await vdisk(['rebase', '-u', '-b', small, '-F', 'raw', 'ov2.qcow2'], dir);
  t.equal(rb.code, 0, `rebase -u onto a URI: ${rb.stderr}`);
  t.equal(JSON.parse((await qimg(['info', '--output=json', 'ov2.qcow2'], dir)).stdout)['backing-filename'], small, 'the URI is recorded as given');

  // An export cannot be resized.
  const [z1] = await both(t, ['resize', '-f', 'raw', target, '64M'], dir, 'resize an export');
  t.match(z1.stderr, /NBD nodes/);
});
