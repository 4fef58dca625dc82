/**
 * qemu-storage-daemon's process options, as 7.2 spells them, so a script
 * written for qsd runs unchanged against vdisk (docs/design/systemd.md):
 *
 *   --chardev socket,id=ID,path=PATH,server=on,wait=off   (or host=,port= on loopback, or fd=)
 *   --monitor [chardev=]ID[,mode=control][,pretty=on|off]
 *   --daemonize [--pidfile FILE]
 *
 * A chardev here is only ever a QMP monitor's socket: vdisk has no other use
 * for one, so other backends are refused by name rather than half-supported.
 */
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { VdiskError } from '../errors.js';
import { parseKeyval } from '../qapi/keyval.js';
import type { QmpAddress } from '../qmp/server.js';

export interface Chardev {
  id: string;
  addr: QmpAddress;
}

export interface Monitor {
  chardev: string;
  pretty: boolean;
}

const CHARDEV_SOCKET_KEYS = ['backend', 'id', 'path', 'host', 'port', 'fd', 'server', 'wait', 'ipv4', 'ipv6', 'to', 'numeric'];

function onOff(v: unknown, key: string, label: string): boolean {
  if (v === undefined) return false;
  if (v === 'on' || v === true || v === 'yes' || v === 'true') return true;
  if (v === 'off' || v === false || v === 'no' || v === 'false') return false;
  throw new VdiskError('EINVAL', `${label}: Parameter '${key}' expects 'on' or 'off'`);
}

/** --chardev socket,...: the address its QMP monitor will listen on. */
export function parseChardev(text: string): Chardev {
  const label = `--chardev ${text}`;
  // The first item is the backend, as QEMU's implied key.
  const withBackend = /^[a-z][a-z0-9-]*(,|$)/.test(text) && !text.startsWith('backend=') && !/^[a-z][a-z0-9-]*=/.test(text) ? `backend=${text}` : text;
  const o = parseKeyval(withBackend, '--chardev') as Record<string, unknown>;
  const backend = o.backend;
  if (typeof o.id !== 'string' || o.id === '') throw new VdiskError('EINVAL', `${label}: Parameter 'id' is missing`);
  if (backend !== 'socket') {
    throw new VdiskError('ENOTSUP', `${label}: chardev backend '${String(backend)}' is not supported by vdisk: a chardev only serves a QMP monitor, use socket`);
  }
  for (const key of Object.keys(o)) if (!CHARDEV_SOCKET_KEYS.includes(key)) throw new VdiskError('EINVAL', `${label}: Invalid parameter '${key}'`);
  const addr = chardevAddress(o, label);
  // A monitor is a server; QEMU's default wait=on would hold the whole start-up until someone connects.
  if (!onOff(o.server, 'server', label)) throw new VdiskError('EINVAL', `${label}: vdisk's monitors listen: add server=on`);
  if (o.wait === undefined || onOff(o.wait, 'wait', label)) throw new VdiskError('EINVAL', `${label}: vdisk does not wait for a monitor client before serving: add wait=off`);
  return { id: o.id, addr };
}

function chardevAddress(o: Record<string, unknown>, label: string): QmpAddress {
  if (typeof o.path === 'string') return { type: 'unix', path: o.path };
  if (typeof o.host === 'string' || o.port !== undefined) {
    const port = Number(o.port);
    if (!Number.isInteger(port) || port < 0 || port > 65535) throw new VdiskError('EINVAL', `${label}: Parameter 'port' expects a port number`);
    return { type: 'inet', host: typeof o.host === 'string' && o.host !== '' ? o.host : '127.0.0.1', port };
  }
  // QEMU's error for a socket chardev with neither a path nor an address: it falls back to fd=.
  if (typeof o.fd !== 'string' || o.fd === '') throw new VdiskError('EINVAL', `${label}: Unable to parse FD number `);
  return { type: 'fd', str: o.fd };
}

