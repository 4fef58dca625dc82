/**
 * `vdisk qmp`: a QMP client for people and scripts.
 *
 *   vdisk qmp --socket PATH COMMAND [key=value ... | JSON]   one command; prints its return value
 *   vdisk qmp --socket PATH --events [COMMAND ...]           then prints events until interrupted
 *   vdisk qmp --socket PATH                                  an interactive shell with history
 *
 * Arguments are written as qmp-shell takes them: key=value where the value
 * is JSON if it parses as JSON (numbers, true, {"a": 1}) and a string
 * otherwise; dotted keys build nested objects (addr.type=unix). A single
 * JSON object argument is taken as the whole arguments object.
 */
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { parseArgs } from 'node:util';
import { VdiskError } from '../errors.js';
import { QmpJsonStream, formatJson, parseJson } from '../qmp/json.js';

export const QMP_USAGE = `Usage: vdisk qmp (--socket PATH | --tcp HOST:PORT) [--events] [--compact] [--timeout S] [COMMAND [ARGS...]]

  COMMAND ARGS    one command, e.g.  vdisk qmp --socket /run/vdisk/qmp.sock blockdev-del node-name=d0
                  ARGS: key=value (value is JSON if it parses, else a string; dotted keys nest)
                        or one JSON object
  --events        after the command (if any), print events until interrupted (or --timeout)
  --compact       print JSON on one line (default: indented)
  --timeout S     give up after S seconds (default: 30 for a command; none for --events)
  Without COMMAND: an interactive shell ('help' lists the daemon's commands; history in ~/.vdisk_qmp_history).

Exit status: 0 on success, 1 when the command returned an error, 2 when the daemon could not be reached.
`;

interface Message {
  QMP?: unknown;
  return?: unknown;
  error?: { class: string; desc: string };
  event?: string;
  id?: unknown;
}

/** A QMP connection: greeting and negotiation done by connect(); execute() is one command. */
export class QmpClient {
  private readonly stream = new QmpJsonStream();
  private readonly waiting = new Map<string, (m: Message) => void>();
  private nextId = 1;
  onEvent: (m: Message) => void = () => undefined;
  onClose: () => void = () => undefined;

  private constructor(private readonly socket: net.Socket) {}

  static connect(target: { path: string } | { host: string; port: number }): Promise<QmpClient> {
    return new Promise((resolve, reject) => {
      const socket = 'path' in target ? net.connect(target.path) : net.connect(target.port, target.host);
      const client = new QmpClient(socket);
      let greeted = false;
      socket.setEncoding('utf8');
      socket.once('error', (err) => reject(new VdiskError('ENOENT', `cannot connect to ${'path' in target ? target.path : `${target.host}:${target.port}`}: ${err.message}`)));
      socket.on('close', () => {
        for (const w of client.waiting.values()) w({ error: { class: 'GenericError', desc: 'the daemon closed the connection' } });
        client.waiting.clear();
        client.onClose();
      });
      socket.on('data', (text: string) => {
        for (const r of client.stream.feed(text)) {
          if ('error' in r) continue;
          const m = r.value as Message;
          if (!greeted && m.QMP) {
            greeted = true;
            client
              .execute('qmp_capabilities', {})
              .then((reply) => (reply.error ? reject(new VdiskError('EIO', reply.error.desc)) : resolve(client)), reject);
            continue;
          }
          if (m.event) client.onEvent(m);
          else if (typeof m.id === 'string' && client.waiting.has(m.id)) {
            const w = client.waiting.get(m.id)!;
            client.waiting.delete(m.id);
            w(m);
          }
        }
      });
    });
  }

  execute(command: string, args: Record<string, unknown> | undefined): Promise<Message> {
    const id = `vdisk-qmp-${this.nextId++}`;
    return new Promise((resolve) => {
      this.waiting.set(id, resolve);
      this.socket.write(formatJson(args === undefined ? { execute: command, id } : { execute: command, arguments: args, id }) + '\n');
    });
  }

  close(): void {
    this.socket.end();
  }
}

/** qmp-shell's argument syntax: key=value pairs (JSON values when they parse) or one JSON object. */
export function parseCommandArgs(words: string[]): Record<string, unknown> {
  if (words.length === 1 && words[0].trimStart().startsWith('{')) {
    let v: unknown;
    try {
      v = parseJson(words[0]);
    } catch (err) {
      throw new VdiskError('EINVAL', `invalid JSON arguments: ${(err as Error).message}`);
    }
    if (typeof v !== 'object' || v === null || Array.isArray(v)) throw new VdiskError('EINVAL', 'JSON arguments must be an object');
    return v as Record<string, unknown>;
  }
  const out: Record<string, unknown> = {};
  for (const w of words) {
    const eq = w.indexOf('=');
    if (eq <= 0) throw new VdiskError('EINVAL', `expected key=value, not '${w}'`);
    const keys = w.slice(0, eq).split('.');
    if (keys.some((k) => k === '' || k === '__proto__')) throw new VdiskError('EINVAL', `invalid key '${w.slice(0, eq)}'`);
    const text = w.slice(eq + 1);
    let value: unknown = text;
    try {
      value = parseJson(text);
    } catch {
      // Not JSON: a plain string.
    }
    let cur = out;
    for (const k of keys.slice(0, -1)) {
      if (cur[k] === undefined) cur[k] = {};
      if (typeof cur[k] !== 'object' || cur[k] === null) throw new VdiskError('EINVAL', `key '${k}' has a value and members`);
      cur = cur[k] as Record<string, unknown>;
    }
    const last = keys[keys.length - 1];
    if (Object.hasOwn(cur, last)) throw new VdiskError('EINVAL', `key '${w.slice(0, eq)}' given twice`);
    cur[last] = value;
  }
  return out;
}

