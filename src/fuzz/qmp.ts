/**
 * Fuzzing the QMP session core (src/qmp/session-core.ts) with the real
 * command table's schemas: generators and properties, shared by
 * test/fuzz/qmp-core.test.ts and scripts/fuzz.mjs. Never loaded by the daemon.
 */
import fc from 'fast-check';
import { QMP_COMMANDS } from '../qmp/commands/index.js';
import { QmpSessionCore, type QmpAction } from '../qmp/session-core.js';
import { check } from '../qapi/schema.js';

const table = new Map(QMP_COMMANDS.map((c) => [c.name, c]));
export const QMP_COMMAND_NAMES = [...table.keys()];

export function qmpCore(): QmpSessionCore {
  return new QmpSessionCore((name) => table.get(name), { QMP: { version: {}, capabilities: ['oob'] } });
}

const jsonValue: fc.Arbitrary<unknown> = fc.letrec((tie) => ({
  v: fc.oneof(
    { depthSize: 'small' },
    fc.constantFrom(null, true, false, 0, -1, 1.5, 2 ** 63, '', 'disk0', 'node0', '../x', 'on'),
    fc.string({ maxLength: 12 }),
    fc.integer(),
    fc.array(tie('v'), { maxLength: 3 }),
    fc.dictionary(fc.constantFrom('node-name', 'driver', 'id', 'name', 'size', 'file', 'filename', 'enable', 'x', '__proto__', 'constructor'), tie('v'), { maxKeys: 4 }),
  ),
})).v;

/** One message: a command with arguments drawn around what it takes, or a malformed envelope. */
const messageArb: fc.Arbitrary<string> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ execute: fc.constantFrom('qmp_capabilities', ...QMP_COMMAND_NAMES, 'no-such-command'), arguments: fc.option(jsonValue, { nil: undefined, freq: 2 }), id: fc.option(jsonValue, { nil: undefined }) }).map((m) => JSON.stringify(m)) },
  { weight: 1, arbitrary: fc.dictionary(fc.constantFrom('execute', 'exec-oob', 'arguments', 'id', 'control'), jsonValue, { maxKeys: 4 }).map((m) => JSON.stringify(m)) },
  { weight: 1, arbitrary: jsonValue.map((v) => JSON.stringify(v) ?? 'null') },
  // QEMU's dialect: single quotes and \' escapes.
  { weight: 1, arbitrary: fc.constantFrom("{'execute': 'query-version'}", "{'execute': 'qmp_capabilities', 'arguments': {'enable': ['oob']}}", "{'execute':'x\\'y'}", "{'exec-oob': 'query-version'}") },
);

/** Text fragments that hit the stream scanner's states: quotes, escapes, nesting, control bytes, non-ASCII. */
const lexArb = fc.constantFrom('{', '}', '[', ']', '"', "'", '\\', ',', ':', ' ', '\r\n', '\x00', '\x01', '\xff', 'é', '\u{1F600}', '\\u0000', '\\ud800', '1e999', '-', 'tru');

/** A whole client stream. */
const NEGOTIATE = '{"execute": "qmp_capabilities"}';
export const qmpStreamArb: fc.Arbitrary<Buffer> = fc.oneof(
  { weight: 4, arbitrary: fc.array(messageArb, { maxLength: 10 }).map((ms) => Buffer.from(NEGOTIATE + ms.join(''))) },
  { weight: 1, arbitrary: fc.array(messageArb, { maxLength: 10 }).map((ms) => Buffer.from(ms.join(''))) },
  { weight: 2, arbitrary: fc.array(fc.oneof(messageArb, lexArb), { maxLength: 16 }).map((ms) => Buffer.from(ms.join(''))) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 200 }).map((u) => Buffer.from(u)) },
  // Deep nesting around the limit.
  { weight: 1, arbitrary: fc.integer({ min: 1020, max: 1030 }).map((n) => Buffer.from('['.repeat(n) + ']'.repeat(n))) },
);

export const qmpScheduleArb = fc.array(fc.integer({ min: 1, max: 61 }), { minLength: 1, maxLength: 8 });

/**
 * Feeds `stream` in chunks cut by `schedule` and throws if a property breaks:
 *   - nothing throws out of the core, every reply is one JSON line;
 *   - a command is handed out only after negotiation, only if it exists,
 *     and with arguments its schema accepts;
 *   - after the stream, a control byte (which QEMU and vdisk treat as a
 *     lexical error that drops any partial value) and a valid command still
 *     get their answer: a client can always resynchronise.
 */
export function runQmpCore(stream: Buffer, schedule: number[]): { actions: QmpAction[]; executed: number } {
  const core = qmpCore();
  const actions: QmpAction[] = [];
  let negotiated = false;
  let executed = 0;
  const take = (acts: QmpAction[]): void => {
    for (const a of acts) {
      actions.push(a);
      if (a.type === 'send') {
        if (!a.text.endsWith('\r\n') || a.text.indexOf('\r\n') !== a.text.length - 2) throw new Error(`reply is not one line: ${JSON.stringify(a.text)}`);
        JSON.parse(a.text);
        if (a.negotiated) negotiated = true;
        continue;
      }
      if (!negotiated) throw new Error(`${a.exec.name} handed out before negotiation`);
      const cmd = table.get(a.exec.name);
      if (!cmd) throw new Error(`unknown command ${a.exec.name} handed out`);
      check(cmd.args, a.exec.args, '', 'json');
      executed++;
      // The host's reply must be well-formed whatever the id was.
      JSON.parse(core.reply(a.exec, { ok: true }));
    }
  };
  let pos = 0;
  for (let step = 0; pos < stream.length; step++) {
    const n = schedule[step % schedule.length];
    take(core.push(stream.subarray(pos, pos + n)));
    pos += n;
  }
  // Resynchronise: a lexical error, then a command that must get exactly its reply.
  const before = actions.length;
  take(core.push(Buffer.from('\x01\n{"execute": "qmp_capabilities", "id": "resync"}\n')));
  const after = actions.slice(before).filter((a) => a.type === 'send' && a.text.includes('"resync"'));
  if (after.length !== 1) throw new Error(`no reply to a valid command after the stream (${actions.length - before} actions)`);
  return { actions, executed };
}

/**
 * Streams safe to throw at a running daemon: garbage, damaged JSON and only
 * the query-* commands, so what the daemon does is never a legitimate change
 * (a fuzzed 'quit' or 'blockdev-del' would be obeyed, and rightly).
 */
const QUERY_NAMES = QMP_COMMAND_NAMES.filter((n) => n.startsWith('query-'));
const safeMessageArb = fc
  .record({ execute: fc.constantFrom('qmp_capabilities', ...QUERY_NAMES, 'no-such-command'), arguments: fc.option(jsonValue, { nil: undefined, freq: 2 }), id: fc.option(jsonValue, { nil: undefined }) })
  .map((m) => JSON.stringify(m));
export const qmpSafeStreamArb: fc.Arbitrary<Buffer> = fc.oneof(
  { weight: 3, arbitrary: fc.array(safeMessageArb, { maxLength: 8 }).map((ms) => Buffer.from(NEGOTIATE + ms.join(''))) },
  { weight: 2, arbitrary: fc.array(fc.oneof(safeMessageArb, lexArb), { maxLength: 16 }).map((ms) => Buffer.from(ms.join(''))) },
  { weight: 1, arbitrary: fc.uint8Array({ maxLength: 200 }).map((u) => Buffer.from(u)) },
);
