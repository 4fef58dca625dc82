/**
 * Reading a qcow2 image's persistent bitmap with QEMU's own tools, so tests
 * do not trust vdisk to report what vdisk stored: qemu-nbd exports the image
 * read-only with the bitmap (-B), nbdinfo maps its qemu:dirty-bitmap context.
 */
import { spawn } from 'node:child_process';
import path from 'node:path';
import { waitForSocket } from './daemon.js';
import { run, tempDir } from './tools.js';

interface TestLike {
  fail(message: string): void;
  teardown(fn: () => unknown): void;
}

/** The dirty extents of bitmap `name` in a qcow2 image, as qemu-nbd + nbdinfo see them. */
export async function bitmapExtents(t: TestLike, image: string, name: string, format = 'qcow2'): Promise<Array<{ offset: number; length: number }>> {
  const dir = tempDir(t, 'vdisk-bmap-');
  const sock = path.join(dir, 'q.sock');
  const p = spawn('qemu-nbd', ['-r', '-t', '-f', format, '-B', name, '-k', sock, image], { stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  p.stderr!.setEncoding('utf8').on('data', (d) => (err += d));
  const exited = new Promise((r) => p.on('exit', r));
  try {
    await waitForSocket(sock).catch(() => {
      throw new Error(`qemu-nbd -B ${name} ${image} did not start: ${err}`);
    });
    const r = await run('nbdinfo', ['--map=qemu:dirty-bitmap:' + name, '--json', `nbd+unix:///?socket=${sock}`]);
    if (r.code !== 0) throw new Error(`nbdinfo --map: ${r.stderr}`);
    return (JSON.parse(r.stdout) as Array<{ offset: number; length: number; type: number }>)
      .filter((e) => e.type & 1)
      .map((e) => ({ offset: e.offset, length: e.length }));
  } finally {
    p.kill('SIGTERM');
    await exited;
  }
}
