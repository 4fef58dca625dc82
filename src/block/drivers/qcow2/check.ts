/**
 * qcow2 consistency check and repair, as `qemu-img check` does it.
 *
 * Every reference to a host cluster is counted (header, L1, L2 tables, data
 * and compressed clusters, refcount table and blocks, snapshot tables with
 * their L1/L2 tables, bitmap directory, tables and data) and compared with
 * the stored refcounts: a refcount below its references is a corruption
 * (the cluster could be handed out again), above is a leak (wasted space).
 * Repair sets refcounts to the references ('leaks': only lowers; 'all': both
 * ways) and fixes COPIED flags.
 */
import { logEvent } from '../../../log.js';
import { type DecodedL2, EntryKind, decodeL2, encodeEntry, l1Offset, readU64 } from './format.js';
import type { Qcow2Node } from './qcow2.js';

export interface CheckResult {
  corruptions: number;
  leaks: number;
  checkErrors: number;
  corruptionsFixed: number;
  leaksFixed: number;
  allocatedClusters: number;
  totalClusters: number;
  fragmentedClusters: number;
  compressedClusters: number;
  imageEndOffset: number;
  /** Lines as qemu-img prints them while checking. */
  messages: string[];
}

export interface CheckOptions {
  repair?: 'leaks' | 'all';
}

export async function checkImage(node: Qcow2Node, options: CheckOptions = {}): Promise<CheckResult> {
  const first = await scan(node);
  if (!options.repair || (first.corruptions === 0 && first.leaks === 0 && first.copiedErrors.length === 0)) return first.result;
  const fixed = await repair(node, first, options.repair);
  const second = await scan(node);
  second.result.messages.unshift(...fixed.messages);
  second.result.corruptionsFixed = fixed.corruptions;
  second.result.leaksFixed = fixed.leaks;
  logEvent('info', 'qcow2-repaired', { filename: node.filename, leaksFixed: fixed.leaks, corruptionsFixed: fixed.corruptions });
  return second.result;
}

interface Scan {
  result: CheckResult;
  corruptions: number;
  leaks: number;
  /** cluster -> [stored refcount, references] for every mismatch. */
  mismatches: Array<[number, number, number]>;
  copiedErrors: Array<{ l1Index: number; l2Index?: number; refcount: number }>;
  /** cluster -> references, as counted. */
  refs: Map<number, number>;
}

