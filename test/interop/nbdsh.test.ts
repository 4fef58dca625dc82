/**
 * The NBD protocol as libnbd (nbdsh) speaks it: structured replies, FUA,
 * DF, block status, zeroes, cache, many requests in flight, multi-conn flush
 * visibility, and requests libnbd only sends with its safety checks off.
 */
import t from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { startDaemon } from '../helpers/daemon.js';
import { nbdsh, requireTool, sparseFile, tempDir } from '../helpers/tools.js';

const MiB = 1024 * 1024;

async function serveFile(t: Tap.Test, size = 64 * MiB, extra: string[] = []) {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.img'), size);
  const d = await startDaemon(t, {
    dir,
    args: [
      '--blockdev', `driver=file,node-name=f0,filename=${img},discard=unmap`,
      '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on',
      '--export', 'type=nbd,id=e1,node-name=f0,name=ro',
      ...extra,
    ],
  });
  return { d, img, uri: d.uri('disk'), roUri: d.uri('ro') };
}

/** Runs a script and fails the test with its stderr when it fails. */
async function py(t: Tap.Test, script: string, uri?: string): Promise<string> {
  const r = await nbdsh(script, uri);
  t.equal(r.code, 0, `nbdsh script ran (stderr: ${r.stderr.trim().slice(-2000)})`);
  return r.stdout;
}

t.test('structured replies, flags advertised, reads and writes with patterns', async (t) => {
  requireTool(t, 'nbdsh');
  const { uri } = await serveFile(t);
  const out = await py(
    t,
    `
assert h.get_structured_replies_negotiated()
assert h.can_fua() and h.can_flush() and h.can_trim() and h.can_zero() and h.can_fast_zero()
assert h.can_cache() and h.can_multi_conn() and h.can_df() and not h.is_read_only()
assert h.get_size() == ${64 * MiB}
h.pwrite(b'\\xab' * 65536, 1048576)
assert h.pread(65536, 1048576) == b'\\xab' * 65536
h.pwrite(b'\\x11' * 4096, 0, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 0) == b'\\x11' * 4096
# DF: exactly one data chunk, even over holes and data
chunks = []
buf = h.pread_structured(2 * 1048576, 0, lambda b, o, s, e: chunks.append((o, len(b), s)) or 0, nbd.CMD_FLAG_DF)
assert chunks == [(0, 2 * 1048576, nbd.READ_DATA)], chunks
assert buf[:4096] == b'\\x11' * 4096 and buf[1048576:1048576+65536] == b'\\xab' * 65536
print('ok')
`,
    uri,
  );
  t.match(out, /ok/);
});

t.test('a large structured read over holes and data (hole chunks)', async (t) => {
  requireTool(t, 'nbdsh');
  const { uri } = await serveFile(t);
  const out = await py(
    t,
    `
h.pwrite(b'\\x22' * 65536, 4 * 1048576)
chunks = []
def cb(user_data, buf, offset, status, error):
    chunks.append((offset, len(buf), status))
    return 0
buf = bytearray(8 * 1048576)
data = h.pread_structured(8 * 1048576, 0, lambda b, o, s, e: cb(None, b, o, s, e))
assert data[4*1048576:4*1048576+65536] == b'\\x22' * 65536
assert data[:4*1048576] == bytes(4*1048576)
kinds = sorted(set(s for (_, _, s) in chunks))
assert nbd.READ_HOLE in kinds and nbd.READ_DATA in kinds, chunks
assert sum(l for (_, l, _) in chunks) == 8 * 1048576, chunks
print('ok', len(chunks))
`,
    uri,
  );
  t.match(out, /ok \d+/);
});

t.test('block status with base:allocation, REQ_ONE, after write, trim and zero', async (t) => {
  requireTool(t, 'nbdsh');
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'disk.img'), 16 * MiB);
  const d = await startDaemon(t, {
    dir,
    args: ['--blockdev', `driver=file,node-name=f0,filename=${img},discard=unmap`, '--export', 'type=nbd,id=e0,node-name=f0,name=disk,writable=on'],
  });
  const script = `
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(${JSON.stringify(d.uri('disk'))})
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
def extents(offset, length, flags=0):
    out = []
    def cb(metacontext, off, ents, err):
        assert metacontext == nbd.CONTEXT_BASE_ALLOCATION
        out.extend(zip(ents[0::2], ents[1::2]))
    h.block_status(length, offset, cb, flags)
    return out
e = extents(0, 16*1048576)
assert e == [(16*1048576, 3)], e
h.pwrite(b'\\x01' * 1048576, 2 * 1048576)
e = extents(0, 16*1048576)
assert e == [(2*1048576, 3), (1048576, 0), (13*1048576, 3)], e
e = extents(0, 16*1048576, nbd.CMD_FLAG_REQ_ONE)
assert e == [(2*1048576, 3)], e
h.trim(1048576, 2 * 1048576)
assert extents(2*1048576, 1048576) == [(1048576, 3)]
assert h.pread(1048576, 2*1048576) == bytes(1048576)
h.pwrite(b'\\x02' * 1048576, 4 * 1048576)
h.zero(1048576, 4 * 1048576)  # may punch: reads zero
assert h.pread(1048576, 4*1048576) == bytes(1048576)
assert extents(4*1048576, 1048576)[0][1] & 2, 'zeroed range reads as zero'
h.pwrite(b'\\x03' * 1048576, 6 * 1048576)
h.zero(1048576, 6 * 1048576, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(1048576, 6*1048576) == bytes(1048576)
h.zero(1048576, 8 * 1048576, nbd.CMD_FLAG_FAST_ZERO)
assert h.pread(1048576, 8*1048576) == bytes(1048576)
h.cache(1048576, 0)
h.flush()
print('ok')
`;
  const out = await py(t, script);
  t.match(out, /ok/);
  // Zero with NO_HOLE must leave the range allocated in the file; the hole-punching zero must not.
  t.ok(fs.statSync(img).blocks * 512 < 4 * MiB, 'the image stays sparse');
});

