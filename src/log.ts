/**
 * Structured logging: one line per event.
 *
 * An event has a name (`nbd-client-connected`) and fields. On a terminal the
 * line is short and readable; otherwise (systemd, files, CI) it is one JSON
 * object, so a machine can follow it. The data path logs at debug only, so
 * the daemon is quiet by default: info is for lifecycle, warn and error for
 * refused input and failed I/O. Under journald (JOURNAL_STREAM names stderr)
 * each line starts with its sd-daemon priority, so `journalctl -p warning`
 * and the journal's colours see the level.
 */
import fs from 'node:fs';
import winston from 'winston';

export type LogLevel = 'error' | 'warn' | 'info' | 'debug';
export const LOG_LEVELS: readonly LogLevel[] = ['error', 'warn', 'info', 'debug'];

const human = winston.format.printf((info) => {
  const { level, message, timestamp, ...fields } = info as Record<string, unknown>;
  const parts = Object.entries(fields)
    .filter(([k]) => typeof k === 'string')
    .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`);
  return `${timestamp} ${level} ${message}${parts.length ? ' ' + parts.join(' ') : ''}`;
});

/** sd-daemon(3) priorities: journald reads a leading <N> as the line's severity. */
const SD_PRIORITY: Record<string, number> = { error: 3, warn: 4, info: 6, debug: 7 };
const MESSAGE = Symbol.for('message');

const sdPrefix = winston.format((info) => {
  const line = (info as unknown as Record<symbol, string>)[MESSAGE];
  (info as unknown as Record<symbol, string>)[MESSAGE] = `<${SD_PRIORITY[info.level] ?? 6}>${line}`;
  return info;
});

function makeFormat(json: boolean, prefix = journalPrefix): winston.Logform.Format {
  const base = json
    ? winston.format.combine(winston.format.timestamp(), winston.format.json())
    : winston.format.combine(winston.format.timestamp({ format: 'HH:mm:ss.SSS' }), human);
  return prefix ? winston.format.combine(base, sdPrefix()) : base;
}

/**
 * journald sets JOURNAL_STREAM to the device and inode of the stream it gave
 * the service as stdout/stderr: only when stderr is that very stream is the
 * prefix understood (a shell redirect of a service's stderr would show it raw).
 */
function stderrIsJournal(env: NodeJS.ProcessEnv = process.env): boolean {
  const m = /^(\d+):(\d+)$/.exec(env.JOURNAL_STREAM ?? '');
  if (!m) return false;
  try {
    const st = fs.fstatSync(2, { bigint: true });
    return st.dev === BigInt(m[1]) && st.ino === BigInt(m[2]);
  } catch {
    return false;
  }
}

let journalPrefix = stderrIsJournal();

const logger = winston.createLogger({
  level: process.env.VDISK_LOG_LEVEL ?? 'info',
  levels: { error: 0, warn: 1, info: 2, debug: 3 },
  format: makeFormat(!process.stderr.isTTY),
  // Logs go to stderr: stdout is for a command's own output (`vdisk img info`).
  transports: [new winston.transports.Console({ stderrLevels: ['error', 'warn', 'info', 'debug'] })],
});

export function setLogLevel(level: LogLevel): void {
  logger.level = level;
}

export type LogFormat = 'json' | 'human' | 'journal';

/** journal: JSON lines with sd-daemon <N> priority prefixes, whatever stderr is. */
export function setLogFormat(format: LogFormat): void {
  if (format === 'journal') journalPrefix = true;
  logger.format = makeFormat(format !== 'human', journalPrefix);
}

export function isLogLevelEnabled(level: LogLevel): boolean {
  return logger.isLevelEnabled(level);
}

/** Logs one event. `fields` must be plain data. */
export function logEvent(level: LogLevel, event: string, fields: Record<string, unknown> = {}): void {
  if (!logger.isLevelEnabled(level)) return;
  logger.log(level, event, fields);
}

/** Waits until buffered log lines are written (before process exit). */
export function flushLog(): Promise<void> {
  return new Promise((resolve) => {
    if (process.stderr.writableLength === 0) resolve();
    else process.stderr.once('drain', () => resolve());
  });
}
