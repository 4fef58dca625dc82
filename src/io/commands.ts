/**
 * The qemu-io command interpreter as a library: one command line in, the
 * text qemu-io (QEMU 7.2) would print out, and whether the command
 * succeeded. `vdisk io` runs it on an image it opens; the daemon can run it
 * on a node for the monitor's `qemu-io NODE "CMD"`.
 *
 * Commands: read, write, discard, flush, map, alloc, info, length,
 * truncate and help, with qemu-io's names, short names (r, w, d, f, a, i,
 * l, t, ?), options, messages and streams (reports and most errors on
 * stdout, argument-count and option errors and error_report() lines on
 * stderr). Requests are checked against the image's length before they
 * reach the node, as QEMU's block backend does, so a request past the end
 * fails with EIO ("Input/output error") as in qemu-io.
 *
 * Deliberate differences: vdisk nodes have no VM state, so `read -b` and
 * `write -b` fail with "Operation not supported" after qemu-io's checks
 * (`write -c` works on qcow2, whole clusters, as in QEMU); `truncate -m` other than off is
 * refused; `help` lists only these commands.
 */
import fs from 'node:fs';
import type { DebugControl } from '../block/debug-control.js';
import { formatSpecificText } from '../block/info.js';
import { type BlockNode, ReqFlags, Status } from '../block/node.js';
import { type Errno, VdiskError, strerror } from '../errors.js';
import { cvtstr, dumpBuffer, printReport } from './format.js';
import { cvtnum, cvtnumError, getopt, parsePattern, splitCommandLine } from './parse.js';

/** QEMU's BDRV_REQUEST_MAX_BYTES: the largest single read or write qemu-io accepts. */
export const BDRV_REQUEST_MAX_BYTES = 2147483136;
const SECTOR = 512;

export type Output = (text: string) => void;

export interface IoCommandOptions {
  /**
   * What error_report() lines start with: "qemu-io: " as the qemu-io program
   * prints them (the default); a monitor passes "".
   */
  errorPrefix?: string;
}

interface Context {
  node: BlockNode;
  out: Output;
  err: Output;
  prefix: string;
}

interface CommandDef {
  name: string;
  altname?: string;
  argmin: number;
  /** -1: no maximum. */
  argmax: number;
  args?: string;
  oneline: string;
  help?: string;
  /** Needs a writable node (QEMU's BLK_PERM_WRITE / RESIZE). */
  write?: boolean;
  run(ctx: Context, argv: string[]): Promise<boolean>;
}

/** A failed I/O as the strerror() text qemu-io prints. */
function errnoText(err: unknown): string {
  return strerror(errnoOf(err));
}

function errnoOf(err: unknown): Errno {
  return err instanceof VdiskError ? err.errno : 'EIO';
}

/** blk_check_byte_request: a request must lie within the image, else EIO. */
function checkRange(node: BlockNode, offset: number, bytes: number): void {
  if (offset > node.size || node.size - offset < bytes) throw new VdiskError('EIO', `request at ${offset} (${bytes} bytes) is past the end`);
}

function usage(ctx: Context, c: CommandDef): false {
  ctx.out(`${c.name} ${c.args ?? '(null)'} -- ${c.oneline}\n`);
  return false;
}

/** Parses a number argument; prints qemu-io's message and returns undefined when it is not one. */
function number(ctx: Context, arg: string): number | undefined {
  const r = cvtnum(arg);
  if ('error' in r) {
    ctx.out(cvtnumError(r.error, arg));
    return undefined;
  }
  if (r.warning) ctx.err(`${ctx.prefix}warning: ${r.warning}\n`);
  return r.value;
}

function pattern(ctx: Context, arg: string): number | undefined {
  const p = parsePattern(arg);
  if (p === undefined) ctx.out(`${arg} is not a valid pattern byte\n`);
  return p;
}

function seconds(start: bigint): number {
  return Number(process.hrtime.bigint() - start) / 1e9;
}

