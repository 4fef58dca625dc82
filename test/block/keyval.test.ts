/**
 * QEMU's keyval syntax (src/qapi/keyval.ts) and the schema's conversion of
 * keyval strings (src/qapi/schema.ts): nesting, ',,' escapes, lists from
 * numeric keys, duplicates, the JSON form, and typed values with clear errors.
 */
import t from 'tap';
import { parseKeyval, parseOptionArg } from '../../src/qapi/keyval.js';
import { VdiskError } from '../../src/errors.js';
import { alternate, arrayOf, bool, check, enumOf, int, nullType, number, parseSize, str, struct, union } from '../../src/qapi/schema.js';

const MiB = 1024 * 1024;

t.test('keys: flat, dotted into nested objects, merged across pairs', async (t) => {
  t.same(parseKeyval('driver=qcow2,node-name=d0,file.driver=file,file.filename=a.qcow2', 'x'), {
    driver: 'qcow2',
    'node-name': 'd0',
    file: { driver: 'file', filename: 'a.qcow2' },
  });
  t.same(parseKeyval('a.b.c=1,a.b.d=2,a.e=3,f=4', 'x'), { a: { b: { c: '1', d: '2' }, e: '3' }, f: '4' }, 'three levels, merged');
  t.same(parseKeyval('cache.direct=on,cache.no-flush=off', 'x'), { cache: { direct: 'on', 'no-flush': 'off' } });
  t.same(parseKeyval('', 'x'), {}, 'empty text: no options');
  t.same(parseKeyval('a=1,', 'x'), { a: '1' }, 'a trailing comma ends the list');
  t.same(parseKeyval('a=b=c', 'x'), { a: 'b=c' }, 'only the first = separates key and value');
  t.same(parseKeyval('empty=,b=1', 'x'), { empty: '', b: '1' }, 'an empty value is the empty string');
  t.same(parseKeyval('Key_1-x=v', 'x'), { 'Key_1-x': 'v' }, 'letters, digits, _ and - in keys');
  const leaf = parseKeyval('n=5,b=on', 'x');
  t.equal(typeof leaf.n, 'string', 'leaves stay strings: the schema converts them');
  t.equal(leaf.b, 'on');
});

t.test("',,' is a comma inside a value", async (t) => {
  t.same(parseKeyval('filename=a,,b,,c,x=1', 'x'), { filename: 'a,b,c', x: '1' });
  t.same(parseKeyval('filename=/tmp/odd,,name.img', 'x'), { filename: '/tmp/odd,name.img' });
  t.same(parseKeyval('a=x,,', 'x'), { a: 'x,' }, 'a doubled comma at the very end');
  t.same(parseKeyval('a=,,,,,b=2', 'x'), { a: ',,', b: '2' }, 'two escaped commas, then a separator');
  t.same(parseKeyval('a=,,', 'x'), { a: ',' });
});

t.test('lists from keys 0, 1, 2, ...', async (t) => {
  t.same(parseKeyval('inject-error.0.event=read_aio,inject-error.1.event=write_aio,inject-error.1.once=on', 'x'), {
    'inject-error': [{ event: 'read_aio' }, { event: 'write_aio', once: 'on' }],
  });
  t.same(parseKeyval('a.1=x,a.0=y', 'x'), { a: ['y', 'x'] }, 'ordered by index, not by position in the text');
  t.same(parseKeyval('a.0=x', 'x'), { a: ['x'] }, 'one element');
  t.same(parseKeyval('a.0.0=x,a.0.1=y,a.1.0=z', 'x'), { a: [['x', 'y'], ['z']] }, 'lists of lists');
  t.same(parseKeyval('a.0=x,a.2=y', 'x'), { a: { 0: 'x', 2: 'y' } }, 'a gap keeps an object (the schema then refuses it)');
  t.same(parseKeyval('a.1=x', 'x'), { a: { 1: 'x' } }, 'a list must start at 0');
  t.same(parseKeyval('a.0=x,a.b=y', 'x'), { a: { 0: 'x', b: 'y' } }, 'a mix of numeric and other keys is an object');
  const arr = (parseKeyval('l.0=1,l.1=2,l.2=3', 'x') as { l: unknown }).l;
  t.ok(Array.isArray(arr), 'a real array');
  t.same(arr, ['1', '2', '3']);
});

t.test('a list index written with a leading zero never yields a hole', async (t) => {
  // QEMU reads list indexes as decimal numbers (key_to_index), so "00" is index 0.
  // Either that, or an error; an array element that is undefined is neither.
  let v: unknown;
  try {
    v = parseKeyval('a.00=x,a.1=y', 'x');
  } catch (err) {
    t.type(err, VdiskError, 'refused with a VdiskError');
    return;
  }
  t.same(v, { a: ['x', 'y'] }, "'a.00' is element 0");
});

