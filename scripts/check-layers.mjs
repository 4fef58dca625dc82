#!/usr/bin/env node
/**
 * Fails when a file under src/ imports one in a higher layer.
 *
 *   node scripts/check-layers.mjs [ROOT]     (ROOT defaults to this repository)
 *
 * LAYERS below is the one definition of vdisk's layers, bottom first
 * (docs/design/layers.md says why they are cut this way). A file belongs to
 * the first layer with a pattern that matches its path; it may import files
 * of its own layer and of lower ones. Every import counts, `import type` and
 * `import()` included: a type import still ties the lower layer's code to the
 * higher one's shape. A file no layer claims is an error too, so a new file
 * or directory gets a place before it gets imports.
 *
 * Imports are read with TypeScript's own scanner (preProcessFile), so
 * comments and strings that look like imports are not taken for them.
 */
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';

/** Bottom to top. Patterns: an exact file, or a directory ending in '/' (everything under it). */
export const LAYERS = [
  {
    name: 'base',
    patterns: [
      'src/errors.ts', 'src/log.ts', 'src/native.ts', 'src/version.ts', 'src/unix-socket.ts', 'src/systemd.ts',
      'src/qapi/', 'src/objects/', 'src/metrics/stats.ts',
    ],
  },
  { name: 'wire', patterns: ['src/nbd/protocol.ts', 'src/nbd/byte-queue.ts', 'src/nbd/client-core.ts', 'src/fuse/protocol.ts'] },
  { name: 'block', patterns: ['src/block/'] },
  { name: 'jobs', patterns: ['src/jobs/'] },
  { name: 'backup', patterns: ['src/backup/'] },
  { name: 'io', patterns: ['src/io/'] },
  { name: 'exports', patterns: ['src/export/', 'src/nbd/', 'src/fuse/'] },
  { name: 'daemon', patterns: ['src/daemon.ts', 'src/qmp/', 'src/metrics/'] },
  { name: 'entry', patterns: ['src/cli/', 'src/fuzz/', 'src/index.ts'] },
];

/** The index in LAYERS of the layer a repository-relative path belongs to, or -1. */
export function layerOf(file) {
  return LAYERS.findIndex((layer) => layer.patterns.some((p) => (p.endsWith('/') ? file.startsWith(p) : file === p)));
}

function sourceFiles(root, dir = 'src') {
  const out = [];
  for (const entry of fs.readdirSync(path.join(root, dir), { withFileTypes: true })) {
    const rel = `${dir}/${entry.name}`;
    if (entry.isDirectory()) out.push(...sourceFiles(root, rel));
    else if (entry.name.endsWith('.ts') && !entry.name.endsWith('.d.ts')) out.push(rel);
  }
  return out.sort();
}

/** Imports of one file that point into the repository: { line, target } with target repository-relative (.ts). */
function relativeImports(root, file) {
  const text = fs.readFileSync(path.join(root, file), 'utf8');
  const found = [];
  for (const ref of ts.preProcessFile(text, true, true).importedFiles) {
    if (!ref.fileName.startsWith('.')) continue;
    const line = text.slice(0, ref.pos).split('\n').length;
    // Sources import each other by their emitted .js names (NodeNext resolution).
    const target = path.posix.normalize(path.posix.join(path.posix.dirname(file), ref.fileName)).replace(/\.js$/, '.ts');
    found.push({ line, target });
  }
  return found;
}

/** Every problem in the tree under root, as "file:line: ..." lines. */
export function checkLayers(root) {
  const problems = [];
  for (const file of sourceFiles(root)) {
    const from = layerOf(file);
    if (from < 0) {
      problems.push(`${file}:1: in no layer (add it to LAYERS in scripts/check-layers.mjs)`);
      continue;
    }
    for (const { line, target } of relativeImports(root, file)) {
      if (!target.startsWith('src/')) continue;
      const to = layerOf(target);
      if (to > from) problems.push(`${file}:${line}: imports ${target}: layer '${LAYERS[from].name}' may not import layer '${LAYERS[to].name}'`);
    }
  }
  return problems;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === path.resolve(process.argv[1])) {
  const root = path.resolve(process.argv[2] ?? path.join(path.dirname(fileURLToPath(import.meta.url)), '..'));
  const problems = checkLayers(root);
  for (const p of problems) console.error(p);
  if (problems.length > 0) {
    console.error(`check-layers: ${problems.length} problem(s) with the layers (bottom first: ${LAYERS.map((l) => l.name).join(' < ')})`);
    process.exit(1);
  }
  console.log(`check-layers: ok (${LAYERS.map((l) => l.name).join(' < ')})`);
}