/** --monitor [chardev=]ID[,mode=control][,pretty=on|off] */
export function parseMonitor(text: string, chardevs: Map<string, Chardev>): Monitor {
  const label = `--monitor ${text}`;
  const o = parseKeyval(/^[^=,]+(,|$)/.test(text) ? `chardev=${text}` : text, '--monitor') as Record<string, unknown>;
  for (const key of Object.keys(o)) if (!['chardev', 'mode', 'pretty', 'id'].includes(key)) throw new VdiskError('EINVAL', `${label}: Invalid parameter '${key}'`);
  if (typeof o.chardev !== 'string') throw new VdiskError('EINVAL', `${label}: Parameter 'chardev' is missing`);
  if (!chardevs.has(o.chardev)) throw new VdiskError('ENOENT', `${label}: chardev "${o.chardev}" not found`);
  if (o.mode !== undefined && o.mode !== 'control') throw new VdiskError('EINVAL', `${label}: Only QMP monitors are supported (mode=control)`);
  return { chardev: o.chardev, pretty: onOff(o.pretty, 'pretty', label) };
}

/** Set in the daemon's environment by a --daemonize parent: the fd of the pipe to report on. */
const STATUS_FD_ENV = 'VDISK_DAEMONIZE_STATUS_FD';

let statusFd: number | undefined;

/** In the daemonized child: takes the status pipe the parent waits on. */
export function takeDaemonizeStatus(): boolean {
  const v = process.env[STATUS_FD_ENV];
  if (v === undefined) return false;
  delete process.env[STATUS_FD_ENV];
  statusFd = Number(v);
  return true;
}

/**
 * The child is serving: the parent may exit 0. Unlike QEMU, the working
 * directory stays: relative socket paths given on the command line are
 * removed at stop by the names they were given, which a chdir('/') would
 * point elsewhere.
 */
export function reportDaemonReady(): void {
  if (statusFd === undefined) return;
  writeStatus('ready\n');
}

/** The child failed to start: the parent prints this and exits 1. */
export function reportDaemonError(message: string): void {
  if (statusFd === undefined) return;
  writeStatus(`error ${message.replace(/\n/g, ' ')}\n`);
}

function writeStatus(text: string): void {
  try {
    fs.writeSync(statusFd!, text);
    fs.closeSync(statusFd!);
  } catch {
    // The parent is gone (killed): nobody to tell.
  }
  statusFd = undefined;
}

/**
 * --daemonize: Node cannot fork, so the parent starts the same command again
 * in a new session (setsid: no controlling terminal), with stdin, stdout and
 * stderr on /dev/null and a pipe on fd 3, and waits for one line on it:
 * "ready" (listeners up, pidfile written) or "error MESSAGE". The parent's
 * exit status is the start-up's outcome, as qemu-storage-daemon's.
 */
export function daemonize(argv: string[]): Promise<number> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [...process.execArgv, process.argv[1], 'serve', ...argv], {
      detached: true,
      stdio: ['ignore', 'ignore', 'ignore', 'pipe'],
      env: { ...process.env, [STATUS_FD_ENV]: '3' },
    });
    const pipe = child.stdio[3] as NodeJS.ReadableStream;
    let text = '';
    let done = false;
    const finish = (code: number, message?: string): void => {
      if (done) return;
      done = true;
      if (message) process.stderr.write(`vdisk: ${message}\n`);
      child.unref();
      (pipe as unknown as { destroy(): void }).destroy();
      resolve(code);
    };
    pipe.setEncoding('utf8');
    pipe.on('data', (d: string) => {
      text += d;
      if (!text.includes('\n')) return;
      const line = text.slice(0, text.indexOf('\n'));
      if (line === 'ready') finish(0);
      else finish(1, line.replace(/^error /, ''));
    });
    pipe.on('error', () => undefined);
    child.on('error', (err) => finish(1, `cannot start the daemon: ${err.message}`));
    // 'close' comes after the pipe is drained, so a status line is never lost to it.
    child.on('close', (code, signal) => finish(1, `the daemon exited during start-up (${signal ?? `status ${code}`})`));
  });
}
