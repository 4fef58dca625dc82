/**
 * The block graph (src/block/graph.ts): blockdev-add options as JSON and as
 * keyval strings, QEMU's error texts, node names, children and who uses whom,
 * deletion, and what is left after a failed add or closeAll.
 */
import t, { type Test } from 'tap';
import fs from 'node:fs';
import path from 'node:path';
import { BlockGraph, checkNodeName } from '../../src/block/graph.js';
import { BlockNode, Status } from '../../src/block/node.js';
import { DRIVERS, type DriverDef } from '../../src/block/drivers/index.js';
import { FileNode } from '../../src/block/drivers/file.js';
import { NullNode } from '../../src/block/drivers/null-co.js';
import { parseKeyval } from '../../src/qapi/keyval.js';
import { int } from '../../src/qapi/schema.js';
import { VdiskError } from '../../src/errors.js';
import { setLogLevel } from '../../src/log.js';
import { patternBuffer, sparseFile, tempDir } from '../helpers/tools.js';

setLogLevel('error');

const MiB = 1024 * 1024;

/** Rejects with exactly this message (a string) or a message matching a pattern. */
async function refuses(t: Test, p: Promise<unknown>, message: string | RegExp, errno?: string, what?: string): Promise<void> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  if (!(err instanceof VdiskError)) {
    t.fail(`${what ?? String(message)}: expected a VdiskError, got ${err === undefined ? 'success' : String(err)}`);
    return;
  }
  if (typeof message === 'string') t.equal(err.message, message, what ?? message);
  else t.match(err.message, message, what ?? String(message));
  if (errno) t.equal(err.errno, errno, `errno ${errno}`);
}

function graph(t: Test): BlockGraph {
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  return g;
}

/** True if a writable FileNode can be opened on the file now (nobody else holds a lock). */
async function writableNow(file: string): Promise<boolean> {
  try {
    const n = await FileNode.open({ nodeName: 'probe', filename: file });
    await n.close();
    return true;
  } catch {
    return false;
  }
}

t.test('JSON options: file, raw over file, null-co, with their values', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), 4 * MiB);
  const g = graph(t);
  const f = await g.add({ driver: 'file', 'node-name': 'f0', filename: img, 'read-only': true, locking: 'off' });
  t.equal(f.driverName, 'file');
  t.equal(f.nodeName, 'f0');
  t.equal(f.size, 4 * MiB);
  t.equal(f.readOnly, true);
  t.equal(f.filename, img);
  const r = await g.add({ driver: 'raw', 'node-name': 'r0', file: 'f0', offset: MiB, size: 2 * MiB });
  t.equal(r.driverName, 'raw');
  t.equal(r.size, 2 * MiB);
  t.equal(r.readOnly, true, 'raw over a read-only child is read-only');
  t.equal(r.child('file'), f, 'the child is the named node itself');
  t.equal(r.filename, img, 'a format node shows its file name');
  const n = await g.add({ driver: 'null-co', 'node-name': 'n0', size: 8192, 'detect-zeroes': 'on' });
  t.equal(n.driverName, 'null-co');
  t.equal(n.size, 8192);
  t.equal(n.detectZeroes, 'on');
  t.equal(n.readOnly, false);
  const d = await g.add({ driver: 'null-co', 'node-name': 'n1' });
  t.equal(d.size, 1 << 30, 'null-co is 1 GiB unless told');
  t.same(
    g.list().map((x) => x.nodeName),
    ['n1', 'n0', 'r0', 'f0'],
    'newest first',
  );
  t.equal(g.find('r0'), r);
  t.equal(g.get('nope'), undefined);
  t.equal(g.isMonitorOwned('f0'), true);
});

