/**
 * `vdisk io`: qemu-io's command line over vdisk's block layer.
 *
 *   vdisk io [-f FMT] [-r] [-U] [-t CACHE] [-n] [-d DISCARD] [-c CMD]... FILENAME
 *
 * Opens FILENAME as qemu-io does (a path with its format probed or given by
 * -f, a json:{...} description, or an nbd:// / nbd+unix:// URI through
 * vdisk's NBD client) and runs each -c command in order, printing what
 * qemu-io prints. Without -c it reads commands from stdin after a
 * "qemu-io> " prompt until end of input or `quit`.
 */
import readline from 'node:readline';
import type { BlockNode } from '../block/node.js';
import { VdiskError } from '../errors.js';
import { runIoCommand, splitCommandLine } from '../io/index.js';
import { cacheMode, openImage } from './img/image.js';

export const IO_USAGE = `Usage: vdisk io [OPTIONS]... [-c STRING]... FILENAME
qemu-io's commands on a disk image or an NBD export

  -c, --cmd STRING     execute command with its arguments (in order; may be
                       given many times); without -c, read commands from
                       standard input after a "qemu-io> " prompt
  -f, --format FMT     the image format (raw or qcow2; probed when absent)
  -r, --read-only      open read-only
  -U, --force-share    open even if another process holds the image (with -r)
  -t, --cache=MODE     cache mode: none, writeback, writethrough, directsync,
                       unsafe
  -n, --nocache        short for -t none
  -d, --discard=MODE   ignore or unmap (the default, as qemu-io)
  -h, --help           show this text

FILENAME is a path, json:{...}, nbd://HOST[:PORT]/EXPORT or
nbd+unix:///EXPORT?socket=PATH.

Commands (see -c help): read, write, discard, flush, map, alloc, info,
length, truncate, help, quit. Their options and output are qemu-io 7.2's.

Exit status: 0 when every command succeeded, 1 when any failed (a failed
request, a pattern mismatch, bad arguments, an unknown command) or the
image could not be opened; the remaining commands still run, as in qemu-io
7.2.
`;

interface IoArgs {
  commands: string[];
  format?: string;
  readOnly: boolean;
  forceShare: boolean;
  cache?: string;
  discard: 'ignore' | 'unmap';
  files: string[];
  help: boolean;
}

const LONG: Record<string, { short: string; value: boolean }> = {
  cmd: { short: 'c', value: true },
  format: { short: 'f', value: true },
  'read-only': { short: 'r', value: false },
  'force-share': { short: 'U', value: false },
  cache: { short: 't', value: true },
  nocache: { short: 'n', value: false },
  discard: { short: 'd', value: true },
  help: { short: 'h', value: false },
};
const SHORT_WITH_VALUE = new Set(['c', 'f', 't', 'd']);
const SHORT_FLAGS = new Set(['r', 'U', 'n', 'h']);

/** getopt_long as qemu-io uses it: options and the file name in any order. */
export function parseIoArgs(argv: string[]): IoArgs {
  const a: IoArgs = { commands: [], readOnly: false, forceShare: false, discard: 'unmap', files: [], help: false };
  const set = (opt: string, value: string | undefined): void => {
    switch (opt) {
      case 'c':
        a.commands.push(value!);
        break;
      case 'f':
        a.format = value;
        break;
      case 'r':
        a.readOnly = true;
        break;
      case 'U':
        a.forceShare = true;
        break;
      case 't':
        a.cache = value;
        break;
      case 'n':
        a.cache = 'none';
        break;
      case 'd':
        if (value !== 'ignore' && value !== 'off' && value !== 'unmap' && value !== 'on') throw new VdiskError('EINVAL', `Invalid discard option: ${value}`);
        a.discard = value === 'unmap' || value === 'on' ? 'unmap' : 'ignore';
        break;
      case 'h':
        a.help = true;
        break;
    }
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    if (arg === '--') {
      a.files.push(...argv.slice(i + 1));
      break;
    }
    if (arg.startsWith('--')) {
      const eq = arg.indexOf('=');
      const name = arg.slice(2, eq < 0 ? undefined : eq);
      const def = LONG[name];
      if (!def) throw new VdiskError('EINVAL', `unrecognized option '${arg}'\nTry 'vdisk io --help' for more information.`);
      let value: string | undefined;
      if (def.value) {
        value = eq >= 0 ? arg.slice(eq + 1) : argv[++i];
        if (value === undefined) throw new VdiskError('EINVAL', `option '--${name}' requires an argument`);
      } else if (eq >= 0) {
        throw new VdiskError('EINVAL', `option '--${name}' doesn't allow an argument`);
      }
      set(def.short, value);
      continue;
    }
    if (arg.length > 1 && arg[0] === '-') {
      for (let k = 1; k < arg.length; k++) {
        const c = arg[k];
        if (SHORT_FLAGS.has(c)) {
          set(c, undefined);
        } else if (SHORT_WITH_VALUE.has(c)) {
          const value = k + 1 < arg.length ? arg.slice(k + 1) : argv[++i];
          if (value === undefined) throw new VdiskError('EINVAL', `option requires an argument -- '${c}'\nTry 'vdisk io --help' for more information.`);
          set(c, value);
          break;
        } else {
          throw new VdiskError('EINVAL', `invalid option -- '${c}'\nTry 'vdisk io --help' for more information.`);
        }
      }
      continue;
    }
    a.files.push(arg);
  }
  return a;
}

