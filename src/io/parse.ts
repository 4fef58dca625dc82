/**
 * How qemu-io reads a command line: words split on single spaces (no quotes,
 * no tabs, as QEMU's breakline), options parsed by GNU getopt (options and
 * operands may be mixed; "--" ends the options), numbers parsed by
 * qemu_strtosz (binary suffixes, fractions with a suffix, hex without one)
 * and pattern bytes by strtol(..., 0).
 */

/**
 * Splits a command line the way qemu-io does: on single spaces, dropping
 * empty words. Quotes are ordinary characters and a tab does not separate
 * words (qemu-io 7.2 behaves so: `read -P "" 0 1` sees the pattern `""`).
 */
export function splitCommandLine(line: string): string[] {
  return line.split(' ').filter((w) => w !== '');
}

export interface GetoptResult {
  /** Options in the order given: [letter, argument or undefined]. */
  options: Array<[string, string | undefined]>;
  /** The operands (GNU getopt permutes them after the options). */
  operands: string[];
  /** getopt's message for the first bad option, e.g. "read: invalid option -- 'x'". */
  error?: string;
}

/**
 * GNU getopt over argv[1..] with an optstring such as "bCl:pP:qs:v".
 * Stops at the first bad option, as a qemu-io command does (it prints
 * getopt's message and its usage line).
 */
export function getopt(argv: string[], optstring: string): GetoptResult {
  const withArg = new Set<string>();
  const known = new Set<string>();
  for (let i = 0; i < optstring.length; i++) {
    const c = optstring[i];
    if (c === ':') continue;
    known.add(c);
    if (optstring[i + 1] === ':') withArg.add(c);
  }
  const options: Array<[string, string | undefined]> = [];
  const operands: string[] = [];
  const name = argv[0];
  for (let i = 1; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--') {
      operands.push(...argv.slice(i + 1));
      break;
    }
    if (a.length < 2 || a[0] !== '-') {
      operands.push(a);
      continue;
    }
    for (let k = 1; k < a.length; k++) {
      const c = a[k];
      if (!known.has(c)) return { options, operands, error: `${name}: invalid option -- '${c}'` };
      if (!withArg.has(c)) {
        options.push([c, undefined]);
        continue;
      }
      if (k + 1 < a.length) {
        options.push([c, a.slice(k + 1)]);
      } else if (i + 1 < argv.length) {
        options.push([c, argv[++i]]);
      } else {
        return { options, operands, error: `${name}: option requires an argument -- '${c}'` };
      }
      break;
    }
  }
  return { options, operands };
}

const SPACE = new Set([' ', '\t', '\n', '\v', '\f', '\r']);
const U64_MAX = (1n << 64n) - 1n;
const I64_MAX = (1n << 63n) - 1n;

/** strtoull: whitespace, a sign, digits of a base (16 takes an optional 0x). Returns the end index (the start when no digits). */
function strtoull(s: string, start: number, base: 10 | 16): { value: bigint; end: number; overflow: boolean } {
  let i = start;
  while (i < s.length && SPACE.has(s[i])) i++;
  let negative = false;
  if (s[i] === '+' || s[i] === '-') {
    negative = s[i] === '-';
    i++;
  }
  if (base === 16 && s[i] === '0' && (s[i + 1] === 'x' || s[i + 1] === 'X') && isDigit(s[i + 2], 16)) i += 2;
  const digitsStart = i;
  let value = 0n;
  let overflow = false;
  while (i < s.length && isDigit(s[i], base)) {
    value = value * BigInt(base) + BigInt(parseInt(s[i], base));
    if (value > U64_MAX) overflow = true;
    i++;
  }
  if (i === digitsStart) return { value: 0n, end: start, overflow: false };
  if (overflow) return { value: U64_MAX, end: i, overflow: true };
  return { value: negative ? (U64_MAX + 1n - value) & U64_MAX : value, end: i, overflow: false };
}

function isDigit(c: string | undefined, base: number): boolean {
  if (c === undefined) return false;
  return base === 16 ? /[0-9a-fA-F]/.test(c) : c >= '0' && c <= '9';
}

/** The part of strtod qemu_strtosz uses after the integer: ".digits[e[+-]digits]"; undefined when no digit follows the point. */
function strtodFraction(s: string, start: number): { value: number; end: number } | undefined {
  const m = /^\.(\d+)([eE][+-]?\d+)?/.exec(s.slice(start));
  if (!m) return undefined;
  return { value: Number(`0${m[0]}`), end: start + m[0].length };
}

function suffixMul(c: string | undefined): bigint {
  switch (c?.toUpperCase()) {
    case 'B':
      return 1n;
    case 'K':
      return 1n << 10n;
    case 'M':
      return 1n << 20n;
    case 'G':
      return 1n << 30n;
    case 'T':
      return 1n << 40n;
    case 'P':
      return 1n << 50n;
    case 'E':
      return 1n << 60n;
    default:
      return -1n;
  }
}

