/**
 * Helpers for tests that drive real programs: run a command with a time
 * limit, make a temp dir that is removed afterwards, and fail (never skip)
 * when a tool is missing, with the command that installs it.
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const VDISK = path.join(ROOT, 'bin', 'vdisk');

/** Which Debian package provides each tool the tests use. */
const PACKAGES: Record<string, string> = {
  'qemu-img': 'qemu-utils',
  'qemu-io': 'qemu-utils',
  'qemu-nbd': 'qemu-utils',
  'qemu-storage-daemon': 'qemu-system-x86',
  'qemu-system-x86_64': 'qemu-system-x86',
  nbdinfo: 'libnbd-bin',
  nbdcopy: 'libnbd-bin',
  nbdsh: 'libnbd-bin',
  nbdkit: 'nbdkit',
  fio: 'fio',
  'mkfs.ext4': 'e2fsprogs',
  e2fsck: 'e2fsprogs',
  debugfs: 'e2fsprogs',
  dumpe2fs: 'e2fsprogs',
  losetup: 'mount',
  busybox: 'busybox-static',
  cpio: 'cpio',
  certtool: 'gnutls-bin',
  psktool: 'gnutls-bin',
  promtool: 'prometheus',
};

interface TestLike {
  fail(message: string): void;
  teardown(fn: () => unknown): void;
}

/** Fails the test (does not skip) if a tool is not installed. */
export function requireTool(t: TestLike, tool: string): boolean {
  const r = spawnSync('sh', ['-c', `command -v ${tool}`], { encoding: 'utf8' });
  if (r.status === 0) return true;
  t.fail(`${tool} is not installed: apt-get install ${PACKAGES[tool] ?? tool} (or run 'bash scripts/setup.sh --test')`);
  return false;
}

/** Fails the test for each missing tool (never skips); true when all are there. */
export function requireTools(t: TestLike, ...tools: string[]): boolean {
  return tools.map((x) => requireTool(t, x)).every(Boolean);
}

/** Runs a command that must succeed (the test fails with its stderr otherwise); its stdout. */
export async function runOk(t: TestLike & { equal(a: unknown, b: unknown, message?: string): unknown }, cmd: string, args: string[]): Promise<string> {
  const r = await run(cmd, args);
  t.equal(r.code, 0, `${cmd} ${args.join(' ')}${r.code ? `: ${r.stderr}` : ''}`);
  return r.stdout;
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
}

/** Runs a command to completion (killed after timeoutMs) and collects its output. */
export function run(cmd: string, args: string[], options: { timeoutMs?: number; input?: string | Buffer; env?: NodeJS.ProcessEnv; cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: options.env ?? process.env, cwd: options.cwd, stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (d) => (stdout += d));
    child.stderr.setEncoding('utf8').on('data', (d) => (stderr += d));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 60_000);
    child.on('error', (err) => {
      clearTimeout(timer);
      reject(err);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
    child.stdin.on('error', () => undefined);
    child.stdin.end(options.input ?? '');
  });
}

/** A fresh directory under /tmp (short enough for unix socket paths), removed at teardown. */
export function tempDir(t: TestLike, prefix = 'vdisk-test-'): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  t.teardown(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Creates a sparse file of the given size. */
export function sparseFile(file: string, size: number): string {
  const fd = fs.openSync(file, 'w');
  fs.ftruncateSync(fd, size);
  fs.closeSync(fd);
  return file;
}

/** Deterministic pseudo-random bytes (xorshift32), so failures reproduce. */
export function patternBuffer(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < length; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    if (i + 4 <= length) b.writeUInt32LE(x, i);
    else for (let k = i; k < length; k++) b[k] = (x >>> (8 * (k - i))) & 0xff;
  }
  return b;
}

/**
 * Runs a Python script under nbdsh (libnbd's shell; the handle is `h`,
 * already connected to `uri` when one is given). Debian's python3-libnbd
 * lives with /usr/bin/python3, so that comes first on PATH.
 */
export function nbdsh(script: string, uri?: string, timeoutMs = 60_000): Promise<RunResult> {
  const args = uri ? ['-u', uri, '-c', script] : ['-c', script];
  return run('nbdsh', args, { timeoutMs, env: { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` } });
}

/** A deterministic random number generator (mulberry32), so a seed reproduces a run. */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

/** A child process whose output is collected as it comes; killed at teardown if still running. */
export interface LoggedProcess {
  proc: ChildProcess;
  out(): string;
  err(): string;
  exited: Promise<number | null>;
}

export function spawnLogged(t: { teardown(fn: () => unknown): void }, cmd: string, args: string[], env: NodeJS.ProcessEnv = {}): LoggedProcess {
  const proc = spawn(cmd, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  proc.stdout!.setEncoding('utf8').on('data', (d) => (out += d));
  proc.stderr!.setEncoding('utf8').on('data', (d) => (err += d));
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  t.teardown(() => {
    if (proc.exitCode === null && proc.signalCode === null) proc.kill('SIGKILL');
  });
  return { proc, out: () => out, err: () => err, exited };
}

/** Waits until cond() holds, polling; throws naming `what` after timeoutMs. */
export async function until(what: string, cond: () => boolean, timeoutMs = 20_000, pollMs = 10): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, pollMs));
  }
}

/** Bytes of a file at an offset (the image as the kernel's page cache has it). */
export function readAt(file: string, offset: number, length: number): Buffer {
  const fd = fs.openSync(file, 'r');
  try {
    const b = Buffer.alloc(length);
    fs.readSync(fd, b, 0, length, offset);
    return b;
  } finally {
    fs.closeSync(fd);
  }
}