t.test('malformed text and duplicates are refused with the option name', async (t) => {
  t.throws(() => parseKeyval('a=1,a=2', '--opt'), { message: "--opt: parameter 'a' given twice" });
  t.throws(() => parseKeyval('file.filename=a,file.filename=b', '--blockdev'), { message: "--blockdev: parameter 'file.filename' given twice" });
  t.throws(() => parseKeyval('a=1,b', '--opt'), { message: "--opt: expected key=value at 'b'" });
  t.throws(() => parseKeyval(',a=1', '--opt'), /--opt: expected key=value at ',a=1'/);
  t.throws(() => parseKeyval('a.=1', '--opt'), { message: "--opt: invalid parameter name 'a.'" });
  t.throws(() => parseKeyval('.a=1', '--opt'), /invalid parameter name '\.a'/);
  t.throws(() => parseKeyval('a..b=1', '--opt'), /invalid parameter name 'a\.\.b'/);
  t.throws(() => parseKeyval('=1', '--opt'), /invalid parameter name ''/);
  t.throws(() => parseKeyval('a b=1', '--opt'), /invalid parameter name 'a b'/);
  t.throws(() => parseKeyval('a=1,a.b=2', '--opt'), { message: "--opt: parameter 'a' has a value and members" });
  t.throws(() => parseKeyval('a.b=2,a=1', '--opt'), /--opt: parameter 'a' given twice/);
  const err = (() => {
    try {
      parseKeyval('a=1,a=2', '--opt');
    } catch (e) {
      return e;
    }
  })() as VdiskError;
  t.type(err, VdiskError);
  t.equal(err.errno, 'EINVAL');
});

t.test("a key named '__proto__' does not reach Object.prototype", async (t) => {
  const probe = 'vdiskKeyvalProbe';
  t.teardown(() => {
    delete (Object.prototype as Record<string, unknown>)[probe];
  });
  try {
    parseKeyval(`driver=null-co,__proto__.${probe}=yes`, '--blockdev');
  } catch {
    // Refusing the key is fine.
  }
  t.equal(({} as Record<string, unknown>)[probe], undefined, 'every object in the process is unchanged');
});

t.test('the JSON form', async (t) => {
  t.same(parseOptionArg('{"driver":"file","filename":"x","cache":{"direct":true}}', 'x'), { driver: 'file', filename: 'x', cache: { direct: true } });
  t.same(parseOptionArg('  {"size": 4096}', 'x'), { size: 4096 }, 'leading spaces, and numbers stay numbers');
  t.same(parseOptionArg('driver=null-co,size=4096', 'x'), { driver: 'null-co', size: '4096' }, 'not starting with { is keyval');
  t.throws(() => parseOptionArg('{"a":', '--blockdev'), /^--blockdev: invalid JSON: /);
  t.throws(() => parseOptionArg('{"a":', '--blockdev'), { name: 'VdiskError', errno: 'EINVAL' });
});

t.test('schema: keyval strings become typed values', async (t) => {
  const s = struct('T', {
    '*b': bool,
    '*n': int('int'),
    '*u': int('uint32'),
    '*u8': int('uint8'),
    '*sz': int('size'),
    '*s': str,
    '*e': enumOf('E', ['ignore', 'unmap']),
    '*l': arrayOf(int('int')),
    '*f': number,
    '*o': struct('O', { x: bool }),
  });
  t.same(check(s, { b: 'on', n: '-5', u: '0x10', sz: '64M', s: '7', l: ['1', '2'], e: 'unmap', f: '2.5', o: { x: 'off' } }, '', 'keyval'), {
    b: true,
    n: -5,
    u: 16,
    sz: 64 * MiB,
    s: '7',
    l: [1, 2],
    e: 'unmap',
    f: 2.5,
    o: { x: false },
  });
  for (const yes of ['on', 'yes', 'true', 'y']) t.same(check(s, { b: yes }, '', 'keyval'), { b: true }, `'${yes}' is true`);
  for (const no of ['off', 'no', 'false', 'n']) t.same(check(s, { b: no }, '', 'keyval'), { b: false }, `'${no}' is false`);
  t.same(check(s, { n: '+12' }, '', 'keyval'), { n: 12 });
  t.same(check(s, { n: '9007199254740991' }, '', 'keyval'), { n: Number.MAX_SAFE_INTEGER }, '2^53-1 is the largest int');
  t.same(check(s, { u: '4294967295' }, '', 'keyval'), { u: 2 ** 32 - 1 });
  t.same(check(s, { sz: '4096' }, '', 'keyval'), { sz: 4096 }, 'a size without a suffix is bytes');
  t.same(check(s, { sz: '1k' }, '', 'keyval'), { sz: 1024 });
  t.same(check(s, { sz: '1.5G' }, '', 'keyval'), { sz: 1.5 * 1024 ** 3 });
  t.same(check(s, { sz: '2T' }, '', 'keyval'), { sz: 2 * 1024 ** 4 });
  t.same(check(s, { s: 'on' }, '', 'keyval'), { s: 'on' }, 'a string member keeps the text as is');
  t.same(check(s, {}, '', 'keyval'), {}, 'optional members may be absent');
});