t.test('keyval strings through parseKeyval and add(opts, "keyval")', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'odd,name.img');
  fs.writeFileSync(img, patternBuffer(MiB, 11));
  const g = graph(t);
  const n = await g.add(parseKeyval('driver=null-co,node-name=k0,size=67108864,read-only=on', '--blockdev'), 'keyval');
  t.equal(n.size, 64 * MiB, 'the size string became a number');
  t.equal(n.readOnly, true, "'on' became true");
  const r = await g.add(
    parseKeyval(`driver=raw,node-name=k1,offset=4096,size=8192,detect-zeroes=unmap,discard=unmap,file.driver=file,file.filename=${img.replace(/,/g, ',,')},file.locking=off`, '--blockdev'),
    'keyval',
  );
  t.equal(r.size, 8192);
  t.equal(r.detectZeroes, 'unmap');
  t.equal(r.child('file')?.filename, img, "',,' in the file name is a comma");
  t.match(r.child('file')?.nodeName, /^#block\d+$/);
  const b = Buffer.alloc(512);
  await r.read(0, b);
  t.ok(b.equals(patternBuffer(MiB, 11).subarray(4096, 4608)), 'reads come from offset 4096 of the file');
  const ref = await g.add(parseKeyval('driver=raw,node-name=k2,file=k1,read-only=on', '--blockdev'), 'keyval');
  t.equal(ref.child('file'), r, 'file=k1 is a reference to the node k1');
  const c = await g.add(parseKeyval(`driver=file,node-name=k3,filename=${img.replace(/,/g, ',,')},cache.direct=on,read-only=yes,locking=off`, 'x'), 'keyval');
  t.equal(c.limits.requestAlignment, 4096, 'cache.direct=on took effect (O_DIRECT alignment)');
  t.equal(c.readOnly, true, "'yes' is true");

  await refuses(t, g.add(parseKeyval('driver=null-co,node-name=k9,read-only=maybe', 'x'), 'keyval'), "Parameter 'read-only' expects 'on' or 'off'", 'EINVAL');
  await refuses(t, g.add(parseKeyval('driver=null-co,node-name=k9,cache.direct=maybe', 'x'), 'keyval'), "Parameter 'cache.direct' expects 'on' or 'off'");
  await refuses(t, g.add(parseKeyval('driver=null-co,node-name=k9,foo=1', 'x'), 'keyval'), "Parameter 'foo' is unexpected");
  await refuses(t, g.add(parseKeyval('driver=nope,node-name=k9', 'x'), 'keyval'), "Parameter 'driver' does not accept value 'nope'");
  await refuses(t, g.add(parseKeyval('driver=raw,node-name=k9,file.driver=file', 'x'), 'keyval'), "Parameter 'file.filename' is missing");
  await refuses(t, g.add(parseKeyval('driver=raw,node-name=k9', 'x'), 'keyval'), "Parameter 'file' is missing");
  await refuses(t, g.add(parseKeyval('driver=raw,node-name=k9,file=nope', 'x'), 'keyval'), "Cannot find device='nope' nor node-name='nope'");
  await refuses(t, g.add(parseKeyval('driver=null-co,node-name=k9,size=-5x', 'x'), 'keyval'), /^Parameter 'size' expects /);
  await refuses(t, g.add(parseKeyval('driver=null-co,node-name=k9,detect-zeroes=sometimes', 'x'), 'keyval'), "Parameter 'detect-zeroes' does not accept value 'sometimes'");
  t.equal(g.get('k9'), undefined);
  t.equal(g.list().length, 5, 'k0, k1 and its file child, k2, k3');
});

