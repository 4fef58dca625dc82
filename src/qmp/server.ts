/**
 * The QMP control port: QEMU's monitor protocol on unix and TCP sockets.
 *
 * Each connection is a QmpSession over a QmpSessionCore (session-core.ts,
 * the protocol without the socket): the greeting, capabilities negotiation,
 * then commands run strictly one after another (replies in request order,
 * as QEMU does without out-of-band execution). Events go to every session
 * that has negotiated. Commands are a table (src/qmp/commands/), each with an
 * argument schema checked before its handler runs, so a bad argument never
 * has a side effect.
 */
import { removeStaleSocket } from '../unix-socket.js';
import fs from 'node:fs';
import net from 'node:net';
import { VdiskError, toVdiskError } from '../errors.js';
import { logEvent } from '../log.js';
import type { Type } from '../qapi/schema.js';
import type { Daemon, QmpEvent } from '../daemon.js';
import { QEMU_COMPAT_VERSION, VERSION } from '../version.js';
import { QmpSessionCore, formatLine, type QmpExecution } from './session-core.js';
import { checkSocketDirectory, takeListenFds, unixSocketPathOfFd } from '../systemd.js';

/** What a command handler gets. */
export interface QmpContext {
  daemon: Daemon;
  server: QmpServer;
  session: QmpSession;
}

export interface QmpCommand {
  name: string;
  /** The arguments' type: a struct (or a union, for "boxed" commands such as blockdev-add). */
  args: Type;
  run(args: Record<string, unknown>, ctx: QmpContext): Promise<unknown> | unknown;
}

/** The QEMU version vdisk's QMP presents (the one its commands and replies follow). */
export const QMP_VERSION = {
  // QEMU writes the triple micro first; clients compare the text of replies.
  qemu: { micro: QEMU_COMPAT_VERSION.micro, minor: QEMU_COMPAT_VERSION.minor, major: QEMU_COMPAT_VERSION.major },
  package: `vdisk ${VERSION}`,
};

export type QmpAddress = { type: 'unix'; path: string } | { type: 'inet'; host: string; port: number } | { type: 'fd'; str: string };

/** Parses --qmp's value: unix:PATH, tcp:HOST:PORT or fd:NAME (a socket systemd passed, by name or number). */
export function parseQmpAddress(text: string): QmpAddress {
  if (text.startsWith('unix:') && text.length > 5) return { type: 'unix', path: text.slice(5) };
  if (text.startsWith('fd:') && text.length > 3) return { type: 'fd', str: text.slice(3) };
  const m = /^tcp:(.*):(\d+)$/.exec(text);
  if (m) {
    const port = Number(m[2]);
    if (port > 65535) throw new VdiskError('EINVAL', `--qmp: port ${port} is out of range`);
    return { type: 'inet', host: m[1].replace(/^\[(.*)\]$/, '$1') || '127.0.0.1', port };
  }
  throw new VdiskError('EINVAL', `--qmp: expected unix:PATH, tcp:HOST:PORT or fd:NAME, not '${text}'`);
}

export class QmpServer {
  private readonly listeners: net.Server[] = [];
  private readonly fdAddress = new Map<net.Server, string>();
  private readonly sessions = new Set<QmpSession>();
  private readonly commands = new Map<string, QmpCommand>();
  /** Called by 'quit' after its reply is on its way. */
  onQuit: () => void = () => undefined;
  private readonly forward = (e: QmpEvent) => this.broadcast(e);

  constructor(
    readonly daemon: Daemon,
    commands: QmpCommand[],
  ) {
    for (const c of commands) this.commands.set(c.name, c);
    daemon.on('event', this.forward);
  }

  /** Where the control port listens: unix:PATH or tcp:HOST:PORT. */
  get endpoints(): string[] {
    return this.listeners.map((l) => {
      const passed = this.fdAddress.get(l);
      if (passed) return passed;
      const a = l.address();
      return typeof a === 'string' ? `unix:${a}` : a ? `tcp:${a.address}:${a.port}` : '';
    });
  }

  command(name: string): QmpCommand | undefined {
    return this.commands.get(name);
  }

  commandNames(): string[] {
    return ['qmp_capabilities', ...this.commands.keys()];
  }

