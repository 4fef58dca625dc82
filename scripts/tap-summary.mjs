#!/usr/bin/env node
// Reads a TAP stream (tap --reporter=tap) on stdin, echoes it, and prints one
// last line "N passed, N failed" counting assertions: tap's own final count
// when it printed one, else this script's count. The test point that
// closes a subtest is not an assertion of its own, unless the subtest failed
// with no failing assertion inside (a crash or a timeout): then it counts as
// one failure.
import readline from 'node:readline';

let passed = 0;
let failed = 0;
/** failed-count when each open subtest began. */
const open = [];
let prevPlanIndent = -1;
let yamlIndent = -1;

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  process.stdout.write(line + '\n');
  const indent = line.length - line.trimStart().length;
  const body = line.trim();
  if (yamlIndent >= 0) {
    if (body === '...' && indent === yamlIndent) yamlIndent = -1;
    return;
  }
  if (body === '---') {
    yamlIndent = indent;
    return;
  }
  if (body.startsWith('# Subtest')) {
    open.push(failed);
    prevPlanIndent = -1;
    return;
  }
  if (body === '' || body.startsWith('#')) return;
  const point = /^(not )?ok\b/.exec(body);
  if (point) {
    const closes = prevPlanIndent > indent && open.length > 0;
    if (closes) {
      const before = open.pop();
      if (point[1] && failed === before) failed++;
    } else if (point[1]) failed++;
    else passed++;
    prevPlanIndent = -1;
    return;
  }
  // A plan line ends a subtest's body; the next test point (less indented) closes it.
  prevPlanIndent = /^\d+\.\.\d+/.test(body) ? indent : -1;
});
// tap ends with its own count, "# { total: N, pass: P, fail: F }": when present it is the authority.
let reported;
rl.on('line', (line) => {
  const m = /^# \{ total: (\d+)(?:, pass: (\d+))?(?:, fail: (\d+))?/.exec(line);
  if (m) reported = { pass: Number(m[2] ?? 0), fail: Number(m[3] ?? 0), total: Number(m[1]) };
});
rl.on('close', () => {
  if (reported) {
    passed = reported.pass;
    // Assertions neither passed nor failed (todo, skip) are left out; a crash counted above stays counted.
    failed = Math.max(reported.fail, failed);
  }
  process.stdout.write(`${passed} passed, ${failed} failed\n`);
});