t.test("QEMU's messages for bad options, and nothing half-made", async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), MiB);
  const g = graph(t);
  await refuses(t, g.add({ driver: 'file', 'node-name': 'x' }), "Parameter 'filename' is missing", 'EINVAL');
  await refuses(t, g.add({ driver: 'raw', 'node-name': 'x', file: { driver: 'file' } }), "Parameter 'file.filename' is missing");
  await refuses(t, g.add({ driver: 'raw', 'node-name': 'x', file: { driver: 'raw', file: { driver: 'file' } } }), "Parameter 'file.file.filename' is missing", undefined, 'two levels deep');
  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'x', foo: 1 }), "Parameter 'foo' is unexpected");
  await refuses(t, g.add({ driver: 'raw', 'node-name': 'x', file: { driver: 'file', filename: img, bar: true } }), "Parameter 'file.bar' is unexpected");
  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'x', filename: img }), "Parameter 'filename' is unexpected", undefined, "another driver's member");
  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'x', size: '1G' }), "Invalid parameter type for 'size', expected: integer");
  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'x', size: 1.5 }), "Invalid parameter type for 'size', expected: integer");
  await refuses(t, g.add({ driver: 'file', 'node-name': 'x', filename: 5 }), "Invalid parameter type for 'filename', expected: string");
  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'x', 'read-only': 'yes' }), "Invalid parameter type for 'read-only', expected: boolean", undefined, 'JSON does not take keyval words');
  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'x', cache: true }), "Invalid parameter type for 'cache', expected: object");
  await refuses(t, g.add({ driver: 'x' }), "Parameter 'driver' does not accept value 'x'");
  await refuses(t, g.add({ driver: 5, 'node-name': 'x' }), "Invalid parameter type for 'driver', expected: string");
  await refuses(t, g.add({ 'node-name': 'x' }), "Parameter 'driver' is missing");
  await refuses(t, g.add({ driver: 'file', 'node-name': 'x', filename: img, locking: 'maybe' }), "Parameter 'locking' does not accept value 'maybe'");
  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'x', discard: 'sometimes' }), "Parameter 'discard' does not accept value 'sometimes'");
  await refuses(t, g.add({ driver: 'raw', 'node-name': 'x', file: 7 }), "Invalid parameter type for 'file', expected: BlockdevRef");
  await refuses(t, g.add({ driver: 'null-co' }), "'node-name' must be specified for the root node");
  await refuses(
    t,
    g.add({ driver: 'null-co', 'node-name': 'x', 'detect-zeroes': 'unmap' }),
    'setting detect-zeroes to unmap is not allowed without setting discard operation to unmap',
  );
  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'x', 'force-share': true }), 'force-share=on can only be used with read-only images');
  await refuses(t, g.add({ driver: 'file', 'node-name': 'x', filename: path.join(dir, 'missing.img') }), `Could not open '${path.join(dir, 'missing.img')}': No such file or directory`, 'ENOENT');
  await refuses(t, g.add({ driver: 'file', 'node-name': 'x', filename: dir, 'read-only': true }), `'${dir}' is not a regular file or block device`, 'EINVAL');
  await refuses(t, g.add({ driver: 'file', 'node-name': 'x', filename: dir }), new RegExp(`^Could not open '${dir}': .*directory`, 'i'), undefined, 'a directory cannot be opened for writing');
  t.same(g.list(), [], 'no failed add left a node');
  t.ok(await writableNow(img), 'and no failed add left the image open or locked');
});

t.test('node names: QEMU syntax, length, duplicates', async (t) => {
  const g = graph(t);
  for (const bad of ['1abc', '_a', '-a', '.a', 'a b', 'a/b', 'a:b', 'a,b', '#block1', 'ä', '']) {
    await refuses(t, g.add({ driver: 'null-co', 'node-name': bad, size: 4096 }), `Invalid node-name: '${bad}'`, 'EINVAL', `'${bad}' is refused`);
  }
  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'a'.repeat(32), size: 4096 }), 'Node name too long');
  for (const good of ['a', 'Z9', 'a-b.c_d', 'a'.repeat(31)]) {
    const n = await g.add({ driver: 'null-co', 'node-name': good, size: 4096 });
    t.equal(n.nodeName, good, `'${good}' is a valid name`);
  }
  t.throws(() => checkNodeName('x y'), { message: "Invalid node-name: 'x y'" });
  t.doesNotThrow(() => checkNodeName('xy'));

  await refuses(t, g.add({ driver: 'null-co', 'node-name': 'a', size: 4096 }), "Duplicate nodes with node-name='a'", 'EEXIST');
  t.equal(g.find('a').size, 4096, 'the first node is untouched');
  await refuses(t, g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'null-co', 'node-name': 'a' } }), "Duplicate nodes with node-name='a'", 'EEXIST', 'an inline child may not take a used name');
  t.equal(g.get('r'), undefined);
  t.equal(g.list().length, 4, 'the failed adds left nothing');
});

t.test('an inline child may not take the name its own parent is being added under', async (t) => {
  // QEMU assigns the parent's name before opening its children, so:
  // qemu-img info 'json:{"driver":"raw","node-name":"x","file":{"driver":"file","node-name":"x",...}}'
  //   -> Duplicate nodes with node-name='x'
  const img = sparseFile(path.join(tempDir(t), 'a.img'), MiB);
  const g = graph(t);
  await refuses(t, g.add({ driver: 'raw', 'node-name': 'x', file: { driver: 'file', 'node-name': 'x', filename: img } }), "Duplicate nodes with node-name='x'", 'EEXIST');
  t.same(
    g.list().map((n) => n.nodeName),
    [],
    'no node was added',
  );
  await g.closeAll();
  t.ok(await writableNow(img), 'the file child was closed (its lock released)');
});

