/**
 * What systemd tells a service through its environment, and what the
 * service tells systemd back (docs/design/systemd.md):
 *
 * - sd_notify(3): READY=1, STATUS=, STOPPING=1, WATCHDOG=1 as datagrams to
 *   $NOTIFY_SOCKET, sent by the native addon. Without NOTIFY_SOCKET nothing
 *   is sent at all.
 * - sd_listen_fds(3): sockets passed from fd 3 on (LISTEN_FDS, LISTEN_PID,
 *   LISTEN_FDNAMES), used by SocketAddress type=fd (`addr.str` is an fd
 *   number or a LISTEN_FDNAMES name).
 *
 * Both are read once, at start, and removed from the environment so nothing
 * the daemon starts takes them for its own.
 */
import fs from 'node:fs';
import { VdiskError } from './errors.js';
import { logEvent } from './log.js';
import { native } from './native.js';

const SD_LISTEN_FDS_START = 3;

let notifySocket: string | undefined;
let watchdogTimer: NodeJS.Timeout | undefined;

/**
 * Takes NOTIFY_SOCKET and WATCHDOG_USEC from the environment. Call once,
 * before anything could start a child process.
 */
export function initNotify(env: NodeJS.ProcessEnv = process.env): void {
  notifySocket = env.NOTIFY_SOCKET || undefined;
  const usec = Number(env.WATCHDOG_USEC);
  const pid = env.WATCHDOG_PID;
  delete env.NOTIFY_SOCKET;
  delete env.WATCHDOG_USEC;
  delete env.WATCHDOG_PID;
  // WATCHDOG_PID names the process systemd watches: another process's watchdog is not ours to feed.
  if (notifySocket && Number.isInteger(usec) && usec > 0 && (pid === undefined || Number(pid) === process.pid)) {
    // Half the timeout, as sd_watchdog_enabled(3) advises: one late tick must not cost a restart.
    const ms = Math.max(1, Math.floor(usec / 2000));
    watchdogTimer = setInterval(() => notify('WATCHDOG=1'), ms);
    // The watchdog must not keep a stopping daemon alive.
    watchdogTimer.unref();
    logEvent('info', 'systemd-watchdog', { intervalMs: ms });
  }
}

/** Whether a service manager listens (NOTIFY_SOCKET was set). */
export function notifyEnabled(): boolean {
  return notifySocket !== undefined;
}

/** Sends one sd_notify message ("READY=1", "STATUS=...", several lines joined by \n). */
export function notify(message: string): void {
  if (notifySocket === undefined) return;
  if (typeof native.sdNotify !== 'function') {
    // An addon built from older sources: say so once, rather than throw from every notification.
    logEvent('error', 'sd-notify-unavailable', { socket: notifySocket, fix: "the native addon predates sd_notify: rebuild it with 'npm run build'" });
    notifySocket = undefined;
    return;
  }
  const r = native.sdNotify(notifySocket, message);
  // A lost notification is not worth stopping for, but the operator must learn why systemd waits.
  if (r < 0) logEvent('warn', 'sd-notify-failed', { socket: notifySocket, message: message.split('\n')[0], errno: -r });
}

let isStopping = false;

/** Whether STOPPING=1 was sent: later STATUS lines would only confuse. */
export function stoppingNotified(): boolean {
  return isStopping;
}

/** STOPPING=1: the watchdog stops too, as the daemon may take a while to flush. */
export function notifyStopping(status: string): void {
  isStopping = true;
  if (watchdogTimer) clearInterval(watchdogTimer);
  watchdogTimer = undefined;
  notify(`STOPPING=1\nSTATUS=${status}`);
}

interface PassedFd {
  fd: number;
  name: string;
  used: boolean;
}

let passed: PassedFd[] = [];

/**
 * Takes the sockets systemd passed (LISTEN_FDS from fd 3, for LISTEN_PID,
 * named by LISTEN_FDNAMES). Variables meant for another process (LISTEN_PID
 * not ours) are left alone, as sd_listen_fds(3) does.
 */