const READ_HELP = `
 reads a range of bytes from the given offset

 Example:
 'read -v 512 1k' - dumps 1 kilobyte read from 512 bytes into the file

 Reads a segment of the currently open file, optionally dumping it to the
 standard output stream (with -v option) for subsequent inspection.
 -b, -- read from the VM state rather than the virtual disk
 -C, -- report statistics in a machine parsable format
 -l, -- length for pattern verification (only with -P)
 -p, -- ignored for backwards compatibility
 -P, -- use a pattern to verify read data
 -q, -- quiet mode, do not show I/O statistics
 -s, -- start offset for pattern verification (only with -P)
 -v, -- dump buffer to standard output

`;

const WRITE_HELP = `
 writes a range of bytes from the given offset

 Example:
 'write 512 1k' - writes 1 kilobyte at 512 bytes into the open file

 Writes into a segment of the currently open file, using a buffer
 filled with a set pattern (0xcdcdcdcd).
 -b, -- write to the VM state rather than the virtual disk
 -c, -- write compressed data with blk_write_compressed
 -f, -- use Force Unit Access semantics
 -n, -- with -z, don't allow slow fallback
 -p, -- ignored for backwards compatibility
 -P, -- use different pattern to fill file
 -s, -- use a pattern file to fill the write buffer
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics
 -u, -- with -z, allow unmapping
 -z, -- write zeroes using blk_co_pwrite_zeroes

`;

const DISCARD_HELP = `
 discards a range of bytes from the given offset

 Example:
 'discard 512 1k' - discards 1 kilobyte from 512 bytes into the file

 Discards a segment of the currently open file.
 -C, -- report statistics in a machine parsable format
 -q, -- quiet mode, do not show I/O statistics

`;

const readCmd: CommandDef = {
  name: 'read',
  altname: 'r',
  argmin: 2,
  argmax: -1,
  args: '[-abCqv] [-P pattern [-s off] [-l len]] off len',
  oneline: 'reads a number of bytes at a specified offset',
  help: READ_HELP,
  async run(ctx, argv) {
    let bflag = false;
    let cflag = false;
    let qflag = false;
    let vflag = false;
    let pflag = false;
    let sflag = false;
    let lflag = false;
    let pat = 0;
    let patternOffset = 0;
    let patternCount = 0;
    const g = getopt(argv, 'bCl:pP:qs:v');
    for (const [opt, arg] of g.options) {
      switch (opt) {
        case 'b':
          bflag = true;
          break;
        case 'C':
          cflag = true;
          break;
        case 'l': {
          const n = number(ctx, arg!);
          if (n === undefined) return false;
          lflag = true;
          patternCount = n;
          break;
        }
        case 'P': {
          const p = pattern(ctx, arg!);
          if (p === undefined) return false;
          pflag = true;
          pat = p;
          break;
        }
        case 'q':
          qflag = true;
          break;
        case 's': {
          const n = number(ctx, arg!);
          if (n === undefined) return false;
          sflag = true;
          patternOffset = n;
          break;
        }
        case 'v':
          vflag = true;
          break;
      }
    }
    if (g.error) {
      ctx.err(g.error + '\n');
      return usage(ctx, readCmd);
    }
    if (g.operands.length !== 2) return usage(ctx, readCmd);
    const offset = number(ctx, g.operands[0]);
    if (offset === undefined) return false;
    const count = number(ctx, g.operands[1]);
    if (count === undefined) return false;
    if (count > BDRV_REQUEST_MAX_BYTES) {
      ctx.out(`length cannot exceed ${BDRV_REQUEST_MAX_BYTES}, given ${g.operands[1]}\n`);
      return false;
    }
    if (!pflag && (lflag || sflag)) return usage(ctx, readCmd);
    if (!lflag) patternCount = count - patternOffset;
    if (patternCount < 0 || patternCount + patternOffset > count) {
      ctx.out('pattern verification range exceeds end of read data\n');
      return false;
    }
    if (bflag && !sectorAligned(ctx, offset, count)) return false;

    const buf = Buffer.alloc(count, 0xab);
    const start = process.hrtime.bigint();
    try {
      if (bflag) throw new VdiskError('ENOTSUP', 'vdisk nodes have no VM state');
      checkRange(ctx.node, offset, count);
      await ctx.node.read(offset, buf);
    } catch (e) {
      ctx.out(`read failed: ${errnoText(e)}\n`);
      return false;
    }
    const t = seconds(start);
    let ok = true;
    if (pflag) {
      const part = buf.subarray(patternOffset, patternOffset + patternCount);
      if (!part.equals(Buffer.alloc(patternCount, pat))) {
        ctx.out(`Pattern verification failed at offset ${offset + patternOffset}, ${patternCount} bytes\n`);
        ok = false;
      }
    }
    if (qflag) return ok;
    if (vflag) ctx.out(dumpBuffer(buf, offset));
    ctx.out(printReport('read', t, offset, count, count, 1, cflag));
    return ok;
  },
};

