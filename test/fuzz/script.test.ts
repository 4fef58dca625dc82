/**
 * scripts/fuzz.mjs as a user runs it: a short run prints its first seed and
 * the counts and exits 0; bad arguments are clear errors.
 */
import t from 'tap';
import path from 'node:path';
import { ROOT, run } from '../helpers/tools.js';

const script = path.join(ROOT, 'scripts', 'fuzz.mjs');

t.test('a short run of every target', async (t) => {
  const r = await run(process.execPath, [script, '--seconds', '2', '--target', 'all', '--seed', '77', '--out', t.testdir()], { timeoutMs: 60_000 });
  t.equal(r.code, 0, r.stderr);
  t.match(r.stdout, /^fuzz: targets nbd, qmp, client, fuse, 2 s, first seed 77$/m);
  t.match(r.stdout, /^fuzz: done, last seed \d+, runs nbd [1-9]\d*, qmp [1-9]\d*, client [1-9]\d*, fuse [1-9]\d*, failures 0$/m);
});

t.test('bad arguments', async (t) => {
  let r = await run(process.execPath, [script, '--seconds', 'x'], { timeoutMs: 30_000 });
  t.not(r.code, 0);
  t.match(r.stderr, /--seconds: expected a positive number, not 'x'/);
  r = await run(process.execPath, [script, '--seconds', '1', '--target', 'http'], { timeoutMs: 30_000 });
  t.not(r.code, 0);
  t.match(r.stderr, /--target: expected nbd, qmp, fuse, client or all, not 'http'/);
});
