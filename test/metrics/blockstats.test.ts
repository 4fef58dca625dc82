/**
 * query-blockstats: the reply's shape is qemu-storage-daemon 7.2's for the
 * same graph (without query-nodes both answer []: exports make nameless
 * BlockBackends, which QEMU skips), and the numbers are what clients did,
 * counted on the client side: exact requests from nbdsh, fio's own counts,
 * bulk bytes from nbdcopy and qemu-io through an NBD export.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { startQsd, stopQsd } from '../helpers/peers.js';
import { QmpWire } from '../helpers/qmp.js';
import { nbdsh, patternBuffer, requireTools, run, runOk, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;
type Stats = Record<string, unknown> & { 'node-name': string; stats: Record<string, unknown>; parent?: Stats; backing?: Stats };

/** A value's shape: member names and JSON types, recursively (arrays by their elements' shapes). */
function shape(v: unknown): unknown {
  if (v === null) return 'null';
  if (Array.isArray(v)) return ['array', ...new Set(v.map((x) => JSON.stringify(shape(x))))];
  if (typeof v === 'object') {
    const out: Record<string, unknown> = {};
    for (const k of Object.keys(v as object).sort()) out[k] = shape((v as Record<string, unknown>)[k]);
    return out;
  }
  return typeof v;
}

/** idle_time_ns is there once a node has done I/O (vdisk's nodes do when they open); the rest must match. */
function withoutIdle(s: unknown): unknown {
  return JSON.parse(JSON.stringify(s, (k, v) => (k === 'idle_time_ns' ? undefined : v)));
}

async function graphArgs(dir: string): Promise<string[]> {
  fs.writeFileSync(path.join(dir, 'd.raw'), Buffer.alloc(16 * MiB));
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', path.join(dir, 'base.qcow2'), '16M']);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', path.join(dir, 'base.qcow2'), '-F', 'qcow2', path.join(dir, 'top.qcow2')]);
  return [
    '--blockdev', `driver=file,node-name=f0,filename=${path.join(dir, 'd.raw')},discard=unmap`,
    '--blockdev', 'driver=raw,node-name=r0,file=f0,discard=unmap',
    '--blockdev', `driver=file,node-name=tf,filename=${path.join(dir, 'top.qcow2')}`,
    '--blockdev', 'driver=qcow2,node-name=q0,file=tf',
    '--nbd-server', `addr.type=unix,addr.path=${path.join(dir, 'nbd.sock')}`,
    '--export', 'type=nbd,id=e0,node-name=r0,writable=on',
    '--export', 'type=nbd,id=e1,node-name=q0,writable=on',
  ];
}

t.test('the reply has qemu-storage-daemon 7.2 shape, with and without query-nodes', async (t) => {
  if (!requireTools(t, 'qemu-storage-daemon', 'qemu-img', 'qemu-io')) return;
  const replies: Record<string, { plain: unknown; nodes: Stats[] }> = {};
  for (const name of ['qsd', 'vdisk']) {
    const dir = tempDir(t);
    const args = await graphArgs(dir);
    let w: QmpWire;
    let stop: () => Promise<unknown>;
    if (name === 'qsd') {
      w = await startQsd(t, dir, args);
      stop = async () => w.ok('quit').catch(() => undefined);
    } else {
      const d = await startDaemon(t, { dir, nbdServer: false, args: [...args, '--qmp', `unix:${path.join(dir, 'qmp.sock')}`, '--log-level', 'warn'] });
      w = await QmpWire.connect(path.join(dir, 'qmp.sock'));
      stop = () => d.stop();
    }
    // Some I/O first, so both have counted something (qsd only wr_highest_offset at node level).
    await runOk(t, 'qemu-io', ['-f', 'raw', '-c', 'write -P 7 0 64k', '-c', 'read 0 4k', `nbd+unix:///r0?socket=${path.join(dir, 'nbd.sock')}`]);
    replies[name] = { plain: await w.ok('query-blockstats'), nodes: (await w.ok('query-blockstats', { 'query-nodes': true })) as Stats[] };
    w.close();
    await stop();
  }
  const { qsd, vdisk } = replies;
  t.same(qsd.plain, [], 'qsd: exports are nameless BlockBackends, not listed');
  t.same(vdisk.plain, [], 'vdisk answers the same');
  // Every named node, oldest first, including the backing file's implicit nodes (#blockNNN).
  const names = (l: Stats[]) => l.map((s) => (s['node-name'].startsWith('#') ? '#auto' : s['node-name']));
  t.same(names(vdisk.nodes), names(qsd.nodes), 'the same nodes in the same order');
  for (let i = 0; i < qsd.nodes.length; i++) {
    t.same(shape(withoutIdle(vdisk.nodes[i])), shape(withoutIdle(qsd.nodes[i])), `node ${names(qsd.nodes)[i]}: same members and types`);
  }
  // Only where the two write the same: vdisk marks a qcow2 image dirty while open, QEMU does not.
  for (const n of ['f0', 'r0']) {
    const [a, b] = [vdisk, qsd].map((p) => p.nodes.find((s) => s['node-name'] === n)!.stats.wr_highest_offset);
    t.equal(a, b, `node ${n}: the same wr_highest_offset`);
    t.equal(a, 65536);
  }
  const r0 = vdisk.nodes.find((s) => s['node-name'] === 'r0')!;
  t.equal(r0.parent?.['node-name'], 'f0', "a format's file is its 'parent'");
  t.same(r0.parent?.['driver-specific'], { driver: 'file', 'discard-nb-ok': 0, 'discard-nb-failed': 0, 'discard-bytes-ok': 0 });
});

