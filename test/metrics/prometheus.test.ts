/**
 * --metrics: the Prometheus endpoint passes the real `promtool check
 * metrics`, its values are the work clients did (counted on their side), it
 * listens on a unix socket too, and refuses an address off this machine.
 */
import t from 'tap';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { nbdsh, requireTools, run, tempDir, VDISK } from '../helpers/tools.js';

const MiB = 1024 * 1024;

function get(target: { port?: number; socketPath?: string }, urlPath = '/metrics'): Promise<{ status: number; type: string; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', ...target, path: urlPath }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }));
    });
    req.on('error', reject);
  });
}

/** The value of one sample, by metric name and labels (all of them given). */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  const want = Object.entries(labels).map(([k, v]) => `${k}="${v}"`);
  for (const line of text.split('\n')) {
    if (line.startsWith('#')) continue;
    const m = /^([a-z_:]+)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = m[2] ? m[2].split(/,(?=[a-z_]+=")/) : [];
    if (have.length === want.length && want.every((w) => have.includes(w))) return Number(m[3]);
  }
  return undefined;
}

async function promtool(t: { equal(a: unknown, b: unknown, message: string): unknown }, text: string): Promise<void> {
  const r = await run('promtool', ['check', 'metrics'], { input: text });
  t.equal(r.code, 0, `promtool check metrics: ${r.stdout}${r.stderr}`);
  t.equal(r.stdout + r.stderr, '', 'no lint findings');
}

t.test('values are the clients\' work; promtool accepts the text', async (t) => {
  if (!requireTools(t, 'promtool', 'nbdsh')) return;
  const dir = tempDir(t);
  // Sparse: a read of an untouched range is a hole the NBD server answers without reading.
  fs.writeFileSync(path.join(dir, 'd.raw'), Buffer.alloc(0));
  fs.truncateSync(path.join(dir, 'd.raw'), 16 * MiB);
  const d = await startDaemon(t, {
    dir,
    args: [
      '--blockdev', `driver=file,node-name=f0,filename=${path.join(dir, 'd.raw')}`,
      '--blockdev', 'driver=raw,node-name=r0,file=f0',
      '--export', 'type=nbd,id=e0,node-name=r0,name=disk,writable=on',
      '--metrics', '127.0.0.1:0',
    ],
  });
  const out = await d.waitStdout(/metrics on 127\.0\.0\.1:\d+/);
  const port = Number(/metrics on 127\.0\.0\.1:(\d+)/.exec(out)![1]);

  const first = await get({ port });
  t.equal(first.status, 200);
  t.match(first.type, /^text\/plain; version=0\.0\.4/);
  await promtool(t, first.body);
  t.equal(sample(first.body, 'vdisk_export_clients', { export: 'e0', type: 'nbd' }), 0);

  const r = await nbdsh(
    [
      'for i in range(5): h.pwrite(b"\\x01" * 32768, i * 32768)',
      'for i in range(3): h.pread(512, 0)',
      'h.flush()',
      // A read of a hole (answered from block status), and a write past the end the server refuses.
      'h.pread(1048576, 8 * 1048576)',
      'h.set_strict_mode(0)',
      'try:\n    h.pwrite(b"\\x02" * 512, 16 * 1048576)\nexcept nbd.Error:\n    pass',
    ].join('\n'),
    d.uri('disk'),
  );
  t.equal(r.code, 0, r.stderr);
  const after = (await get({ port })).body;
  await promtool(t, after);
  // The export counts what the client asked, as it asked it; the node what reached it.
  const exp = { export: 'e0', type: 'nbd' };
  t.equal(sample(after, 'vdisk_export_bytes_total', { ...exp, op: 'write' }), 5 * 32768);
  t.equal(sample(after, 'vdisk_export_operations_total', { ...exp, op: 'write' }), 5);
  t.equal(sample(after, 'vdisk_export_bytes_total', { ...exp, op: 'read' }), 3 * 512 + MiB, 'the hole read counts on the export');
  t.equal(sample(after, 'vdisk_node_bytes_total', { node: 'r0', driver: 'raw', op: 'read' }), 3 * 512, 'but never reached the node');
  t.equal(sample(after, 'vdisk_export_operations_total', { ...exp, op: 'read' }), 4);
  t.equal(sample(after, 'vdisk_export_operations_total', { ...exp, op: 'flush' }), 1);
  t.equal(sample(after, 'vdisk_export_failed_operations_total', { ...exp, op: 'write' }), 0);
  t.equal(sample(after, 'vdisk_export_invalid_operations_total', { ...exp, op: 'write' }), 1, 'the write past the end, refused by the server');
  t.equal(sample(after, 'vdisk_node_invalid_operations_total', { node: 'r0', driver: 'raw', op: 'write' }), 0, 'which the node never saw');
  t.equal(sample(after, 'vdisk_export_request_duration_seconds_count', { ...exp, op: 'write' }), 5, 'one latency sample per write');
  t.equal(sample(after, 'vdisk_node_bytes_total', { node: 'f0', driver: 'file', op: 'write' }), 5 * 32768, 'the file node below took the same bytes');
  // The histogram counts every successful request once: +Inf bucket = _count = operations.
  const h = { node: 'r0', driver: 'raw', op: 'write' };
  t.equal(sample(after, 'vdisk_node_request_duration_seconds_bucket', { ...h, le: '+Inf' }), 5);
  t.equal(sample(after, 'vdisk_node_request_duration_seconds_count', h), 5);
  t.ok(sample(after, 'vdisk_node_request_duration_seconds_sum', h)! > 0);
  t.ok(sample(after, 'process_resident_memory_bytes', {})! > 10 * MiB, 'RSS is reported');
  t.equal(sample(after, 'vdisk_node_size_bytes', { node: 'r0', driver: 'raw' }), 16 * MiB);

  // A connected client shows in the gauge while it stays.
  const holder = spawn('nbdsh', ['-u', d.uri('disk'), '-c', 'import sys; sys.stdin.readline()'], { stdio: ['pipe', 'ignore', 'ignore'], env: { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` } });
  t.teardown(() => holder.kill('SIGKILL'));
  let clients = 0;
  for (let i = 0; i < 200 && clients !== 1; i++) {
    clients = sample((await get({ port })).body, 'vdisk_export_clients', { export: 'e0', type: 'nbd' }) ?? -1;
    if (clients !== 1) await new Promise((res) => setTimeout(res, 50));
  }
  t.equal(clients, 1, 'one client connected');
  holder.stdin.end('\n');
  await new Promise((res) => holder.once('exit', res));

  t.equal((await get({ port }, '/')).status, 404, 'only /metrics');
});

t.test('a unix socket, the config file key, and addresses refused', async (t) => {
  if (!requireTools(t, 'promtool')) return;
  const dir = tempDir(t);
  const sock = path.join(dir, 'metrics.sock');
  const config = path.join(dir, 'vdisk.json');
  fs.writeFileSync(config, JSON.stringify({ blockdev: [{ driver: 'null-co', 'node-name': 'n0', size: MiB }], metrics: `unix:${sock}` }));
  const d = await startDaemon(t, { dir, nbdServer: false, args: ['--config', config] });
  await d.waitStdout(/metrics on unix:/);
  const m = await get({ socketPath: sock });
  t.equal(m.status, 200);
  await promtool(t, m.body);
  t.equal(sample(m.body, 'vdisk_node_size_bytes', { node: 'n0', driver: 'null-co' }), MiB);
  t.equal(await d.stop(), 0);
  t.notOk(fs.existsSync(sock), 'the socket is removed at exit');

  for (const [addr, msg] of [
    ['0.0.0.0:9100', /--metrics: refusing to listen on 0\.0\.0\.0: the endpoint has no authentication/],
    ['192.0.2.1:9100', /refusing to listen on 192\.0\.2\.1/],
    ['9100', /--metrics: expected HOST:PORT \(loopback\) or unix:PATH, not '9100'/],
  ] as const) {
    const r = await run(process.execPath, [VDISK, 'serve', '--blockdev', 'driver=null-co,node-name=n0', '--metrics', addr], { cwd: dir, timeoutMs: 20_000 });
    t.not(r.code, 0, `${addr} refused`);
    t.match(r.stderr, msg);
  }
});

t.test('a FUSE export counts what the kernel asked (dd with O_DIRECT through the mount)', async (t) => {
  if (!requireTools(t, 'promtool', 'dd')) return;
  const dir = tempDir(t);
  const img = path.join(dir, 'f.raw');
  fs.writeFileSync(img, Buffer.alloc(0));
  fs.truncateSync(img, 8 * MiB);
  const mnt = path.join(dir, 'mnt');
  fs.writeFileSync(mnt, '');
  const d = await startDaemon(t, {
    dir,
    nbdServer: false,
    args: ['--blockdev', `driver=file,node-name=f0,filename=${img}`, '--export', `type=fuse,id=fx,node-name=f0,mountpoint=${mnt},writable=on`, '--metrics', '127.0.0.1:0'],
  });
  const out = await d.waitStdout(/metrics on 127\.0\.0\.1:\d+/);
  const port = Number(/metrics on 127\.0\.0\.1:(\d+)/.exec(out)![1]);
  // dd in its own process: the daemon serves the mount, so nothing here touches it synchronously.
  const w = await run('dd', ['if=/dev/zero', `of=${mnt}`, 'bs=64k', 'count=16', 'oflag=direct', 'conv=notrunc,fsync'], { timeoutMs: 60_000 });
  t.equal(w.code, 0, w.stderr);
  const r = await run('dd', [`if=${mnt}`, 'of=/dev/null', 'bs=64k', 'count=8', 'iflag=direct'], { timeoutMs: 60_000 });
  t.equal(r.code, 0, r.stderr);
  const text = (await get({ port })).body;
  await promtool(t, text);
  const exp = { export: 'fx', type: 'fuse' };
  t.equal(sample(text, 'vdisk_export_bytes_total', { ...exp, op: 'write' }), MiB, "1 MiB written through the mount, as dd wrote it");
  t.equal(sample(text, 'vdisk_export_bytes_total', { ...exp, op: 'read' }), MiB / 2, 'half of it read back');
  t.ok(sample(text, 'vdisk_export_operations_total', { ...exp, op: 'flush' })! >= 1, "dd's fsync reached the export as a flush");
  t.equal(await d.stop(), 0);
});
