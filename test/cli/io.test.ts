/**
 * `vdisk io` against qemu-io as the referee: on copies of the same raw and
 * qcow2 images (made by qemu-img and qemu-io), the same -c command lines
 * print the same lines (the timing figures aside) on the same streams, with
 * the same exit status: read -v dumps, pattern verification failures,
 * write -P/-z/-u/-f/-s, discard, map, alloc, length, info, help, requests
 * past the end, read-only images, argument and option errors, qemu-io's
 * number and pattern syntax, and the interactive prompt on stdin.
 *
 * Over NBD, vdisk's own client talks to a vdisk daemon, to qemu-nbd and to
 * nbdkit (block-size limits, simple replies only, injected errors), prints
 * what qemu-io prints on the same export, and writes through it land in the
 * image (qemu-img compare). A server that goes away fails the requests in
 * flight with EIO instead of hanging.
 */
import t, { type Test } from 'tap';
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { NbdClientNode } from '../../src/block/drivers/nbd.js';
import { VdiskError } from '../../src/errors.js';
import { Status } from '../../src/block/node.js';
import { startDaemon, waitForSocket } from '../helpers/daemon.js';
import { type RunResult, VDISK, patternBuffer, requireTool, run, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

const vio = (args: string[], cwd: string, input?: string) => run(process.execPath, [VDISK, 'io', ...args], { cwd, input, timeoutMs: 60_000 });
const qio = (args: string[], cwd: string, input?: string) => run('qemu-io', args, { cwd, input, timeoutMs: 60_000 });
const qimg = (args: string[], cwd: string) => run('qemu-img', args, { cwd, timeoutMs: 60_000 });

/** The timing figures differ run to run; everything else must not. */
function normalise(text: string): string {
  return text
    .split('\n')
    .map((l) => l.replace(/^(.+, \d+ ops; ).*$/, '$1TIME').replace(/^(\d+,\d+),\d+:\d\d:\d\d\.\d\d,\d+\.\d{3},\d+\.\d{3}$/, '$1,TIME'))
    .join('\n');
}

/** Each -c argument of a command list. */
const cmds = (lines: string[]): string[] => lines.flatMap((l) => ['-c', l]);

/** Runs the same arguments through both programs (each on its own copy when `mine` names one) and compares. */
async function same(t: Test, cwd: string, theirs: string[], mine: string[], what: string, input?: string): Promise<{ q: RunResult; v: RunResult }> {
  const q = await qio(theirs, cwd, input);
  const v = await vio(mine, cwd, input);
  t.equal(normalise(v.stdout), normalise(q.stdout), `${what}: stdout as qemu-io`);
  t.equal(v.stderr, q.stderr, `${what}: stderr as qemu-io`);
  t.equal(v.code, q.code, `${what}: exit status ${q.code} as qemu-io`);
  return { q, v };
}

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io']) requireTool(t, tool);
});

const SESSION = [
  'read -v 0 64',
  'read -v 1000 40',
  'read -P 0x11 0 64k',
  'read -P 0x22 0 512',
  'read -P 0x11 -s 512 -l 512 0 4k',
  'read -q -P 0x33 0 1',
  'read -C 0 512',
  'write -P 0x44 1M 64k',
  'read -P 0x44 1M 64k',
  'write 1M 4k',
  'read -v 1M 32',
  'write -f -P 0x55 1M 512',
  'read -v 1M 16',
  'write -z 2M 4k',
  'read -P 0 2M 4k',
  'write -z -u 2M 64k',
  'read -P 0 2M 64k',
  'write -z 0 4k',
  'discard 3M 64k',
  'write -s src.bin 128k 100',
  'read -v 128k 100',
  'write -C -P 0x66 256k 512',
  'discard -C 3M 512',
  'discard -q 3M 512',
  'map',
  'alloc 0 4M',
  'alloc 1M',
  'alloc 4M 512',
  'alloc 3M 2M',
  'alloc 0 0',
  'length',
  'info',
  'flush',
  'read 4M 1',
  'write 4M 1',
  'discard 4M 1',
  'write -z 4M 1',
  'read 4095k 2k',
  'read 4M 0',
  'read 5M 0',
  'foo',
  '',
  'help read',
  'help write',
  'help discard',
  'help map',
  'help alloc',
  'help flush',
  'help nope',
  'help r',
];