async function scan(node: Qcow2Node): Promise<Scan> {
  const h = node.header;
  const file = node.file;
  const cs = node.clusterBytes;
  const refs = new Map<number, number>();
  const messages: string[] = [];
  let checkErrors = 0;
  const fileClusters = Math.ceil(file.size / cs);
  const add = (offset: number, bytes: number, what: string): boolean => {
    if (offset % cs !== 0 && what !== 'compressed') {
      messages.push(`ERROR ${what} offset=${offset.toString(16)} is not cluster aligned`);
      checkErrors++;
      return false;
    }
    const firstCluster = Math.floor(offset / cs);
    const last = Math.floor((offset + Math.max(bytes, 1) - 1) / cs);
    for (let c = firstCluster; c <= last; c++) refs.set(c, (refs.get(c) ?? 0) + 1);
    return true;
  };

  add(0, cs, 'header');
  add(h.l1TableOffset, h.l1Size * 8, 'L1 table');
  const rc = node.refcounts;
  add(rc.layout.tableOffset, rc.layout.tableClusters * cs, 'refcount table');
  for (let i = 0; i < rc.tableEntries; i++) {
    const off = readU64(rc.table, i * 8, 'refcount table entry') - (rc.table.readUInt32BE(i * 8 + 4) & 0x1ff);
    if (off) add(off, cs, 'refcount block');
  }

  let allocated = 0;
  let fragmented = 0;
  let compressed = 0;
  const copiedErrors: Scan['copiedErrors'] = [];
  const l2Checks: Array<{ l1Index: number; l2Offset: number; entries: Array<{ i: number; e: DecodedL2 }> }> = [];

  /** Counts the references of one L1 table; `active` L2 tables are kept to check COPIED flags. */
  const walkL1 = async (l1: Buffer, entries: number, active: boolean) => {
    let nextContiguous = -1;
    for (let i = 0; i < entries; i++) {
      const l2Off = l1Offset(l1.readUInt32BE(i * 8), l1.readUInt32BE(i * 8 + 4));
      if (l2Off === 0) continue;
      if (l2Off + cs > file.size + cs) {
        messages.push(`ERROR l2_offset=${l2Off.toString(16)}: L2 table is outside the image`);
        checkErrors++;
        continue;
      }
      if (!add(l2Off, cs, 'L2 table')) continue;
      const table = active ? (await node.l2Table(l2Off)).buf : await readCluster(file, l2Off, cs);
      const kept: Array<{ i: number; e: DecodedL2 }> = [];
      for (let j = 0; j < cs / 8; j++) {
        const e = decodeL2(table.readUInt32BE(j * 8), table.readUInt32BE(j * 8 + 4), h.clusterBits, h.version === 3);
        if (e.kind === EntryKind.Compressed) {
          if (active) {
            compressed++;
            allocated++;
          }
          add(e.offset, e.compressedLength, 'compressed');
          continue;
        }
        if ((e.kind === EntryKind.Normal || e.kind === EntryKind.Zero) && e.offset !== 0) {
          if (!add(e.offset, cs, 'data cluster')) continue;
          if (active) {
            allocated++;
            if (nextContiguous >= 0 && e.offset !== nextContiguous) fragmented++;
            nextContiguous = e.offset + cs;
            kept.push({ i: j, e });
          }
        }
      }
      if (active) l2Checks.push({ l1Index: i, l2Offset: l2Off, entries: kept });
    }
  };

  await walkL1(node.l1Table, h.l1Size, true);

  // Internal snapshots: their table, their L1 tables and everything those reference.
  if (h.nbSnapshots > 0) {
    let pos = h.snapshotsOffset;
    const start = pos;
    for (let s = 0; s < h.nbSnapshots; s++) {
      const head = Buffer.alloc(40);
      await file.read(pos, head);
      const l1Off = readU64(head, 0, 'snapshot L1 offset');
      const l1Entries = head.readUInt32BE(8);
      const idLen = head.readUInt16BE(12);
      const nameLen = head.readUInt16BE(14);
      const extra = head.readUInt32BE(36);
      pos += Math.ceil((40 + extra + idLen + nameLen) / 8) * 8;
      add(l1Off, l1Entries * 8, 'snapshot L1 table');
      const l1 = Buffer.alloc(l1Entries * 8);
      await file.read(l1Off, l1);
      await walkL1(l1, l1Entries, false);
    }
    add(start, pos - start, 'snapshot table');
  }

  // Persistent bitmaps: directory, tables and data clusters.
  if (h.bitmapsExtension && h.bitmapsExtension.length >= 24) {
    const ext = h.bitmapsExtension;
    const count = ext.readUInt32BE(0);
    const dirSize = readU64(ext, 8, 'bitmap directory size');
    const dirOff = readU64(ext, 16, 'bitmap directory offset');
    add(dirOff, dirSize, 'bitmap directory');
    const dir = Buffer.alloc(dirSize);
    await file.read(dirOff, dir);
    let p = 0;
    for (let b = 0; b < count && p + 24 <= dir.length; b++) {
      const tableOff = readU64(dir, p, 'bitmap table offset');
      const tableSize = dir.readUInt32BE(p + 8);
      const nameSize = dir.readUInt16BE(p + 18);
      const extraSize = dir.readUInt32BE(p + 20);
      p += Math.ceil((24 + extraSize + nameSize) / 8) * 8;
      if (tableOff === 0) continue;
      add(tableOff, tableSize * 8, 'bitmap table');
      const table = Buffer.alloc(tableSize * 8);
      await file.read(tableOff, table);
      for (let k = 0; k < tableSize; k++) {
        const off = l1Offset(table.readUInt32BE(k * 8), table.readUInt32BE(k * 8 + 4));
        if (off) add(off, cs, 'bitmap data');
      }
    }
  }

  // Compare with the stored refcounts.
  let maxCluster = fileClusters;
  for (const c of refs.keys()) maxCluster = Math.max(maxCluster, c + 1);
  let corruptions = 0;
  let leaks = 0;
  let highest = -1;
  const mismatches: Scan['mismatches'] = [];
  // As qemu-img: refcounts past the end of the file (and of every reference) are not examined, so
  // both tools give the same verdict; such a leak becomes visible once the file grows over it.
  const scanLimit = maxCluster;
  for (let c = 0; c < scanLimit; c++) {
    const stored = await rc.get(c);
    const wanted = refs.get(c) ?? 0;
    if (stored !== 0) highest = c;
    if (stored === wanted) continue;
    mismatches.push([c, stored, wanted]);
    if (stored < wanted) {
      corruptions++;
      messages.push(`ERROR cluster ${c} refcount=${stored} reference=${wanted}`);
    } else {
      leaks++;
      messages.push(`Leaked cluster ${c} refcount=${stored} reference=${wanted}`);
    }
  }

  // COPIED flags of the active tables must say "refcount is exactly one".
  for (const t of l2Checks) {
    const l1Copied = (node.l1Table.readUInt32BE(t.l1Index * 8) & 0x80000000) !== 0;
    const l2Ref = await rc.get(t.l2Offset / cs);
    if (l1Copied !== (l2Ref === 1)) {
      copiedErrors.push({ l1Index: t.l1Index, refcount: l2Ref });
      messages.push(`ERROR OFLAG_COPIED L2 cluster: l1_index=${t.l1Index} l1_entry=${t.l2Offset.toString(16)} refcount=${l2Ref}`);
      corruptions++;
    }
    for (const { i, e } of t.entries) {
      const r = await rc.get(e.offset / cs);
      if (e.copied !== (r === 1)) {
        copiedErrors.push({ l1Index: t.l1Index, l2Index: i, refcount: r });
        messages.push(`ERROR OFLAG_COPIED data cluster: l2_entry=${e.offset.toString(16)} refcount=${r}`);
        corruptions++;
      }
    }
  }

  return {
    result: {
      corruptions: corruptions + checkErrors,
      leaks,
      checkErrors: 0,
      corruptionsFixed: 0,
      leaksFixed: 0,
      allocatedClusters: allocated,
      totalClusters: Math.ceil(h.size / cs),
      fragmentedClusters: fragmented,
      compressedClusters: compressed,
      imageEndOffset: (highest + 1) * cs,
      messages,
    },
    corruptions,
    leaks,
    mismatches,
    copiedErrors,
    refs,
  };
}

