/**
 * A raw QMP connection for tests: sends exactly what the test writes and
 * keeps every message it receives, so a test can check the wire itself
 * (greeting, replies, ids, events and their order).
 */
import net from 'node:net';

export interface QmpMessage {
  QMP?: { version: unknown; capabilities: unknown[] };
  return?: unknown;
  error?: { class: string; desc: string };
  event?: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
  id?: unknown;
}

export class QmpWire {
  readonly messages: QmpMessage[] = [];
  private text = '';
  private waiters: Array<() => void> = [];
  closed = false;

  private constructor(readonly socket: net.Socket) {
    socket.setEncoding('utf8');
    socket.on('data', (d: string) => {
      this.text += d;
      let i;
      while ((i = this.text.indexOf('\r\n')) >= 0) {
        const line = this.text.slice(0, i);
        this.text = this.text.slice(i + 2);
        this.messages.push(JSON.parse(line) as QmpMessage);
      }
      for (const w of this.waiters.splice(0)) w();
    });
    socket.on('close', () => {
      this.closed = true;
      for (const w of this.waiters.splice(0)) w();
    });
    socket.on('error', () => undefined);
  }

  static async connect(path: string, negotiate = true): Promise<QmpWire> {
    const socket = net.connect(path);
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve());
      socket.once('error', reject);
    });
    const w = new QmpWire(socket);
    await w.waitFor((m) => m.QMP !== undefined);
    if (negotiate) {
      const r = await w.cmd('qmp_capabilities');
      if (r.error) throw new Error(`negotiation failed: ${r.error.desc}`);
    }
    return w;
  }

  /** Resolves with the first message (received so far or later) that matches, within timeoutMs. */
  async waitFor(match: (m: QmpMessage) => boolean, timeoutMs = 20_000, from = 0): Promise<QmpMessage> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const found = this.messages.slice(from).find(match);
      if (found) return found;
      if (this.closed) throw new Error('the connection closed');
      if (Date.now() > deadline) throw new Error(`no matching QMP message within ${timeoutMs} ms; got ${JSON.stringify(this.messages.slice(-5))}`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 50);
      });
    }
  }

  private nextId = 1;

  /** Sends a command with a fresh string id and resolves with its reply. */
  async cmd(execute: string, args?: unknown): Promise<QmpMessage> {
    const id = `t${this.nextId++}`;
    this.send(args === undefined ? { execute, id } : { execute, arguments: args, id });
    return this.waitFor((m) => m.id === id && m.event === undefined);
  }

  /** Like cmd, but fails the caller on an error reply. */
  async ok(execute: string, args?: unknown): Promise<unknown> {
    const r = await this.cmd(execute, args);
    if (r.error) throw new Error(`${execute}: ${r.error.class}: ${r.error.desc}`);
    return r.return;
  }

  send(obj: unknown): void {
    this.socket.write(JSON.stringify(obj));
  }

  sendRaw(text: string | Buffer): void {
    this.socket.write(text);
  }

  events(name?: string): QmpMessage[] {
    return this.messages.filter((m) => m.event !== undefined && (name === undefined || m.event === name));
  }

  close(): void {
    this.socket.destroy();
  }
}