t.test('raw, qcow2 and a qcow2 over a raw backing file: the same session prints the same', async (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, 'src.bin'), Buffer.from('hello world 0123456789ABCDEFghij\x00\x01\xff', 'latin1'));
  t.equal((await qimg(['create', '-f', 'raw', 'base.raw', '4M'], dir)).code, 0);
  t.equal((await qio(['-f', 'raw', ...cmds(['write -P 0x11 0 64k', 'write -P 0x12 2M 1M']), 'base.raw'], dir)).code, 0);
  t.equal((await qimg(['create', '-f', 'qcow2', 'img.qcow2', '4M'], dir)).code, 0);
  t.equal((await qio([...cmds(['write -P 0x11 0 64k', 'write -P 0x12 2M 1M']), 'img.qcow2'], dir)).code, 0);
  t.equal((await qimg(['create', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', 'top.qcow2'], dir)).code, 0);
  t.equal((await qio([...cmds(['write -P 0x21 64k 64k', 'write -z 2M 64k']), 'top.qcow2'], dir)).code, 0);

  for (const [img, fmt] of [
    ['base.raw', ['-f', 'raw']],
    ['img.qcow2', []],
    ['top.qcow2', ['-f', 'qcow2']],
  ] as Array<[string, string[]]>) {
    fs.copyFileSync(path.join(dir, img), path.join(dir, `q-${img}`));
    fs.copyFileSync(path.join(dir, img), path.join(dir, `v-${img}`));
    const { v } = await same(t, dir, [...fmt, ...cmds(SESSION), `q-${img}`], [...fmt, ...cmds(SESSION), `v-${img}`], img);
    t.equal(v.code, 1, `${img}: a session with failed commands exits 1`);
    t.match(v.stdout, /^00000000: {2}11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 {2}\.{16}$/m, `${img}: read -v dumps as qemu-io`);
    t.match(v.stdout, /^Pattern verification failed at offset 0, 512 bytes$/m, `${img}: a pattern mismatch is reported`);
    t.match(v.stdout, /^read 64\/64 bytes at offset 0\n64 bytes, 1 ops; \d\d\.\d\d sec \([\d.]+ (bytes|KiB|MiB|GiB|TiB)\/sec and \d+\.\d{4} ops\/sec\)$/m, `${img}: the timing line has qemu-io's format`);
    t.match(v.stdout, /^read failed: Input\/output error$/m, `${img}: a read past the end is EIO`);
    t.match(v.stderr, /^command "foo" not found$/m);
    // What the sessions wrote is the same data.
    const cmp = await qimg(['compare', `q-${img}`, `v-${img}`], dir);
    t.equal(cmp.code, 0, `${img}: qemu-img compare: ${cmp.stdout.trim()}`);
  }
});

t.test("qemu-io's argument syntax: numbers, patterns, options and their errors", async (t) => {
  const dir = tempDir(t);
  t.equal((await qimg(['create', '-f', 'raw', 'q.raw', '1M'], dir)).code, 0);
  t.equal((await qimg(['create', '-f', 'raw', 'v.raw', '1M'], dir)).code, 0);
  fs.writeFileSync(path.join(dir, 'empty.bin'), '');
  const numbers = ['0x1k', '0x10', '0X10', '1.k', '1.', '.5k', '1.5e3k', '0.5', '1.0', '+5', '0x', '0x.5', '1kb', '1Kx', '18446744073709551615',
    '18446744073709551616', '9223372036854775807', '9223372036854775808', '16E', '15.99999E', '1.5b', '0.0001k', '1.0009765625k', '-0', '0b',
    '0xffffffffffffffff', '00001', '1.1.1', '1e3', '1.5k', '1K', '1b', '1B', '010', '5i', '1.0625k', '3.999M', '1023.9999k'];
  const patterns = ['0x1F', '017', '08', '+5', '-0', '0xg', '255', '256', '0X0a', '1e1', '0', '-1', '""', "'1'"];
  const lines = [
    ...numbers.map((n) => `alloc ${n} 0`),
    ...patterns.map((p) => `read -q -P ${p} 0 1`),
    'read -x 0 512', 'read 0 512 512', 'read -s 2 0 512', 'read 0 16 -P', 'read -P 0 0 16 -P', 'read -v -- -1 16', 'read -P0 0 16',
    'read -vP 0 0 16', 'read -vq 0 16', 'read 0 16 -v', 'read 0 3G', 'read 0 2G', 'read -P 0 -l 20 0 16', 'read -P 0 -s 5 0 4', 'read -l 1 -s 1 0 4',
    'read -P 0 -l x 0 1', 'read -b 1 512', 'read -b 0 511', 'read -b 0 512', 'read -a 0 1', 'read -p 0 1', 'read -P 0 -l 0 0 16', 'read -v 0 0', 'read',
    'write -u 0 4k', 'write -n 0 1', 'write -n -u 0 1', 'write -z -P 1 0 4k', 'write -b -z 0 512', 'write -f -b 0 512', 'write -f -c 0 512',
    'write -c 1 512', 'write -c 0 511', 'write -c 0 64k', 'write -b 0 512', 'write -P 300 -x 0 1', 'write -x -P 300 0 1', 'write 0',
    'write -z 0 3G', 'write 0 3G', 'write x 1', 'write 0 x', 'write -s nonexist 0 1', 'write -s empty.bin 0 1', 'write -s . 0 1',
    'write -z -s x 0 1', 'write -P 1 -P 2 0 1', 'write -q 0 512', 'write -u -z -n -f 0 512', 'write -z -c 0 512',
    'discard -x 0 1', 'discard 0 1 2', 'discard 0 3G', 'discard 0 x', 'discard 0',
    'alloc 0 1 2', 'alloc', 'alloc x', 'alloc 0 x', 'alloc 1', 'alloc 1 100', 'alloc 0 2T', 'alloc -1',
    'flush x', 'length x', 'map x', 'info x', 'truncate', 'truncate -m', 'truncate -m foo 2M', 'truncate x', 'truncate 1M 2', 'help read x',
    '  length', 'read\t0 1', 'r 0 1', 'w 0 1', 'l', 'a 0', 'd 0 1', 'f', 'i', 't 1M',
    'truncate 2M', 'length', 'map', 'truncate 1536k', 'length', 'truncate -m off 1M', 'length',
  ];
  await same(t, dir, ['-f', 'raw', ...cmds(lines), 'q.raw'], ['-f', 'raw', ...cmds(lines), 'v.raw'], 'syntax');

  // Each failing command alone gives qemu-io's exit status too.
  for (const line of ['read 0 3G', 'foo', 'read -x 0 1', 'alloc 0 1 2', 'help nope', 'read -P 1 0 1', 'read 1M 1', 'read -P 0 0 1', 'help read']) {
    await same(t, dir, ['-f', 'raw', '-c', line, 'q.raw'], ['-f', 'raw', '-c', line, 'v.raw'], `'${line}' alone`);
  }
});

t.test('read-only images refuse writes as qemu-io; -U reads an image in use', async (t) => {
  const dir = tempDir(t);
  t.equal((await qimg(['create', '-f', 'qcow2', 'ro.qcow2', '1M'], dir)).code, 0);
  const lines = ['write 0 512', 'write -z 0 512', 'write -x 0 512', 'discard 0 512', 'truncate 2M', 'flush', 'read 0 512', 'write -b 0 512', 'length'];
  await same(t, dir, ['-r', ...cmds(lines), 'ro.qcow2'], ['-r', ...cmds(lines), 'ro.qcow2'], 'read-only');
  const v = await vio(['-r', '-c', 'write 0 512', 'ro.qcow2'], dir);
  t.equal(v.stderr, 'qemu-io: Block node is read-only\n');

  // A writer holds the image: -r -U still reads it, as qemu-io.
  const d = await startDaemon(t, { args: ['--blockdev', `driver=file,node-name=f0,filename=${path.join(dir, 'ro.qcow2')}`, '--blockdev', 'driver=qcow2,node-name=q0,file=f0', '--export', 'type=nbd,id=e0,node-name=q0'] });
  const locked = await vio(['-c', 'length', 'ro.qcow2'], dir);
  t.equal(locked.code, 1, 'the image in use cannot be opened for writing');
  t.match(locked.stderr, /^vdisk io: can't open device ro\.qcow2: .*lock/);
  await same(t, dir, ['-r', '-U', '-c', 'length', '-c', 'map', 'ro.qcow2'], ['-r', '-U', '-c', 'length', '-c', 'map', 'ro.qcow2'], '-r -U');
  await d.stop();
});

t.test('help, usage and opening errors', async (t) => {
  const dir = tempDir(t);
  t.equal((await qimg(['create', '-f', 'raw', 'h.raw', '1M'], dir)).code, 0);
  const q = await qio(['-f', 'raw', '-c', 'help', 'h.raw'], dir);
  const v = await vio(['-f', 'raw', '-c', 'help', 'h.raw'], dir);
  t.equal(v.code, 0);
  const theirs = new Set(q.stdout.split('\n'));
  const ours = v.stdout.split('\n').filter((l) => l !== '');
  t.same(ours.map((l) => l.split(' ')[0]), ['alloc', 'break', 'discard', 'flush', 'help', 'info', 'length', 'map', 'read', 'remove_break', 'resume', 'truncate', 'wait_break', 'write', "Use"], 'the commands, sorted');
  for (const l of ours) t.ok(theirs.has(l), `qemu-io's help has the line '${l}'`);

  const usage = await vio(['--help'], dir);
  t.equal(usage.code, 0);
  t.match(usage.stdout, /^Usage: vdisk io /);
  t.match(usage.stdout, /Exit status: 0 when every command succeeded, 1 when any failed/);
  const missing = await vio(['-c', 'length', 'nonexist.qcow2'], dir);
  t.equal(missing.code, 1);
  t.equal(missing.stderr, "vdisk io: can't open device nonexist.qcow2: Could not open 'nonexist.qcow2': No such file or directory\n");
  const badFormat = await vio(['-f', 'vmdk', '-c', 'length', 'h.raw'], dir);
  t.equal(badFormat.code, 1);
  t.match(badFormat.stderr, /Unknown file format 'vmdk'/);
  const noFile = await vio(['-c', 'length'], dir);
  t.equal(noFile.code, 1);
  t.match(noFile.stderr, /no image file name given/);
  const badOpt = await vio(['-x', 'h.raw'], dir);
  t.equal(badOpt.code, 1);
  t.match(badOpt.stderr, /invalid option -- 'x'/);
  // Options after the file name, clustered short options and json: descriptions, as qemu-io.
  const json = `json:${JSON.stringify({ driver: 'raw', file: { driver: 'file', filename: path.join(dir, 'h.raw') } })}`;
  await same(t, dir, ['-c', 'info', '-c', 'length', json, '-r'], ['-c', 'info', '-c', 'length', json, '-r'], 'json: and -r after the file');
  const jfile = `json:${JSON.stringify({ driver: 'file', filename: path.join(dir, 'h.raw') })}`;
  await same(t, dir, ['-rc', 'info', jfile], ['-rc', 'info', jfile], 'a file node on top: info');
  const nul = `json:${JSON.stringify({ driver: 'null-co', size: 4 * MiB, 'read-zeroes': true })}`;
  const nulCmds = cmds(['info', 'length', 'map', 'alloc 0 1M', 'read -v 0 16', 'write -P 1 0 512', 'read -P 0 0 512']);
  await same(t, dir, [...nulCmds, nul], [...nulCmds, nul], 'null-co');
  // quit ends the -c list.
  await same(t, dir, ['-f', 'raw', '-c', 'length', '-c', 'quit', '-c', 'foo', 'h.raw'], ['-f', 'raw', '-c', 'length', '-c', 'quit', '-c', 'foo', 'h.raw'], 'quit');
});

t.test('without -c: commands from stdin after the prompt', async (t) => {
  const dir = tempDir(t);
  t.equal((await qimg(['create', '-f', 'raw', 'p.raw', '1M'], dir)).code, 0);
  const input = 'write -P 9 0 512\nread -P 9 0 512\nlength\nfoo\n\nread -P 1 0 1\nquit\nlength\n';
  const { v } = await same(t, dir, ['-f', 'raw', 'p.raw'], ['-f', 'raw', 'p.raw'], 'stdin', input);
  t.match(v.stdout, /^qemu-io> wrote 512\/512 bytes at offset 0\n/, 'the prompt comes first');
  t.match(v.stdout, /qemu-io> $/, 'and again before quit');
  await same(t, dir, ['-f', 'raw', 'p.raw'], ['-f', 'raw', 'p.raw'], 'end of input without quit', 'length\n');
});

/** qemu-nbd serving an image in the background until the test ends. */
async function qemuNbd(t: Test, socket: string, args: string[]): Promise<ChildProcess> {
  const proc = spawn('qemu-nbd', ['-t', '-k', socket, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  t.teardown(() => {
    proc.kill('SIGKILL');
  });
  await waitForSocket(socket, 10_000);
  return proc;
}

/** nbdkit serving in the foreground (-f) of a child process until the test ends. */
async function nbdkit(t: Test, socket: string, args: string[]): Promise<ChildProcess> {
  const proc = spawn('nbdkit', ['-f', '-U', socket, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  t.teardown(() => {
    proc.kill('SIGKILL');
  });
  await waitForSocket(socket, 10_000);
  return proc;
}

function killed(proc: ChildProcess): Promise<void> {
  return new Promise((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) resolve();
    else proc.once('exit', () => resolve());
  });
}

const NBD_READS = [
  'info', 'map', 'length', 'alloc 0 1M', 'alloc 60M 8M', 'read -v 0 16', 'read -P 0xab 0 64k', 'read -P 1 2M 4k', 'read -P 0 64k 1M',
  'read -P 0xab 0 4k', 'read -v 65530 8', 'read 64M 1', 'read 64M 0', 'write 64M 1', 'discard 64M 1', 'write -z 64M 1', 'truncate 128M', 'read 0 40M',
];
const NBD_WRITES = ['write -P 0x5a 1M 1M', 'write -f -P 0x5b 3M 4k', 'write 5M 100', 'write -z 2M 4k', 'write -z -u 8M 1M', 'discard 16M 64k', 'write -P 0x5c 20M 33M', 'flush'];
const NBD_CHECKS = ['read -P 0x5a 1M 1M', 'read -P 0x5b 3M 4k', 'read -P 0xcd 5M 100', 'read -P 0 2M 4k', 'read -P 0 8M 1M', 'read -P 0 16M 64k', 'read -P 0x5c 20M 33M'];

t.test('over NBD: a vdisk daemon and qemu-nbd, through vdisk io and qemu-io', async (t) => {
  requireTool(t, 'qemu-nbd');
  const dir = tempDir(t);
  t.equal((await qimg(['create', '-f', 'qcow2', 'orig.qcow2', '64M'], dir)).code, 0);
  t.equal((await qio([...cmds(['write -P 0xab 0 64k', 'write -P 1 2M 4k', 'write -P 2 16M 64k']), 'orig.qcow2'], dir)).code, 0);
  for (const name of ['daemon.qcow2', 'qnbd.qcow2', 'ref.qcow2']) fs.copyFileSync(path.join(dir, 'orig.qcow2'), path.join(dir, name));

  const d = await startDaemon(t, {
    args: ['--blockdev', `driver=file,node-name=f0,filename=${path.join(dir, 'daemon.qcow2')},discard=unmap`, '--blockdev', 'driver=qcow2,node-name=q0,file=f0,discard=unmap',
      '--export', 'type=nbd,id=e0,node-name=q0,name=disk,writable=on', '--export', 'type=nbd,id=e1,node-name=q0,name=ro'],
  });
  const qsock = path.join(dir, 'q.sock');
  // Both servers pass discards down (qemu-nbd and vdisk ignore them by default), as qemu-io does on a local image.
  const qnbd = await qemuNbd(t, qsock, ['--discard=unmap', '-f', 'qcow2', path.join(dir, 'qnbd.qcow2')]);
  const uris: Array<[string, string]> = [['the vdisk daemon', d.uri('disk')], ['qemu-nbd', `nbd+unix:///?socket=${qsock}`]];

  // NBD nodes in json: descriptions, bare and under raw.
  for (const j of [{ driver: 'nbd', server: { type: 'unix', path: qsock } }, { driver: 'raw', file: { driver: 'nbd', server: { type: 'unix', path: d.socket }, export: 'disk' } }]) {
    const arg = `json:${JSON.stringify(j)}`;
    await same(t, dir, [...cmds(['info', 'map', 'read -P 0xab 0 64k']), arg], [...cmds(['info', 'map', 'read -P 0xab 0 64k']), arg], `json: ${j.driver}`);
  }
  for (const [who, uri] of uris) {
    // Reads (and refused requests) first, so both programs see the same disk.
    await same(t, dir, ['-f', 'raw', ...cmds(NBD_READS), uri], ['-f', 'raw', ...cmds(NBD_READS), uri], `${who}: reads`);
    // Without -f the format is probed (raw here), as qemu-io does (which also warns about it).
    const probed = await vio([...cmds(['info', 'read -P 0xab 0 64k']), uri], dir);
    t.equal(probed.code, 1, `${who}: info fails over NBD (no driver info), as in qemu-io`);
    t.match(probed.stdout, /^format name: raw\nread 65536\/65536 bytes at offset 0\n/);
    const w = await vio(['-f', 'raw', ...cmds(NBD_WRITES), uri], dir);
    t.equal(w.code, 0, `${who}: writes through vdisk io: ${w.stdout}${w.stderr}`);
    t.match(w.stdout, /^wrote 34603008\/34603008 bytes at offset 20971520$/m, `${who}: a write above the 32 MiB payload limit is split`);
    const c = await vio(['-f', 'raw', ...cmds(NBD_CHECKS), uri], dir);
    t.equal(c.code, 0, `${who}: vdisk io reads its writes back`);
    t.notMatch(c.stdout, /verification failed/);
    const cq = await qio(['-f', 'raw', ...cmds(NBD_CHECKS), uri], dir);
    t.equal(cq.code, 0, `${who}: qemu-io reads them too`);
    t.notMatch(cq.stdout, /verification failed/);
  }
  // The same writes done by qemu-io on a local copy: the served images must equal it.
  t.equal((await qio([...cmds(NBD_WRITES), 'ref.qcow2'], dir)).code, 0);
  await d.stop();
  qnbd.kill('SIGTERM');
  await killed(qnbd);
  for (const img of ['daemon.qcow2', 'qnbd.qcow2']) {
    const cmp = await qimg(['compare', 'ref.qcow2', img], dir);
    t.equal(cmp.code, 0, `${img}: qemu-img compare with qemu-io's own writes: ${cmp.stdout.trim()}${cmp.stderr.trim()}`);
    t.equal((await qimg(['check', img], dir)).code, 0, `${img}: qemu-img check is clean`);
  }
});

t.test('over NBD: read-only exports, unknown exports, no server', async (t) => {
  const dir = tempDir(t);
  t.equal((await qimg(['create', '-f', 'raw', 'r.raw', '4M'], dir)).code, 0);
  const d = await startDaemon(t, {
    args: ['--blockdev', `driver=file,node-name=f0,filename=${path.join(dir, 'r.raw')}`, '--export', 'type=nbd,id=e0,node-name=f0,name=ro'],
  });
  const ro = await vio(['-f', 'raw', ...cmds(['read 0 512', 'write 0 512', 'discard 0 512', 'flush']), d.uri('ro')], dir);
  t.equal(ro.code, 1);
  t.match(ro.stdout, /^read 512\/512 bytes at offset 0$/m);
  t.equal(ro.stderr, 'qemu-io: Block node is read-only\nqemu-io: Block node is read-only\n', 'a read-only export makes a read-only node');
  const unknown = await vio(['-c', 'length', d.uri('nope')], dir);
  t.equal(unknown.code, 1);
  t.match(unknown.stderr, /^vdisk io: can't open device nbd\+unix:\/\/\/nope\?socket=.*: Requested export not available/);
  const none = await vio(['-c', 'length', `nbd+unix:///x?socket=${path.join(dir, 'none.sock')}`], dir);
  t.equal(none.code, 1);
  t.match(none.stderr, /Failed to connect to '.*none\.sock': No such file or directory/);
  const badUri = await vio(['-c', 'length', 'nbd+unix:///x'], dir);
  t.equal(badUri.code, 1);
  t.match(badUri.stderr, /No valid URL specified/);

  // nbd://host:port/export over TCP (qemu-nbd on a port the kernel found free).
  requireTool(t, 'qemu-nbd');
  t.equal((await qimg(['create', '-f', 'raw', 'tcp.raw', '4M'], dir)).code, 0);
  const port = await new Promise<number>((resolve) => {
    const srv = net.createServer().listen(0, '127.0.0.1', () => {
      const p = (srv.address() as net.AddressInfo).port;
      srv.close(() => resolve(p));
    });
  });
  const proc = spawn('qemu-nbd', ['-t', '-b', '127.0.0.1', '-p', String(port), '-x', 'tcpdisk', '-f', 'raw', path.join(dir, 'tcp.raw')], { stdio: 'ignore' });
  t.teardown(() => {
    proc.kill('SIGKILL');
  });
  const deadline = Date.now() + 10_000;
  for (;;) {
    const up = await new Promise<boolean>((resolve) => {
      const c = net.connect(port, '127.0.0.1', () => (c.destroy(), resolve(true)));
      c.on('error', () => resolve(false));
    });
    if (up) break;
    if (Date.now() > deadline) throw new Error('qemu-nbd did not listen');
    await new Promise((r) => setTimeout(r, 50));
  }
  const uri = `nbd://127.0.0.1:${port}/tcpdisk`;
  const tcpCmds = cmds(['write -P 0x77 1M 64k', 'read -P 0x77 1M 64k', 'map', 'length']);
  const tcp = await vio(['-f', 'raw', ...tcpCmds, uri], dir);
  t.equal(tcp.code, 0, `over TCP: ${tcp.stderr}`);
  await same(t, dir, ['-f', 'raw', ...tcpCmds, uri], ['-f', 'raw', ...tcpCmds, uri], 'over TCP');
});

t.test('over NBD with nbdkit: block-size limits, simple replies, server errors', async (t) => {
  requireTool(t, 'nbdkit');
  const dir = tempDir(t);
  // Requests outside 512..1 MiB are errors on this server: the client must split and align.
  const s1 = path.join(dir, 'bs.sock');
  await nbdkit(t, s1, ['--filter=blocksize-policy', 'memory', '64M', 'blocksize-minimum=512', 'blocksize-preferred=4096', 'blocksize-maximum=1M', 'blocksize-error-policy=error']);
  const lines = ['write -P 1 0 4M', 'read -P 1 0 4M', 'write -P 2 1 3', 'read -v 0 8', 'write -z 4M 4M', 'read -P 0 4M 4M', 'discard 8M 1M', 'map', 'alloc 0 64M'];
  const uri1 = `nbd+unix:///?socket=${s1}`;
  const b = await same(t, dir, ['-f', 'raw', ...cmds(lines), uri1], ['-f', 'raw', ...cmds(lines), uri1], 'nbdkit with block-size limits');
  t.equal(b.v.code, 0, 'every request fits the limits');
  t.match(b.v.stdout, /^00000000: {2}01 02 02 02 01 01 01 01 {2}\.{8}$/m, 'an unaligned write is read-modify-written in whole blocks');

  // Simple replies only: reads, writes and (no block status) map still work.
  const s2 = path.join(dir, 'sr.sock');
  await nbdkit(t, s2, ['--no-sr', 'memory', '64M']);
  const uri2 = `nbd+unix:///?socket=${s2}`;
  const sr = ['write -P 3 0 1M', 'read -P 3 0 1M', 'read -v 1M 16', 'map', 'write -z 2M 1M', 'discard 2M 4k', 'read 64M 1', 'read -P 3 0 40M'];
  await same(t, dir, ['-f', 'raw', ...cmds(sr), uri2], ['-f', 'raw', ...cmds(sr), uri2], 'nbdkit --no-sr');

  // Errors from the server keep their errno.
  const s3 = path.join(dir, 'err.sock');
  await nbdkit(t, s3, ['--filter=error', 'memory', '64M', 'error=EPERM', 'error-pread-rate=100%']);
  const uri3 = `nbd+unix:///?socket=${s3}`;
  const e = await same(t, dir, ['-f', 'raw', '-c', 'read 0 512', '-c', 'write 0 512', uri3], ['-f', 'raw', '-c', 'read 0 512', '-c', 'write 0 512', uri3], 'nbdkit injecting EPERM');
  t.match(e.v.stdout, /^read failed: Operation not permitted$/m);
  const s4 = path.join(dir, 'eio.sock');
  await nbdkit(t, s4, ['--filter=error', 'memory', '64M', 'error=ENOSPC', 'error-pwrite-rate=100%']);
  const uri4 = `nbd+unix:///?socket=${s4}`;
  await same(t, dir, ['-f', 'raw', '-c', 'write 0 512', '-c', 'read 0 512', uri4], ['-f', 'raw', '-c', 'write 0 512', '-c', 'read 0 512', uri4], 'nbdkit injecting ENOSPC');
});

/** Rejects when p takes longer than ms: a hang fails the test instead of stalling it. */
function within<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const timeout = new Promise<never>((_, reject) => (timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms)));
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

t.test('the NBD client: requests in flight, negotiation, a server that goes away', async (t) => {
  requireTool(t, 'qemu-nbd');
  const dir = tempDir(t);
  const img = path.join(dir, 'c.raw');
  const data = patternBuffer(16 * MiB, 5);
  fs.writeFileSync(img, data);
  const sock = path.join(dir, 'c.sock');
  const qnbd = await qemuNbd(t, sock, ['-f', 'raw', img]);

  const node = await within(NbdClientNode.fromUri(`nbd+unix:///?socket=${sock}`, { nodeName: 'c0' }), 10_000, 'connect');
  t.equal(node.driverName, 'nbd');
  t.equal(node.size, 16 * MiB);
  t.ok(node.structuredReplies, 'structured replies negotiated');
  t.ok(node.hasBlockStatus, 'base:allocation negotiated');
  t.equal(node.limits.maxTransfer, 32 * MiB, "qemu-nbd's maximum block size");
  t.equal(node.filename, `nbd+unix:///?socket=${sock}`);
  // Many reads in flight at once, answered in any order, each lands in its own buffer.
  const bufs = Array.from({ length: 64 }, () => Buffer.alloc(64 * 1024));
  await within(Promise.all(bufs.map((b, i) => node.read(i * 256 * 1024, b))), 20_000, 'parallel reads');
  t.ok(bufs.every((b, i) => b.equals(data.subarray(i * 256 * 1024, i * 256 * 1024 + b.length))), '64 parallel reads return the right data');
  const ext = await node.blockStatus(0, 16 * MiB);
  t.ok(ext.length > 0 && ext.length <= 16 * MiB, 'block status answers');
  await node.write(MiB, Buffer.alloc(4096, 7));
  await node.writeZeroes(2 * MiB, MiB);
  const back = Buffer.alloc(4096);
  await node.read(MiB, back);
  t.ok(back.equals(Buffer.alloc(4096, 7)), 'a write reads back');
  await node.close();

  const simple = await within(NbdClientNode.fromUri(`nbd+unix:///?socket=${sock}`, { nodeName: 'c1', structuredReplies: false }), 10_000, 'connect');
  t.notOk(simple.structuredReplies, 'simple replies when asked');
  t.notOk(simple.hasBlockStatus);
  const s = Buffer.alloc(MiB);
  await simple.read(4 * MiB, s);
  t.ok(s.equals(data.subarray(4 * MiB, 5 * MiB)), 'reads with simple replies');
  t.same(await simple.blockStatus(0, MiB), { length: MiB, flags: Status.DATA | Status.ALLOCATED, depth: 1, hostOffset: 0 }, 'without base:allocation everything is data, at its own offset (QEMU: OFFSET_VALID)');

  // The server dies with requests in flight: every one fails with EIO, none hangs, and so does the next.
  const pending = Array.from({ length: 32 }, (_, i) => simple.read(i * 256 * 1024, Buffer.alloc(256 * 1024)));
  qnbd.kill('SIGKILL');
  const settled = await within(Promise.allSettled(pending), 10_000, 'requests in flight when the server died');
  const failed = settled.filter((r) => r.status === 'rejected');
  t.ok(failed.every((r) => (r as PromiseRejectedResult).reason instanceof VdiskError && (r as PromiseRejectedResult).reason.errno === 'EIO'), `${failed.length} failed requests, all with EIO`);
  await killed(qnbd);
  const after = await within(simple.read(0, Buffer.alloc(512)).then(() => 'ok', (e: VdiskError) => e.errno), 5_000, 'a request after the loss');
  t.equal(after, 'EIO', 'a request after the connection is gone fails with EIO');
  await within(simple.close(), 5_000, 'close after the loss');
});

t.test('vdisk io when the server disappears mid-session', async (t) => {
  requireTool(t, 'qemu-nbd');
  const dir = tempDir(t);
  t.equal((await qimg(['create', '-f', 'raw', 'g.raw', '4M'], dir)).code, 0);
  const sock = path.join(dir, 'g.sock');
  const qnbd = await qemuNbd(t, sock, ['-f', 'raw', path.join(dir, 'g.raw')]);
  const child = spawn(process.execPath, [VDISK, 'io', '-f', 'raw', `nbd+unix:///?socket=${sock}`], { stdio: ['pipe', 'pipe', 'pipe'] });
  const timer = setTimeout(() => child.kill('SIGKILL'), 30_000);
  let out = '';
  child.stdout!.setEncoding('utf8').on('data', (d) => (out += d));
  const exited = new Promise<number | null>((resolve) => child.on('close', (code) => resolve(code)));
  const waitFor = async (re: RegExp): Promise<void> => {
    const deadline = Date.now() + 10_000;
    while (!re.test(out)) {
      if (Date.now() > deadline) throw new Error(`no ${re} in: ${out}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  };
  child.stdin!.write('read 0 512\n');
  await waitFor(/read 512\/512 bytes at offset 0/);
  qnbd.kill('SIGKILL');
  await killed(qnbd);
  child.stdin!.write('read 0 512\n');
  await waitFor(/read failed: Input\/output error/);
  child.stdin!.end('length\n');
  const code = await exited;
  clearTimeout(timer);
  t.equal(code, 1, 'exit status 1: a command failed');
  t.match(out, /read failed: Input\/output error\nqemu-io> 4 MiB\nqemu-io> $/);
});
