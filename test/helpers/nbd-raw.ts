/**
 * A deliberately small raw NBD client for tests that must send what real
 * clients never send (garbage, cut messages, bad magic). It does only what
 * those tests need: read exact byte counts, do the fixed newstyle handshake
 * with OPT_GO, send requests and read replies.
 */
import net from 'node:net';

export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const IHAVEOPT = 0x49484156454f5054n;

export class RawClient {
  private buf = Buffer.alloc(0);
  private waiters: Array<() => void> = [];
  closed = false;

  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => undefined);
  }

  /** A client on a socket already open (the TLS socket after NBD_OPT_STARTTLS). */
  static over(socket: net.Socket): RawClient {
    return new RawClient(socket);
  }

  /** Bytes received and not read yet. */
  get buffered(): number {
    return this.buf.length;
  }

  static connect(path: string): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(path);
      s.once('connect', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  private wake(): void {
    for (const w of this.waiters.splice(0)) w();
  }

  /** Reads exactly n bytes; rejects if the server closes first or after timeoutMs. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.closed) throw new Error(`connection closed after ${this.buf.length} of ${n} bytes`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes`);
      await new Promise<void>((r) => {
        this.waiters.push(r);
        setTimeout(r, 100);
      });
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Resolves true when the server closes the connection within timeoutMs. */
  async waitClosed(timeoutMs = 5000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return this.closed;
  }

  write(b: Buffer): void {
    this.socket.write(b);
  }

  close(): void {
    this.socket.destroy();
  }

  /** Reads the greeting and sends client flags (fixed newstyle, no zeroes). */
  async greet(): Promise<void> {
    const g = await this.read(18);
    if (g.readBigUInt64BE(0) !== 0x4e42444d41474943n || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad greeting');
    const f = Buffer.alloc(4);
    f.writeUInt32BE(3);
    this.write(f);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength = data.length): void {
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(IHAVEOPT, 0);
    h.writeUInt32BE(option, 8);
    h.writeUInt32BE(declaredLength, 12);
    this.write(Buffer.concat([h, data]));
  }

  /** Reads one option reply: {option, type, data}. */
  async optionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    if (h.readBigUInt64BE(0) !== 0x3e889045565a9n) throw new Error('bad option reply magic');
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** Handshake to transmission with OPT_GO on `name`; optionally structured replies first. */
  async go(name: string, structured = false): Promise<{ size: bigint; flags: number }> {
    await this.greet();
    if (structured) {
      this.sendOption(NBD_OPT_STRUCTURED_REPLY);
      const r = await this.optionReply();
      if (r.type !== 1) throw new Error('structured replies refused');
    }
    const n = Buffer.from(name);
    const d = Buffer.alloc(4 + n.length + 2);
    d.writeUInt32BE(n.length, 0);
    n.copy(d, 4);
    this.sendOption(NBD_OPT_GO, d);
    let size = 0n;
    let flags = 0;
    for (;;) {
      const r = await this.optionReply();
      if (r.type === 3 && r.data.readUInt16BE(0) === 0) {
        size = r.data.readBigUInt64BE(2);
        flags = r.data.readUInt16BE(10);
      } else if (r.type === 1) return { size, flags };
      else if (r.type !== 3) throw new Error(`OPT_GO failed: reply type ${r.type} ${r.data.toString()}`);
    }
  }

  /** Sends one transmission request (with payload for WRITE). */
  request(type: number, offset: number, length: number, cookie: number, flags = 0, payload?: Buffer, magic = 0x25609513): void {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(magic, 0);
    h.writeUInt16BE(flags, 4);
    h.writeUInt16BE(type, 6);
    h.writeBigUInt64BE(BigInt(cookie), 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(length, 24);
    this.write(payload ? Buffer.concat([h, payload]) : h);
  }

  /** Reads a simple reply: {error, cookie}. */
  async simpleReply(): Promise<{ error: number; cookie: number }> {
    const r = await this.read(16);
    if (r.readUInt32BE(0) !== 0x67446698) throw new Error(`not a simple reply: ${r.toString('hex')}`);
    return { error: r.readUInt32BE(4), cookie: Number(r.readBigUInt64BE(8)) };
  }
}
