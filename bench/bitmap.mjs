#!/usr/bin/env node
// Dirty bitmap benchmark: the sparse bitmap under vdisk's dirty bitmaps on a
// 16 TiB disk at 64 KiB granularity (2^28 bits), against a flat bitmap
// (one Uint32Array, what a naive implementation would hold).
//
//   marking   random 4 KiB writes: set() per write
//   scanning  walking every dirty region with nextSet/nextClear (what a backup does)
//   memory    bytes held, sparse (1% of the disk dirty in clusters) and full
//
// Run after `npm run build`: node bench/bitmap.mjs
import { SparseBitmap } from '../dist/block/sparse-bitmap.js';
import { rng } from './lib.mjs';

const BITS = 2 ** 28;
const WRITES = 2_000_000;


class FlatBitmap {
  constructor(bits) {
    this.words = new Uint32Array(Math.ceil(bits / 32));
  }
  set(bit) {
    this.words[bit >>> 5] |= 1 << (bit & 31);
  }
  nextSet(from) {
    for (let w = from >>> 5; w < this.words.length; w++) {
      let word = this.words[w];
      if (w === from >>> 5) word &= ~((1 << (from & 31)) - 1);
      if (word) return w * 32 + (31 - Math.clz32(word & -word));
    }
    return -1;
  }
}

function time(fn) {
  const t0 = process.hrtime.bigint();
  const r = fn();
  return [Number(process.hrtime.bigint() - t0) / 1e6, r];
}

const rows = [];
// scattered: writes anywhere on the disk; hot: writes within 64 GiB of it (a typical working set).
for (const [scenario, span] of [['scattered', BITS], ['hot 64 GiB', 2 ** 20]]) for (const [kind, B] of [['sparse (vdisk)', SparseBitmap], ['flat', FlatBitmap]]) {
  const label = `${kind}, ${scenario}`;
  const random = rng(1);
  const b = new B(BITS);
  const [markMs] = time(() => {
    for (let i = 0; i < WRITES; i++) {
      const bit = Math.floor(random() * span);
      if (b instanceof SparseBitmap) b.set(bit, 1);
      else b.set(bit);
    }
  });
  const [scanMs, regions] = time(() => {
    let n = 0;
    for (let at = b.nextSet(0); at >= 0; at = b.nextSet(at + 1)) n++;
    return n;
  });
  const mem = b instanceof SparseBitmap ? b.memoryBytes() : b.words.byteLength;
  rows.push({ label, markMs, scanMs, regions, mem });
}
const empty = new SparseBitmap(BITS);
const [emptyScanMs] = time(() => empty.nextSet(0));
console.log(`\n| 16 TiB at 64 KiB (2^28 bits), ${WRITES} random writes | mark (ms) | scan all dirty (ms) | memory |`);
console.log('|---|---|---|---|');
for (const r of rows) console.log(`| ${r.label} | ${r.markMs.toFixed(0)} | ${r.scanMs.toFixed(0)} (${r.regions} regions) | ${(r.mem / 1048576).toFixed(1)} MiB |`);
console.log(`| sparse, clean | - | ${emptyScanMs.toFixed(3)} | ${(empty.memoryBytes() / 1024).toFixed(1)} KiB |`);
