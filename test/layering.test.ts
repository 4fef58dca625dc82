/**
 * The layers of docs/design/layers.md hold: scripts/check-layers.mjs passes
 * on the real tree, and fails, naming file and line, on a small tree with
 * upward imports planted (a type import among them, since those count too).
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { ROOT, run, tempDir } from './helpers/tools.js';

const CHECK = path.join(ROOT, 'scripts', 'check-layers.mjs');

function write(root: string, file: string, text: string): void {
  fs.mkdirSync(path.dirname(path.join(root, file)), { recursive: true });
  fs.writeFileSync(path.join(root, file), text);
}

t.test('the source tree has no import from a lower layer to a higher one', async (t) => {
  const r = await run(process.execPath, [CHECK]);
  t.equal(r.code, 0, `exit 0 (${r.stdout}${r.stderr})`);
  t.match(r.stdout, /check-layers: ok \(base < wire < block < /);
});

t.test('a planted upward import fails with its file and line', async (t) => {
  const root = tempDir(t, 'vdisk-layers-');
  write(root, 'src/errors.ts', 'export class VdiskError extends Error {}\n');
  write(root, 'src/daemon.ts', "import { VdiskError } from './errors.js';\nexport class Daemon { e = VdiskError; }\n");
  write(root, 'src/cli/main.ts', "import { Daemon } from '../daemon.js';\nexport const d = new Daemon();\n");
  write(
    root,
    'src/block/node.ts',
    [
      "import { VdiskError } from '../errors.js';",
      '// import { Daemon } from "../daemon.js" (a comment is not an import)',
      "import type {",
      '  Daemon,',
      "} from '../daemon.js';",
      "export const late = () => import('../cli/main.js');",
      'export type D = Daemon;',
      'export const E = VdiskError;',
      '',
    ].join('\n'),
  );
  write(root, 'src/stray.ts', 'export const x = 1;\n');

  const r = await run(process.execPath, [CHECK, root]);
  t.equal(r.code, 1, 'fails');
  const lines = r.stderr.trim().split('\n');
  t.same(
    lines.slice(0, -1),
    [
      "src/block/node.ts:5: imports src/daemon.ts: layer 'block' may not import layer 'daemon'",
      "src/block/node.ts:6: imports src/cli/main.ts: layer 'block' may not import layer 'entry'",
      'src/stray.ts:1: in no layer (add it to LAYERS in scripts/check-layers.mjs)',
    ],
    'each upward import (type and dynamic ones too) and the unplaced file, nothing else',
  );
  t.match(lines.at(-1), /^check-layers: 3 problem\(s\) with the layers/);
});
