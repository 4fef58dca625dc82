import t from 'tap';
import { parseKeyval, parseOptionArg } from '../../src/qapi/keyval.js';
import { arrayOf, bool, check, int, str, struct, parseSize } from '../../src/qapi/schema.js';

t.test('keyval syntax', async (t) => {
  t.same(parseKeyval('driver=qcow2,node-name=d0,file.driver=file,file.filename=a.qcow2', 'x'), {
    driver: 'qcow2',
    'node-name': 'd0',
    file: { driver: 'file', filename: 'a.qcow2' },
  });
  t.same(parseKeyval('filename=a,,b,,c,x=1', 'x'), { filename: 'a,b,c', x: '1' }, 'a doubled comma is a comma');
  t.same(parseKeyval('inject-error.0.event=read_aio,inject-error.1.event=write_aio,inject-error.1.once=on', 'x'), {
    'inject-error': [{ event: 'read_aio' }, { event: 'write_aio', once: 'on' }],
  });
  t.same(parseKeyval('a.1=x,a.0=y', 'x'), { a: ['y', 'x'] }, 'list order by index');
  t.same(parseKeyval('a.0=x,a.2=y', 'x'), { a: { 0: 'x', 2: 'y' } }, 'gaps keep an object');
  t.same(parseKeyval('empty=', 'x'), { empty: '' });
  t.throws(() => parseKeyval('a=1,a=2', '--opt'), /--opt: parameter 'a' given twice/);
  t.throws(() => parseKeyval('a=1,b', '--opt'), /expected key=value/);
  t.throws(() => parseKeyval('a.=1', '--opt'), /invalid parameter name/);
  t.throws(() => parseKeyval('a=1,a.b=2', '--opt'), /given twice|has a value and members/);
  t.same(parseOptionArg('{"driver":"file","filename":"x"}', 'x'), { driver: 'file', filename: 'x' }, 'JSON form');
  t.throws(() => parseOptionArg('{"a":', '--blockdev'), /--blockdev: invalid JSON/);
});

t.test('schema conversions of keyval strings', async (t) => {
  const s = struct('T', { '*b': bool, '*n': int('int'), '*u': int('uint32'), '*sz': int('size'), '*s': str, '*l': arrayOf(int('int')) });
  t.same(check(s, { b: 'on', n: '-5', u: '0x10', sz: '64M', s: '7', l: ['1', '2'] }, '', 'keyval'), { b: true, n: -5, u: 16, sz: 64 * 1024 * 1024, s: '7', l: [1, 2] });
  t.same(check(s, { b: 'off' }, '', 'keyval'), { b: false });
  t.throws(() => check(s, { b: 'perhaps' }, '', 'keyval'), /Parameter 'b' expects 'on' or 'off'/);
  t.throws(() => check(s, { u: '-1' }, '', 'keyval'), /Parameter 'u' expects uint32/);
  t.throws(() => check(s, { n: '1.5' }, '', 'keyval'), /Parameter 'n' expects an integer/);
  t.throws(() => check(s, { sz: '12Q' }, '', 'keyval'), /Parameter 'sz' expects a size value/);
  t.throws(() => check(s, { l: ['1', 'x'] }, '', 'keyval'), /Parameter 'l\[1\]' expects an integer/);
  // JSON input is strict about types.
  t.throws(() => check(s, { b: 'on' }, '', 'json'), /Invalid parameter type for 'b', expected: boolean/);
  t.throws(() => check(s, { n: 2 ** 60 }, '', 'json'), /Parameter 'n' expects integer/);
  t.equal(parseSize('1k'), 1024);
  t.equal(parseSize('1.5G'), 1.5 * 1024 ** 3);
  t.equal(parseSize('512'), 512);
  t.equal(parseSize('10T'), 10 * 1024 ** 4);
  t.equal(parseSize('abc'), undefined);
});
