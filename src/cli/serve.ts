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
import { LOG_LEVELS, type LogFormat, type LogLevel, flushLog, logEvent, setLogFormat, setLogLevel } from '../log.js';
import { checkNbdServerOptions } from '../nbd/server.js';
import { parseOptionArg } from '../qapi/keyval.js';
import { parseSize } from '../qapi/schema.js';
import { QMP_COMMANDS } from '../qmp/commands/index.js';
import { QmpServer, parseQmpAddress } from '../qmp/server.js';
import { type Chardev, daemonize, parseChardev, parseMonitor, reportDaemonError, reportDaemonReady, takeDaemonizeStatus } from './qsd-options.js';
import { checkListenFdsUsed, initListenFds, initNotify, notify, notifyEnabled, notifyStopping, stoppingNotified } from '../systemd.js';
import { MetricsServer, parseMetricsAddress } from '../metrics/server.js';

export const SERVE_USAGE = `Usage: vdisk serve [options]

With none of --object/--blockdev/--export/--nbd-server/--qmp/--config, serves the embedded default: a sparse
raw disk <data-dir>/disk0.raw exported writable as 'disk0' over NBD on
127.0.0.1:10809 and on the unix socket <data-dir>/nbd.sock.

Options (the same objects as blockdev-add, block-export-add and nbd-server-start,
as JSON or as dotted key=value lists, like qemu-storage-daemon):
  --object OPTS       add an object (as QEMU's --object): tls-creds-x509, tls-creds-psk,
                      authz-simple, authz-list, e.g.
                      tls-creds-x509,id=tls0,dir=/etc/pki/vdisk,endpoint=server
  --blockdev OPTS     add a block node, e.g. driver=file,node-name=f0,filename=disk.img
  --export OPTS       add an export, e.g. type=nbd,id=e0,node-name=f0,writable=on
  --nbd-server OPTS   listen for NBD clients, e.g. addr.type=unix,addr.path=/run/vdisk.sock
                      (repeat to listen on several addresses); tls-creds=ID makes clients
                      use TLS, tls-authz=ID says which of them may connect;
                      addr.type=fd,addr.str=NAME serves the sockets systemd passed as NAME
  --qmp ADDR          QMP control port: unix:PATH (created mode 0600), tcp:HOST:PORT
                      (loopback only) or fd:NAME (a socket systemd passed, by its
                      LISTEN_FDNAMES name or fd number); repeat for several
  --config FILE       one JSON document: {"object": [...], "blockdev": [...], "nbd-server": [...],
                      "export": [...], "qmp": ["unix:PATH"], "pidfile": "...",
                      "metrics": "127.0.0.1:PORT"}
  --data-dir DIR      directory of the embedded default (default: ./vdisk-data)
  --size SIZE         size of a new default disk (default: 10G)
  --port PORT         TCP port of the embedded default (default: 10809)
  --pidfile FILE      write the process id here once serving (removed at stop)
  --chardev socket,id=ID,path=PATH,server=on,wait=off
                      a socket for --monitor (qemu-storage-daemon's syntax; also
                      host=HOST,port=PORT on loopback, or fd=N|NAME)
  --monitor [chardev=]ID[,mode=control][,pretty=on|off]
                      a QMP monitor on that chardev (as --qmp)
  --daemonize         run in the background; the command exits 0 once serving
                      (pidfile written), or 1 with the error that stopped it
  --metrics ADDR      Prometheus endpoint GET /metrics on 127.0.0.1:PORT (loopback only) or
                      unix:PATH (docs/metrics.md)
  --log-level LEVEL   error, warn, info (default) or debug
  --log-format FMT    json, human or journal (default: human on a terminal, else json;
                      journal is json with sd-daemon <N> priority prefixes, added by
                      itself when stderr is journald's stream, JOURNAL_STREAM)
`;

const DEFAULT_PORT = 10809;
const DEFAULT_SIZE = 10 * 1024 ** 3;

