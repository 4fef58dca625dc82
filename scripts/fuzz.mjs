#!/usr/bin/env node
/**
 * Long fuzz runs of the protocol cores, with the same generators and
 * properties as test/fuzz/ (src/fuzz/*.ts, built into dist/):
 *
 *   node scripts/fuzz.mjs --seconds 600 --target nbd|qmp|fuse|client|all [--seed N] [--out DIR]
 *
 * Runs batches of fast-check runs, a new seed per batch, until the time is
 * up, and prints the seed and the counts. Targets: nbd (the server core),
 * qmp, fuse, client (the nbd driver's reply parser). A failing input is shrunk and saved
 * under --out (default ./fuzz-findings) as the exact bytes plus a JSON file
 * with the seed and the error, ready to become a regression test.
 * Exit status 1 if anything failed. Needs `npx tsc -p .` first.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : dflt;
};
if (args.includes('--help')) {
  console.log('usage: node scripts/fuzz.mjs [--seconds 60] [--target nbd|qmp|fuse|client|all] [--seed N] [--out DIR]');
  process.exit(0);
}
const seconds = Number(opt('seconds', '60'));
const target = opt('target', 'all');
const out = path.resolve(opt('out', 'fuzz-findings'));
let seed = Number(opt('seed', String(Date.now() % 2 ** 31)));
if (!Number.isFinite(seconds) || seconds <= 0) throw new Error(`--seconds: expected a positive number, not '${opt('seconds')}'`);

const fc = (await import('fast-check')).default;
const dist = (p) => import(path.join(root, 'dist', 'fuzz', p));
const targets = {};
if (target === 'nbd' || target === 'all') {
  const m = await dist('nbd.js');
  targets.nbd = fc.property(m.nbdStreamArb, m.nbdScheduleArb, (stream, schedule) => void m.runNbdCore(stream, schedule));
}
if (target === 'qmp' || target === 'all') {
  const m = await dist('qmp.js');
  targets.qmp = fc.property(m.qmpStreamArb, m.qmpScheduleArb, (stream, schedule) => void m.runQmpCore(stream, schedule));
}
if (target === 'client' || target === 'all') {
  const m = await dist('nbd-client.js');
  targets.client = fc.property(m.clientStreamArb, m.clientScheduleArb, (input, schedule) => void m.runClientCore(input, schedule));
}
if (target === 'fuse' || target === 'all') {
  const m = await dist('fuse.js');
  targets.fuse = fc.property(m.fuseStreamArb, (input) => void m.runFuseCore(input));
}
if (Object.keys(targets).length === 0) throw new Error(`--target: expected nbd, qmp, fuse, client or all, not '${target}'`);

console.log(`fuzz: targets ${Object.keys(targets).join(', ')}, ${seconds} s, first seed ${seed}`);
const deadline = Date.now() + seconds * 1000;
const counts = Object.fromEntries(Object.keys(targets).map((k) => [k, 0]));
let failures = 0;
const BATCH = 500;
// The deadline is checked between rounds, so every target runs at least one batch however
// busy the machine is (a short run under load used to end before reaching the last targets).
while (Date.now() < deadline) {
  for (const [name, prop] of Object.entries(targets)) {
    const r = fc.check(prop, { seed, numRuns: BATCH, endOnFailure: true });
    counts[name] += r.numRuns;
    if (r.failed) {
      failures++;
      fs.mkdirSync(out, { recursive: true });
      const [input, schedule] = r.counterexample;
      const base = path.join(out, `${name}-${seed}`);
      // nbd/qmp: one byte stream (and how it was cut); fuse: a mode and a list of kernel requests.
      const hex = (b) => Buffer.from(b).toString('hex');
      const saved = Buffer.isBuffer(input) ? { bytesHex: hex(input), schedule } : { mode: input.mode, requestsHex: input.requests.map(hex) };
      if (Buffer.isBuffer(input)) fs.writeFileSync(`${base}.bin`, input);
      fs.writeFileSync(`${base}.json`, JSON.stringify({ target: name, seed, error: String(r.errorInstance?.message ?? r.error), ...saved }, null, 2) + '\n');
      console.log(`fuzz: ${name} FAILED with seed ${seed}: ${r.errorInstance?.message ?? r.error}\n  input saved: ${base}.json`);
    }
  }
  seed = (seed + 1) % 2 ** 31;
}
console.log(`fuzz: done, last seed ${seed}, runs ${Object.entries(counts).map(([k, v]) => `${k} ${v}`).join(', ')}, failures ${failures}`);
process.exit(failures ? 1 : 0);
