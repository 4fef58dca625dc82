/**
 * One QMP session's protocol without a socket: bytes in, actions out.
 * QmpSession (server.ts) feeds it what the socket reads and carries out
 * what it returns, in order: text to send, or a command to run, whose
 * outcome comes back through reply()/failure() as the text to send.
 *
 * Everything a client can get wrong is decided here, before any handler
 * runs: JSON (QmpJsonStream and its limits), the message's members,
 * capabilities negotiation, the command's existence and its arguments'
 * schema. So a command action always carries a known command and checked
 * arguments, and the fuzz tests (test/fuzz/qmp-core.test.ts) can show that
 * no input reaches a handler without passing all of it.
 */
import { StringDecoder } from 'node:string_decoder';
import { toVdiskError } from '../errors.js';
import { type Type, arrayOf, check, enumOf, struct } from '../qapi/schema.js';
import { QmpJsonStream, formatJson } from './json.js';

export type QmpAction =
  /** negotiated: this is the reply that completes capabilities negotiation (events may flow after it). */
  | { type: 'send'; text: string; negotiated?: true }
  | { type: 'execute'; exec: QmpExecution };

/** A command that passed every check, for the host to run. */
export interface QmpExecution {
  name: string;
  /** The arguments as the command's schema checked them. */
  args: Record<string, unknown>;
  /** Whether the request had an id, and which (echoed in the reply). */
  hasId: boolean;
  id: unknown;
}

const CAPABILITIES_ARGS = struct('qmp_capabilities', { '*enable': arrayOf(enumOf('QMPCapability', ['oob'])) });

export class QmpSessionCore {
  private negotiated = false;
  private oob = false;
  private readonly stream = new QmpJsonStream();
  private readonly decoder = new StringDecoder('utf8');

  constructor(
    /** The argument schema of a command, or undefined if there is no such command. */
    private readonly lookup: (name: string) => { args: Type } | undefined,
    private readonly greetingValue: unknown,
    /** --monitor pretty=on: QEMU's indented JSON, for people reading the socket. */
    private readonly pretty = false,
  ) {}

  greeting(): string {
    return this.line(this.greetingValue);
  }

  private line(msg: unknown): string {
    return formatLine(msg, this.pretty);
  }

  /** Whether qmp_capabilities has been accepted (events are sent only then). */
  get commandMode(): boolean {
    return this.negotiated;
  }

  push(data: Buffer | string): QmpAction[] {
    const out: QmpAction[] = [];
    const text = typeof data === 'string' ? data : this.decoder.write(data);
    for (const r of this.stream.feed(text)) {
      if ('error' in r) out.push({ type: 'send', text: this.line({ error: { class: 'GenericError', desc: r.error } }) });
      else out.push(this.handle(r.value));
    }
    return out;
  }

  /** The reply to a command that succeeded. */
  reply(exec: QmpExecution, result: unknown): string {
    return this.line(withId(exec.hasId, exec.id, { return: result ?? {} }));
  }

  /** The reply to a command that failed. */
  failure(exec: QmpExecution, desc: string, cls = 'GenericError'): string {
    return this.line(withId(exec.hasId, exec.id, { error: { class: cls, desc } }));
  }

  private handle(msg: unknown): QmpAction {
    if (typeof msg !== 'object' || msg === null || Array.isArray(msg)) {
      return { type: 'send', text: this.line({ error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }) };
    }
    const req = msg as Record<string, unknown>;
    const hasId = Object.hasOwn(req, 'id');
    const fail = (desc: string, cls = 'GenericError'): QmpAction => ({ type: 'send', text: this.line(withId(hasId, req.id, { error: { class: cls, desc } })) });
    for (const key of Object.keys(req)) {
      if (key !== 'execute' && key !== 'arguments' && key !== 'id' && !(key === 'exec-oob' && this.oob)) return fail(`QMP input member '${key}' is unexpected`);
    }
    if (Object.hasOwn(req, 'exec-oob')) {
      if (Object.hasOwn(req, 'execute')) return fail("QMP input member 'execute' is unexpected");
      if (typeof req['exec-oob'] !== 'string') return fail("QMP input member 'exec-oob' must be a string");
      // No vdisk command is meant to run out of band (QEMU has only migrate-recover and a test command).
      return fail(`The command ${req['exec-oob']} does not support OOB`);
    }
    if (!Object.hasOwn(req, 'execute')) return fail("QMP input lacks member 'execute'");
    if (typeof req.execute !== 'string') return fail("QMP input member 'execute' must be a string");
    const args = req.arguments ?? {};
    if (typeof args !== 'object' || args === null || Array.isArray(args)) return fail("QMP input member 'arguments' must be an object");
    const name = req.execute;

    if (name === 'qmp_capabilities') {
      if (this.negotiated) return fail('Capabilities negotiation is already complete, command ignored', 'CommandNotFound');
      try {
        const checked = check(CAPABILITIES_ARGS, args, '', 'json') as { enable?: string[] };
        // 'oob' is offered and may be enabled (QEMU's Python client does when offered); it only
        // makes 'exec-oob' a known member, since no command here runs out of band.
        this.oob = checked.enable?.includes('oob') ?? false;
      } catch (err) {
        return fail((err as Error).message);
      }
      this.negotiated = true;
      return { type: 'send', text: this.line(withId(hasId, req.id, { return: {} })), negotiated: true };
    }
    if (!this.negotiated) return fail("Expecting capabilities negotiation with 'qmp_capabilities'", 'CommandNotFound');
    const command = this.lookup(name);
    if (!command) return fail(`The command ${name} has not been found`, 'CommandNotFound');
    let checked: Record<string, unknown>;
    try {
      checked = check(command.args, args, '', 'json') as Record<string, unknown>;
    } catch (err) {
      const e = toVdiskError(err, `QMP command ${name}`);
      return fail(e.advice === undefined ? e.message : `${e.message}: ${e.advice}`, e.qmpClass);
    }
    return { type: 'execute', exec: { name, args: checked, hasId, id: req.id } };
  }
}

function withId(hasId: boolean, id: unknown, body: Record<string, unknown>): Record<string, unknown> {
  return hasId ? { ...body, id } : body;
}

/** One message as QEMU sends it: one line, or indented (pretty) with every line ending in \r\n. */
export function formatLine(msg: unknown, pretty = false): string {
  // QEMU ends every line of a monitor's output with \r\n, indented ones included.
  return (pretty ? JSON.stringify(JSON.parse(formatJson(msg)), null, 4).replace(/\n/g, '\r\n') : formatJson(msg)) + '\r\n';
}