t.test('schema: bad keyval values give errors that name the parameter', async (t) => {
  const s = struct('T', {
    '*b': bool,
    '*n': int('int'),
    '*u': int('uint32'),
    '*u8': int('uint8'),
    '*sz': int('size'),
    '*e': enumOf('E', ['ignore', 'unmap']),
    '*l': arrayOf(int('int')),
    '*o': struct('O', { x: bool }),
    need: str,
  });
  const ok = { need: 'x' };
  const bad = (v: Record<string, unknown>, message: RegExp | string, what: string) =>
    t.throws(() => check(s, { ...ok, ...v }, '', 'keyval'), { errno: 'EINVAL', message }, what);
  bad({ b: 'perhaps' }, "Parameter 'b' expects 'on' or 'off'", 'not a boolean word');
  bad({ b: 'ON' }, "Parameter 'b' expects 'on' or 'off'", 'boolean words are lower case');
  bad({ b: '' }, "Parameter 'b' expects 'on' or 'off'", 'empty boolean');
  bad({ u: '-1' }, "Parameter 'u' expects uint32_t", 'negative unsigned');
  bad({ u: '4294967296' }, "Parameter 'u' expects uint32_t", 'one past uint32');
  bad({ u8: '256' }, "Parameter 'u8' expects uint8_t", 'one past uint8');
  bad({ n: '9007199254740993' }, "Parameter 'n' expects integer", 'above 2^53');
  bad({ n: '1.5' }, /^Parameter 'n' expects /, 'a fraction');
  bad({ n: 'ten' }, /^Parameter 'n' expects /, 'a word');
  bad({ n: '' }, /^Parameter 'n' expects /, 'empty integer');
  bad({ sz: '12Q' }, /^Parameter 'sz' expects /, 'unknown size suffix');
  bad({ sz: '-1M' }, /^Parameter 'sz' expects /, 'negative size');
  bad({ sz: '1.5' }, /^Parameter 'sz' expects /, 'fractional bytes without a suffix');
  bad({ sz: '16E' }, /^Parameter 'sz' expects /, '2^64 does not fit');
  bad({ e: 'sometimes' }, "Parameter 'e' does not accept value 'sometimes'", 'enum value');
  bad({ l: ['1', 'x'] }, /^Parameter 'l\[1\]' expects /, 'the list element is named');
  bad({ o: { x: 'maybe' } }, "Parameter 'o.x' expects 'on' or 'off'", 'the nested member is named with a dot');
  bad({ o: {} }, "Parameter 'o.x' is missing", 'missing nested member');
  bad({ zzz: '1' }, "Parameter 'zzz' is unexpected", 'unknown member');
  bad({ o: { x: 'on', y: '1' } }, "Parameter 'o.y' is unexpected", 'unknown nested member');
  t.throws(() => check(s, {}, '', 'keyval'), { message: "Parameter 'need' is missing" });
  t.throws(() => check(s, { ...ok, o: 'x' }, '', 'keyval'), { message: "Invalid parameter type for 'o', expected: object" });
});

t.test('schema: keyval integer errors use QEMU wording', async (t) => {
  // qemu-storage-daemon --blockdev driver=null-co,node-name=n,size=64M
  //   -> "Parameter 'size' expects integer" (QERR_INVALID_PARAMETER_VALUE, "integer").
  const s = struct('T', { '*size': int('int') });
  t.throws(() => check(s, { size: '64M' }, '', 'keyval'), { message: "Parameter 'size' expects integer" });
  t.throws(() => check(s, { size: '' }, '', 'keyval'), { message: "Parameter 'size' expects integer" });
});