t.test('children: references, inline children with automatic names, deletion', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), MiB);
  const g = graph(t);
  const raw = await g.add({ driver: 'raw', 'node-name': 'r0', file: { driver: 'file', filename: img } });
  const names = g.list().map((n) => n.nodeName);
  t.equal(names.length, 2);
  t.equal(names[0], 'r0', 'newest first: the parent');
  t.match(names[1], /^#block\d+$/, 'the inline child got an automatic #block name');
  t.equal(raw.child('file')?.nodeName, names[1]);
  t.equal(g.isMonitorOwned(names[1]), false, 'an inline child is not owned by the monitor');
  const users = [...g.get(names[1])!.users].map((u) => u.userDescription);
  t.same(users, ["node 'r0' (as file)"], 'the child knows its user');
  await refuses(t, g.delete(names[1]), `Node ${names[1]} is not owned by the monitor`, 'EPERM');
  t.equal(await writableNow(img), false, 'the image is held open and locked');
  await g.delete('r0');
  t.same(g.list(), [], 'deleting the parent removed its inline child');
  t.equal(raw.isClosed, true);
  t.equal(raw.child('file')?.isClosed, true, 'and closed it');
  t.ok(await writableNow(img), 'its lock is gone');

  // A second inline child gets another name.
  const a = await g.add({ driver: 'raw', 'node-name': 'a', file: { driver: 'null-co', size: 4096 } });
  const b = await g.add({ driver: 'raw', 'node-name': 'b', file: { driver: 'null-co', size: 4096 } });
  t.not(a.child('file')?.nodeName, b.child('file')?.nodeName, 'automatic names are unique');
  // An inline child with a name of its own: reachable by name, still goes with its parent.
  const c = await g.add({ driver: 'raw', 'node-name': 'c', file: { driver: 'null-co', 'node-name': 'c-file', size: 4096 } });
  t.equal(g.find('c-file'), c.child('file'));
  await refuses(t, g.delete('c-file'), 'Node c-file is not owned by the monitor');
  await g.delete('c');
  t.equal(g.get('c-file'), undefined, 'a named inline child goes with its parent too');
});

t.test('a node in use by a parent cannot be deleted', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), MiB);
  const g = graph(t);
  const f = await g.add({ driver: 'file', 'node-name': 'f0', filename: img });
  await g.add({ driver: 'raw', 'node-name': 'r1', file: 'f0' });
  await g.add({ driver: 'raw', 'node-name': 'r2', file: 'f0', offset: 4096 });
  const err = await g.delete('f0').catch((e) => e);
  t.type(err, VdiskError);
  t.equal(err.message, "Node f0 is in use by node 'r1' (as file), node 'r2' (as file)");
  t.equal(err.errno, 'EBUSY');
  t.equal(err.code, 'VDISK_NODE_IN_USE');
  t.equal(f.isClosed, false, 'a refused delete leaves the node open');
  await f.write(0, Buffer.alloc(512, 1));
  await g.delete('r1');
  await refuses(t, g.delete('f0'), "Node f0 is in use by node 'r2' (as file)", 'EBUSY');
  await g.delete('r2');
  t.equal(g.get('f0'), f, 'a monitor-owned child stays when its parents go');
  t.equal(f.isClosed, false);
  t.equal(f.users.size, 0, 'and has no users left');
  await g.delete('f0');
  t.equal(f.isClosed, true);
  await refuses(t, g.delete('f0'), "Failed to find node with node-name='f0'", 'ENOENT');
  t.throws(() => g.find('f0'), { message: "Cannot find device='' nor node-name='f0'", errno: 'ENOENT' });
});

