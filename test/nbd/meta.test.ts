/**
 * The meta-context logic on its own (src/nbd/meta.ts): query matching for
 * LIST and SET, and the extents of each context at the edges no client
 * reaches easily: granules larger than the request, a bitmap shorter or
 * longer than the export (its node resized), the extent cap and REQ_ONE.
 */
import t from 'tap';
import { DirtyBitmap } from '../../src/block/dirty-bitmap.js';
import { BlockNode, type Extent, Status } from '../../src/block/node.js';
import { addExtent, chainDepths, dirtyExtents, selectContexts, selectedContexts, statusExtents } from '../../src/nbd/meta.js';
import type { NbdExport } from '../../src/nbd/server.js';

const KiB = 1024;
const MiB = 1024 * KiB;

function fakeExport(bitmapNames: string[], allocationDepth: boolean): NbdExport {
  return {
    allocationDepth,
    bitmaps: bitmapNames.map((n) => ({ bitmap: new DirtyBitmap(n, 65536, MiB), context: `qemu:dirty-bitmap:${n}` })),
  } as unknown as NbdExport;
}

const names = (exp: NbdExport, queries: string[], list: boolean) => selectedContexts(selectContexts(exp, queries, list)).map((c) => `${c.id} ${c.name}`);

t.test('queries: exact names for SET, wildcards for LIST only', async (t) => {
  const exp = fakeExport(['a', 'b'], true);
  t.same(names(exp, [], true), ['0 base:allocation', '1 qemu:allocation-depth', '2 qemu:dirty-bitmap:a', '3 qemu:dirty-bitmap:b']);
  t.same(names(exp, [], false), [], 'SET with no query selects nothing');
  for (const q of ['base:', 'qemu:', 'qemu:dirty-bitmap:']) t.same(names(exp, [q], false), [], `${q} is no wildcard for SET`);
  t.same(names(exp, ['qemu:'], true), ['1 qemu:allocation-depth', '2 qemu:dirty-bitmap:a', '3 qemu:dirty-bitmap:b']);
  t.same(names(exp, ['qemu:dirty-bitmap:b', 'base:allocation', 'qemu:dirty-bitmap:b'], false), ['0 base:allocation', '3 qemu:dirty-bitmap:b'], 'ids fixed by the export, order by the server, no duplicates');
  t.same(names(exp, ['qemu:dirty-bitmap:c', 'x:y', 'qemu:nope', 'base:allocation:', 'qemu:allocation-depth:'], true), [], 'unknown names are skipped');
  const plain = fakeExport([], false);
  t.same(names(plain, ['qemu:allocation-depth'], false), [], 'allocation-depth only where the export publishes it');
  t.same(names(plain, [], true), ['0 base:allocation']);
  const twice = fakeExport(['a', 'a'], false);
  t.same(names(twice, ['qemu:dirty-bitmap:a'], false), ['2 qemu:dirty-bitmap:a'], 'a bitmap listed twice answers as the first');
  t.equal(selectContexts(exp, ['base:allocation', 'qemu:dirty-bitmap:a'], false).count, 2);
});

t.test('addExtent merges equal flags and stops at the cap', async (t) => {
  const l: number[] = [];
  const f: number[] = [];
  t.ok(addExtent(l, f, 1, 10, 0));
  t.ok(addExtent(l, f, 1, 5, 0), 'equal flags merge even when full');
  t.ok(addExtent(l, f, 1, 0, 1), 'an empty extent is no extent');
  t.notOk(addExtent(l, f, 1, 5, 1), 'different flags do not fit');
  t.same([l, f], [[15], [0]]);
});

