/**
 * The race fleecing must close, made to happen on purpose in-process: a
 * reader of the point-in-time view decides a cluster still lives on the
 * source, and only then does its read reach the source; a guest write to the
 * same cluster arrives in between. The write must wait (its old data is
 * saved first, and the reader's read is let finish on the old data), and
 * later reads of the view come from the saved copy. A real qcow2 overlay has
 * the same gap between its L2 lookup and its backing read; here a memory
 * node whose reads can be held open makes it wide and certain.
 *
 * Also: a view whose point in time was given up refuses unsaved clusters;
 * QEMU's rate limiter arithmetic.
 */
import t from 'tap';
import { BlockNode } from '../../src/block/node.js';
import { BlockCopy } from '../../src/backup/block-copy.js';
import { CopyBeforeWriteNode } from '../../src/backup/cbw.js';
import { SnapshotAccessNode } from '../../src/backup/snapshot-access.js';
import { VdiskError } from '../../src/errors.js';
import { RateLimit } from '../../src/jobs/rate-limit.js';

const CLUSTER = 65536;

/** A disk in memory; `holdNextRead()` makes the next read take its data only when released. */
class MemNode extends BlockNode {
  readonly driverName = 'mem';
  readonly data: Buffer;
  private hold: Promise<void> | undefined;
  private releaseHold: (() => void) | undefined;
  reads = 0;

  constructor(name: string, data: Buffer) {
    super({ nodeName: name });
    this.data = data;
    this.length = data.length;
  }

  holdNextRead(): () => void {
    this.hold = new Promise((r) => (this.releaseHold = r));
    return () => this.releaseHold!();
  }

  protected override async doRead(offset: number, buf: Buffer): Promise<void> {
    this.reads++;
    const h = this.hold;
    this.hold = undefined;
    if (h) await h;
    this.data.copy(buf, 0, offset, offset + buf.length);
  }

  protected override async doWrite(offset: number, buf: Buffer): Promise<void> {
    buf.copy(this.data, offset);
  }
}

const ticks = async (n: number) => {
  for (let i = 0; i < n; i++) await new Promise((r) => setImmediate(r));
};

function pair() {
  const old = Buffer.alloc(4 * CLUSTER, 0xaa);
  const source = new MemNode('src', Buffer.from(old));
  const target = new MemNode('tgt', Buffer.alloc(4 * CLUSTER));
  const copy = new BlockCopy(source, target, CLUSTER);
  copy.toCopy.bits.set(0, 4);
  const cbw = new CopyBeforeWriteNode('cbw', source, target, copy);
  const view = new SnapshotAccessNode('view', source, copy, 'job');
  return { old, source, target, copy, cbw, view };
}

t.test('a guest write waits for a snapshot read that is reading its cluster from the source', async (t) => {
  const { old, source, target, cbw, view } = pair();
  const release = source.holdNextRead();
  const got = Buffer.alloc(CLUSTER);
  const reading = view.read(CLUSTER, got);
  await ticks(5);
  let written = false;
  const writing = cbw.write(CLUSTER, Buffer.alloc(CLUSTER, 0xbb)).then(() => (written = true));
  await ticks(50);
  t.notOk(written, 'the write is held while the reader is on the source');
  t.ok(target.data.subarray(CLUSTER, 2 * CLUSTER).equals(old.subarray(0, CLUSTER)), 'but the old data is already saved');
  release();
  await reading;
  t.ok(got.equals(old.subarray(0, CLUSTER)), 'the reader gets the data of the point in time');
  await writing;
  t.ok(source.data.subarray(CLUSTER, 2 * CLUSTER).equals(Buffer.alloc(CLUSTER, 0xbb)), 'then the write lands on the source');
  const again = Buffer.alloc(CLUSTER);
  const before = source.reads;
  await view.read(CLUSTER, again);
  t.ok(again.equals(old.subarray(0, CLUSTER)), 'a later read of the view is the saved copy');
  t.equal(source.reads, before, 'taken from the target, not the source');
});

t.test('a snapshot read that starts while its cluster is being saved waits for the copy', async (t) => {
  const { old, source, cbw, view } = pair();
  // The copy's own read of the source is held: the cluster stays in flight.
  const release = source.holdNextRead();
  const writing = cbw.write(0, Buffer.alloc(CLUSTER, 0xcc));
  await ticks(5);
  const got = Buffer.alloc(CLUSTER);
  let read = false;
  const reading = view.read(0, got).then(() => (read = true));
  await ticks(20);
  t.notOk(read, 'the reader waits for the copy in flight');
  release();
  await Promise.all([writing, reading]);
  t.ok(got.equals(old.subarray(0, CLUSTER)), 'and then reads the saved old data');
});

t.test('a view whose point in time was given up refuses what was never saved', async (t) => {
  const { old, copy, cbw, view } = pair();
  await cbw.write(0, Buffer.alloc(CLUSTER, 0x11));
  copy.giveUp(new VdiskError('EACCES', 'backup job has ended'));
  const saved = Buffer.alloc(CLUSTER);
  await view.read(0, saved);
  t.ok(saved.equals(old.subarray(0, CLUSTER)), 'a saved cluster still reads');
  await t.rejects(view.read(2 * CLUSTER, Buffer.alloc(512)), { errno: 'EACCES', message: /backup job has ended/ }, 'an unsaved one fails');
  await cbw.write(3 * CLUSTER, Buffer.alloc(CLUSTER, 0x22));
  await t.rejects(view.read(3 * CLUSTER, Buffer.alloc(512)), { errno: 'EACCES' }, 'and nothing is saved any more');
});

t.test("QEMU's rate limiter: a chunk goes, then the slice stretches to what it cost", async (t) => {
  const one = new RateLimit(1);
  t.equal(one.delay(0, 0), 0, 'the first chunk may go at once');
  one.charge(CLUSTER, 0);
  // quota = max(1, 1 * 0.1) = 1 byte per 100 ms slice: 64 KiB costs 65536 slices.
  t.equal(one.delay(0, 1), CLUSTER * 100 - 1, 'then it waits 65536 slices of 100 ms');
  t.equal(one.delay(0, CLUSTER * 100 + 1), 0, 'and may go again after that');

  const fast = new RateLimit(100 * 1024);
  t.equal(fast.delay(0, 0), 0);
  fast.charge(CLUSTER, 0);
  t.equal(Math.round(fast.delay(0, 10)), 640 - 10, '64 KiB at 100 KiB/s: 640 ms from the slice start');
  fast.setSpeed(0);
  t.equal(fast.delay(0, 11), 0, 'speed 0 lifts the limit at once');
  const small = new RateLimit(10 * 1024 * 1024);
  for (let i = 0; i < 15; i++) {
    t.equal(small.delay(0, 5), 0, `chunk ${i + 1} of 64 KiB fits the 1 MiB slice quota`);
    small.charge(CLUSTER, 5);
  }
  small.charge(CLUSTER, 5);
  t.equal(small.delay(0, 5), 100, 'the 16th fills the slice (which began at 5 ms): wait for its end at 105 ms');
});
