/**
 * Entry point of the `vdisk` command: picks the sub-command, reports errors
 * in one line and sets the exit status. Nothing else.
 */
import { VdiskError } from '../errors.js';
import { type LogLevel, flushLog, setLogLevel } from '../log.js';
import { VERSION } from '../version.js';

const USAGE = `Usage: vdisk <command> [options]

Commands:
  serve     run the daemon (with no options: serve a default disk over NBD)
  img       image tools with qemu-img's syntax: bitmap, create, info, check,
            compare, convert, map, rebase, resize ('vdisk img help')
  io        qemu-io's commands (read, write, map, ...) on an image or an NBD
            export ('vdisk io --help')
  qmp       send QMP commands to a running daemon, follow its events, or an
            interactive shell ('vdisk qmp --help')
  help      show this text, or 'vdisk help serve'
  version   print the version

Run 'vdisk serve --help' for the daemon's options.
`;

// Each command's module is loaded only when that command runs: `vdisk img info` should not pay
// for the daemon's modules (start-up time is most of a short command's time).
export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case 'serve':
      return (await import('./serve.js')).serveCommand(rest);
    case 'qmp':
      return (await import('./qmp.js')).qmpCommand(rest);
    case 'img':
      // A tool, not a daemon, whose output is qemu-img's: what a daemon would log as a warning (an
      // inconsistent bitmap found at open) is the tool's output or error here, so only errors are
      // logged unless asked (VDISK_LOG_LEVEL=info shows progress events).
      setLogLevel((process.env.VDISK_LOG_LEVEL as LogLevel | undefined) ?? 'error');
      return (await import('./img/index.js')).imgCommand(rest);
    case 'io':
      // A tool too: its output is qemu-io's, so only errors are logged unless asked.
      setLogLevel((process.env.VDISK_LOG_LEVEL as LogLevel | undefined) ?? 'error');
      return (await import('./io.js')).ioCommand(rest);
    case 'version':
    case '--version':
      process.stdout.write(`vdisk ${VERSION}\n`);
      return 0;
    case 'help':
    case '--help':
    case '-h':
    case undefined:
      process.stdout.write(await usageOf(rest[0]));
      return command === undefined ? 1 : 0;
    default:
      process.stderr.write(`vdisk: unknown command '${command}'\n${USAGE}`);
      return 1;
  }
}

async function usageOf(command: string | undefined): Promise<string> {
  switch (command) {
    case 'serve':
      return (await import('./serve.js')).SERVE_USAGE;
    case 'img':
      return (await import('./img/index.js')).IMG_USAGE;
    case 'io':
      return (await import('./io.js')).IO_USAGE;
    case 'qmp':
      return (await import('./qmp.js')).QMP_USAGE;
    default:
      return USAGE;
  }
}

export function run(): void {
  // Output piped into a program that stops reading (| head) ends quietly, as a C tool's would.
  process.stdout.on('error', (err: NodeJS.ErrnoException) => {
    if (err.code === 'EPIPE') process.exit(0);
  });
  main(process.argv.slice(2)).then(
    async (code) => {
      await flushLog();
      process.exit(code);
    },
    async (err: unknown) => {
      const message = err instanceof VdiskError || (err as { code?: string })?.code?.startsWith?.('ERR_PARSE_ARGS')
        ? (err as Error).message
        : ((err as Error)?.stack ?? String(err));
      process.stderr.write(`vdisk: ${message}\n`);
      await flushLog();
      process.exit(1);
    },
  );
}