export type NumberResult = { value: number; warning?: string } | { error: 'EINVAL' | 'ERANGE' };

/**
 * qemu-io's cvtnum: QEMU's qemu_strtosz with binary suffixes (B, K, M, G,
 * T, P, E in either case; none means bytes), a fraction only with a suffix
 * ("1.5k", rounded half up), hexadecimal only without a fraction (a suffix
 * on hex is accepted with a deprecation warning), no sign '-', and nothing
 * above INT64_MAX.
 */
export function cvtnum(s: string): NumberResult {
  const r = strtosz(s);
  if ('error' in r) return r;
  return r.warning === undefined ? { value: Number(r.value) } : { value: Number(r.value), warning: r.warning };
}

/**
 * cvtnum with the exact value, for callers that go on to truncate it as C
 * does (qemu-img passes a granularity as uint32_t: only the low 32 bits
 * count, and those of a number above 2^53 are lost in a double).
 */
export function strtosz(s: string): { value: bigint; warning?: string } | { error: 'EINVAL' | 'ERANGE' } {
  const int = strtoull(s, 0, 10);
  if (int.end === 0) return { error: 'EINVAL' };
  if (int.overflow) return { error: 'ERANGE' };
  if (s.slice(0, int.end).includes('-')) return { error: 'EINVAL' };
  let val = int.value;
  let end = int.end;
  let valf = 0n;
  let hex = false;
  if (val === 0n && (s[end] === 'x' || s[end] === 'X')) {
    const h = strtoull(s, 0, 16);
    if (h.overflow) return { error: 'ERANGE' };
    val = h.value;
    end = h.end;
    hex = true;
    if (s[end] === '.') return { error: 'EINVAL' };
  } else if (s[end] === '.') {
    const f = strtodFraction(s, end);
    if (f === undefined) {
      end++;
    } else {
      if (/[eE]/.test(s.slice(end, f.end))) return { error: 'EINVAL' };
      end = f.end;
      const scaled = f.value * 2 ** 64;
      valf = scaled >= 2 ** 64 ? U64_MAX : BigInt(Math.floor(scaled));
    }
  }
  let mul = suffixMul(s[end]);
  let warning: string | undefined;
  if (mul > 0n) {
    if (hex) warning = `Using a multiplier suffix on hex numbers is deprecated: ${s}`;
    end++;
  } else {
    mul = 1n;
  }
  if (mul === 1n) {
    if (valf !== 0n) return { error: 'EINVAL' };
  } else {
    // 64.64 fixed point times the multiplier, the fraction rounded half up.
    const low = valf * mul;
    val = val * mul + (low >> 64n) + ((low >> 63n) & 1n);
    if (val > U64_MAX) return { error: 'ERANGE' };
  }
  if (end !== s.length) return { error: 'EINVAL' };
  if (val > I64_MAX) return { error: 'ERANGE' };
  return warning === undefined ? { value: val } : { value: val, warning };
}

/** print_cvtnum_err's text for a number qemu-io could not parse. */
export function cvtnumError(error: 'EINVAL' | 'ERANGE', arg: string): string {
  return error === 'ERANGE'
    ? `Parsing error: argument too large -- ${arg}\n`
    : `Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- ${arg}\n`;
}

/**
 * A pattern byte as parse_pattern reads it: strtol(arg, &end, 0) (0x for
 * hex, a leading 0 for octal), the whole word used, 0..255. Undefined when
 * invalid.
 */
export function parsePattern(arg: string): number | undefined {
  let i = 0;
  while (i < arg.length && SPACE.has(arg[i])) i++;
  let negative = false;
  if (arg[i] === '+' || arg[i] === '-') {
    negative = arg[i] === '-';
    i++;
  }
  let base = 10;
  if (arg[i] === '0' && (arg[i + 1] === 'x' || arg[i + 1] === 'X') && isDigit(arg[i + 2], 16)) {
    base = 16;
    i += 2;
  } else if (arg[i] === '0') {
    base = 8;
  }
  const start = i;
  let value = 0;
  while (i < arg.length && digitValue(arg[i]) < base) {
    value = Math.min(value * base + digitValue(arg[i]), Number.MAX_SAFE_INTEGER);
    i++;
  }
  // No digits: strtol converts nothing and leaves the end at the start of the word.
  if (i === start) i = 0;
  if (negative) value = -value;
  if (i !== arg.length || value < 0 || value > 255) return undefined;
  return value;
}

function digitValue(c: string): number {
  if (c >= '0' && c <= '9') return c.charCodeAt(0) - 48;
  if (c >= 'a' && c <= 'z') return c.charCodeAt(0) - 87;
  if (c >= 'A' && c <= 'Z') return c.charCodeAt(0) - 55;
  return 99;
}
