/**
 * `vdisk serve`: the daemon.
 *
 * With --blockdev / --export / --nbd-server it builds exactly what they say,
 * taking the same objects as blockdev-add, block-export-add and
 * nbd-server-start (JSON, or qemu-style dotted key=value lists), as
 * qemu-storage-daemon does. With none of them it serves its embedded
 * default: a sparse disk in the data directory, exported writable as
 * `disk0` on 127.0.0.1:10809 and on a unix socket next to the disk.
 */
import fs from 'node:fs';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { Daemon } from '../daemon.js';
import { VdiskError } from '../errors.js';
import { LOG_LEVELS, type LogLevel, flushLog, logEvent, setLogFormat, setLogLevel } from '../log.js';
import { checkNbdServerOptions } from '../nbd/server.js';
import { parseOptionArg } from '../qapi/keyval.js';
import { parseSize } from '../qapi/schema.js';

export const SERVE_USAGE = `Usage: vdisk serve [options]

With no --blockdev/--export/--nbd-server, serves the embedded default: a sparse
raw disk <data-dir>/disk0.raw exported writable as 'disk0' over NBD on
127.0.0.1:10809 and on the unix socket <data-dir>/nbd.sock.

Options (the same objects as blockdev-add, block-export-add and nbd-server-start,
as JSON or as dotted key=value lists, like qemu-storage-daemon):
  --blockdev OPTS     add a block node, e.g. driver=file,node-name=f0,filename=disk.img
  --export OPTS       add an export, e.g. type=nbd,id=e0,node-name=f0,writable=on
  --nbd-server OPTS   listen for NBD clients, e.g. addr.type=unix,addr.path=/run/vdisk.sock
                      (repeat to listen on several addresses)
  --data-dir DIR      directory of the embedded default (default: ./vdisk-data)
  --size SIZE         size of a new default disk (default: 10G)
  --port PORT         TCP port of the embedded default (default: 10809)
  --pidfile FILE      write the process id here once serving
  --log-level LEVEL   error, warn, info (default) or debug
  --log-format FMT    json or human (default: human on a terminal, else json)
`;

const DEFAULT_PORT = 10809;
const DEFAULT_SIZE = 10 * 1024 ** 3;

export async function serveCommand(argv: string[]): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      blockdev: { type: 'string', multiple: true },
      export: { type: 'string', multiple: true },
      'nbd-server': { type: 'string', multiple: true },
      'data-dir': { type: 'string' },
      size: { type: 'string' },
      port: { type: 'string' },
      pidfile: { type: 'string' },
      'log-level': { type: 'string' },
      'log-format': { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    process.stdout.write(SERVE_USAGE);
    return 0;
  }
  if (values['log-level'] !== undefined) {
    if (!LOG_LEVELS.includes(values['log-level'] as LogLevel)) {
      throw new VdiskError('EINVAL', `--log-level: expected one of ${LOG_LEVELS.join(', ')}`);
    }
    setLogLevel(values['log-level'] as LogLevel);
  }
  if (values['log-format'] !== undefined) {
    if (values['log-format'] !== 'json' && values['log-format'] !== 'human') throw new VdiskError('EINVAL', '--log-format: expected json or human');
    setLogFormat(values['log-format']);
  }

  const daemon = new Daemon();
  const explicit = values.blockdev || values.export || values['nbd-server'];
  try {
    if (explicit) await setUpFromOptions(daemon, values.blockdev ?? [], values['nbd-server'] ?? [], values.export ?? []);
    else await setUpDefault(daemon, values['data-dir'] ?? 'vdisk-data', values.size, values.port);
  } catch (err) {
    await daemon.shutdown().catch(() => undefined);
    throw err;
  }

  if (values.pidfile) fs.writeFileSync(values.pidfile, `${process.pid}\n`);
  printEndpoints(daemon, !explicit);

  await waitForSignal(daemon);
  if (values.pidfile) fs.rmSync(values.pidfile, { force: true });
  return 0;
}

/** Applies the options in qemu-storage-daemon's order: nodes, then the server, then exports. */
async function setUpFromOptions(daemon: Daemon, blockdevs: string[], servers: string[], exports: string[]): Promise<void> {
  for (const [i, text] of blockdevs.entries()) {
    await withOption(`--blockdev #${i + 1}`, text, (o, mode) => daemon.blockdevAdd(o, mode));
  }
  for (const [i, text] of servers.entries()) {
    await withOption(`--nbd-server #${i + 1}`, text, async (o, mode) => {
      if (!daemon.nbdServer) await daemon.nbdServerStart(o, mode);
      else {
        await daemon.nbdServer.listen(checkNbdServerOptions(o, mode).addr);
      }
    });
  }
  for (const [i, text] of exports.entries()) {
    await withOption(`--export #${i + 1}`, text, (o, mode) => daemon.blockExportAdd(o, mode));
  }
}