t.test('counts are what the clients did', async (t) => {
  if (!requireTools(t, 'nbdsh', 'nbdcopy', 'qemu-io', 'fio')) return;
  const dir = tempDir(t);
  const args = await graphArgs(dir);
  const qmpSock = path.join(dir, 'qmp.sock');
  await startDaemon(t, { dir, nbdServer: false, args: [...args, '--qmp', `unix:${qmpSock}`, '--log-level', 'warn'] });
  const w = await QmpWire.connect(qmpSock);
  t.teardown(() => w.close());
  const stats = async (node: string): Promise<Record<string, number>> => {
    const all = (await w.ok('query-blockstats', { 'query-nodes': true })) as Stats[];
    return all.find((s) => s['node-name'] === node)!.stats as Record<string, number>;
  };
  const uri = `nbd+unix:///r0?socket=${path.join(dir, 'nbd.sock')}`;
  const before = await stats('r0');

  // nbdsh: every request is one request to the node, no more (no flush at disconnect).
  const r = await nbdsh(
    [
      'buf = b"\\x5a" * 65536',
      'for i in range(10): h.pwrite(buf, i * 65536)',
      'for i in range(7): h.pread(4096, i * 8192)',
      'h.pread(1000, 3)',
      'h.zero(131072, 1048576)',
      'h.trim(65536, 2097152)',
      'h.trim(4096, 3145728)',
      'h.flush()',
      'h.flush()',
      'h.flush()',
    ].join('\n'),
    uri,
  );
  t.equal(r.code, 0, r.stderr);
  const a = await stats('r0');
  t.equal(a.wr_operations - before.wr_operations, 11, '10 writes and 1 write-zeroes');
  t.equal(a.wr_bytes - before.wr_bytes, 10 * 65536 + 131072, 'their bytes');
  t.equal(a.rd_operations - before.rd_operations, 8);
  t.equal(a.rd_bytes - before.rd_bytes, 7 * 4096 + 1000);
  t.equal(a.unmap_operations - before.unmap_operations, 2);
  t.equal(a.unmap_bytes - before.unmap_bytes, 65536 + 4096);
  t.equal(a.flush_operations - before.flush_operations, 3);
  t.equal(a.wr_highest_offset, 1048576 + 131072, 'the furthest write ends at the write-zeroes');
  for (const k of ['failed_rd_operations', 'failed_wr_operations', 'failed_flush_operations', 'failed_unmap_operations']) t.equal(a[k], 0, k);
  t.ok(a.rd_total_time_ns > 0 && a.wr_total_time_ns > 0 && a.flush_total_time_ns > 0, 'time is counted');
  t.type(a.idle_time_ns, 'number', 'idle_time_ns once there was I/O');
  const f0 = await stats('f0');
  t.equal(f0.wr_bytes - 0, a.wr_bytes, 'raw passes every write byte to its file');
  t.equal(f0.unmap_bytes, a.unmap_bytes, 'and every discard');

  // nbdcopy: bulk bytes, however it splits them into requests.
  const src = path.join(dir, 'src.bin');
  fs.writeFileSync(src, patternBuffer(8 * MiB, 42));
  const b1 = await stats('r0');
  await runOk(t, 'nbdcopy', ['--flush', src, uri]);
  const b2 = await stats('r0');
  t.equal(b2.wr_bytes - b1.wr_bytes, 8 * MiB, 'nbdcopy wrote 8 MiB of random data: 8 MiB counted');
  t.ok(b2.wr_operations - b1.wr_operations >= 2, 'in several requests');
  t.ok(b2.flush_operations - b1.flush_operations >= 1, 'nbdcopy --flush flushes at the end');

  // fio: its own count of requests and bytes, from its JSON report.
  const f1 = await stats('r0');
  const fio = await runOk(t, 'fio', [
    '--name=m', '--ioengine=nbd', `--uri=${uri}`, '--rw=randrw', '--rwmixread=50', '--bs=4k', '--iodepth=8',
    '--size=4M', '--io_size=2M', '--randrepeat=1', '--output-format=json',
  ]);
  const job = (JSON.parse(fio.slice(fio.indexOf('{'))) as { jobs: Array<{ read: { io_bytes: number; total_ios: number }; write: { io_bytes: number; total_ios: number } }> }).jobs[0];
  const f2 = await stats('r0');
  t.ok(job.write.total_ios > 0 && job.read.total_ios > 0, 'fio did reads and writes');
  t.equal(f2.wr_operations - f1.wr_operations, job.write.total_ios, "writes: fio's count");
  t.equal(f2.wr_bytes - f1.wr_bytes, job.write.io_bytes, "write bytes: fio's count");
  t.equal(f2.rd_operations - f1.rd_operations, job.read.total_ios, "reads: fio's count");
  t.equal(f2.rd_bytes - f1.rd_bytes, job.read.io_bytes, "read bytes: fio's count");

  // qemu-io through the qcow2 export: the qcow2 node sees exactly the guest I/O; its file sees metadata too.
  // (Reads stay within written data: the NBD server answers holes from block status without reading.)
  const quri = `nbd+unix:///q0?socket=${path.join(dir, 'nbd.sock')}`;
  const q1 = await stats('q0');
  await runOk(t, 'qemu-io', ['-f', 'raw', '-c', 'write -P 1 0 256k', '-c', 'write -P 2 1M 64k', '-c', 'read 0 256k', '-c', 'read 1M 64k', quri]);
  const q2 = await stats('q0');
  t.equal(q2.wr_bytes - q1.wr_bytes, 256 * 1024 + 64 * 1024);
  t.equal(q2.rd_bytes - q1.rd_bytes, 320 * 1024);
  const all = (await w.ok('query-blockstats', { 'query-nodes': true })) as Stats[];
  const q0 = all.find((s) => s['node-name'] === 'q0')!;
  t.equal(q0.parent?.['node-name'], 'tf');
  t.ok((q0.parent!.stats.wr_bytes as number) >= q2.wr_bytes, 'the qcow2 file took the data and the metadata');
  t.equal(q0.backing, undefined, "node level: no 'backing' (as QEMU)");
});