function sectorAligned(ctx: Context, offset: number, count: number): boolean {
  if (offset % SECTOR !== 0) {
    ctx.out(`${offset} is not a sector-aligned value for 'offset'\n`);
    return false;
  }
  if (count % SECTOR !== 0) {
    ctx.out(`${count} is not a sector-aligned value for 'count'\n`);
    return false;
  }
  return true;
}

/** write -s: the file's bytes, repeated to fill the request (qemu_io_alloc_from_file). */
function bufferFromFile(ctx: Context, file: string, length: number): Buffer | undefined {
  let data: Buffer;
  try {
    const fd = fs.openSync(file, 'r');
    try {
      data = Buffer.alloc(length);
      let got = 0;
      while (got < length) {
        const n = fs.readSync(fd, data, got, length - got, null);
        if (n === 0) break;
        got += n;
      }
      data = data.subarray(0, got);
    } finally {
      fs.closeSync(fd);
    }
  } catch (e) {
    ctx.err(`${file}: ${hostStrerror(e)}\n`);
    return undefined;
  }
  if (data.length === 0) {
    ctx.err(`${file}: file is empty\n`);
    return undefined;
  }
  const buf = Buffer.alloc(length);
  for (let done = 0; done < length; done += data.length) data.copy(buf, done, 0, Math.min(data.length, length - done));
  return buf;
}

/** strerror() of a host file error (perror's text). */
function hostStrerror(e: unknown): string {
  const code = (e as NodeJS.ErrnoException)?.code;
  const texts: Record<string, string> = {
    ENOENT: 'No such file or directory',
    EACCES: 'Permission denied',
    EISDIR: 'Is a directory',
    ENOTDIR: 'Not a directory',
    ELOOP: 'Too many levels of symbolic links',
    EIO: 'Input/output error',
    EPERM: 'Operation not permitted',
  };
  return (code && texts[code]) ?? (e as Error)?.message ?? String(e);
}