export async function qmpCommand(argv: string[]): Promise<number> {
  const { values, positionals } = parseArgs({
    args: argv,
    options: {
      socket: { type: 'string', short: 's' },
      tcp: { type: 'string' },
      events: { type: 'boolean', short: 'e' },
      compact: { type: 'boolean' },
      timeout: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    allowPositionals: true,
    strict: true,
  });
  if (values.help) {
    process.stdout.write(QMP_USAGE);
    return 0;
  }
  let target: { path: string } | { host: string; port: number };
  if (values.socket !== undefined) target = { path: values.socket };
  else if (values.tcp !== undefined) {
    const m = /^(.*):(\d+)$/.exec(values.tcp);
    if (!m) throw new VdiskError('EINVAL', `--tcp: expected HOST:PORT, not '${values.tcp}'`);
    target = { host: m[1] || '127.0.0.1', port: Number(m[2]) };
  } else throw new VdiskError('EINVAL', `--socket PATH or --tcp HOST:PORT is required\n${QMP_USAGE}`);
  const show = (v: unknown) => (values.compact ? formatJson(v) : JSON.stringify(v, null, 2));
  const timeout = values.timeout === undefined ? undefined : Number(values.timeout);
  if (timeout !== undefined && !(timeout > 0)) throw new VdiskError('EINVAL', `--timeout: '${values.timeout}' is not a number of seconds`);

  let client: QmpClient;
  try {
    client = await withTimeout(QmpClient.connect(target), timeout ?? 30);
  } catch (err) {
    process.stderr.write(`vdisk qmp: ${(err as Error).message}\n`);
    return 2;
  }
  try {
    if (positionals.length === 0 && !values.events) return await shell(client, show);
    let status = 0;
    // Events the command itself causes may arrive before its reply: print them all, in order.
    if (values.events) client.onEvent = (m) => process.stdout.write(show(m) + '\n');
    if (positionals.length > 0) {
      const [command, ...rest] = positionals;
      const reply = await withTimeout(client.execute(command, rest.length ? parseCommandArgs(rest) : undefined), values.events ? 30 : (timeout ?? 30));
      if (reply.error) {
        process.stderr.write(`vdisk qmp: ${reply.error.class}: ${reply.error.desc}\n`);
        status = 1;
      } else {
        process.stdout.write(show(reply.return) + '\n');
      }
    }
    if (values.events) {
      await new Promise<void>((resolve) => {
        client.onClose = resolve;
        process.once('SIGINT', resolve);
        if (timeout !== undefined) setTimeout(resolve, timeout * 1000).unref();
      });
    }
    return status;
  } finally {
    client.close();
  }
}

/** The interactive shell: one command per line, events printed as they come. */
async function shell(client: QmpClient, show: (v: unknown) => string): Promise<number> {
  const historyFile = path.join(os.homedir(), '.vdisk_qmp_history');
  let history: string[] = [];
  try {
    history = fs.readFileSync(historyFile, 'utf8').split('\n').filter(Boolean).reverse().slice(0, 1000);
  } catch {
    // No history yet.
  }
  const rl = readline.createInterface({ input: process.stdin, output: process.stdout, history, historySize: 1000, prompt: '(QMP) ', terminal: process.stdin.isTTY });
  client.onEvent = (m) => {
    process.stdout.write(`\n${show(m)}\n`);
    rl.prompt(true);
  };
  client.onClose = () => rl.close();
  rl.prompt();
  for await (const line of rl) {
    const text = line.trim();
    if (text === '') {
      rl.prompt();
      continue;
    }
    if (text === 'quit-shell' || text === 'exit') break;
    fs.appendFileSync(historyFile, text + '\n', { mode: 0o600 });
    try {
      let command: string;
      let args: Record<string, unknown> | undefined;
      if (text.startsWith('{')) {
        const req = parseCommandArgs([text]);
        command = String(req.execute);
        args = req.arguments as Record<string, unknown> | undefined;
      } else {
        const [c, ...rest] = splitWords(text);
        command = c === 'help' ? 'query-commands' : c;
        args = rest.length ? parseCommandArgs(rest) : undefined;
      }
      const reply = await client.execute(command, args);
      process.stdout.write((reply.error ? `error: ${reply.error.class}: ${reply.error.desc}` : show(reply.return)) + '\n');
    } catch (err) {
      process.stdout.write(`error: ${(err as Error).message}\n`);
    }
    rl.prompt();
  }
  rl.close();
  return 0;
}

/** Splits a shell line on spaces, keeping quoted parts ('...' or "...") together. */
function splitWords(text: string): string[] {
  const words: string[] = [];
  let cur = '';
  let quote: string | undefined;
  let braces = 0;
  for (const c of text) {
    if (quote) {
      if (c === quote) quote = undefined;
      else cur += c;
    } else if ((c === '"' || c === "'") && braces === 0) quote = c;
    else if (c === ' ' && braces === 0) {
      if (cur) words.push(cur);
      cur = '';
    } else {
      if (c === '{' || c === '[') braces++;
      if (c === '}' || c === ']') braces--;
      cur += c;
    }
  }
  if (cur) words.push(cur);
  return words;
}

function withTimeout<T>(p: Promise<T>, seconds: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new VdiskError('EAGAIN', `no answer within ${seconds} s`)), seconds * 1000);
    p.then(
      (v) => {
        clearTimeout(t);
        resolve(v);
      },
      (e) => {
        clearTimeout(t);
        reject(e);
      },
    );
  });
}
