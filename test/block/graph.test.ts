/**
 * The block graph: blockdev-add options (JSON and keyval), QEMU's error texts,
 * names, children and who uses whom.
 */
import t from 'tap';
import path from 'node:path';
import { BlockGraph } from '../../src/block/graph.js';
import { parseKeyval } from '../../src/qapi/keyval.js';
import { VdiskError } from '../../src/errors.js';
import { sparseFile, tempDir } from '../helpers/tools.js';

const rejects = async (t: Tap.Test, p: Promise<unknown>, message: RegExp | string, what?: string) => {
  await t.rejects(p, { message: typeof message === 'string' ? new RegExp(message.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')) : message }, what ?? String(message));
};

t.test('blockdev-add options: QEMU error texts, nothing half-made', async (t) => {
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  await rejects(t, g.add({ driver: 'file', 'node-name': 'f0' }), "Parameter 'filename' is missing");
  await rejects(t, g.add({ driver: 'raw', 'node-name': 'r0', file: { driver: 'file' } }), "Parameter 'file.filename' is missing");
  await rejects(t, g.add({ driver: 'null-co', 'node-name': 'n0', foo: 1 }), "Parameter 'foo' is unexpected");
  await rejects(t, g.add({ driver: 'null-co', 'node-name': 'n0', size: '1G' }), "Invalid parameter type for 'size', expected: integer");
  await rejects(t, g.add({ driver: 'bogus', 'node-name': 'n0' }), "Parameter 'driver' does not accept value 'bogus'");
  await rejects(t, g.add({ 'node-name': 'n0' }), "Parameter 'driver' is missing");
  await rejects(t, g.add({ driver: 'null-co', 'node-name': 'n0', 'read-only': 'yes' }), "Invalid parameter type for 'read-only', expected: boolean");
  await rejects(t, g.add({ driver: 'null-co' }), "'node-name' must be specified for the root node");
  await rejects(t, g.add({ driver: 'null-co', 'node-name': '1abc' }), "Invalid node-name: '1abc'");
  await rejects(t, g.add({ driver: 'null-co', 'node-name': 'a'.repeat(32) }), 'Node name too long');
  await rejects(t, g.add({ driver: 'raw', 'node-name': 'r0', file: 'nope' }), "Cannot find device='' nor node-name='nope'");
  await rejects(t, g.add({ driver: 'raw', 'node-name': 'r0', file: { driver: 'file', filename: '/nonexistent/img' } }), "Could not open '/nonexistent/img': No such file or directory");
  t.same(g.list(), [], 'no node was left behind by any failed add');
  await g.add({ driver: 'null-co', 'node-name': 'n0', size: 1 << 20 });
  await rejects(t, g.add({ driver: 'null-co', 'node-name': 'n0' }), "Duplicate nodes with node-name='n0'");
  const err = await g.add({ driver: 'null-co', 'node-name': 'n0' }).catch((e) => e);
  t.type(err, VdiskError);
  t.equal(err.errno, 'EEXIST');
});

t.test('keyval options go through the same schema', async (t) => {
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const n = await g.add(parseKeyval('driver=null-co,node-name=k0,size=67108864,read-only=on', 'test'), 'keyval');
  t.equal(n.size, 64 * 1024 * 1024);
  t.equal(n.readOnly, true);
  await rejects(t, g.add(parseKeyval('driver=null-co,node-name=k1,read-only=maybe', 'test'), 'keyval'), "Parameter 'read-only' expects 'on' or 'off'");
});

t.test('children: inline ones are named #block..., shared ones are refused deletion while used', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), 1 << 20);
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const raw = await g.add({ driver: 'raw', 'node-name': 'r0', file: { driver: 'file', filename: img } });
  const names = g.list().map((n) => n.nodeName);
  t.equal(names[0], 'r0', 'newest first');
  t.match(names[1], /^#block\d+$/, 'the inline child got an automatic name');
  t.equal(raw.child('file')?.nodeName, names[1]);
  await rejects(t, g.delete(names[1]), `Node ${names[1]} is not owned by the monitor`);
  await g.delete('r0');
  t.same(g.list(), [], 'deleting the parent removed its implicit child');

  await g.add({ driver: 'file', 'node-name': 'f0', filename: img });
  await g.add({ driver: 'raw', 'node-name': 'r1', file: 'f0' });
  await g.add({ driver: 'raw', 'node-name': 'r2', file: 'f0', offset: 4096 });
  await rejects(t, g.delete('f0'), /Node f0 is in use by node 'r1' \(as file\), node 'r2' \(as file\)/);
  await g.delete('r1');
  await rejects(t, g.delete('f0'), /in use by node 'r2'/);
  await g.delete('r2');
  t.equal(g.get('f0')?.nodeName, 'f0', 'a named child stays when its parents go');
  await g.delete('f0');
  await rejects(t, g.delete('f0'), "Failed to find node with node-name='f0'");
});

t.test('read-only, discard and cache are inherited by inline children', async (t) => {
  const dir = tempDir(t);
  const img = sparseFile(path.join(dir, 'a.img'), 1 << 20);
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  const raw = await g.add({ driver: 'raw', 'node-name': 'r0', 'read-only': true, file: { driver: 'file', filename: img } });
  t.equal(raw.readOnly, true);
  t.equal(raw.child('file')?.readOnly, true, 'the inline file child is read-only too');
  await t.rejects(raw.write(0, Buffer.alloc(512)), { errno: 'EROFS' });
});

t.test('insert: a node object of the caller, checked like any other', async (t) => {
  const { NullNode } = await import('../../src/block/drivers/null-co.js');
  const g = new BlockGraph();
  t.teardown(() => g.closeAll());
  g.insert(new NullNode({ nodeName: 'mine', size: 4096 }));
  t.throws(() => g.insert(new NullNode({ nodeName: 'mine' })), /Duplicate nodes/);
  t.throws(() => g.insert(new NullNode({ nodeName: 'bad name' })), /Invalid node-name/);
  t.equal(g.find('mine').size, 4096);
  t.throws(() => g.find('none'), /Cannot find device='' nor node-name='none'/);
});
