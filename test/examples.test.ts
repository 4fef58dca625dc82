import t from 'tap';
import path from 'node:path';
import { serveMemoryDisk } from '../examples/memory-disk.js';
import { requireTool, run, tempDir } from './helpers/tools.js';

t.test('examples/memory-disk.ts: a node class of its own, served over NBD to qemu-io and nbdinfo', async (t) => {
  requireTool(t, 'qemu-io');
  requireTool(t, 'nbdinfo');
  const sock = path.join(tempDir(t), 'mem.sock');
  const daemon = await serveMemoryDisk(sock, 16 * 1024 * 1024);
  t.teardown(() => daemon.shutdown());
  const uri = `nbd+unix:///mem?socket=${sock}`;
  // Real clients run as child processes: never block this process's event loop, it serves them.
  const w = await run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 65536 131072', '-c', 'read -P 0x5a 65536 131072', '-c', 'read -P 0 0 65536', uri]);
  t.equal(w.code, 0, w.stderr);
  t.match(w.stdout, /wrote 131072\/131072 bytes at offset 65536/);
  t.notMatch(w.stdout, /Pattern verification failed/);
  const map = await run('nbdinfo', ['--map', '--json', uri]);
  t.equal(map.code, 0, map.stderr);
  const extents = JSON.parse(map.stdout) as Array<{ offset: number; length: number; type: number }>;
  t.same(
    extents.map((e) => [e.offset, e.length, e.type]),
    [
      [0, 65536, 3],
      [65536, 131072, 0],
      [196608, 16 * 1024 * 1024 - 196608, 3],
    ],
  );
});