export async function serveCommand(argv: string[]): Promise<number> {
  // In a --daemonize child, every start-up error goes to the waiting parent: stderr is /dev/null.
  const daemonChild = takeDaemonizeStatus();
  try {
    return await serve(argv, daemonChild);
  } catch (err) {
    reportDaemonError((err as Error).message);
    throw err;
  }
}

async function serve(argv: string[], daemonChild: boolean): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      object: { type: 'string', multiple: true },
      blockdev: { type: 'string', multiple: true },
      export: { type: 'string', multiple: true },
      'nbd-server': { type: 'string', multiple: true },
      'data-dir': { type: 'string' },
      size: { type: 'string' },
      port: { type: 'string' },
      pidfile: { type: 'string' },
      qmp: { type: 'string', multiple: true },
      chardev: { type: 'string', multiple: true },
      monitor: { type: 'string', multiple: true },
      daemonize: { type: 'boolean' },
      config: { type: 'string' },
      metrics: { type: 'string' },
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
    if (!['json', 'human', 'journal'].includes(values['log-format'])) throw new VdiskError('EINVAL', '--log-format: expected json, human or journal');
    setLogFormat(values['log-format'] as LogFormat);
  }

  // qemu-storage-daemon's monitors: checked before anything starts, as every other option.
  const chardevs = new Map<string, Chardev>();
  for (const text of values.chardev ?? []) {
    const c = parseChardev(text);
    if (chardevs.has(c.id)) throw new VdiskError('EEXIST', `--chardev ${text}: attempt to add duplicate property '${c.id}' to object (type 'container')`);
    chardevs.set(c.id, c);
  }
  const monitors = (values.monitor ?? []).map((text) => ({ text, ...parseMonitor(text, chardevs) }));
  if (values.daemonize && !daemonChild) return daemonize(argv);

  // Read once, before anything else, and taken out of the environment (see src/systemd.ts).
  initListenFds();
  initNotify();
  // Opening a long backing chain or a big bitmap can take a while: `systemctl status` says so.
  notify('STATUS=starting: opening images, then listeners');

  // One failed promise nobody awaited must not take every export down: log it and keep serving.
  process.on('unhandledRejection', (err) => logEvent('error', 'internal-error', { error: (err as Error)?.stack ?? String(err) }));
  // SIGHUP's default would kill the daemon with no clean stop (bitmaps left in use, sockets and
  // pidfile left behind): a closed terminal or a careless `kill -HUP` must not cost that. There is
  // no log file to reopen (logs go to stderr) and no config to reload, so it is only logged.
  process.on('SIGHUP', () => logEvent('info', 'signal-ignored', { signal: 'SIGHUP', why: 'vdisk stops on SIGTERM, SIGINT or QMP quit' }));
  const daemon = new Daemon();
  const config = values.config === undefined ? undefined : readConfig(values.config);
  const explicit = values.object || values.blockdev || values.export || values['nbd-server'] || values.qmp || values.chardev || values.monitor || config;
  const pidfileArg = values.pidfile ?? (config?.pidfile as string | undefined);
  // Absolute: a daemonized vdisk moves to / once serving, and removes its pidfile at stop.
  const pidfile = pidfileArg === undefined ? undefined : path.resolve(pidfileArg);
  const qmp = new QmpServer(daemon, QMP_COMMANDS);
  const metricsText = values.metrics ?? (config?.metrics as string | undefined);
  let metrics: MetricsServer | undefined;
  try {
    if (config) await setUpFromConfig(daemon, qmp, values.config!, config);
    if (explicit) await setUpFromOptions(daemon, values.object ?? [], values.blockdev ?? [], values['nbd-server'] ?? [], values.export ?? []);
    else await setUpDefault(daemon, values['data-dir'] ?? 'vdisk-data', values.size, values.port);
    for (const text of values.qmp ?? []) await withLabel('--qmp', text, () => qmp.listen(parseQmpAddress(text)));
    for (const m of monitors) {
      const addr = chardevs.get(m.chardev)!.addr;
      await withLabel('--monitor', m.text, () => qmp.listen(addr, false, { pretty: m.pretty }));
    }
    if (metricsText !== undefined) {
      if (typeof metricsText !== 'string') throw new VdiskError('EINVAL', `--config ${values.config}: 'metrics' must be a string HOST:PORT or unix:PATH`);
      metrics = await MetricsServer.start(daemon, parseMetricsAddress(metricsText));
    }
    checkListenFdsUsed();
    if (pidfile) writePidfile(pidfile);
  } catch (err) {
    await metrics?.close().catch(() => undefined);
    await qmp.close().catch(() => undefined);
    await daemon.shutdown().catch(() => undefined);
    throw err;
  }

  printEndpoints(daemon, qmp, !explicit);
  if (metrics) {
    const ep = metrics.endpoint;
    const curl = ep.startsWith('unix:') ? `curl --unix-socket ${ep.slice(5)} http://localhost/metrics` : `curl http://${ep}/metrics`;
    process.stdout.write(`vdisk: metrics on ${ep}    try: ${curl}\n`);
  }
  // Only now: every listener and mount is up and the pidfile written, so whatever systemd starts
  // after us (After=vdisk@x.service) finds the daemon answering.
  notify(`READY=1\nSTATUS=${servingStatus(daemon, qmp)}\nMAINPID=${process.pid}`);
  reportDaemonReady();
  // Exports added or removed over QMP: `systemctl status` keeps saying what is served.
  if (notifyEnabled()) daemon.exports.on('changed', () => {
    if (!stoppingNotified()) notify(`STATUS=${servingStatus(daemon, qmp)}`);
  });

  await waitForStop(daemon, qmp);
  await metrics?.close();
  if (pidfile) fs.rmSync(pidfile, { force: true });
  return 0;
}