t.test('dirty extents: clipped to the request and to the bitmap', async (t) => {
  const run = (b: DirtyBitmap, offset: number, length: number, max = 4096) => {
    const l: number[] = [];
    const f: number[] = [];
    dirtyExtents(b, offset, length, max, l, f);
    return l.map((x, i) => [x, f[i]]);
  };
  const big = new DirtyBitmap('big', MiB, 8 * MiB);
  big.mark(3 * MiB + 5, 1);
  t.same(run(big, 3 * MiB + 1000, 512), [[512, 1]], 'a granule larger than the request reports the request only');
  t.same(run(big, 2 * MiB, 2 * MiB), [[MiB, 0], [MiB, 1]]);
  t.same(run(big, 0, 8 * MiB, 1), [[3 * MiB, 0]], 'REQ_ONE: the first extent only');
  // The bitmap's node shrank below the export (or the bitmap sits on a shorter backing node):
  // past its end nothing is dirty, and its partial last granule stops at its end.
  const short = new DirtyBitmap('s', MiB, 2 * MiB + 4096);
  short.mark(2 * MiB, 4096);
  t.same(run(short, MiB, 3 * MiB), [[MiB, 0], [4096, 1], [2 * MiB - 4096, 0]]);
  t.same(run(short, 3 * MiB, MiB), [[MiB, 0]], 'wholly past the bitmap: clean');
  short.resize(4 * MiB);
  t.same(run(short, 3 * MiB, MiB), [[MiB, 0]], 'after growing, a new granule is clean');
  short.mark(3 * MiB, 1);
  t.same(run(short, 3 * MiB, MiB), [[MiB, 1]], 'until written');
  // Many alternating granules: the cap ends the reply on a change of flags, never mid-run.
  const fine = new DirtyBitmap('f', 512, MiB);
  for (let i = 0; i < 2048; i += 2) fine.mark(i * 512, 512);
  const capped = run(fine, 0, MiB, 100);
  t.equal(capped.length, 100);
  t.same(capped.slice(0, 2), [[512, 1], [512, 0]]);
});

/** A node with a fixed map of extents: [length, flags, depth]. */
class MapNode extends BlockNode {
  readonly driverName = 'map';
  calls = 0;
  constructor(private readonly map: Array<[number, number, number]>) {
    super({ nodeName: 'm' });
    this.length = map.reduce((a, [l]) => a + l, 0);
  }
  protected doRead(): Promise<void> {
    return Promise.resolve();
  }
  protected override async doBlockStatus(offset: number, length: number): Promise<Extent> {
    this.calls++;
    let at = 0;
    for (const [l, flags, depth] of this.map) {
      if (offset < at + l) return { length: Math.min(at + l - offset, length), flags, depth };
      at += l;
    }
    throw new Error('past the end');
  }
}

t.test('allocation and depth from one walk of block status', async (t) => {
  const D = Status.DATA | Status.ALLOCATED;
  const node = new MapNode([
    [4096, D, 1],
    [4096, Status.DATA, 2],
    [8192, Status.ZERO, 0],
    [4096, Status.ZERO | Status.ALLOCATED, 1],
  ]);
  const bl: number[] = [];
  const bf: number[] = [];
  const dl: number[] = [];
  const dv: number[] = [];
  await statusExtents(node, 1000, node.size - 1000, 4096, bl, bf, dl, dv);
  t.same([bl, bf], [[3096 + 4096, 8192 + 4096], [0, 3]], 'base:allocation: data, then hole+zero');
  t.same([dl, dv], [[3096, 4096, 8192, 4096], [1, 2, 0, 1]], 'depths as the chain reports them');
  t.equal(node.calls, 4, 'one block-status walk serves both contexts');
  const l: number[] = [];
  const f: number[] = [];
  node.calls = 0;
  await statusExtents(node, 0, node.size, 1, undefined, undefined, l, f);
  t.same([l, f, node.calls], [[4096], [1], 2], 'REQ_ONE stops the walk at the first change');
});

/** A bare node for chain shapes: a filter (filteredRole 'image') or a format with a backing child. */
class ChainNode extends BlockNode {
  readonly driverName = 'chain';
  override readonly filteredRole: 'image' | undefined;
  constructor(filter: boolean, below?: BlockNode) {
    super({ nodeName: 'c' });
    this.filteredRole = filter ? 'image' : undefined;
    if (below) this.children.push({ role: filter ? 'image' : 'backing', node: below });
  }
  protected doRead(): Promise<void> {
    return Promise.resolve();
  }
}

t.test('allocation depth over filters, counted as QEMU counts them', async (t) => {
  const F = (below?: BlockNode) => new ChainNode(true, below);
  const N = (below?: BlockNode) => new ChainNode(false, below);
  t.equal(chainDepths(N(N(N()))), undefined, 'no filter: Extent.depth as it is');
  // blkdebug over an overlay over its backing file: [F, top, base] -> top 1, base 3.
  t.same(chainDepths(F(N(N()))), [0, 1, 3]);
  // A filter between overlay and backing file: [top, F, base, base2] -> 1, 2, 4.
  t.same(chainDepths(N(F(N(N())))), [0, 1, 2, 4]);
  t.same(chainDepths(F(F(N(F(N()))))), [0, 1, 4]);
});