t.test('sizes: suffixes are powers of 1024, fractions need a unit', async (t) => {
  t.equal(parseSize('512'), 512);
  t.equal(parseSize('0'), 0);
  t.equal(parseSize('1b'), 1);
  t.equal(parseSize('1B'), 1);
  t.equal(parseSize('1k'), 1024);
  t.equal(parseSize('1K'), 1024);
  t.equal(parseSize('64M'), 64 * MiB);
  t.equal(parseSize('64m'), 64 * MiB);
  t.equal(parseSize('3G'), 3 * 1024 ** 3);
  t.equal(parseSize('10T'), 10 * 1024 ** 4);
  t.equal(parseSize('2P'), 2 * 1024 ** 5);
  t.equal(parseSize('1.5G'), 1.5 * 1024 ** 3);
  t.equal(parseSize('0.5k'), 512);
  t.equal(parseSize('1.5'), undefined, 'fractional bytes');
  t.equal(parseSize('abc'), undefined);
  t.equal(parseSize(''), undefined);
  t.equal(parseSize('-1'), undefined);
  t.equal(parseSize('1X'), undefined);
  t.equal(parseSize('1MB'), undefined, 'one suffix letter only');
});

t.test('sizes: a fraction of a byte is refused even with the B suffix', async (t) => {
  // QEMU: qemu-img create -f raw x 1.5b -> refused; 1.0b -> 1 byte.
  t.equal(parseSize('1.5b'), undefined, "'1.5b' is not a whole number of bytes");
  t.equal(parseSize('1.0b'), 1);
});

t.test('schema: JSON input is strict about types', async (t) => {
  const s = struct('T', { '*b': bool, '*n': int('int'), '*u': int('uint32'), '*s': str, '*l': arrayOf(str) });
  t.throws(() => check(s, { b: 'on' }, '', 'json'), { message: "Invalid parameter type for 'b', expected: boolean" });
  t.throws(() => check(s, { n: '5' }, '', 'json'), { message: "Invalid parameter type for 'n', expected: integer" });
  t.throws(() => check(s, { n: 1.5 }, '', 'json'), { message: "Invalid parameter type for 'n', expected: integer" });
  t.throws(() => check(s, { n: 2 ** 60 }, '', 'json'), { message: "Parameter 'n' expects integer" });
  t.throws(() => check(s, { u: -1 }, '', 'json'), { message: "Parameter 'u' expects uint32_t" });
  t.throws(() => check(s, { s: 5 }, '', 'json'), { message: "Invalid parameter type for 's', expected: string" });
  t.throws(() => check(s, { l: 'x' }, '', 'json'), { message: "Invalid parameter type for 'l', expected: array" });
  t.throws(() => check(s, { s: null }, '', 'json'), { message: "Invalid parameter type for 's', expected: string" });
  t.throws(() => check(s, [], '', 'json'), { message: "Invalid parameter type for 'arguments', expected: object" });
  t.same(check(s, { b: true, n: -3, u: 7, s: 'x', l: ['a'] }, '', 'json'), { b: true, n: -3, u: 7, s: 'x', l: ['a'] });
  // A keyval-only conversion does not apply to numbers given as JSON numbers either way.
  t.same(check(s, { n: 42 }, '', 'keyval'), { n: 42 }, 'keyval mode accepts typed values too');
});

t.test('schema: unions and alternates (the shape of BlockdevOptions and BlockdevRef)', async (t) => {
  const base = { driver: enumOf('D', ['a', 'b']), '*ro': bool };
  const u = union('U', base, 'driver', { a: { x: int('int') }, b: { '*y': str } });
  t.same(check(u, { driver: 'a', x: '3', ro: 'on' }, '', 'keyval'), { driver: 'a', x: 3, ro: true });
  t.throws(() => check(u, { driver: 'b', x: '3' }, '', 'keyval'), { message: "Parameter 'x' is unexpected" }, 'a member of another branch');
  t.throws(() => check(u, { driver: 'c' }, '', 'keyval'), { message: "Parameter 'driver' does not accept value 'c'" });
  t.throws(() => check(u, { x: 1 }, '', 'json'), { message: "Parameter 'driver' is missing" });
  t.throws(() => check(u, { driver: 'a' }, '', 'json'), { message: "Parameter 'x' is missing" });
  const ref = alternate('Ref', [str, u]);
  t.equal(check(ref, 'node0', 'file', 'keyval'), 'node0', 'a string is a reference');
  t.same(check(ref, { driver: 'b', y: 'z' }, 'file', 'keyval'), { driver: 'b', y: 'z' }, 'an object is inline options');
  t.throws(() => check(ref, 5, 'file', 'json'), { message: "Invalid parameter type for 'file', expected: Ref" });
  t.throws(() => check(ref, { driver: 'a' }, 'file', 'json'), { message: "Parameter 'file.x' is missing" }, 'inline options are checked with the dotted path');
  const orNull = alternate('RefOrNull', [str, u, nullType]);
  t.equal(check(orNull, null, 'backing', 'json'), null, 'JSON null');
  t.equal(check(orNull, '', 'backing', 'keyval'), null, "keyval 'backing=' is null");
  t.equal(check(orNull, 'b0', 'backing', 'keyval'), 'b0');
});