const writeCmd: CommandDef = {
  name: 'write',
  altname: 'w',
  argmin: 2,
  argmax: -1,
  args: '[-bcCfnquz] [-P pattern | -s source_file] off len',
  oneline: 'writes a number of bytes at a specified offset',
  help: WRITE_HELP,
  write: true,
  async run(ctx, argv) {
    let bflag = false;
    let compressed = false;
    let cflag = false;
    let qflag = false;
    let zflag = false;
    let pflag = false;
    let sourceFile: string | undefined;
    let flags = 0;
    let pat = 0xcd;
    const g = getopt(argv, 'bcCfnpP:qs:uz');
    for (const [opt, arg] of g.options) {
      switch (opt) {
        case 'b':
          bflag = true;
          break;
        case 'c':
          compressed = true;
          break;
        case 'C':
          cflag = true;
          break;
        case 'f':
          flags |= ReqFlags.FUA;
          break;
        case 'n':
          flags |= ReqFlags.NO_FALLBACK;
          break;
        case 'P': {
          const p = pattern(ctx, arg!);
          if (p === undefined) return false;
          pflag = true;
          pat = p;
          break;
        }
        case 'q':
          qflag = true;
          break;
        case 's':
          sourceFile = arg;
          break;
        case 'u':
          flags |= ReqFlags.MAY_UNMAP;
          break;
        case 'z':
          zflag = true;
          break;
      }
    }
    if (g.error) {
      ctx.err(g.error + '\n');
      return usage(ctx, writeCmd);
    }
    if (g.operands.length !== 2) return usage(ctx, writeCmd);
    if (bflag && zflag) {
      ctx.out('-b and -z cannot be specified at the same time\n');
      return false;
    }
    if (flags & ReqFlags.FUA && (bflag || compressed)) {
      ctx.out('-f and -b or -c cannot be specified at the same time\n');
      return false;
    }
    if (flags & ReqFlags.NO_FALLBACK && !zflag) {
      ctx.out('-n requires -z to be specified\n');
      return false;
    }
    if (flags & ReqFlags.MAY_UNMAP && !zflag) {
      ctx.out('-u requires -z to be specified\n');
      return false;
    }
    if (Number(zflag) + Number(pflag) + Number(sourceFile !== undefined) > 1) {
      ctx.out('Only one of -z, -P, and -s can be specified at the same time\n');
      return false;
    }
    const offset = number(ctx, g.operands[0]);
    if (offset === undefined) return false;
    const count = number(ctx, g.operands[1]);
    if (count === undefined) return false;
    if (count > BDRV_REQUEST_MAX_BYTES && !(flags & ReqFlags.NO_FALLBACK)) {
      ctx.out(`length cannot exceed ${BDRV_REQUEST_MAX_BYTES} without -n, given ${g.operands[1]}\n`);
      return false;
    }
    if ((bflag || compressed) && !sectorAligned(ctx, offset, count)) return false;
    let buf: Buffer | undefined;
    if (!zflag) {
      buf = sourceFile !== undefined ? bufferFromFile(ctx, sourceFile, count) : Buffer.alloc(count, pat);
      if (buf === undefined) return false;
    }
    const start = process.hrtime.bigint();
    try {
      if (bflag) throw new VdiskError('ENOTSUP', 'vdisk nodes have no VM state');
      checkRange(ctx.node, offset, count);
      if (zflag) await ctx.node.writeZeroes(offset, count, flags);
      else if (compressed) await ctx.node.writeCompressed(offset, buf!);
      else await ctx.node.write(offset, buf!, flags);
    } catch (e) {
      ctx.out(`write failed: ${errnoText(e)}\n`);
      return false;
    }
    const t = seconds(start);
    if (qflag) return true;
    ctx.out(printReport('wrote', t, offset, count, count, 1, cflag));
    return true;
  },
};

const discardCmd: CommandDef = {
  name: 'discard',
  altname: 'd',
  argmin: 2,
  argmax: -1,
  args: '[-Cq] off len',
  oneline: 'discards a number of bytes at a specified offset',
  help: DISCARD_HELP,
  write: true,
  async run(ctx, argv) {
    let cflag = false;
    let qflag = false;
    const g = getopt(argv, 'Cq');
    for (const [opt] of g.options) {
      if (opt === 'C') cflag = true;
      else qflag = true;
    }
    if (g.error) {
      ctx.err(g.error + '\n');
      return usage(ctx, discardCmd);
    }
    if (g.operands.length !== 2) return usage(ctx, discardCmd);
    const offset = number(ctx, g.operands[0]);
    if (offset === undefined) return false;
    const bytes = number(ctx, g.operands[1]);
    if (bytes === undefined) return false;
    if (bytes > BDRV_REQUEST_MAX_BYTES) {
      ctx.out(`length cannot exceed ${BDRV_REQUEST_MAX_BYTES}, given ${g.operands[1]}\n`);
      return false;
    }
    const start = process.hrtime.bigint();
    try {
      checkRange(ctx.node, offset, bytes);
      await ctx.node.discard(offset, bytes);
    } catch (e) {
      ctx.out(`discard failed: ${errnoText(e)}\n`);
      return false;
    }
    const t = seconds(start);
    if (!qflag) ctx.out(printReport('discard', t, offset, bytes, bytes, 1, cflag));
    return true;
  },
};