/** Runs one option and names it in any error. */
async function withOption(label: string, text: string, apply: (o: unknown, mode: 'json' | 'keyval') => Promise<unknown>): Promise<void> {
  const parsed = parseOptionArg(text, label);
  const mode = text.trimStart().startsWith('{') ? 'json' : 'keyval';
  try {
    await apply(parsed, mode);
  } catch (err) {
    if (err instanceof VdiskError) throw new VdiskError(err.errno, `${label} (${text}): ${err.message}`, { code: err.code, cause: err });
    throw err;
  }
}

async function setUpDefault(daemon: Daemon, dataDir: string, sizeText: string | undefined, portText: string | undefined): Promise<void> {
  const dir = path.resolve(dataDir);
  fs.mkdirSync(dir, { recursive: true });
  const image = path.join(dir, 'disk0.raw');
  if (!fs.existsSync(image)) {
    const size = sizeText === undefined ? DEFAULT_SIZE : parseSize(sizeText);
    if (size === undefined || size <= 0) throw new VdiskError('EINVAL', `--size: '${sizeText}' is not a size`);
    // A sparse file: it takes no space until written.
    const fd = fs.openSync(image, 'wx', 0o600);
    fs.ftruncateSync(fd, size);
    fs.closeSync(fd);
    logEvent('info', 'default-disk-created', { filename: image, size });
  } else if (sizeText !== undefined) {
    logEvent('warn', 'default-disk-size-ignored', { filename: image, reason: 'the disk exists already' });
  }
  const port = portText === undefined ? DEFAULT_PORT : Number(portText);
  if (!Number.isInteger(port) || port < 0 || port > 65535) throw new VdiskError('EINVAL', `--port: '${portText}' is not a port`);
  await daemon.blockdevAdd({
    driver: 'raw',
    'node-name': 'disk0',
    discard: 'unmap',
    file: { driver: 'file', filename: image },
  });
  await daemon.nbdServerStart({ addr: { type: 'inet', host: '127.0.0.1', port: String(port) } });
  await daemon.nbdServer!.listen({ type: 'unix', path: path.join(dir, 'nbd.sock') });
  await daemon.blockExportAdd({ type: 'nbd', id: 'disk0', 'node-name': 'disk0', name: 'disk0', writable: true });
}

/** One line per endpoint, with the command a person would run next. */
function printEndpoints(daemon: Daemon, isDefault: boolean): void {
  const server = daemon.nbdServer;
  const lines: string[] = [];
  for (const exp of daemon.exports.list()) {
    const node = exp.node;
    lines.push(`vdisk: export '${exp.id}': node '${node.nodeName}' (${node.driverName}, ${formatSize(node.size)}, ${exp.writable ? 'writable' : 'read-only'}) ${node.filename}`);
    if (exp.type !== 'nbd' || !server) continue;
    const name = server.listExports().find((e) => e.node === node)?.name ?? exp.id;
    for (const ep of server.endpoints) {
      const uri = ep.startsWith('unix:')
        ? `nbd+unix:///${encodeURIComponent(name)}?socket=${ep.slice(5)}`
        : `nbd://${ep.slice(4)}/${encodeURIComponent(name)}`;
      const hint = ep.startsWith('unix:') ? `qemu-io -f raw -c 'read -v 0 512' '${uri}'` : `nbdinfo ${uri}   or   qemu-img info ${uri}`;
      lines.push(`  ${uri}    try: ${hint}`);
    }
  }
  if (!server) lines.push('vdisk: no NBD server (add --nbd-server addr.type=...)');
  if (isDefault) lines.push('vdisk: stop with Ctrl-C or SIGTERM; the disk stays in the data directory.');
  process.stdout.write(lines.join('\n') + '\n');
}

function formatSize(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1 && v % 1024 === 0) {
    v /= 1024;
    i++;
  }
  return `${v} ${units[i]}`;
}

/** Serves until SIGINT or SIGTERM, then shuts down cleanly; a second signal exits at once. */
function waitForSignal(daemon: Daemon): Promise<void> {
  return new Promise((resolve) => {
    let stopping = false;
    const onSignal = (signal: NodeJS.Signals): void => {
      if (stopping) {
        logEvent('warn', 'shutdown-forced', { signal });
        process.exit(1);
      }
      stopping = true;
      logEvent('info', 'signal-received', { signal });
      daemon
        .shutdown()
        .catch((err) => logEvent('error', 'shutdown-failed', { error: (err as Error).message }))
        .then(() => flushLog())
        .then(() => resolve());
    };
    process.on('SIGINT', onSignal);
    process.on('SIGTERM', onSignal);
  });
}
