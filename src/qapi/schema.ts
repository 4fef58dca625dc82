/**
 * A small QAPI type system: the shapes of QMP command arguments and of
 * blockdev/export options, checked with QEMU's wording.
 *
 * One schema serves two inputs: JSON (QMP, --config, --blockdev '{...}') and
 * keyval strings (--blockdev driver=file,filename=x), where every leaf is a
 * string converted by the schema, as QEMU's keyval input visitor does.
 * Checking happens before any side effect and returns a new, typed value.
 *
 * Members are written QAPI-style: a leading '*' marks an optional member.
 */
import { VdiskError } from '../errors.js';

export type Type =
  | { kind: 'str' }
  | { kind: 'int'; name: IntName }
  | { kind: 'bool' }
  | { kind: 'number' }
  | { kind: 'any' }
  | { kind: 'null' }
  | { kind: 'enum'; name: string; values: readonly string[] }
  | { kind: 'array'; of: Type }
  | { kind: 'struct'; name: string; members: Members }
  | { kind: 'union'; name: string; base: Members; discriminator: string; branches: Record<string, Members> }
  | { kind: 'alternate'; name: string; choices: Type[] };

export type Members = Record<string, Type>;
export type IntName = 'int' | 'int8' | 'int16' | 'int32' | 'int64' | 'uint8' | 'uint16' | 'uint32' | 'uint64' | 'size';

const INT_RANGES: Record<IntName, [number, number]> = {
  int: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
  int64: [Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER],
  int8: [-128, 127],
  int16: [-32768, 32767],
  int32: [-(2 ** 31), 2 ** 31 - 1],
  uint8: [0, 255],
  uint16: [0, 65535],
  uint32: [0, 2 ** 32 - 1],
  // 64-bit unsigned values above 2^53 cannot be represented exactly; vdisk refuses them.
  uint64: [0, Number.MAX_SAFE_INTEGER],
  size: [0, Number.MAX_SAFE_INTEGER],
};

export const str: Type = { kind: 'str' };
export const bool: Type = { kind: 'bool' };
export const number: Type = { kind: 'number' };
export const any: Type = { kind: 'any' };
export const nullType: Type = { kind: 'null' };
export const int = (name: IntName = 'int'): Type => ({ kind: 'int', name });

/** How QEMU names an integer type when a value is out of its range (visit_type_uintN and friends). */
const RANGE_NAMES: Record<IntName, string> = {
  int: 'integer',
  int64: 'integer',
  int8: 'int8_t',
  int16: 'int16_t',
  int32: 'int32_t',
  uint8: 'uint8_t',
  uint16: 'uint16_t',
  uint32: 'uint32_t',
  uint64: 'uint64',
  size: 'size',
};
export const enumOf = (name: string, values: readonly string[]): Type => ({ kind: 'enum', name, values });
export const arrayOf = (of: Type): Type => ({ kind: 'array', of });
export const struct = (name: string, members: Members): Type => ({ kind: 'struct', name, members });
export const alternate = (name: string, choices: Type[]): Type => ({ kind: 'alternate', name, choices });
export const union = (name: string, base: Members, discriminator: string, branches: Record<string, Members>): Type => ({
  kind: 'union',
  name,
  base,
  discriminator,
  branches,
});

export type InputMode = 'json' | 'keyval';

function fail(message: string): never {
  throw new VdiskError('EINVAL', message);
}

