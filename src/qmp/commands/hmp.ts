/**
 * human-monitor-command, for the one HMP command QEMU's tests drive block
 * devices with: `qemu-io [-d] DEVICE "COMMAND"`. As in QEMU, qemu-io's own
 * output goes to the daemon's standard output, not into the reply, and the
 * reply is "" even when the I/O failed; an unknown device is reported in the
 * returned text. (QEMU's system emulator has HMP; qemu-storage-daemon does not.)
 */
import { int, str, struct } from '../../qapi/schema.js';
import { runIoCommand } from '../../io/index.js';
import { logEvent } from '../../log.js';
import type { QmpCommand } from '../server.js';

/** Splits an HMP line into words; double-quoted parts (with \\" and \\\\ escapes) are one word. */
function hmpWords(line: string): string[] {
  const words: string[] = [];
  let i = 0;
  while (i < line.length) {
    while (line[i] === ' ') i++;
    if (i >= line.length) break;
    let w = '';
    if (line[i] === '"') {
      i++;
      while (i < line.length && line[i] !== '"') {
        if (line[i] === '\\' && i + 1 < line.length) i++;
        w += line[i++];
      }
      i++;
    } else {
      while (i < line.length && line[i] !== ' ') w += line[i++];
    }
    words.push(w);
  }
  return words;
}

export const HMP_COMMANDS: QmpCommand[] = [
  {
    name: 'human-monitor-command',
    args: struct('human-monitor-command', { 'command-line': str, '*cpu-index': int('int') }),
    run: async (args, { daemon }) => {
      const words = hmpWords(args['command-line'] as string);
      const [command, ...rest] = words;
      if (command === undefined) return '';
      if (command !== 'qemu-io') return `unknown command: '${command}'\r\n`;
      const qdev = rest[0] === '-d';
      const operands = qdev ? rest.slice(1) : rest;
      if (operands.length !== 2) return 'Error: qemu-io: expected a device and a command, e.g. qemu-io drive0 "read 0 512"\r\n';
      const [device, line] = operands;
      const node = daemon.graph.get(device);
      if (!node) return qdev ? `Error: Cannot find device='${device}'\r\n` : `Error: Cannot find device='' nor node-name='${device}'\r\n`;
      const print = (text: string) => process.stdout.write(text);
      const ok = await runIoCommand(node, line, print, print, { errorPrefix: '' });
      logEvent('debug', 'hmp-qemu-io', { device, command: line, ok });
      return '';
    },
  },
];