t.test('a failed read is counted as failed, an unknown argument refused', async (t) => {
  const dir = tempDir(t);
  fs.writeFileSync(path.join(dir, 'd.raw'), Buffer.alloc(MiB));
  const qmpSock = path.join(dir, 'qmp.sock');
  await startDaemon(t, {
    dir,
    nbdServer: false,
    args: [
      '--blockdev', `{"driver":"blkdebug","node-name":"bd","image":{"driver":"file","node-name":"f1","filename":"${path.join(dir, 'd.raw')}"},"inject-error":[{"event":"read_aio","errno":5,"immediately":true}]}`,
      '--blockdev', 'driver=raw,node-name=r1,file=bd',
      '--qmp', `unix:${qmpSock}`, '--log-level', 'error',
    ],
  });
  const w = await QmpWire.connect(qmpSock);
  t.teardown(() => w.close());
  await w.ok('human-monitor-command', { 'command-line': 'qemu-io r1 "read 0 4096"' });
  const all = (await w.ok('query-blockstats', { 'query-nodes': true })) as Stats[];
  const r1 = all.find((s) => s['node-name'] === 'r1')!;
  t.equal(r1.stats.failed_rd_operations, 1, 'the read failed with EIO');
  t.equal(r1.stats.rd_operations, 0, 'and is not a successful read');
  const bad = await w.cmd('query-blockstats', { 'query-nodes': 'yes' });
  t.equal(bad.error?.desc, "Invalid parameter type for 'query-nodes', expected: boolean");
});
