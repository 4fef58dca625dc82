/**
 * Structured logging: one line per event.
 *
 * An event has a name (`nbd-client-connected`) and fields. On a terminal the
 * line is short and readable; otherwise (systemd, files, CI) it is one JSON
 * object, so a machine can follow it. The data path logs at debug only, so
 * the daemon is quiet by default: info is for lifecycle, warn and error for
 * refused input and failed I/O.
 */
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

function makeFormat(json: boolean): winston.Logform.Format {
  return json
    ? winston.format.combine(winston.format.timestamp(), winston.format.json())
    : winston.format.combine(winston.format.timestamp({ format: 'HH:mm:ss.SSS' }), human);
}

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

export function setLogFormat(format: 'json' | 'human'): void {
  logger.format = makeFormat(format === 'json');
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