/** Written once every listener is up, so a script that waits for the file finds a daemon that answers. */
function writePidfile(file: string): void {
  try {
    fs.writeFileSync(file, `${process.pid}\n`);
  } catch (err) {
    // qemu-storage-daemon's wording.
    throw new VdiskError('EIO', `cannot create PID file: Could not create '${file}': ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'No such file or directory' : (err as Error).message}`);
  }
}

/** --config FILE: one JSON document with the same objects as the options. */
function readConfig(file: string): Record<string, unknown> {
  let doc: unknown;
  try {
    doc = JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (err) {
    throw new VdiskError('EINVAL', `--config ${file}: ${(err as Error).message}`);
  }
  if (typeof doc !== 'object' || doc === null || Array.isArray(doc)) throw new VdiskError('EINVAL', `--config ${file}: expected a JSON object`);
  const known = ['object', 'blockdev', 'nbd-server', 'export', 'qmp', 'pidfile', 'metrics'];
  for (const key of Object.keys(doc)) {
    if (!known.includes(key)) throw new VdiskError('EINVAL', `--config ${file}: unknown key '${key}' (expected ${known.join(', ')})`);
  }
  return doc as Record<string, unknown>;
}

/** Applies a config document in the same order as options: objects, nodes, NBD server, exports, QMP. */
async function setUpFromConfig(daemon: Daemon, qmp: QmpServer, file: string, config: Record<string, unknown>): Promise<void> {
  const list = (key: string): unknown[] => {
    const v = config[key];
    return v === undefined ? [] : Array.isArray(v) ? v : [v];
  };
  for (const [i, o] of list('object').entries()) await withLabel(`--config ${file}: object[${i}]`, JSON.stringify(o), async () => daemon.objectAdd(o));
  for (const [i, o] of list('blockdev').entries()) await withLabel(`--config ${file}: blockdev[${i}]`, JSON.stringify(o), () => daemon.blockdevAdd(o));
  for (const [i, o] of list('nbd-server').entries()) {
    await withLabel(`--config ${file}: nbd-server[${i}]`, JSON.stringify(o), async () => {
      if (!daemon.nbdServer) await daemon.nbdServerStart(o);
      else await listenAgain(daemon, o, 'json');
    });
  }
  for (const [i, o] of list('export').entries()) await withLabel(`--config ${file}: export[${i}]`, JSON.stringify(o), () => daemon.blockExportAdd(o));
  for (const [i, o] of list('qmp').entries()) {
    await withLabel(`--config ${file}: qmp[${i}]`, JSON.stringify(o), () => {
      if (typeof o !== 'string') throw new VdiskError('EINVAL', 'expected a string unix:PATH or tcp:HOST:PORT');
      return qmp.listen(parseQmpAddress(o));
    });
  }
}

/** Runs one setup step and names its source in any error. */
async function withLabel(label: string, text: string, apply: () => Promise<unknown>): Promise<void> {
  try {
    await apply();
  } catch (err) {
    if (err instanceof VdiskError) throw new VdiskError(err.errno, `${label} (${text}): ${err.message}`, { code: err.code, cause: err });
    throw err;
  }
}

/** Applies the options in qemu-storage-daemon's order: objects, nodes, then the server, then exports. */
async function setUpFromOptions(daemon: Daemon, objects: string[], blockdevs: string[], servers: string[], exports: string[]): Promise<void> {
  for (const [i, text] of objects.entries()) {
    await withOption(`--object #${i + 1}`, text, async (o, mode) => daemon.objectAdd(o, mode), true);
  }
  for (const [i, text] of blockdevs.entries()) {
    await withOption(`--blockdev #${i + 1}`, text, (o, mode) => daemon.blockdevAdd(o, mode));
  }
  for (const [i, text] of servers.entries()) {
    await withOption(`--nbd-server #${i + 1}`, text, async (o, mode) => {
      if (!daemon.nbdServer) await daemon.nbdServerStart(o, mode);
      else await listenAgain(daemon, o, mode);
    });
  }
  for (const [i, text] of exports.entries()) {
    await withOption(`--export #${i + 1}`, text, (o, mode) => daemon.blockExportAdd(o, mode));
  }
}

/**
 * A second --nbd-server adds an address to the one server, so its TLS
 * options must be the server's: a listener without TLS beside one with it
 * would let clients skip TLS.
 */
async function listenAgain(daemon: Daemon, o: unknown, mode: 'json' | 'keyval'): Promise<void> {
  const options = checkNbdServerOptions(o, mode);
  const server = daemon.nbdServer!;
  if (!server.sameTls(options)) {
    const tls = server.tls ? `tls-creds=${server.tls.creds.id}${server.tls.authzId ? `,tls-authz=${server.tls.authzId}` : ''}` : 'no TLS';
    throw new VdiskError('EINVAL', `every --nbd-server must give the same tls-creds and tls-authz (the NBD server has ${tls})`);
  }
  server.checkSameLimits(options);
  await server.listen(options.addr);
}

/** Runs one option and names it in any error. */
async function withOption(label: string, text: string, apply: (o: unknown, mode: 'json' | 'keyval') => Promise<unknown>, implicitType = false): Promise<void> {
  // --object's first item may be the bare type, as QEMU's: tls-creds-x509,id=tls0,...
  const m = implicitType ? /^([a-z][a-z0-9-]*)(,|$)/.exec(text) : null;
  const parsed = parseOptionArg(m ? `qom-type=${text}` : text, label);
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
function printEndpoints(daemon: Daemon, qmp: QmpServer, isDefault: boolean): void {
  const server = daemon.nbdServer;
  const lines: string[] = [];
  for (const ep of qmp.endpoints) {
    lines.push(`vdisk: QMP on ${ep}${ep.startsWith('unix:') ? `    try: vdisk qmp --socket ${ep.slice(5)} query-named-block-nodes` : ''}`);
  }
  for (const exp of daemon.exports.list()) {
    const node = exp.node;
    lines.push(`vdisk: export '${exp.id}': node '${node.nodeName}' (${node.driverName}, ${formatSize(node.size)}, ${exp.writable ? 'writable' : 'read-only'}) ${node.filename}`);
    const mountpoint = (exp.handle as { mountpoint?: string }).mountpoint;
    if (exp.type === 'fuse' && mountpoint) lines.push(`  fuse: ${mountpoint}    try: qemu-img info -f raw ${mountpoint}`);
    if (exp.type !== 'nbd' || !server) continue;
    const name = server.listExports().find((e) => e.node === node)?.name ?? exp.id;
    for (const ep of server.endpoints) {
      if (server.tls) {
        // libnbd's URIs for TLS; the client needs its own credentials, named in the query.
        const query = server.tls.creds.qomType === 'tls-creds-psk' ? 'tls-psk-file=KEYS.PSK&tls-username=NAME' : 'tls-certificates=CLIENT-DIR';
        const uri = ep.startsWith('unix:')
          ? `nbds+unix:///${encodeURIComponent(name)}?socket=${ep.slice(5)}&${query}`
          : `nbds://${ep.slice(4)}/${encodeURIComponent(name)}?${query}`;
        lines.push(`  ${uri}    (TLS: tls-creds=${server.tls.creds.id})    try: nbdinfo '${uri}'`);
        continue;
      }
      const uri = ep.startsWith('unix:')
        ? `nbd+unix:///${encodeURIComponent(name)}?socket=${ep.slice(5)}`
        : `nbd://${ep.slice(4)}/${encodeURIComponent(name)}`;
      const hint = ep.startsWith('unix:') ? `qemu-io -f raw -c 'read -v 0 512' '${uri}'` : `nbdinfo ${uri}   or   qemu-img info ${uri}`;
      lines.push(`  ${uri}    try: ${hint}`);
    }
  }
  if (!server && qmp.endpoints.length === 0 && !daemon.exports.list().some((e) => e.type === 'fuse')) lines.push('vdisk: no NBD server (add --nbd-server addr.type=...)');
  if (isDefault) lines.push('vdisk: stop with Ctrl-C or SIGTERM; the disk stays in the data directory.');
  process.stdout.write(lines.join('\n') + '\n');
}

/** One line for `systemctl status`: what is served, where. */
function servingStatus(daemon: Daemon, qmp: QmpServer): string {
  const exports = daemon.exports.list();
  const names = exports.map((e) => e.id);
  const parts = [`serving ${exports.length} export${exports.length === 1 ? '' : 's'}${names.length ? ` (${names.slice(0, 4).join(', ')}${names.length > 4 ? ', ...' : ''})` : ''}`];
  const nbd = daemon.nbdServer?.endpoints ?? [];
  if (nbd.length) parts.push(`NBD on ${nbd.join(' ')}`);
  if (qmp.endpoints.length) parts.push(`QMP on ${qmp.endpoints.join(' ')}`);
  return parts.join('; ');
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

/**
 * Serves until SIGINT, SIGTERM or QMP 'quit', then shuts down cleanly; a
 * second signal exits at once. SIGHUP is logged and otherwise ignored.
 */
function waitForStop(daemon: Daemon, qmp: QmpServer): Promise<void> {
  return new Promise((resolve) => {
    let stopping = false;
    const stop = (why: Record<string, unknown>): void => {
      if (stopping) {
        logEvent('warn', 'shutdown-forced', why);
        process.exit(1);
      }
      stopping = true;
      logEvent('info', 'stop-requested', why);
      notifyStopping(`stopping (${why.signal ?? 'QMP quit'}): finishing requests in flight and flushing`);
      qmp
        .close()
        .then(() => daemon.shutdown())
        .catch((err) => logEvent('error', 'shutdown-failed', { error: (err as Error).message }))
        .then(() => flushLog())
        .then(() => resolve());
    };
    process.on('SIGINT', () => stop({ signal: 'SIGINT' }));
    process.on('SIGTERM', () => stop({ signal: 'SIGTERM' }));
    qmp.onQuit = () => stop({ qmp: 'quit' });
  });
}