t.test('a failed add leaves no node behind and closes what it opened', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), MiB);
  const g = graph(t);
  // The file child opens, then raw refuses its window.
  await refuses(
    t,
    g.add({ driver: 'raw', 'node-name': 'r', offset: 2 * MiB, file: { driver: 'file', filename: img } }),
    `Offset (${2 * MiB}) cannot be greater than size of the containing file (${MiB})`,
    'EINVAL',
  );
  t.same(g.list(), []);
  t.ok(await writableNow(img), 'the inline file node that was opened is closed again');
  // Two levels of inline children, the innermost fails.
  await refuses(
    t,
    g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'raw', file: { driver: 'file', filename: path.join(dir, 'nope.img') } } }),
    /Could not open '.*nope\.img': No such file or directory/,
  );
  t.same(g.list(), []);
  // A failing add does not touch an existing node it referenced.
  const f = await g.add({ driver: 'file', 'node-name': 'f', filename: img });
  await refuses(t, g.add({ driver: 'raw', 'node-name': 'r', file: 'f', size: 1000 }), 'Specified size is not multiple of 512');
  t.equal(f.isClosed, false);
  t.equal(f.users.size, 0, 'no user was recorded for the failed parent');
  await g.delete('f');
  // A driver that throws after its child opened.
  const g2 = new BlockGraph([
    ...DRIVERS,
    {
      name: 'broken',
      members: { file: { kind: 'any' } },
      async open(o, { openChild }) {
        await openChild(o.file, 'file');
        throw new VdiskError('EIO', 'broken driver');
      },
    } as DriverDef,
  ]);
  t.teardown(() => g2.closeAll());
  await refuses(t, g2.add({ driver: 'broken', 'node-name': 'b', file: { driver: 'file', filename: img } }), 'broken driver', 'EIO');
  t.same(g2.list(), []);
  t.ok(await writableNow(img), 'the child opened for a driver that failed was closed');
});

t.test('read-only, discard and cache are inherited by inline children; a child may say otherwise', async (t) => {
  const dir = tempDir(t);
  const img = path.join(dir, 'a.img');
  fs.writeFileSync(img, patternBuffer(MiB, 2));
  const g = graph(t);
  const raw = await g.add({ driver: 'raw', 'node-name': 'r0', 'read-only': true, file: { driver: 'file', filename: img } });
  t.equal(raw.readOnly, true);
  t.equal(raw.child('file')?.readOnly, true, 'the inline file child is read-only too');
  await refuses(t, raw.write(0, Buffer.alloc(512)), /read-only/, 'EROFS');
  await g.delete('r0');

  const d = await g.add({ driver: 'raw', 'node-name': 'r1', cache: { direct: true }, discard: 'unmap', file: { driver: 'file', filename: img } });
  t.equal(d.child('file')?.limits.requestAlignment, 4096, 'cache.direct reached the child');
  const before = fs.statSync(img).blocks;
  await d.discard(0, 256 * 1024);
  t.ok(fs.statSync(img).blocks < before, 'discard=unmap reached the child (a hole was punched)');
  t.equal(d.limits.requestAlignment, 4096, "raw takes its child's alignment");
  await g.delete('r1');

  const e = await g.add({ driver: 'raw', 'node-name': 'r2', discard: 'unmap', file: { driver: 'file', filename: img, discard: 'ignore' } });
  const now = fs.statSync(img).blocks;
  await e.discard(512 * 1024, 256 * 1024);
  t.equal(fs.statSync(img).blocks, now, "the child's own discard=ignore wins");
});

t.test('closeAll flushes and closes every node, parents first, and empties the graph', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), MiB);
  const order: string[] = [];
  class Probe extends BlockNode {
    readonly driverName = 'probe';
    constructor(name: string, child?: BlockNode) {
      super({ nodeName: name });
      this.length = 4096;
      if (child) this.children.push({ role: 'file', node: child });
    }
    protected override async doRead(_o: number, b: Buffer): Promise<void> {
      b.fill(0);
    }
    protected override async doFlush(): Promise<void> {
      order.push(`flush ${this.nodeName}`);
    }
    protected override async doClose(): Promise<void> {
      order.push(`close ${this.nodeName}`);
    }
  }
  const g = new BlockGraph();
  const f = await g.add({ driver: 'file', 'node-name': 'f', filename: img });
  const r = await g.add({ driver: 'raw', 'node-name': 'r', file: 'f' });
  const lo = g.insert(new Probe('lo'));
  const hi = g.insert(new Probe('hi', lo));
  const ro = await g.add({ driver: 'null-co', 'node-name': 'ro', 'read-only': true, size: 4096 });
  await f.write(0, Buffer.alloc(4096, 5));
  await g.closeAll();
  for (const n of [f, r, lo, hi, ro]) t.equal(n.isClosed, true, `${n.nodeName} is closed`);
  t.same(g.list(), [], 'the graph is empty');
  t.equal(g.get('f'), undefined);
  t.ok(await writableNow(img), 'the file lock is released');
  t.ok(fs.readFileSync(img).subarray(0, 4096).equals(Buffer.alloc(4096, 5)), 'the data is in the file');
  t.same(order.slice(-2), ['close hi', 'close lo'], 'the parent is closed before its child');
  t.ok(order.indexOf('flush hi') >= 0 && order.indexOf('flush hi') < order.indexOf('close hi'), 'flushed before closing');
  await g.closeAll();
  t.pass('closeAll twice is harmless');
  // Names are free again.
  const again = await g.add({ driver: 'file', 'node-name': 'f', filename: img });
  t.equal(again.isClosed, false);
  await g.closeAll();
});

