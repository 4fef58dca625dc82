/**
 * Command-line parsing as qemu-img's getopt_long does it: short options
 * (-f qcow2, -fqcow2, clustered booleans -pq), long options (--output=json,
 * --output json), options anywhere among the positionals, `--` ending them.
 * A negative size such as `-1G` for resize is a positional when it cannot be
 * an option.
 */
import { VdiskError } from '../../errors.js';

export type ArgKind = 'bool' | 'value' | 'multi';
export type Flags = Record<string, string | string[] | boolean | undefined>;

export function parseImgArgs(argv: string[], spec: Record<string, ArgKind>, usage: string): { flags: Flags; positionals: string[] } {
  const flags: Flags = {};
  const positionals: string[] = [];
  const set = (name: string, kind: ArgKind, value: string | true) => {
    if (kind === 'multi') ((flags[name] as string[] | undefined) ?? (flags[name] = [])).push(value as string);
    else flags[name] = value;
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
      const name = eq < 0 ? a.slice(2) : a.slice(2, eq);
      const kind = spec[name];
      if (!kind) throw new VdiskError('EINVAL', `unrecognized option '--${name}'\nTry 'vdisk img --help' for more information`);
      if (kind === 'bool') {
        if (eq >= 0) throw new VdiskError('EINVAL', `option '--${name}' doesn't allow an argument`);
        set(name, kind, true);
      } else {
        const value = eq >= 0 ? a.slice(eq + 1) : argv[++i];
        if (value === undefined) throw new VdiskError('EINVAL', `option '--${name}' requires an argument`);
        set(name, kind, value);
      }
      continue;
    }
    if (a.length > 1 && a.startsWith('-') && !/^-\d/.test(a)) {
      for (let j = 1; j < a.length; j++) {
        const name = a[j];
        const kind = spec[name];
        if (!kind) throw new VdiskError('EINVAL', `invalid option -- '${name}'\nTry 'vdisk img --help' for more information`);
        if (kind === 'bool') {
          set(name, kind, true);
          continue;
        }
        const value = j + 1 < a.length ? a.slice(j + 1) : argv[++i];
        if (value === undefined) throw new VdiskError('EINVAL', `option requires an argument -- '${name}'`);
        set(name, kind, value);
        break;
      }
      continue;
    }
    positionals.push(a);
  }
  return { flags, positionals };
}