const flushCmd: CommandDef = {
  name: 'flush',
  altname: 'f',
  argmin: 0,
  argmax: 0,
  oneline: 'flush all in-core file state to disk',
  async run(ctx) {
    try {
      await ctx.node.flush();
      return true;
    } catch {
      // qemu-io's flush reports failure only through its exit status.
      return false;
    }
  },
};

const truncateCmd: CommandDef = {
  name: 'truncate',
  altname: 't',
  argmin: 1,
  argmax: 3,
  args: '[-m prealloc_mode] off',
  oneline: 'truncates the current file at the given offset',
  write: true,
  async run(ctx, argv) {
    let prealloc = 'off';
    const g = getopt(argv, 'm:');
    for (const [, arg] of g.options) {
      if (!['off', 'metadata', 'falloc', 'full'].includes(arg!)) {
        ctx.err(`${ctx.prefix}Invalid preallocation mode '${arg}'\n`);
        return false;
      }
      prealloc = arg!;
    }
    if (g.error) {
      ctx.err(g.error + '\n');
      return usage(ctx, truncateCmd);
    }
    if (g.operands.length < 1) return usage(ctx, truncateCmd);
    const offset = number(ctx, g.operands[0]);
    if (offset === undefined) return false;
    try {
      if (prealloc !== 'off') throw new VdiskError('ENOTSUP', `Unsupported preallocation mode '${prealloc}'`);
      await ctx.node.truncate(offset);
    } catch (e) {
      ctx.err(`${ctx.prefix}${(e as Error).message}\n`);
      return false;
    }
    return true;
  },
};

const lengthCmd: CommandDef = {
  name: 'length',
  altname: 'l',
  argmin: 0,
  argmax: 0,
  oneline: 'gets the length of the current file',
  async run(ctx) {
    ctx.out(`${cvtstr(ctx.node.size)}\n`);
    return true;
  },
};

/**
 * The protocol name of drivers whose QEMU counterpart has one: qemu-io's info
 * prints it as a second "format name" line (for 'nbd' QEMU finds its
 * nbd+unix driver by that format name, whatever the server's address).
 */
const PROTOCOL_NAMES: Record<string, string> = { file: 'file', nbd: 'nbd+unix', 'null-co': 'null-co' };

const infoCmd: CommandDef = {
  name: 'info',
  altname: 'i',
  argmin: 0,
  argmax: 0,
  oneline: 'prints information about the current file',
  async run(ctx) {
    const node = ctx.node;
    ctx.out(`format name: ${node.driverName}\n`);
    const protocol = PROTOCOL_NAMES[node.driverName];
    if (protocol !== undefined) ctx.out(`format name: ${protocol}\n`);
    // bdrv_get_info: nodes whose QEMU driver has none stop after the format names.
    const fi = node.formatInfo();
    if (!fi) return false;
    ctx.out(`cluster size: ${cvtstr(fi.clusterSize)}\nvm state offset: ${cvtstr(fi.vmStateOffset)}\n`);
    if (fi.specific) ctx.out(`Format specific information:\n${formatSpecificText(fi.specific.data)}`);
    return true;
  },
};

/** bdrv_is_allocated: whether this node (not a backing file) decides [offset, ...), and for how many bytes; 0 at the end. */
async function isAllocated(node: BlockNode, offset: number, bytes: number): Promise<{ allocated: boolean; num: number }> {
  if (offset >= node.size || bytes === 0) return { allocated: false, num: 0 };
  const ext = await node.blockStatus(offset, Math.min(bytes, node.size - offset));
  return { allocated: (ext.flags & Status.ALLOCATED) !== 0, num: ext.length };
}