function join(path: string, key: string): string {
  return path ? `${path}.${key}` : key;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** Parses a keyval size: a number with an optional suffix B, K, M, G, T, P, E (powers of 1024). */
export function parseSize(text: string): number | undefined {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([bBkKmMgGtTpPeE]?)\s*$/.exec(text);
  if (!m) return undefined;
  const shift = ' kmgtpe'.indexOf(m[2].toLowerCase() || ' ');
  const factor = m[2] === '' || m[2].toLowerCase() === 'b' ? 1 : 1024 ** shift;
  const value = Number(m[1]) * factor;
  if (!Number.isFinite(value)) return undefined;
  // A fraction needs a unit larger than a byte, unless it is whole ("1.0b").
  if (m[1].includes('.') && factor === 1 && !Number.isInteger(value)) return undefined;
  return Math.round(value);
}

function parseKeyvalInt(text: string): number | undefined {
  if (/^[-+]?\d+$/.test(text)) return Number(text);
  if (/^0x[0-9a-fA-F]+$/.test(text)) return Number.parseInt(text, 16);
  return undefined;
}

function parseKeyvalBool(text: string): boolean | undefined {
  if (['on', 'yes', 'true', 'y'].includes(text)) return true;
  if (['off', 'no', 'false', 'n'].includes(text)) return false;
  return undefined;
}

/**
 * Checks `value` against `type` and returns the typed copy. `path` is the
 * dotted name of the value (for messages: "file.filename").
 */
export function check(type: Type, value: unknown, path: string, mode: InputMode = 'json'): unknown {
  const keyval = mode === 'keyval' && typeof value === 'string';
  switch (type.kind) {
    case 'any':
      return value;
    case 'null':
      // In keyval syntax an empty value is null (backing= means "no backing file"), as QEMU's visitor.
      if (value === null || (keyval && value === '')) return null;
      return fail(`Invalid parameter type for '${path}', expected: null`);
    case 'str':
      if (typeof value === 'string') return value;
      return fail(`Invalid parameter type for '${path}', expected: string`);
    case 'enum':
      if (typeof value !== 'string') return fail(`Invalid parameter type for '${path}', expected: string`);
      if (!type.values.includes(value)) return fail(`Parameter '${path}' does not accept value '${value}'`);
      return value;
    case 'bool':
      if (typeof value === 'boolean') return value;
      if (keyval) {
        const b = parseKeyvalBool(value as string);
        if (b !== undefined) return b;
        return fail(`Parameter '${path}' expects 'on' or 'off'`);
      }
      return fail(`Invalid parameter type for '${path}', expected: boolean`);
    case 'number':
      if (typeof value === 'number') return value;
      if (keyval && Number.isFinite(Number(value))) return Number(value);
      return fail(`Invalid parameter type for '${path}', expected: number`);
    case 'int': {
      let n: number | undefined;
      if (typeof value === 'number') n = value;
      else if (keyval) n = type.name === 'size' ? parseSize(value as string) : parseKeyvalInt(value as string);
      else return fail(`Invalid parameter type for '${path}', expected: integer`);
      if (n === undefined) return fail(`Parameter '${path}' expects ${type.name === 'size' ? 'size' : 'integer'}`);
      if (!Number.isInteger(n)) return fail(`Invalid parameter type for '${path}', expected: integer`);
      const [min, max] = INT_RANGES[type.name];
      if (n < min || n > max) return fail(`Parameter '${path}' expects ${RANGE_NAMES[type.name]}`);
      return n;
    }
    case 'array': {
      if (!Array.isArray(value)) return fail(`Invalid parameter type for '${path}', expected: array`);
      return value.map((v, i) => check(type.of, v, `${path}[${i}]`, mode));
    }
    case 'struct': {
      if (!isObject(value)) return fail(`Invalid parameter type for '${path || 'arguments'}', expected: object`);
      return checkMembers(type.members, value, path, mode, new Set());
    }
    case 'union': {
      if (!isObject(value)) return fail(`Invalid parameter type for '${path || 'arguments'}', expected: object`);
      const seen = new Set<string>();
      const out = checkMembers(type.base, value, path, mode, seen, true);
      const tag = out[type.discriminator] as string | undefined;
      const branch = tag === undefined ? undefined : type.branches[tag];
      if (branch) Object.assign(out, checkMembers(branch, value, path, mode, seen, true));
      for (const key of Object.keys(value)) {
        if (!seen.has(key)) fail(`Parameter '${join(path, key)}' is unexpected`);
      }
      return out;
    }
    case 'alternate': {
      if (keyval && value === '' && type.choices.some((c) => c.kind === 'null')) return null;
      for (const choice of type.choices) {
        if (matchesShape(choice, value, mode)) return check(choice, value, path, mode);
      }
      return fail(`Invalid parameter type for '${path}', expected: ${type.name}`);
    }
  }
}

/** Whether an alternate's branch is the one this value's JSON type selects. */
function matchesShape(t: Type, value: unknown, mode: InputMode): boolean {
  switch (t.kind) {
    case 'str':
    case 'enum':
      return typeof value === 'string';
    case 'int':
    case 'number':
      return typeof value === 'number' || (mode === 'keyval' && typeof value === 'string' && value !== '' && !Number.isNaN(Number(value)));
    case 'bool':
      return typeof value === 'boolean';
    case 'null':
      return value === null;
    case 'array':
      return Array.isArray(value);
    case 'struct':
    case 'union':
      return isObject(value);
    default:
      return true;
  }
}

function checkMembers(
  members: Members,
  value: Record<string, unknown>,
  path: string,
  mode: InputMode,
  seen: Set<string>,
  partOfUnion = false,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [spec, type] of Object.entries(members)) {
    const optional = spec.startsWith('*');
    const key = optional ? spec.slice(1) : spec;
    seen.add(key);
    if (!(key in value) || value[key] === undefined) {
      if (!optional) fail(`Parameter '${join(path, key)}' is missing`);
      continue;
    }
    out[key] = check(type, value[key], join(path, key), mode);
  }
  if (!partOfUnion) {
    for (const key of Object.keys(value)) {
      if (!seen.has(key)) fail(`Parameter '${join(path, key)}' is unexpected`);
    }
  }
  return out;
}