  /** Listens on an address; a unix socket is created with mode 0600 (only its owner may control the daemon). */
  async listen(addr: QmpAddress, allowRemote = false, options: { pretty?: boolean } = {}): Promise<net.Server> {
    if (addr.type === 'fd') {
      // Several sockets may share one name (one .socket unit): listen on each.
      let last: net.Server | undefined;
      for (const fd of takeListenFds(addr.str, `--qmp fd:${addr.str}`)) last = await this.listenFd(fd, options.pretty === true);
      return last!;
    }
    if (addr.type === 'inet' && !allowRemote && !isLoopback(addr.host)) {
      throw new VdiskError('EPERM', `--qmp: refusing to listen on ${addr.host}: QMP has no authentication; use a loopback address or a unix socket`);
    }
    const server = net.createServer((socket) => this.accept(socket, options.pretty === true));
    if (addr.type === 'unix') {
      checkSocketDirectory(addr.path, '--qmp');
      await removeStaleSocket(addr.path, { busy: `QMP socket ${addr.path} is in use by a running process` });
    }
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err) => reject(toVdiskError(err, `QMP listen on ${describe(addr)}`)));
      if (addr.type === 'unix') {
        const umask = process.umask(0o177);
        server.listen(addr.path, () => {
          process.umask(umask);
          resolve();
        });
        server.once('error', () => process.umask(umask));
      } else {
        server.listen(addr.port, addr.host, () => resolve());
      }
    });
    if (addr.type === 'unix') fs.chmodSync(addr.path, 0o600);
    this.listeners.push(server);
    logEvent('info', 'qmp-listening', { address: describe(addr, server) });
    return server;
  }

  /** A socket passed by systemd: its mode and owner are the .socket unit's (SocketMode=), its file is not ours to remove. */
  private async listenFd(fd: number, pretty: boolean): Promise<net.Server> {
    const server = net.createServer((socket) => this.accept(socket, pretty));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err) => reject(toVdiskError(err, `QMP listen on fd ${fd}`)));
      server.listen({ fd }, () => resolve());
    });
    const a = server.address();
    if (a && typeof a === 'object' && !isLoopback(a.address)) {
      // The same rule as --qmp tcp:, whoever made the socket.
      await new Promise<void>((r) => server.close(() => r()));
      throw new VdiskError('EPERM', `--qmp: refusing to serve QMP on the passed socket fd ${fd} bound to ${a.address}:${a.port}: QMP has no authentication; bind it to a loopback address or use a unix socket`);
    }
    const unix = a && typeof a === 'object' ? undefined : a || unixSocketPathOfFd(fd);
    const address = a && typeof a === 'object' ? `tcp:${a.address}:${a.port}` : unix ? `unix:${unix}` : `fd:${fd}`;
    this.listeners.push(server);
    this.fdAddress.set(server, address);
    logEvent('info', 'qmp-listening', { address, fd });
    return server;
  }

  private accept(socket: net.Socket, pretty: boolean): void {
    const session = new QmpSession(this, socket, pretty);
    this.sessions.add(session);
    socket.once('close', () => this.sessions.delete(session));
  }

  /** Sends an event to every session in command mode. */
  broadcast(e: QmpEvent): void {
    const us = Math.round((performance.timeOrigin + performance.now()) * 1000);
    const msg = { timestamp: { seconds: Math.floor(us / 1e6), microseconds: us % 1e6 }, event: e.event, data: e.data };
    for (const s of this.sessions) s.sendEvent(msg);
  }

  async close(): Promise<void> {
    this.daemon.off('event', this.forward);
    // Sessions first: a listener's close() waits for every connection it accepted to end.
    for (const s of this.sessions) s.close();
    for (const l of this.listeners.splice(0)) {
      const addr = l.address();
      await new Promise<void>((r) => l.close(() => r()));
      if (typeof addr === 'string' && !this.fdAddress.has(l)) fs.rmSync(addr, { force: true });
    }
  }
}

export class QmpSession {
  /** The protocol (JSON, negotiation, checks); this class runs commands and owns the socket. */
  private readonly core: QmpSessionCore;
  /** Events flow once the capabilities reply is on its way (not when it is merely parsed). */
  private negotiated = false;
  /** Commands run one at a time, in order. */
  private queue: Promise<void> = Promise.resolve();
  private closed = false;

  constructor(
    private readonly server: QmpServer,
    private readonly socket: net.Socket,
    /** --monitor pretty=on: QEMU's indented JSON, for people reading the socket. */
    private readonly pretty = false,
  ) {
    this.core = new QmpSessionCore((name) => this.server.command(name), { QMP: { version: QMP_VERSION, capabilities: ['oob'] } }, pretty);
    socket.on('data', (data: Buffer) => {
      for (const a of this.core.push(data)) {
        if (a.type === 'send') {
          this.enqueue(() => {
            if (a.negotiated) this.negotiated = true;
            this.write(a.text);
          });
        } else {
          this.enqueue(() => this.execute(a.exec));
        }
      }
    });
    socket.on('error', () => undefined);
    socket.on('close', () => (this.closed = true));
    this.write(this.core.greeting());
  }

  private enqueue(fn: () => Promise<void> | void): void {
    this.queue = this.queue.then(fn).catch((err) => logEvent('error', 'qmp-internal-error', { error: (err as Error).stack }));
  }

  private write(text: string): void {
    if (this.closed || this.socket.destroyed) return;
    this.socket.write(text);
  }

  send(msg: unknown): void {
    this.write(formatLine(msg, this.pretty));
  }

  sendEvent(msg: unknown): void {
    // Before negotiation events are dropped, not queued (as QEMU).
    if (this.negotiated) this.send(msg);
  }

  /** Ends the connection: pending output is flushed, and the socket goes away even if the peer lingers. */
  close(): void {
    this.closed = true;
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  private async execute(exec: QmpExecution): Promise<void> {
    const command = this.server.command(exec.name)!;
    let result: unknown;
    try {
      result = await command.run(exec.args, { daemon: this.server.daemon, server: this.server, session: this });
    } catch (err) {
      const e = toVdiskError(err, `QMP command ${exec.name}`);
      logEvent('debug', 'qmp-command-failed', { command: exec.name, error: e.message });
      return this.write(this.core.failure(exec, e.advice === undefined ? e.message : `${e.message}: ${e.advice}`, e.qmpClass));
    }
    logEvent('debug', 'qmp-command', { command: exec.name });
    this.write(this.core.reply(exec, result));
  }
}

function isLoopback(host: string): boolean {
  return host === 'localhost' || host === '::1' || /^127\./.test(host);
}

function describe(addr: QmpAddress, server?: net.Server): string {
  if (addr.type === 'unix') return `unix:${addr.path}`;
  if (addr.type === 'fd') return `fd:${addr.str}`;
  const a = server?.address();
  const port = a && typeof a === 'object' ? a.port : addr.port;
  return `tcp:${addr.host}:${port}`;
}