t.test('insert: a node object of the caller, checked like any other', async (t) => {
  const g = graph(t);
  const mine = g.insert(new NullNode({ nodeName: 'mine', size: 4096 }));
  t.equal(g.find('mine'), mine);
  t.equal(g.isMonitorOwned('mine'), true);
  t.throws(() => g.insert(new NullNode({ nodeName: 'mine' })), { message: "Duplicate nodes with node-name='mine'", errno: 'EEXIST' });
  t.throws(() => g.insert(new NullNode({ nodeName: 'bad name' })), { message: "Invalid node-name: 'bad name'" });
  const stray = new NullNode({ nodeName: 'stray', size: 4096 });
  class Parent extends BlockNode {
    readonly driverName = 'parent';
    constructor(name: string, child: BlockNode) {
      super({ nodeName: name });
      this.length = child.size;
      this.children.push({ role: 'file', node: child });
    }
    protected override doRead(o: number, b: Buffer): Promise<void> {
      return this.children[0].node.read(o, b);
    }
  }
  t.throws(() => g.insert(new Parent('p0', stray)), { message: "node 'p0' has child 'stray' that is not in the graph" });
  t.equal(g.get('p0'), undefined);
  const p = g.insert(new Parent('p1', mine));
  t.same([...mine.users].map((u) => u.userDescription), ["node 'p1' (as file)"]);
  await refuses(t, g.delete('mine'), "Node mine is in use by node 'p1' (as file)", 'EBUSY');
  await g.delete('p1');
  t.equal(p.isClosed, true);
  t.equal(mine.users.size, 0);
  t.equal(g.get('mine'), mine, 'an inserted child is monitor-owned and stays');
  // A node added by name can be used as a child by blockdev-add options.
  const r = await g.add({ driver: 'raw', 'node-name': 'r', file: 'mine' });
  t.equal(r.child('file'), mine);
  const s = await r.blockStatus(0, 4096);
  t.equal(s.flags, Status.ZERO | Status.ALLOCATED);
});

t.test('registerDriver: a library user adds a node type', async (t) => {
  class Pattern extends BlockNode {
    readonly driverName = 'pattern';
    constructor(name: string, size: number, private readonly byte: number) {
      super({ nodeName: name, readOnly: true });
      this.length = size;
    }
    protected override async doRead(_o: number, b: Buffer): Promise<void> {
      b.fill(this.byte);
    }
  }
  const g = graph(t);
  g.registerDriver({
    name: 'pattern',
    members: { size: int('int'), '*byte': int('uint8') },
    async open(o, { common }) {
      return new Pattern(common.nodeName, o.size as number, (o.byte as number | undefined) ?? 0xaa);
    },
  });
  t.throws(() => g.registerDriver({ ...DRIVERS[0] }), { message: "driver 'file' is already registered", errno: 'EEXIST' });
  const p = await g.add(parseKeyval('driver=pattern,node-name=p,size=8192,byte=7', 'x'), 'keyval');
  const b = Buffer.alloc(16);
  await p.read(100, b);
  t.ok(b.equals(Buffer.alloc(16, 7)));
  await refuses(t, g.add({ driver: 'pattern', 'node-name': 'q', size: 1, byte: 300 }), "Parameter 'byte' expects uint8_t");
  const r = await g.add({ driver: 'raw', 'node-name': 'r', file: { driver: 'pattern', size: 4096 } });
  t.equal(r.child('file')?.driverName, 'pattern', 'the new driver works as an inline child too');
});