const allocCmd: CommandDef = {
  name: 'alloc',
  altname: 'a',
  argmin: 1,
  argmax: 2,
  args: 'offset [count]',
  oneline: 'checks if offset is allocated in the file',
  async run(ctx, argv) {
    const start = number(ctx, argv[1]);
    if (start === undefined) return false;
    let count = SECTOR;
    if (argv.length === 3) {
      const n = number(ctx, argv[2]);
      if (n === undefined) return false;
      count = n;
    }
    let offset = start;
    let remaining = count;
    let sum = 0;
    while (remaining > 0) {
      let r: { allocated: boolean; num: number };
      try {
        r = await isAllocated(ctx.node, offset, remaining);
      } catch (e) {
        ctx.out(`is_allocated failed: ${errnoText(e)}\n`);
        return false;
      }
      offset += r.num;
      remaining -= r.num;
      if (r.allocated) sum += r.num;
      if (r.num === 0) {
        count -= remaining;
        remaining = 0;
      }
    }
    ctx.out(`${sum}/${count} bytes allocated at offset ${cvtstr(start)}\n`);
    return true;
  },
};

const mapCmd: CommandDef = {
  name: 'map',
  argmin: 0,
  argmax: 0,
  args: '',
  oneline: 'prints the allocated areas of a file',
  async run(ctx) {
    let offset = 0;
    let bytes = ctx.node.size;
    const lines: string[] = [];
    const flush = () => {
      if (lines.length) ctx.out(lines.splice(0).join(''));
    };
    while (bytes > 0) {
      // map_is_allocated: one run of the same answer, merged over as many queries as it takes.
      let first: { allocated: boolean; num: number };
      let num: number;
      try {
        first = await isAllocated(ctx.node, offset, Math.min(bytes, BDRV_REQUEST_MAX_BYTES));
        num = first.num;
        while (bytes - num > 0) {
          const next = await isAllocated(ctx.node, offset + num, Math.min(bytes - num, BDRV_REQUEST_MAX_BYTES));
          if (next.allocated !== first.allocated || next.num === 0) break;
          num += next.num;
        }
      } catch (e) {
        flush();
        ctx.err(`${ctx.prefix}Failed to get allocation status: ${errnoText(e)}\n`);
        return false;
      }
      if (num === 0) {
        flush();
        ctx.err(`${ctx.prefix}Unexpected end of image\n`);
        return false;
      }
      const what = first.allocated ? '    allocated' : 'not allocated';
      lines.push(`${cvtstr(num)} (0x${num.toString(16)}) bytes ${what} at offset ${cvtstr(offset)} (0x${offset.toString(16)})\n`);
      if (lines.length >= 1024) flush();
      offset += num;
      bytes -= num;
    }
    flush();
    return true;
  },
};

const helpCmd: CommandDef = {
  name: 'help',
  altname: '?',
  argmin: 0,
  argmax: 1,
  args: '[command]',
  oneline: 'help for one or all commands',
  async run(ctx, argv) {
    if (argv.length === 1) {
      let text = '';
      for (const c of COMMANDS) text += helpOneline(c.name, c);
      ctx.out(text + "\nUse 'help commandname' for extended help.\n");
      return true;
    }
    const c = findCommand(argv[1]);
    if (!c) {
      ctx.out(`command ${argv[1]} not found\n`);
      return false;
    }
    ctx.out(helpOneline(argv[1], c) + (c.help ?? ''));
    return true;
  },
};

function helpOneline(name: string, c: CommandDef): string {
  return `${name} ${c.args !== undefined ? c.args + ' ' : ''}-- ${c.oneline}\n`;
}

/** The debug control at or below a node (qemu-io's breakpoint commands go down the file chain, as bdrv_debug_breakpoint). */
function blkdebugBelow(node: BlockNode): DebugControl | undefined {
  for (let n: BlockNode | undefined = node; n; n = n.child('file') ?? n.child('image')) {
    if (n.debugControl) return n.debugControl;
  }
  return undefined;
}

