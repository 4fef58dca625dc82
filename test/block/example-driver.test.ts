/**
 * The README's "Writing a driver" example, kept honest: the README shows
 * examples/pattern-driver.ts verbatim, and that file, registered in a
 * daemon, is opened by blockdev-add and read over NBD by libnbd (nbdinfo,
 * nbdsh) and qemu-io. The README's driver table is checked against the
 * driver table in src/block/drivers/index.ts: every driver has a row and
 * every option it takes is named in it.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { setLogLevel } from 'vdisk';
import { servePattern } from '../../examples/pattern-driver.js';
import { DRIVERS } from '../../src/block/drivers/index.js';
import { ROOT, nbdsh, requireTools, run, tempDir } from '../helpers/tools.js';

// The example runs on the built package (as a user's code would): quiet its lifecycle lines.
setLogLevel('error');

const README = fs.readFileSync(path.join(ROOT, 'README.md'), 'utf8');

t.test('the README shows examples/pattern-driver.ts as it is', async (t) => {
  const example = fs.readFileSync(path.join(ROOT, 'examples', 'pattern-driver.ts'), 'utf8');
  t.ok(README.includes('```ts\n' + example + '```\n'), 'one ts block of the README is the whole file');
});

t.test('the example driver, registered in a daemon, served over NBD to nbdinfo, nbdsh and qemu-io', async (t) => {
  requireTools(t, 'nbdinfo', 'nbdsh', 'qemu-io');
  const sock = path.join(tempDir(t), 'p.sock');
  const daemon = await servePattern(sock);
  t.teardown(() => daemon.shutdown());
  const uri = `nbd+unix:///p0?socket=${sock}`;
  // Clients run as child processes: this process serves them and must not block.
  const info = await run('nbdinfo', ['--json', uri]);
  t.equal(info.code, 0, info.stderr);
  const exp = (JSON.parse(info.stdout) as { exports: Array<{ 'export-size': number; is_read_only: boolean }> }).exports[0];
  t.equal(exp['export-size'], 4 << 20, 'the size given to blockdev-add');
  t.equal(exp.is_read_only, true, 'a read-only node makes a read-only export');
  const sh = await nbdsh(
    `
assert h.pread(4096, 0) == b'\\x5a' * 4096
assert h.pread(1000, (4 << 20) - 1000) == b'\\x5a' * 1000
print('ok')
`,
    uri,
  );
  t.equal(sh.code, 0, sh.stderr);
  t.match(sh.stdout, /ok/, 'every byte is the one given, at the start and at the end');
  const io = await run('qemu-io', ['-f', 'raw', '-r', '-c', `read -P 0x5a 0 ${4 << 20}`, uri]);
  t.equal(io.code, 0, io.stderr);
  t.notMatch(io.stdout, /Pattern verification failed|failed/, io.stdout);
});

t.test("the README's driver table names every driver and every option it takes", async (t) => {
  const rows = new Map<string, string>();
  for (const m of README.matchAll(/^\| `([a-z0-9-]+)` \| [^|]+ \| (.+) \|$/gm)) rows.set(m[1], m[2]);
  t.same([...rows.keys()].sort(), DRIVERS.map((d) => d.name).sort(), 'one row per driver, no more');
  for (const d of DRIVERS) {
    const row = rows.get(d.name) ?? '';
    const missing = Object.keys(d.members)
      .map((k) => k.replace(/^\*/, ''))
      .filter((k) => !row.includes(`\`${k}\``));
    t.same(missing, [], `${d.name}: every option is in its row`);
  }
});
