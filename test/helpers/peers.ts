/**
 * qemu-storage-daemon and vdisk side by side, each with a QMP socket in its
 * own temp dir, for tests that send both the same commands and compare
 * what clients then see. Both are killed at teardown.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { startDaemon } from './daemon.js';
import { QmpWire } from './qmp.js';
import { tempDir } from './tools.js';

export interface Peer {
  name: 'qsd' | 'vdisk';
  dir: string;
  w: QmpWire;
  /** The NBD unix socket the test's nbd-server-start is expected to use. */
  nbdSocket: string;
  uri(exportName: string): string;
}

interface TestLike {
  teardown(fn: () => unknown): void;
  fail(message: string): void;
}

/**
 * Stops a qemu-storage-daemon with SIGTERM, as a user would. QEMU 7.2's
 * daemon only sets a flag in its SIGTERM handler and does not wake its main
 * loop, so with nothing else happening it can sleep in poll() for minutes: a
 * connection to its monitor socket is the event that wakes it. SIGKILL after
 * 10 s. Resolves when the process has exited.
 */
export async function stopQsd(proc: ChildProcess, monitorSocket: string): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => proc.once('exit', () => resolve()));
  proc.kill('SIGTERM');
  const deadline = Date.now() + 10_000;
  let done = false;
  void exited.then(() => (done = true));
  while (!done && Date.now() < deadline) {
    const poke = net.connect(monitorSocket);
    poke.on('error', () => {});
    poke.on('connect', () => poke.destroy());
    await new Promise((r) => setTimeout(r, 200));
    poke.destroy();
  }
  if (!done) proc.kill('SIGKILL');
  await exited;
}

/**
 * Starts qemu-storage-daemon with a QMP monitor on dir/qmp.sock (and any extra arguments).
 * It waits for the socket file rather than probing it with a connection: QEMU's monitor
 * serves one client at a time, and a probe that connects and leaves just before the real
 * client once got that client closed on a loaded CI machine. QEMU listens before its main
 * loop runs, so a connection made once the file exists waits in the backlog until served.
 */
export async function startQsd(t: TestLike, dir: string, extra: string[] = []): Promise<QmpWire> {
  const sock = path.join(dir, 'qmp.sock');
  const proc: ChildProcess = spawn('qemu-storage-daemon', ['--chardev', `socket,path=${sock},server=on,wait=off,id=m0`, '--monitor', 'chardev=m0', ...extra], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let stderr = '';
  proc.stderr?.on('data', (d: Buffer) => (stderr += d.toString()));
  let exit: string | undefined;
  proc.on('exit', (code, signal) => (exit = `exited (${signal ?? code})`));
  t.teardown(() => {
    proc.kill('SIGKILL');
  });
  const why = (): string => `qemu-storage-daemon ${exit ?? 'is running'}${stderr ? `; stderr: ${stderr.trim()}` : ''}`;
  await waitForQsdSocket(proc, sock, why);
  try {
    const w = await QmpWire.connect(sock);
    t.teardown(() => w.close());
    return w;
  } catch (err) {
    throw new Error(`QMP to qemu-storage-daemon failed (${(err as Error).message}): ${why()}`);
  }
}

/**
 * Waits for the monitor socket file of a qemu-storage-daemon started with
 * `--chardev socket,path=SOCK,server=on,wait=off`, without connecting to it
 * (see startQsd for why a probe connection is harmful). Fails at once if the
 * daemon exits, with `why()` (its stderr, when the caller collects it).
 */
export async function waitForQsdSocket(proc: ChildProcess, sock: string, why: () => string = () => 'qemu-storage-daemon'): Promise<void> {
  let exited: string | undefined = proc.exitCode !== null || proc.signalCode !== null ? `exited (${proc.signalCode ?? proc.exitCode})` : undefined;
  const onExit = (code: number | null, signal: string | null): void => {
    exited = `exited (${signal ?? code})`;
  };
  proc.on('exit', onExit);
  try {
    const deadline = Date.now() + 10_000;
    while (!isSocket(sock)) {
      if (exited !== undefined) throw new Error(`no QMP socket at ${sock}: ${why()} ${exited}`);
      if (Date.now() > deadline) throw new Error(`no QMP socket at ${sock} within 10 s: ${why()}`);
      await new Promise((r) => setTimeout(r, 20));
    }
  } finally {
    proc.off('exit', onExit);
  }
}

function isSocket(p: string): boolean {
  try {
    return fs.statSync(p).isSocket();
  } catch {
    return false;
  }
}

/** Starts `vdisk serve` with QMP on dir/qmp.sock (and any extra arguments). */
export async function startVdiskQmp(t: TestLike, dir: string, extra: string[] = []): Promise<QmpWire> {
  const sock = path.join(dir, 'qmp.sock');
  await startDaemon(t, { dir, nbdServer: false, args: ['--qmp', `unix:${sock}`, '--log-level', 'warn', ...extra] });
  const w = await QmpWire.connect(sock);
  t.teardown(() => w.close());
  return w;
}

/**
 * Both daemons, qemu-storage-daemon first. prepare runs in each peer's
 * directory before its daemon starts (to create the same images).
 */
export async function startPeers(t: TestLike, prepare: (dir: string) => Promise<void>): Promise<[Peer, Peer]> {
  const peers: Peer[] = [];
  for (const name of ['qsd', 'vdisk'] as const) {
    const dir = tempDir(t);
    await prepare(dir);
    const w = name === 'qsd' ? await startQsd(t, dir) : await startVdiskQmp(t, dir);
    const nbdSocket = path.join(dir, 'nbd.sock');
    peers.push({ name, dir, w, nbdSocket, uri: (e) => `nbd+unix:///${e}?socket=${nbdSocket}` });
  }
  return [peers[0], peers[1]];
}
