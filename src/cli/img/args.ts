/**
 * Command-line parsing as qemu-img's getopt_long does it: short options
 * (-f qcow2, -fqcow2, clustered booleans -pq), long options (--output=json,
 * --output json, or any unambiguous prefix: --out=json), options anywhere
 * among the positionals, `--` ending them, and qemu-img's messages for an
 * unknown option or a missing argument. A negative size such as `-1G` for
 * resize is a positional when it cannot be an option.
 *
 * `sequence` lists every option in command-line order, for commands whose
 * options are actions applied in the order given (bitmap).
 */
import { VdiskError } from '../../errors.js';

export type ArgKind = 'bool' | 'value' | 'multi';
export type Flags = Record<string, string | string[] | boolean | undefined>;

export interface ParsedArgs {
  flags: Flags;
  positionals: string[];
  sequence: Array<{ name: string; value: string | true }>;
}

const TRY_HELP = "\nTry 'vdisk img --help' for more information";

export function parseImgArgs(argv: string[], spec: Record<string, ArgKind>, usage: string): ParsedArgs {
  const flags: Flags = {};
  const positionals: string[] = [];
  const sequence: ParsedArgs['sequence'] = [];
  const set = (name: string, kind: ArgKind, value: string | true) => {
    sequence.push({ name, value });
    if (kind === 'multi') ((flags[name] as string[] | undefined) ?? (flags[name] = [])).push(value as string);
    else flags[name] = value;
  };
  const longOption = (given: string): string | undefined => {
    if (given.length > 1 && spec[given]) return given;
    const candidates = Object.keys(spec).filter((k) => k.length > 1 && k.startsWith(given));
    return given !== '' && candidates.length === 1 ? candidates[0] : undefined;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') {
      positionals.push(...argv.slice(i + 1));
      break;
    }
    if (a === '-h' || a === '--help') throw new VdiskError('EINVAL', usage, { code: 'VDISK_USAGE' });
    if (a.startsWith('--')) {
      const eq = a.indexOf('=');
      const given = eq < 0 ? a.slice(2) : a.slice(2, eq);
      const name = longOption(given);
      const kind = name === undefined ? undefined : spec[name];
      if (name === undefined || !kind) throw new VdiskError('EINVAL', `unrecognized option '${a}'${TRY_HELP}`);
      if (kind === 'bool') {
        if (eq >= 0) throw new VdiskError('EINVAL', `unrecognized option '${a}'${TRY_HELP}`);
        set(name, kind, true);
      } else {
        const value = eq >= 0 ? a.slice(eq + 1) : argv[++i];
        if (value === undefined) throw new VdiskError('EINVAL', `missing argument for option '${a}'${TRY_HELP}`);
        set(name, kind, value);
      }
      continue;
    }
    if (a.length > 1 && a.startsWith('-') && !/^-\d/.test(a)) {
      for (let j = 1; j < a.length; j++) {
        const name = a[j];
        const kind = spec[name];
        if (!kind) throw new VdiskError('EINVAL', `unrecognized option '${a}'${TRY_HELP}`);
        if (kind === 'bool') {
          set(name, kind, true);
          continue;
        }
        const value = j + 1 < a.length ? a.slice(j + 1) : argv[++i];
        if (value === undefined) throw new VdiskError('EINVAL', `missing argument for option '${a}'${TRY_HELP}`);
        set(name, kind, value);
        break;
      }
      continue;
    }
    positionals.push(a);
  }
  return { flags, positionals, sequence };
}