export function initListenFds(env: NodeJS.ProcessEnv = process.env): void {
  const pidText = env.LISTEN_PID;
  const countText = env.LISTEN_FDS;
  if (pidText === undefined || countText === undefined) return;
  if (Number(pidText) !== process.pid) return;
  const count = Number(countText);
  const names = env.LISTEN_FDNAMES === undefined ? [] : env.LISTEN_FDNAMES.split(':');
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (!Number.isInteger(count) || count < 0) throw new VdiskError('EINVAL', `LISTEN_FDS: '${countText}' is not a number of sockets`);
  passed = [];
  for (let i = 0; i < count; i++) {
    const fd = SD_LISTEN_FDS_START + i;
    // systemd's default name when FileDescriptorName= is not given.
    passed.push({ fd, name: names[i] || 'unknown', used: false });
  }
  if (count > 0) logEvent('info', 'systemd-listen-fds', { fds: passed.map((p) => `${p.fd}=${p.name}`) });
}

/**
 * Resolves SocketAddress type=fd's `str` to the passed sockets it names: an
 * fd number, or a LISTEN_FDNAMES name (every fd of that name: a .socket unit
 * with several Listen lines passes them all under one name).
 */
export function takeListenFds(str: string, who: string): number[] {
  let found: PassedFd[];
  if (/^\d+$/.test(str)) {
    const fd = Number(str);
    found = passed.filter((p) => p.fd === fd);
    if (found.length === 0) {
      // Not from systemd: QEMU takes any listening socket the caller left open under that number.
      if (!isListeningSocket(fd)) throw new VdiskError('EINVAL', `${who}: fd ${fd} is not a socket passed to vdisk${passedSummary()}`);
      return [fd];
    }
  } else {
    found = passed.filter((p) => p.name === str);
    if (found.length === 0) throw new VdiskError('ENOENT', `${who}: no socket named '${str}' was passed (LISTEN_FDNAMES)${passedSummary()}`);
  }
  for (const p of found) {
    if (p.used) throw new VdiskError('EBUSY', `${who}: fd ${p.fd} ('${p.name}') is already used by another listener`);
    p.used = true;
  }
  return found.map((p) => p.fd);
}

/** A passed socket nothing uses is a configuration mistake: clients would connect and never be answered. */
export function checkListenFdsUsed(): void {
  const unused = passed.filter((p) => !p.used);
  if (unused.length === 0) return;
  const list = unused.map((p) => `fd ${p.fd} ('${p.name}')`).join(', ');
  throw new VdiskError(
    'EINVAL',
    `systemd passed ${list} but no option uses ${unused.length === 1 ? 'it' : 'them'}: add --nbd-server addr.type=fd,addr.str=NAME or --qmp fd:NAME (NAME is the socket unit's FileDescriptorName=)`,
  );
}

function passedSummary(): string {
  if (passed.length === 0) return ' (no sockets were passed: LISTEN_FDS is unset)';
  return ` (passed: ${passed.map((p) => `${p.fd}=${p.name}`).join(', ')})`;
}

function isListeningSocket(fd: number): boolean {
  try {
    return fs.fstatSync(fd).isSocket();
  } catch {
    return false;
  }
}

/**
 * bind(2) on a path whose directory is missing fails with ENOENT, or with
 * EACCES/EROFS under ProtectSystem=strict (the directory cannot be made),
 * which sends the operator hunting for a permission problem. Name the
 * directory instead, and the unit setting that creates it.
 */
export function checkSocketDirectory(socketPath: string, who: string): void {
  const dir = socketPath.includes('/') ? socketPath.slice(0, socketPath.lastIndexOf('/')) || '/' : '.';
  let st: fs.Stats;
  try {
    st = fs.statSync(dir);
  } catch {
    throw new VdiskError('ENOENT', `${who}: cannot create socket ${socketPath}: directory ${dir} does not exist (create it, or under systemd use RuntimeDirectory=)`);
  }
  if (!st.isDirectory()) throw new VdiskError('EINVAL', `${who}: cannot create socket ${socketPath}: ${dir} is not a directory`);
}

/**
 * The path a passed unix socket is bound to. Node reports a listening pipe's
 * address from the path it was asked to listen on, so a socket made by
 * someone else reads as ''; the kernel's table of unix sockets, keyed by
 * inode, has it. Abstract names come back as '@name'.
 */
export function unixSocketPathOfFd(fd: number): string | undefined {
  try {
    const ino = String(fs.fstatSync(fd).ino);
    for (const line of fs.readFileSync('/proc/self/net/unix', 'utf8').split('\n').slice(1)) {
      const cols = line.trim().split(/\s+/);
      if (cols[6] === ino && cols[7]) return cols[7];
    }
  } catch {
    // Not readable (hidepid, no /proc): the endpoint is then named by its fd.
  }
  return undefined;
}
