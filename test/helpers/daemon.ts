/**
 * Starts `vdisk serve` in a child process for a test, the way a user would,
 * and stops it (SIGTERM, then SIGKILL after a grace period) at teardown.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { VDISK, tempDir } from './tools.js';

export interface DaemonHandle {
  proc: ChildProcess;
  /** The NBD unix socket. */
  socket: string;
  dir: string;
  /** nbd+unix URI of an export. */
  uri(exportName?: string): string;
  stdout(): string;
  stderr(): string;
  /**
   * Waits (up to timeoutMs) until the daemon's stdout matches: what it prints
   * arrives through a pipe, after any QMP reply sent at the same moment.
   * Resolves with stdout as it is then, matched or not.
   */
  waitStdout(pattern: RegExp, timeoutMs?: number): Promise<string>;
  /** Sends SIGTERM and resolves with the exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

interface TestLike {
  teardown(fn: () => unknown): void;
  fail(message: string): void;
}

export interface StartOptions {
  /** Extra arguments after `serve` (--blockdev, --export, ...). */
  args?: string[];
  /** Add --nbd-server on a unix socket in the test's temp dir (default true). */
  nbdServer?: boolean;
  env?: NodeJS.ProcessEnv;
  dir?: string;
  cwd?: string;
  /** How long to wait for the socket (ms). */
  timeoutMs?: number;
  /**
   * A network namespace to run the daemon in (`ip netns exec NAME`, which execs the daemon, so
   * proc's pid is the daemon's and a signal reaches it directly).
   */
  netns?: string;
}

export async function startDaemon(t: TestLike, options: StartOptions = {}): Promise<DaemonHandle> {
  const dir = options.dir ?? tempDir(t);
  const socket = path.join(dir, 'nbd.sock');
  const args = ['serve', ...(options.args ?? [])];
  if (options.nbdServer !== false) args.push('--nbd-server', `addr.type=unix,addr.path=${socket}`);
  const command = options.netns ? ['ip', 'netns', 'exec', options.netns, process.execPath] : [process.execPath];
  const proc = spawn(command[0], [...command.slice(1), VDISK, ...args], {
    cwd: options.cwd ?? dir,
    env: { ...process.env, ...options.env },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let err = '';
  proc.stdout!.setEncoding('utf8').on('data', (d) => (out += d));
  proc.stderr!.setEncoding('utf8').on('data', (d) => (err += d));
  const exited = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  let stopped = false;
  const stop = async (signal: NodeJS.Signals = 'SIGTERM'): Promise<number | null> => {
    if (!stopped) {
      stopped = true;
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill('SIGKILL'), 15_000);
      const code = await exited;
      clearTimeout(timer);
      return code;
    }
    return exited;
  };
  t.teardown(() => stop());
  // Ready when the banner is printed (after every option has been applied).
  const deadline = Date.now() + (options.timeoutMs ?? 20_000);
  while (!out.includes('vdisk: ')) {
    if (proc.exitCode !== null) throw new Error(`vdisk serve exited with ${proc.exitCode}: ${err}`);
    if (Date.now() > deadline) throw new Error(`vdisk serve did not start in time: ${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    proc,
    socket,
    dir,
    uri: (name = '') => `nbd+unix:///${name}?socket=${socket}`,
    stdout: () => out,
    stderr: () => err,
    waitStdout: async (pattern, timeoutMs = 10_000) => {
      const until = Date.now() + timeoutMs;
      while (!pattern.test(out) && Date.now() < until && proc.exitCode === null) await new Promise((r) => setTimeout(r, 20));
      return out;
    },
    stop,
  };
}

/** Resolves once something accepts connections on a unix socket. */
export async function waitForSocket(socket: string, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const s = net.connect(socket);
      s.once('connect', () => {
        s.destroy();
        resolve(true);
      });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${socket}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