t.test('simple replies when structured replies are not requested', async (t) => {
  requireTool(t, 'nbdsh');
  const { uri } = await serveFile(t);
  const out = await py(
    t,
    `
h.set_request_structured_replies(False)
h.connect_uri(${JSON.stringify(uri)})
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
h.pwrite(b'\\x5a' * 131072, 65536)
assert h.pread(131072, 65536) == b'\\x5a' * 131072
assert h.pread(65536, 1048576) == bytes(65536)
print('ok')
`,
  );
  t.match(out, /ok/);
});

t.test('many requests in flight on one connection, completed out of order', async (t) => {
  requireTool(t, 'nbdsh');
  const { uri } = await serveFile(t);
  const out = await py(
    t,
    `
import random
random.seed(7)
N = 64
blocks = random.sample(range(0, 4096), N)
cookies = []
for i, b in enumerate(blocks):
    cookies.append(h.aio_pwrite(bytes([i + 1]) * 4096, b * 4096))
while h.aio_in_flight() > 0:
    h.poll(-1)
for c in cookies:
    assert h.aio_command_completed(c)
bufs = []
for b in blocks:
    buf = nbd.Buffer(4096)
    bufs.append((buf, h.aio_pread(buf, b * 4096)))
while h.aio_in_flight() > 0:
    h.poll(-1)
for i, (buf, c) in enumerate(bufs):
    assert h.aio_command_completed(c)
    assert buf.to_bytearray() == bytes([i + 1]) * 4096, i
print('ok')
`,
    uri,
  );
  t.match(out, /ok/);
});

t.test('multi-conn: a write on one connection, flush on another, read on a third', async (t) => {
  requireTool(t, 'nbdsh');
  const { uri } = await serveFile(t);
  const out = await py(
    t,
    `
u = ${JSON.stringify(uri)}
a = nbd.NBD(); a.connect_uri(u)
b = nbd.NBD(); b.connect_uri(u)
c = nbd.NBD(); c.connect_uri(u)
assert a.can_multi_conn() and b.can_multi_conn()
a.pwrite(b'\\x77' * 65536, 8 * 1048576)
b.flush()
assert c.pread(65536, 8 * 1048576) == b'\\x77' * 65536
for x in (a, b, c):
    x.shutdown()
print('ok')
`,
  );
  t.match(out, /ok/);
});

t.test('a read-only export refuses writes with EPERM and keeps serving', async (t) => {
  requireTool(t, 'nbdsh');
  const { roUri } = await serveFile(t);
  const out = await py(
    t,
    `
assert h.is_read_only()
assert not h.can_trim() and not h.can_zero()
h.set_strict_mode(0)
for op in (lambda: h.pwrite(b'x' * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):
    try:
        op()
        raise AssertionError('write-like request succeeded on a read-only export')
    except nbd.Error as e:
        assert e.errno == 'EPERM', e
assert h.pread(512, 0) == bytes(512)
print('ok')
`,
    roUri,
  );
  t.match(out, /ok/);
});

t.test('requests libnbd refuses to send unless told to: the server answers each with the right error', async (t) => {
  requireTool(t, 'nbdsh');
  const { uri } = await serveFile(t, 1 * MiB);
  const out = await py(
    t,
    `
h.set_strict_mode(0)
size = h.get_size()
def err(f):
    try:
        f()
    except nbd.Error as e:
        return e.errno
    return None
assert err(lambda: h.pread(4096, size - 1024)) == 'EINVAL'
assert err(lambda: h.pwrite(b'x' * 4096, size - 1024)) == 'ENOSPC'
assert err(lambda: h.zero(4096, size)) == 'ENOSPC'
assert err(lambda: h.trim(4096, size)) == 'EINVAL'
assert err(lambda: h.pread(512, 0, 0x80)) == 'EINVAL'            # unknown flag
assert err(lambda: h.pwrite(b'x' * 512, 0, nbd.CMD_FLAG_NO_HOLE)) == 'EINVAL'  # flag not for WRITE
assert err(lambda: h.pread(512, 0, nbd.CMD_FLAG_REQ_ONE)) == 'EINVAL'
assert err(lambda: h.pread(33 * 1048576, 0)) in ('EINVAL', 'ERANGE')
# block status without a negotiated context
assert err(lambda: h.block_status(512, 0, lambda *a: 0)) == 'EINVAL'
# after all that, the connection still works
h.pwrite(b'\\x42' * 512, 512)
assert h.pread(512, 512) == b'\\x42' * 512
print('ok')
`,
    uri,
  );
  t.match(out, /ok/);
});