/** qemu-io's breakpoint commands, which fail with strerror text when no blkdebug node is below. */
function breakpointCmd(name: string, argmin: number, args: string, oneline: string, act: (b: DebugControl, argv: string[], ctx: Context) => Promise<void> | void, failure: (argv: string[]) => string): CommandDef {
  return {
    name,
    argmin,
    argmax: argmin,
    args,
    oneline,
    async run(ctx, argv) {
      const b = blkdebugBelow(ctx.node);
      try {
        if (!b) throw new VdiskError('ENOTSUP', 'no blkdebug node');
        await act(b, argv, ctx);
        return true;
      } catch (e) {
        ctx.out(`${failure(argv)}: ${errnoText(e)}\n`);
        return false;
      }
    },
  };
}

const breakCmd = breakpointCmd('break', 2, 'event tag', 'sets a breakpoint on event and tags the stopped request as tag', (b, argv) => b.addBreakpoint(argv[1], argv[2]), () => 'Could not set breakpoint');
const removeBreakCmd = breakpointCmd('remove_break', 1, 'tag', 'remove a breakpoint by tag', (b, argv) => b.removeBreakpoint(argv[1]), (argv) => `Could not remove breakpoint ${argv[1]}`);
const resumeCmd = breakpointCmd('resume', 1, 'tag', 'resumes the request tagged as tag', (b, argv) => b.resume(argv[1]), () => 'Could not resume request');
const waitBreakCmd = breakpointCmd(
  'wait_break',
  1,
  'tag',
  'waits for the suspension of a request',
  async (b, argv) => {
    while (!b.isSuspended(argv[1])) await new Promise((r) => setTimeout(r, 5));
  },
  () => 'Could not wait',
);

/** Sorted by name, as qemu-io keeps its table. */
const COMMANDS: CommandDef[] = [allocCmd, breakCmd, discardCmd, flushCmd, helpCmd, infoCmd, lengthCmd, mapCmd, readCmd, removeBreakCmd, resumeCmd, truncateCmd, waitBreakCmd, writeCmd];

function findCommand(name: string): CommandDef | undefined {
  return COMMANDS.find((c) => c.name === name || c.altname === name);
}

/** The commands runIoCommand knows, by their full names. */
export function ioCommandNames(): string[] {
  return COMMANDS.map((c) => c.name);
}

/**
 * Runs one qemu-io command line on a node. `out` and `err` receive what
 * qemu-io prints on stdout and stderr (whole lines, each ending in "\n").
 * Resolves true when the command succeeded: false for an unknown command,
 * bad arguments, a failed request or a pattern mismatch, the cases in which
 * qemu-io 7.2 exits with status 1. An empty line succeeds and prints nothing.
 * Never rejects.
 */
export async function runIoCommand(node: BlockNode, line: string, out: Output, err: Output, options: IoCommandOptions = {}): Promise<boolean> {
  const argv = splitCommandLine(line);
  if (argv.length === 0) return true;
  const c = findCommand(argv[0]);
  if (!c) {
    err(`command "${argv[0]}" not found\n`);
    return false;
  }
  const argc = argv.length - 1;
  if (argc < c.argmin || (c.argmax !== -1 && argc > c.argmax)) {
    if (c.argmax === -1) err(`bad argument count ${argc} to ${argv[0]}, expected at least ${c.argmin} arguments\n`);
    else if (c.argmin === c.argmax) err(`bad argument count ${argc} to ${argv[0]}, expected ${c.argmin} arguments\n`);
    else err(`bad argument count ${argc} to ${argv[0]}, expected between ${c.argmin} and ${c.argmax} arguments\n`);
    return false;
  }
  const ctx: Context = { node, out, err, prefix: options.errorPrefix ?? 'qemu-io: ' };
  // The write permission is taken before the command parses its arguments, as qemu-io's command().
  if (c.write && node.readOnly) {
    err(`${ctx.prefix}Block node is read-only\n`);
    return false;
  }
  try {
    return await c.run(ctx, argv);
  } catch (e) {
    err(`${ctx.prefix}${(e as Error)?.message ?? String(e)}\n`);
    return false;
  }
}