async function readCluster(file: Qcow2Node['file'], offset: number, cs: number): Promise<Buffer> {
  const b = Buffer.alloc(cs);
  await file.read(offset, b);
  return b;
}

async function repair(node: Qcow2Node, s: Scan, mode: 'leaks' | 'all'): Promise<{ leaks: number; corruptions: number; messages: string[] }> {
  const rc = node.refcounts;
  const messages: string[] = [];
  let leaks = 0;
  let corruptions = 0;
  // Refcount blocks made while repairing (for ranges whose block is missing) must not go where
  // something is referenced: their refcounts may say free, the references say otherwise.
  let end = 0;
  for (const c of s.refs.keys()) end = Math.max(end, c + 1);
  rc.reserved = { has: (c) => s.refs.has(c), end };
  try {
    for (const [c, stored, wanted] of s.mismatches) {
      if (stored > wanted || mode === 'all') {
        messages.push(`Repairing cluster ${c} refcount=${stored} reference=${wanted}`);
        await rc.set(c, wanted);
        if (stored > wanted) leaks++;
        else corruptions++;
      }
    }
  } finally {
    rc.reserved = undefined;
  }
  if (mode === 'all') {
    const cs = node.clusterBytes;
    // COPIED flags are judged against the refcounts as repaired above (as QEMU checks them after
    // rebuilding refcounts): a flag that was only wrong because its refcount was is right now.
    for (const err of s.copiedErrors) {
      if (err.l2Index === undefined) {
        const l2Offset = node.l1Entry(err.l1Index);
        const refcount = await rc.get(l2Offset / cs);
        const copied = (node.l1Table.readUInt32BE(err.l1Index * 8) & 0x80000000) !== 0;
        if (copied === (refcount === 1)) continue;
        node.setL1Entry(err.l1Index, l2Offset, refcount === 1);
        messages.push(`Repairing OFLAG_COPIED L2 cluster: l1_index=${err.l1Index} l1_entry=${l2Offset.toString(16)} refcount=${refcount}`);
      } else {
        const t = await node.l2Table(node.l1Entry(err.l1Index));
        const e = decodeL2(t.buf.readUInt32BE(err.l2Index * 8), t.buf.readUInt32BE(err.l2Index * 8 + 4), node.header.clusterBits, node.header.version === 3);
        const refcount = await rc.get(e.offset / cs);
        if (e.copied === (refcount === 1)) continue;
        encodeEntry(t.buf, err.l2Index * 8, e.offset, refcount === 1, e.kind === EntryKind.Zero);
        t.dirty = true;
        messages.push(`Repairing OFLAG_COPIED data cluster: l2_entry=${e.offset.toString(16)} refcount=${refcount}`);
      }
      corruptions++;
    }
  }
  await node.flushMetadata();
  await node.file.flush();
  return { leaks, corruptions, messages };
}
