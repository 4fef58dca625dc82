/**
 * Listener options of QEMU's SocketAddress that vdisk used to accept and
 * ignore: keep-alive=on on an inet address (the kernel then probes idle
 * clients: `ss -o` shows a keepalive timer on the accepted connection) and
 * abstract=on on a unix address (Linux's abstract namespace: no file, `ss -xl`
 * shows @NAME, and qemu-img reaches it with server.abstract=on,tight=off).
 * Node binds abstract names padded to the whole sun_path, which is QEMU's
 * tight=off; tight=on (QEMU's default) is refused with a clear error instead
 * of being bound under a name no tight=on client finds. vdisk's own nbd
 * driver connects to an abstract socket too.
 */
import t from 'tap';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { VDISK, requireTool, run, sparseFile, tempDir } from '../helpers/tools.js';

t.before(() => {
  for (const tool of ['qemu-img', 'qemu-io', 'ss']) requireTool(t, tool);
});

const MiB = 1024 * 1024;

t.test('keep-alive=on: accepted connections have SO_KEEPALIVE; without it they do not', async (t) => {
  for (const keepAlive of [true, false]) {
    const dir = tempDir(t);
    const img = path.join(dir, 'disk.raw');
    sparseFile(img, 4 * MiB);
    // Port 0: the kernel picks a free one; the log line names it.
    const d = await startDaemon(t, {
      dir,
      nbdServer: false,
      args: ['--nbd-server', `addr.type=inet,addr.host=127.0.0.1,addr.port=0${keepAlive ? ',addr.keep-alive=on' : ''}`, '--blockdev', `driver=file,node-name=f0,filename=${img}`, '--export', 'type=nbd,id=e0,node-name=f0,name=disk'],
    });
    const m = /"address":"tcp:127\.0\.0\.1:(\d+)"/.exec(d.stderr()) ?? /nbd:\/\/127\.0\.0\.1:(\d+)/.exec(d.stdout());
    t.ok(m, 'the daemon says which port it bound', { stdout: d.stdout(), stderr: d.stderr() });
    const port = Number(m![1]);
    const client = net.connect({ host: '127.0.0.1', port });
    await new Promise((r) => client.once('data', r)); // the server's greeting: accepted
    const ss = await run('ss', ['-tnoH', 'state', 'established', `( sport = :${port} )`]);
    t.equal(ss.code, 0, ss.stderr);
    t.match(ss.stdout, new RegExp(`127\\.0\\.0\\.1:${port}`), 'ss lists the accepted connection');
    if (keepAlive) t.match(ss.stdout, /timer:\(keepalive,/, 'keep-alive=on: the server side has a keepalive timer');
    else t.notMatch(ss.stdout, /keepalive/, 'by default: no keepalive timer');
    client.destroy();
    t.equal(await d.stop(), 0);
  }
});

t.test('abstract=on,tight=off: no file, qemu-img and qemu-io reach it with server.abstract=on,tight=off, and so does the nbd driver', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'disk.raw');
  sparseFile(img, 4 * MiB);
  const name = `vdisk-test-${crypto.randomBytes(6).toString('hex')}`;
  const d = await startDaemon(t, {
    dir,
    nbdServer: false,
    args: ['--nbd-server', `addr.type=unix,addr.path=${name},addr.abstract=on,addr.tight=off`, '--blockdev', `driver=file,node-name=f0,filename=${img}`, '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on'],
  });
  t.notOk(fs.existsSync(name) || fs.existsSync(path.join(dir, name)), 'no socket file is made');
  t.match(d.stderr(), `"address":"unix:@${name}"`, 'the log names the abstract address');
  const ss = await run('ss', ['-xlH']);
  t.match(ss.stdout, `@${name}`, 'ss -xl lists @NAME');
  const opts = `driver=nbd,server.type=unix,server.path=${name},server.abstract=on,server.tight=off,export=disk`;
  const w = await run('qemu-io', ['--image-opts', '-c', 'write -P 0x3c 1M 64k', opts]);
  t.equal(w.code, 0, `qemu-io writes through it: ${w.stderr}`);
  const info = await run('qemu-img', ['info', '--output=json', '--image-opts', opts]);
  t.equal(info.code, 0, info.stderr);
  t.equal(JSON.parse(info.stdout)['virtual-size'], 4 * MiB, 'qemu-img info sees the export');
  // vdisk's own nbd driver: a second daemon opens the export through the abstract socket and serves it again.
  const dir2 = tempDir(t);
  const d2 = await startDaemon(t, {
    dir: dir2,
    args: ['--blockdev', `driver=nbd,node-name=n0,server.type=unix,server.path=${name},server.abstract=on,server.tight=off,export=disk`, '--export', 'type=nbd,id=e1,node-name=n0,name=again'],
  });
  const r = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x3c 1M 64k', d2.uri('again')]);
  t.equal(r.code, 0, r.stderr);
  t.notMatch(r.stdout, /fail/i, `vdisk's nbd driver reads the data back through the abstract socket: ${r.stdout.trim().split('\n')[0]}`);
  t.equal(await d2.stop(), 0);
  t.equal(await d.stop(), 0, 'a clean stop');
  const after = await run('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0x3c 1M 64k', img]);
  t.notMatch(after.stdout, /fail/i, 'the data is in the image');
});

t.test('abstract=on with tight=on (QEMU\'s default) is refused at start, saying why', async (t) => {
  const dir = tempDir(t);
  for (const tight of ['', ',addr.tight=on']) {
    const r = await run(process.execPath, [VDISK, 'serve', '--nbd-server', `addr.type=unix,addr.path=x,addr.abstract=on${tight}`], { cwd: dir, timeoutMs: 20_000 });
    t.not(r.code, 0, `abstract=on${tight}: the daemon does not start`);
    t.match(r.stderr, /abstract unix sockets need tight=off in vdisk/, r.stderr.trim().split('\n').pop());
  }
  t.notOk(fs.existsSync(path.join(dir, 'x')));
});