interface Opened {
  node: BlockNode;
  close(): Promise<void>;
}

async function openTarget(filename: string, args: IoArgs): Promise<Opened> {
  const cache = cacheMode(args.cache, 'writeback');
  const img = await openImage(filename, {
    format: args.format,
    readOnly: args.readOnly,
    forceShare: args.forceShare,
    unmap: args.discard === 'unmap',
    direct: cache.direct,
    noFlush: cache.noFlush,
  });
  return { node: img.node, close: () => img.close() };
}

const out = (text: string): void => {
  process.stdout.write(text);
};
const err = (text: string): void => {
  process.stderr.write(text);
};

/** qemu-io's quit (or q), which the program, not the command library, handles: true when the line is one. */
function isQuit(line: string): boolean {
  const w = splitCommandLine(line);
  return w.length > 0 && (w[0] === 'quit' || w[0] === 'q');
}

/** Runs one line: quit ends the session (true), anything else goes to the interpreter. */
async function runLine(node: BlockNode, line: string): Promise<{ ok: boolean; quit: boolean }> {
  if (isQuit(line)) {
    const argc = splitCommandLine(line).length - 1;
    if (argc === 0) return { ok: true, quit: true };
    err(`bad argument count ${argc} to ${splitCommandLine(line)[0]}, expected 0 arguments\n`);
    return { ok: false, quit: false };
  }
  return { ok: await runIoCommand(node, line, out, err), quit: false };
}

/** Reads commands from stdin, one a line, each after the prompt, until end of input or quit. */
async function interactive(node: BlockNode): Promise<boolean> {
  const tty = process.stdin.isTTY === true && process.stdout.isTTY === true;
  const rl = readline.createInterface({ input: process.stdin, output: tty ? process.stdout : undefined, terminal: tty });
  let ok = true;
  const prompt = (): void => {
    if (tty) {
      rl.setPrompt('qemu-io> ');
      rl.prompt();
    } else {
      out('qemu-io> ');
    }
  };
  prompt();
  for await (const line of rl) {
    const r = await runLine(node, line);
    if (!r.ok) ok = false;
    if (r.quit) break;
    prompt();
  }
  rl.close();
  return ok;
}

/** Resolves when what was written to stdout has been handed to the OS (process.exit would cut a pipe short). */
function drainStdout(): Promise<void> {
  if (process.stdout.writableLength === 0) return Promise.resolve();
  return new Promise((resolve) => process.stdout.once('drain', () => resolve()));
}

export async function ioCommand(argv: string[]): Promise<number> {
  let args: IoArgs;
  try {
    args = parseIoArgs(argv);
  } catch (e) {
    process.stderr.write(`vdisk io: ${(e as Error).message}\n`);
    return 1;
  }
  if (args.help) {
    out(IO_USAGE);
    return 0;
  }
  if (args.files.length !== 1) {
    process.stderr.write(`vdisk io: ${args.files.length === 0 ? 'no image file name given' : 'expecting one image file name'}\n${IO_USAGE}`);
    return 1;
  }
  const filename = args.files[0];
  let opened: Opened;
  try {
    opened = await openTarget(filename, args);
  } catch (e) {
    process.stderr.write(`vdisk io: can't open device ${filename}: ${(e as Error).message}\n`);
    return 1;
  }
  let ok = true;
  try {
    if (args.commands.length === 0) {
      ok = await interactive(opened.node);
    } else {
      for (const c of args.commands) {
        const r = await runLine(opened.node, c);
        if (!r.ok) ok = false;
        if (r.quit) break;
      }
    }
  } finally {
    // Closing flushes what the commands wrote, as qemu-io's exit does.
    if (!opened.node.readOnly) await opened.node.flush().catch(() => undefined);
    await opened.close();
    await drainStdout();
  }
  return ok ? 0 : 1;
}
