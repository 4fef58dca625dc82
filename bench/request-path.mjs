#!/usr/bin/env node
// CPU cost of the node request path alone: BlockNode.read of 4 KiB on a null-co node (no I/O),
// 16 reads in flight, best of 5 x 500k, printed in CPU nanoseconds per request. CPU time, not
// wall time, so a busy machine disturbs it less. To compare two builds, run it alternately on
// each build's dist directory:
//   node bench/request-path.mjs /path/to/before/dist; node bench/request-path.mjs   # and again
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const dist = path.resolve(process.argv[2] ?? path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist'));
const { BlockGraph } = await import(path.join(dist, 'block', 'graph.js'));
const { setLogLevel } = await import(path.join(dist, 'log.js'));
setLogLevel('error');
const node = await new BlockGraph().add({ driver: 'null-co', 'node-name': 'n', size: 1 << 30 });
const buf = Buffer.alloc(4096);

async function run(count) {
  const c0 = process.cpuUsage();
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      await node.read((i * 4096) % (1 << 29), buf);
    }
  };
  await Promise.all(Array.from({ length: 16 }, worker));
  const c = process.cpuUsage(c0);
  return ((c.user + c.system) * 1000) / count;
}

await run(200000); // warm-up: let the JIT settle
let best = Infinity;
for (let r = 0; r < 5; r++) best = Math.min(best, await run(500000));
console.log(`${dist}: ${best.toFixed(0)} ns CPU per 4k read (null-co, qd16, best of 5 x 500k)`);
