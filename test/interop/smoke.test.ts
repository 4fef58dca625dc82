import t from 'tap';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';

t.test('nbdinfo sees a file exported by vdisk serve', async (t) => {
  requireTool(t, 'nbdinfo');
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), 64 * 1024 * 1024);
  const d = await startDaemon(t, {
    dir,
    args: ['--blockdev', `driver=file,node-name=f0,filename=${img}`, '--export', 'type=nbd,id=e0,node-name=f0,name=a'],
  });
  const r = await run('nbdinfo', ['--json', d.uri('a')]);
  t.equal(r.code, 0, r.stderr);
  const info = JSON.parse(r.stdout);
  t.equal(info.exports[0]['export-size'], 64 * 1024 * 1024);
  t.equal(info.exports[0]['is_read_only'], true);
  t.equal(await d.stop(), 0, 'SIGTERM exits 0');
});
